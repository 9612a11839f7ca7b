"""XFS (v4 and v5/CRC): free space from every allocation group's free-space B+trees.

Each allocation group (AG) keeps its free extents twice: in the by-block B+tree (bnobt) and in
the by-size B+tree (cntbt). Both are walked at any depth, leaf and node blocks; an extent is
free only if both trees hold it (they must hold exactly the same set) and their total equals
the AGF's free-block count and longest extent. Every block read is checked: its magic, level,
record count, sibling links and node keys; on v5 (CRC) filesystems also its crc32c, its own
disk address, the filesystem UUID and the owning AG. The AGF must carry its magic, its AG
number and the AG's length (and, on v5, a valid checksum).

Counted as used whatever the trees say: every AG's header sectors (superblock copy, AGF, AGI,
AGFL), the blocks on the AG free list (AGFL: reserved for B+tree growth; they hold no file
data, but the oracles' treatment of them as free is not worth the risk), the internal log, and
everything past the end of the data device.

The on-disk trees are only the truth when the log holds nothing to replay. The log is read as
the kernel's log recovery reads it: the head is found by the cycle numbers stamped on every
512-byte log block, and the volume is accepted only when the last record before the head is
an unmount record ending exactly at the head (a cleanly unmounted or freshly made
filesystem). A log that needs recovery (a live or crashed system), an external log, an
unknown feature, the ``needsrepair`` flag or an unfinished mkfs raise UsageError: all used.

A realtime device is another disk (not this volume): only a note is added here; that disk has
no XFS superblock and counts as all used on its own.

Written here rather than taken from a library: dissect.xfs reads files and inodes, not the
free-space trees or the log, and the parse is a short B+tree walk per AG.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vmbak.usage.crc import crc32c
from vmbak.usage.model import FsUsage, UsageError, Volume, empty_ranges, normalize, subtract

NAME = "xfs"
SB_MAGIC = b"XFSB"
AGF_MAGIC = b"XAGF"
NULLAGBLOCK = 0xFFFFFFFF
MAX_LEVELS = 12  # far above what any real AG's tree needs (XFS itself allows 9 with 512 B blocks)

# feature bits accepted (anything else: UsageError)
V5_INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # ftype, spinodes, meta_uuid, bigtime,
#                                                                # nrext64, exchrange, parent
V5_INCOMPAT_META_UUID = 0x4
V5_INCOMPAT_NEEDSREPAIR = 0x10
V5_RO_COMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8  # finobt, rmapbt, reflink, inobtcount

SB_CRC_OFF = 224
AGF_CRC_OFF = 216
V4_BLOCK_HDR = 16
V5_BLOCK_HDR = 56
V5_BLOCK_CRC_OFF = 52

# the log
LOG_MAGIC = 0xFEEDBABE
BB = 512
LOG_HEADER_CYCLE_SIZE = 32 * 1024
LOG_WINDOW_BB = 2 * 8 * 256 * 1024 // BB  # twice what 8 in-flight 256 KiB log buffers can cover
XLOG_UNMOUNT_TRANS = 0x20
XFS_LOG_CLIENT = 0xAA


@dataclass
class Super:
    bs: int
    sectsize: int
    dblocks: int
    rblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    logstart: int  # fsblock number (AG-encoded); 0: external log
    logblocks: int
    v5: bool
    uuid: bytes  # the UUID stamped into v5 metadata blocks
    log_uuid: bytes  # the UUID log records carry
    label: str

    def ag_length(self, agno: int) -> int:
        return self.agblocks if agno < self.agcount - 1 else self.dblocks - (self.agcount - 1) * self.agblocks

    def fsb_to_byte(self, fsb: int) -> int:
        agno, agbno = fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1)
        if agno >= self.agcount or agbno >= self.ag_length(agno):
            raise UsageError(f"block {fsb} lies outside the filesystem")
        return (agno * self.agblocks + agbno) * self.bs


def probe(vol: Volume) -> bool:
    return vol.size >= 512 and vol.read(0, 4) == SB_MAGIC


def _crc_ok(buf: bytes, off: int) -> bool:
    stored, = struct.unpack_from("<I", buf, off)
    return crc32c(buf[:off] + b"\0\0\0\0" + buf[off + 4:]) == stored


def _log2(n: int) -> int:
    return n.bit_length() - 1


def parse_superblock(vol: Volume) -> Super:
    head = vol.read(0, 512)
    if head[:4] != SB_MAGIC:
        raise UsageError("bad superblock magic")
    bs, dblocks, rblocks = struct.unpack_from(">IQQ", head, 4)
    logstart, = struct.unpack_from(">Q", head, 48)
    agblocks, agcount, _rbmblocks, logblocks, versionnum, sectsize = struct.unpack_from(">IIIIHH", head, 84)
    blocklog, sectlog, _inodelog, _inopblog, agblklog, _rextslog, inprogress = struct.unpack_from(">7B", head, 120)
    if not 512 <= bs <= 65536 or bs & (bs - 1) or _log2(bs) != blocklog:
        raise UsageError(f"impossible block size {bs}")
    if not 512 <= sectsize <= 32768 or sectsize & (sectsize - 1) or _log2(sectsize) != sectlog or sectsize > bs:
        raise UsageError(f"impossible sector size {sectsize}")
    version = versionnum & 0xF
    if version not in (4, 5):
        raise UsageError(f"unknown superblock version {version}")
    v5 = version == 5
    sb = vol.read(0, sectsize)
    if v5 and not _crc_ok(sb, SB_CRC_OFF):
        raise UsageError("superblock checksum mismatch")
    if inprogress:
        raise UsageError("mkfs did not finish (sb_inprogress)")
    if agcount < 1 or agblocks < 5 or agblklog != (agblocks - 1).bit_length():
        raise UsageError("impossible allocation group geometry")
    if not (agcount - 1) * agblocks < dblocks <= agcount * agblocks:
        raise UsageError("block count does not match the allocation groups")
    if dblocks * bs > vol.size:
        raise UsageError(f"filesystem ({dblocks * bs} bytes) is larger than its volume ({vol.size} bytes)")
    fs_uuid = sb[32:48]
    meta_uuid = fs_uuid
    if v5:
        _compat, ro_compat, incompat, _log_incompat = struct.unpack_from(">IIII", sb, 208)
        if incompat & V5_INCOMPAT_NEEDSREPAIR:
            raise UsageError("the filesystem is flagged as needing xfs_repair")
        if incompat & ~V5_INCOMPAT_KNOWN:
            raise UsageError(f"unknown incompatible features {incompat & ~V5_INCOMPAT_KNOWN:#x}")
        if ro_compat & ~V5_RO_COMPAT_KNOWN:
            raise UsageError(f"unknown read-only-compatible features {ro_compat & ~V5_RO_COMPAT_KNOWN:#x}")
        if incompat & V5_INCOMPAT_META_UUID:
            meta_uuid = sb[248:264]
    label = sb[108:120].split(b"\0", 1)[0].decode("utf-8", "replace")
    return Super(bs, sectsize, dblocks, rblocks, agblocks, agcount, agblklog, logstart, logblocks, v5,
                 meta_uuid, fs_uuid, label)


# ---------------------------------------------------------------------------- the log
class _Log:
    """Basic-block (512 B) access to the internal log, wrapping around its end."""

    def __init__(self, vol: Volume, sb: Super) -> None:
        self.vol = vol
        self.start = sb.fsb_to_byte(sb.logstart)
        self.nbb = sb.logblocks * sb.bs // BB
        if sb.logblocks < 2 or self.start + self.nbb * BB > sb.dblocks * sb.bs:
            raise UsageError("the internal log lies outside the filesystem")
        # the log may not cross an AG boundary
        agno = sb.logstart >> sb.agblklog
        if (sb.logstart & ((1 << sb.agblklog) - 1)) + sb.logblocks > sb.ag_length(agno):
            raise UsageError("the internal log crosses an allocation group boundary")

    def read(self, bb: int, count: int) -> bytes:
        """``count`` basic blocks starting at ``bb`` (taken modulo the log size)."""
        bb %= self.nbb
        out = []
        while count > 0:
            n = min(count, self.nbb - bb)
            out.append(self.vol.read(self.start + bb * BB, n * BB))
            count -= n
            bb = 0
        return b"".join(out)

    @staticmethod
    def cycle_of(block: bytes) -> int:
        w0, w1 = struct.unpack_from(">II", block, 0)
        return w1 if w0 == LOG_MAGIC else w0

    def cycle(self, bb: int) -> int:
        return self.cycle_of(self.read(bb, 1))


def check_log_clean(vol: Volume, sb: Super) -> None:
    """Raise UsageError unless the internal log provably holds nothing to replay."""
    if sb.logstart == 0:
        raise UsageError("external log: whether it needs recovery cannot be told from this volume")
    log = _Log(vol, sb)
    nbb = log.nbb
    first, last = log.cycle(0), log.cycle(nbb - 1)
    if first == 0:
        raise UsageError("the log has been zeroed or never written")
    if first == last:
        head, cur = 0, first  # the whole log is of one cycle: the head is at the (wrapped) end
    elif first == (last + 1) & 0xFFFFFFFF:
        # binary search for the first block of the older cycle, as xlog_find_head does
        lo, hi = 0, nbb - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if log.cycle(mid) == last:
                hi = mid
            else:
                lo = mid
        head, cur = hi, first
    else:
        raise UsageError("log cycle numbers do not make sense")
    # The blocks before the head must all carry the current cycle: a block of an older cycle
    # there is a write that never completed, and the real head lies before it.
    window = min(nbb, LOG_WINDOW_BB)
    back = window if first == last else min(window, head)
    raw = log.read(head - back, back) if back else b""
    cycles = [log.cycle_of(raw[i * BB:i * BB + 8]) for i in range(back)]
    if any(c != cur for c in cycles):
        raise UsageError("the log has a torn write near its head: it needs recovery")
    # the last record header before the head
    rec = None
    for i in range(back - 1, -1, -1):
        w0, w1 = struct.unpack_from(">II", raw, i * BB)
        if w0 == LOG_MAGIC and w1 == cur:
            rec = i
            break
    if rec is None:
        raise UsageError("no log record found before the log head")
    hdr = raw[rec * BB:(rec + 1) * BB]
    version, h_len = struct.unpack_from(">II", hdr, 8)
    num_logops, = struct.unpack_from(">I", hdr, 40)
    hblks = 1
    if version & 2:
        if hdr[304:320] != sb.log_uuid:
            raise UsageError("the log belongs to another filesystem")
        h_size, = struct.unpack_from(">I", hdr, 320)
        if h_size > LOG_HEADER_CYCLE_SIZE:
            hblks = -(-h_size // LOG_HEADER_CYCLE_SIZE)
    rec_bb = head - back + rec
    after = (rec_bb + hblks + -(-h_len // BB)) % nbb
    if after != head % nbb or num_logops != 1 or h_len < 12:
        raise UsageError("the log needs recovery (its last record is not an unmount record)")
    op = log.read(rec_bb + hblks, 1)
    clientid, flags = op[8], op[9]
    if clientid != XFS_LOG_CLIENT or not flags & XLOG_UNMOUNT_TRANS:
        raise UsageError("the log needs recovery (its last record is not an unmount record)")


# ---------------------------------------------------------------------------- the free-space trees
class _TreeReader:
    """Reads and checks the blocks of one AG's short-form B+trees."""

    def __init__(self, vol: Volume, sb: Super, agno: int, length: int) -> None:
        self.vol, self.sb, self.agno, self.length = vol, sb, agno, length
        self.hdr = V5_BLOCK_HDR if sb.v5 else V4_BLOCK_HDR
        self.leaf_max = (sb.bs - self.hdr) // 8
        self.node_max = (sb.bs - self.hdr) // 12

    def block(self, agbno: int, magic: bytes, level: int, root: bool = False) -> tuple[bytes, int, int, int]:
        """(block, numrecs, leftsib, rightsib) of a tree block, checked. Only a root leaf may
        be empty (an AG with no free space)."""
        if not 0 < agbno < self.length:
            raise UsageError(f"AG {self.agno}: tree pointer {agbno} outside the AG")
        off = (self.agno * self.sb.agblocks + agbno) * self.sb.bs
        buf = self.vol.read(off, self.sb.bs)
        if buf[:4] != magic:
            raise UsageError(f"AG {self.agno}: block {agbno} is not a {magic.decode()} B+tree block")
        lvl, nrecs, left, right = struct.unpack_from(">HHII", buf, 4)
        if lvl != level:
            raise UsageError(f"AG {self.agno}: B+tree block {agbno} has level {lvl}, expected {level}")
        if not (0 if root and level == 0 else 1) <= nrecs <= (self.leaf_max if level == 0 else self.node_max):
            raise UsageError(f"AG {self.agno}: B+tree block {agbno} has {nrecs} records")
        if self.sb.v5:
            blkno, = struct.unpack_from(">Q", buf, 16)
            owner, = struct.unpack_from(">I", buf, 48)
            if not _crc_ok(buf, V5_BLOCK_CRC_OFF):
                raise UsageError(f"AG {self.agno}: B+tree block {agbno} checksum mismatch")
            if blkno != off // BB or buf[32:48] != self.sb.uuid or owner != self.agno:
                raise UsageError(f"AG {self.agno}: B+tree block {agbno} belongs elsewhere")
        return buf, nrecs, left, right

    def walk(self, root: int, levels: int, magic: bytes, key_cols: int) -> np.ndarray:
        """All leaf records of the tree in tree order, as int64 (n, 2) pairs. A node's key for
        a child must equal the child's first record or key in its first ``key_cols`` fields
        (the kernel compares by-block keys by start block only, by-size keys by both)."""
        if not 1 <= levels <= MAX_LEVELS:
            raise UsageError(f"AG {self.agno}: implausible B+tree height {levels}")
        seen: set[int] = set()
        current = [root]
        keys: np.ndarray | None = None  # each current block's key in its parent
        for level in range(levels - 1, -1, -1):
            nxt: list[int] = []
            recs: list[np.ndarray] = []
            prev = NULLAGBLOCK
            for i, agbno in enumerate(current):
                if agbno in seen:
                    raise UsageError(f"AG {self.agno}: B+tree block {agbno} is reachable twice")
                seen.add(agbno)
                buf, n, left, right = self.block(agbno, magic, level, root=level == levels - 1)
                want_right = current[i + 1] if i + 1 < len(current) else NULLAGBLOCK
                if left != prev or right != want_right:
                    raise UsageError(f"AG {self.agno}: B+tree sibling links of block {agbno} are broken")
                prev = agbno
                r = np.frombuffer(buf, ">u4", 2 * n, self.hdr).reshape(n, 2).astype(np.int64)
                # a node's key for a child is the child's lowest key or record
                if keys is not None and not np.array_equal(r[0, :key_cols], keys[i, :key_cols]):
                    raise UsageError(f"AG {self.agno}: B+tree key of block {agbno} does not match it")
                recs.append(r)
                if level:
                    nxt.extend(int(p) for p in np.frombuffer(buf, ">u4", n, self.hdr + self.node_max * 8))
            out = np.concatenate(recs) if recs else np.zeros((0, 2), np.int64)
            if level == 0:
                return out
            keys = out
            current = nxt
        raise AssertionError("unreachable")


def _ag_free(vol: Volume, sb: Super, agno: int) -> np.ndarray:
    """Free extents (agbno, count) of one AG, proven by both trees and the AGF; sorted."""
    length = sb.ag_length(agno)
    ag_off = agno * sb.agblocks * sb.bs
    agf = vol.read(ag_off + sb.sectsize, sb.sectsize)
    if agf[:4] != AGF_MAGIC:
        raise UsageError(f"AG {agno}: bad AGF magic")
    (version, seqno, agf_length, bno_root, cnt_root, _rmap_root, bno_level, cnt_level, _rmap_level,
     flfirst, fllast, flcount, freeblks, longest) = struct.unpack_from(">14I", agf, 4)
    if version != 1 or seqno != agno or agf_length != length:
        raise UsageError(f"AG {agno}: AGF does not describe this allocation group")
    if sb.v5 and (not _crc_ok(agf, AGF_CRC_OFF) or agf[64:80] != sb.uuid):
        raise UsageError(f"AG {agno}: AGF checksum or UUID mismatch")
    if freeblks > length or longest > freeblks:
        raise UsageError(f"AG {agno}: AGF free counts are impossible")
    tr = _TreeReader(vol, sb, agno, length)
    v = "3" if sb.v5 else "T"
    bno = tr.walk(bno_root, bno_level, b"AB" + v.encode() + b"B", 1)
    cnt = tr.walk(cnt_root, cnt_level, b"AB" + v.encode() + b"C", 2)
    # by-block: ascending and disjoint; inside the AG; after the AG headers
    first_free = -(-4 * sb.sectsize // sb.bs)
    if len(bno):
        start, count = bno[:, 0], bno[:, 1]
        if (count <= 0).any() or start[0] < first_free or (start + count > length).any():
            raise UsageError(f"AG {agno}: a free extent lies outside the AG's free area")
        if (start[1:] < start[:-1] + count[:-1]).any():
            raise UsageError(f"AG {agno}: by-block free extents are out of order or overlap")
    # by-size: ordered by (count, start); must hold exactly the same extents
    if len(cnt) != len(bno):
        raise UsageError(f"AG {agno}: the two free-space trees disagree")
    if len(cnt):
        order = np.lexsort((cnt[:, 0], cnt[:, 1]))
        if not np.array_equal(order, np.arange(len(cnt))):
            raise UsageError(f"AG {agno}: by-size free extents are out of order")
        if not np.array_equal(cnt[np.lexsort((cnt[:, 1], cnt[:, 0]))], bno):
            raise UsageError(f"AG {agno}: the two free-space trees disagree")
    total_free = int(bno[:, 1].sum()) if len(bno) else 0
    max_free = int(bno[:, 1].max()) if len(bno) else 0
    if total_free != freeblks or max_free != longest:
        raise UsageError(f"AG {agno}: free-space trees ({total_free} blocks) disagree with the AGF ({freeblks})")
    # the AG free list: reserved blocks, counted as used (they are not in the trees anyway)
    hdr = 36 if sb.v5 else 0
    agfl_size = (sb.sectsize - hdr) // 4
    agfl_blocks: list[int] = []
    if flcount:
        if flfirst >= agfl_size or fllast >= agfl_size or flcount > agfl_size:
            raise UsageError(f"AG {agno}: AGFL indexes out of range")
        agfl = vol.read(ag_off + 3 * sb.sectsize, sb.sectsize)
        entries = struct.unpack_from(f">{agfl_size}I", agfl, hdr)
        i = flfirst
        for _ in range(flcount):
            agfl_blocks.append(entries[i])
            i = (i + 1) % agfl_size
    free = np.stack((bno[:, 0], bno[:, 0] + bno[:, 1]), axis=1)
    if agfl_blocks:
        a = np.array(agfl_blocks, np.int64)
        free = subtract(free, np.stack((a, a + 1), axis=1))
    return free


def analyze(vol: Volume) -> FsUsage:
    sb = parse_superblock(vol)
    check_log_clean(vol, sb)
    parts = []
    for agno in range(sb.agcount):
        ext = _ag_free(vol, sb, agno)
        if len(ext):
            parts.append((ext + agno * sb.agblocks) * sb.bs)
    free = normalize(np.concatenate(parts)) if parts else empty_ranges()
    log_start = sb.fsb_to_byte(sb.logstart)
    free = subtract(free, np.array([[log_start, log_start + sb.logblocks * sb.bs]], np.int64))
    notes = []
    if sb.rblocks:
        notes.append("has a realtime device: that device is another disk and counts as all used there")
    return FsUsage("xfs", free, size=sb.dblocks * sb.bs, label=sb.label, unit=sb.bs, notes=notes)

