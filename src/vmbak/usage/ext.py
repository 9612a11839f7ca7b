"""ext2, ext3 and ext4: free blocks from the block bitmaps.

Handles 64bit and 32-bit descriptors, flex_bg, meta_bg, sparse_super and sparse_super2, groups
with BLOCK_UNINIT (their metadata is computed, as the kernel does), bigalloc (bitmaps count
clusters), and filesystems whose journal still needs recovery: then every block bitmap copy
that the journal would replay is merged in, so a block allocated by a transaction that has not
reached its home location yet still counts as used.

Safety nets, each of which turns the volume into "all used" (UsageError) or a group into
"all used": descriptors pointing outside the filesystem, a group whose bitmap claims more free
clusters than its descriptor records (on a clean filesystem), a journal that would change the
group descriptors' layout, an external journal, fast-commit blocks waiting for replay.

Written here rather than taken from a library: dissect.extfs reads files, not the allocation
state, and the whole parse is a handful of numpy operations on the bitmaps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vmbak.usage.crc import crc32c
from vmbak.usage.model import FsUsage, UsageError, Volume, empty_ranges, normalize, runs_of, subtract

NAME = "ext"
MAGIC = 0xEF53

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_FAST_COMMIT = 0x400
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
RO_SPARSE_SUPER = 0x1
RO_GDT_CSUM = 0x10
RO_BIGALLOC = 0x200
RO_METADATA_CSUM = 0x400
INCOMPAT_CSUM_SEED = 0x2000
BG_BLOCK_UNINIT = 0x2

JBD2_MAGIC = 0xC03B3998
JBD2_DESCRIPTOR, JBD2_COMMIT, JBD2_SB_V1, JBD2_SB_V2, JBD2_REVOKE = 1, 2, 3, 4, 5
JBD2_INCOMPAT_64BIT, JBD2_INCOMPAT_CSUM_V2, JBD2_INCOMPAT_CSUM_V3, JBD2_INCOMPAT_FAST_COMMIT = 0x2, 0x8, 0x10, 0x20
JBD2_FLAG_ESCAPE, JBD2_FLAG_SAME_UUID, JBD2_FLAG_LAST_TAG = 1, 2, 8

GROUPS_PER_PASS = 2048  # bounds the memory of the bitmap unpacking


def probe(vol: Volume) -> bool:
    if vol.size < 2048:
        return False
    return struct.unpack("<H", vol.read(1024 + 56, 2))[0] == MAGIC


@dataclass
class _Geometry:
    bs: int
    blocks: int
    first_data_block: int
    bpg: int  # blocks per group
    cpg: int  # clusters per group
    ratio: int  # blocks per cluster
    ipg: int
    inode_size: int
    groups: int
    desc_size: int
    compat: int
    incompat: int
    ro_compat: int
    reserved_gdt: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    mmp_block: int
    journal_inum: int

    @property
    def desc_per_block(self) -> int:
        return self.bs // self.desc_size

    @property
    def sb_block(self) -> int:
        return 1024 // self.bs  # the block holding the primary superblock (1 for 1 KiB blocks)

    def group_first_block(self, g: int) -> int:
        return self.first_data_block + g * self.bpg

    def has_super(self, g: int) -> bool:
        if g == 0:
            return True
        if self.compat & COMPAT_SPARSE_SUPER2:
            return g in self.backup_bgs
        if g <= 1 or not self.ro_compat & RO_SPARSE_SUPER:
            return True
        if g % 2 == 0:
            return False
        for base in (3, 5, 7):
            n = base
            while n < g:
                n *= base
            if n == g:
                return True
        return False

    @property
    def gdt_blocks(self) -> int:
        return -(-self.groups // self.desc_per_block)


def _geometry(sb: bytes, vol_size: int) -> _Geometry:
    (inodes, blocks_lo, _r, _free_lo, _free_inodes, first_data_block, log_bs, log_cs, bpg, cpg, ipg) = \
        struct.unpack_from("<11I", sb, 0)
    if struct.unpack_from("<H", sb, 56)[0] != MAGIC:
        raise UsageError("bad superblock magic")
    rev = struct.unpack_from("<I", sb, 76)[0]
    inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    reserved_gdt = struct.unpack_from("<H", sb, 206)[0]
    journal_inum = struct.unpack_from("<I", sb, 224)[0]
    desc_size = struct.unpack_from("<H", sb, 254)[0]
    first_meta_bg = struct.unpack_from("<I", sb, 260)[0]
    blocks_hi = struct.unpack_from("<I", sb, 336)[0]
    mmp_block = struct.unpack_from("<Q", sb, 360)[0]
    backup_bgs = struct.unpack_from("<II", sb, 0x24C)
    if log_bs > 6:
        raise UsageError(f"impossible block size (log {log_bs})")
    bs = 1024 << log_bs
    is64 = bool(incompat & INCOMPAT_64BIT)
    blocks = blocks_lo | (blocks_hi << 32 if is64 else 0)
    if rev >= 1 and (inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1)):
        raise UsageError(f"impossible inode size {inode_size}")
    if is64:
        if desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1):
            raise UsageError(f"impossible descriptor size {desc_size}")
    else:
        desc_size = 32
    if ro_compat & RO_BIGALLOC:
        if log_cs < log_bs or log_cs - log_bs > 16:
            raise UsageError("impossible cluster size")
        ratio = 1 << (log_cs - log_bs)
        if first_data_block != 0:
            raise UsageError("bigalloc with a non-zero first data block")
    else:
        ratio = 1
        cpg = bpg
    if cpg == 0 or cpg > 8 * bs or bpg != cpg * ratio:
        raise UsageError("impossible blocks per group")
    if first_data_block != (1 if bs == 1024 and ratio == 1 else 0):
        raise UsageError(f"unexpected first data block {first_data_block}")
    if blocks <= first_data_block:
        raise UsageError("filesystem has no blocks")
    if blocks * bs > vol_size:
        raise UsageError(f"filesystem ({blocks * bs} bytes) is larger than its volume ({vol_size} bytes)")
    groups = -(-(blocks - first_data_block) // bpg)
    if ipg == 0 or ipg > 8 * bs or inodes > groups * ipg:
        raise UsageError("impossible inode counts")
    if incompat & INCOMPAT_JOURNAL_DEV:
        raise UsageError("this is an external journal device")
    return _Geometry(bs, blocks, first_data_block, bpg, cpg, ratio, ipg, inode_size, groups, desc_size,
                     compat, incompat, ro_compat, reserved_gdt, first_meta_bg, (backup_bgs[0], backup_bgs[1]),
                     mmp_block, journal_inum)


_DESC32 = np.dtype([("bb", "<u4"), ("ib", "<u4"), ("it", "<u4"), ("free", "<u2"), ("fi", "<u2"),
                    ("dirs", "<u2"), ("flags", "<u2")])
_DESC64_HI = np.dtype([("bb", "<u4"), ("ib", "<u4"), ("it", "<u4"), ("free", "<u2")])


def _descriptor_blocks(g: _Geometry) -> list[int]:
    """Block numbers of the group descriptor table, in order."""
    n = g.gdt_blocks
    if not g.incompat & INCOMPAT_META_BG:
        return [g.sb_block + 1 + i for i in range(n)]
    out = []
    for i in range(n):
        if i < g.first_meta_bg:
            out.append(g.sb_block + 1 + i)
        else:
            grp = i * g.desc_per_block
            out.append(g.group_first_block(grp) + (1 if g.has_super(grp) else 0))
    return out


def _read_blocks(vol: Volume, bs: int, blocks: list[int]) -> bytes:
    """Read many blocks, coalescing consecutive ones into single reads."""
    parts = []
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j - i < 4095:
            j += 1
        parts.append(vol.read(blocks[i] * bs, (j - i + 1) * bs))
        i = j + 1
    return b"".join(parts)


def _descriptors(g: _Geometry, raw: bytes) -> dict[str, np.ndarray]:
    arr = np.frombuffer(raw, np.uint8)[: g.groups * g.desc_size].reshape(g.groups, g.desc_size)
    lo = np.ascontiguousarray(arr[:, :20]).view(_DESC32).reshape(-1)
    out = {k: lo[k].astype(np.int64) for k in ("bb", "ib", "it", "free", "flags")}
    if g.desc_size >= 64:
        hi = np.ascontiguousarray(arr[:, 32:46]).view(_DESC64_HI).reshape(-1)
        for k in ("bb", "ib", "it"):
            out[k] |= hi[k].astype(np.int64) << 32
        out["free"] |= hi["free"].astype(np.int64) << 16
    if not g.ro_compat & (RO_GDT_CSUM | RO_METADATA_CSUM):
        out["flags"] = np.zeros(g.groups, np.int64)  # the flags only mean something with checksums
    return out


def _metadata_ranges(g: _Geometry, d: dict[str, np.ndarray]) -> np.ndarray:
    """Byte ranges that are metadata whatever the bitmaps say (superblocks, GDT, bitmaps, inode tables)."""
    bs = g.bs
    itb = -(-g.ipg * g.inode_size // bs)
    ranges = [(0, (g.first_data_block + 1) * bs + 1024)]  # boot block and primary superblock
    meta_bg = bool(g.incompat & INCOMPAT_META_BG)
    dpb = g.desc_per_block
    for grp in range(g.groups):
        start = g.group_first_block(grp)
        n = 0
        if g.has_super(grp):
            n = 1
            if not meta_bg or grp < g.first_meta_bg * dpb:
                n += (g.first_meta_bg if meta_bg else g.gdt_blocks) + g.reserved_gdt
        if meta_bg and grp >= g.first_meta_bg * dpb:
            idx = grp % dpb
            if idx in (0, 1, dpb - 1):
                n += 1
        if n:
            ranges.append((start * bs, (start + n) * bs))
    for b in _descriptor_blocks(g):
        ranges.append((b * bs, (b + 1) * bs))
    if g.incompat & INCOMPAT_MMP and g.mmp_block:
        ranges.append((g.mmp_block * bs, (g.mmp_block + 1) * bs))
    arr = np.array(ranges, np.int64)
    per_group = np.concatenate([
        np.stack((d["bb"] * bs, (d["bb"] + 1) * bs), axis=1),
        np.stack((d["ib"] * bs, (d["ib"] + 1) * bs), axis=1),
        np.stack((d["it"] * bs, (d["it"] + itb) * bs), axis=1),
    ])
    out = np.concatenate((arr, per_group))
    cb = bs * g.ratio  # a cluster holding any metadata is used as a whole
    out[:, 0] = out[:, 0] // cb * cb
    out[:, 1] = -(-out[:, 1] // cb) * cb
    return normalize(out)


def _check_descriptors(g: _Geometry, d: dict[str, np.ndarray]) -> None:
    itb = -(-g.ipg * g.inode_size // g.bs)
    for k, n in (("bb", 1), ("ib", 1), ("it", itb)):
        v = d[k]
        if (v <= g.first_data_block).any() or (v + n > g.blocks).any():
            raise UsageError("a group descriptor points outside the filesystem")
    if (d["free"] > g.cpg).any():
        raise UsageError("a group descriptor records more free clusters than a group has")


# ---------------------------------------------------------------------------- backup copies
_GEOMETRY_FIELDS = [(4, "<I"), (20, "<I"), (24, "<I"), (28, "<I"), (32, "<I"), (36, "<I"), (40, "<I"),
                    (88, "<H"), (206, "<H"), (254, "<H"), (260, "<I"), (336, "<I")]


def _check_backup(vol: Volume, g: _Geometry, sb: bytes, d: dict[str, np.ndarray]) -> bool:
    """Compare geometry and descriptor locations with the first backup superblock and GDT.

    Nothing but mkfs, resize and tune2fs writes these fields, and all of them update the
    backups too, so a disagreement means the primary copy is damaged. Returns False when the
    filesystem has no backup to compare with.
    """
    backup = next((grp for grp in range(1, g.groups) if g.has_super(grp)), None)
    if backup is None:
        return False
    start = g.group_first_block(backup)
    bsb = vol.read(start * g.bs, 1024)
    if struct.unpack_from("<H", bsb, 56)[0] != MAGIC:
        raise UsageError(f"backup superblock in group {backup} is missing")
    for off, fmt in _GEOMETRY_FIELDS:
        if struct.unpack_from(fmt, sb, off) != struct.unpack_from(fmt, bsb, off):
            raise UsageError(f"primary and backup superblocks disagree (offset {off})")
    masks = ((92, COMPAT_SPARSE_SUPER2), (96, INCOMPAT_64BIT | INCOMPAT_META_BG | INCOMPAT_FLEX_BG),
             (100, RO_BIGALLOC | RO_SPARSE_SUPER))
    for off, mask in masks:
        if struct.unpack_from("<I", sb, off)[0] & mask != struct.unpack_from("<I", bsb, off)[0] & mask:
            raise UsageError("primary and backup superblocks disagree about features")
    nblk = g.first_meta_bg if g.incompat & INCOMPAT_META_BG else g.gdt_blocks
    nblk = min(nblk, g.gdt_blocks)
    if nblk:
        n = min(g.groups, nblk * g.desc_per_block)
        raw = vol.read((start + 1) * g.bs, nblk * g.bs)
        sub = _Geometry(**{**g.__dict__, "groups": n})
        bd = _descriptors(sub, raw)
        for k in ("bb", "ib", "it"):
            if not np.array_equal(bd[k], d[k][:n]):
                raise UsageError("primary and backup group descriptors disagree")
    return True


# ---------------------------------------------------------------------------- checksums
def _crc32c_raw(seed: int, data: bytes) -> int:
    """The kernel's crc32c_le(seed, data): no inversion before or after (crc32c.crc32c inverts both)."""
    return ~crc32c(data, ~seed & 0xFFFFFFFF) & 0xFFFFFFFF


def _csum_seed(sb: bytes) -> int:
    if struct.unpack_from("<I", sb, 96)[0] & INCOMPAT_CSUM_SEED:
        return struct.unpack_from("<I", sb, 0x270)[0]
    return _crc32c_raw(0xFFFFFFFF, sb[104:120])


def _check_superblock_csum(sb: bytes) -> None:
    if sb[0x175] != 1:
        raise UsageError(f"unknown metadata checksum type {sb[0x175]}")
    if _crc32c_raw(0xFFFFFFFF, sb[:0x3FC]) != struct.unpack_from("<I", sb, 0x3FC)[0]:
        raise UsageError("superblock checksum mismatch")


def _check_descriptor_csums(g: _Geometry, raw: bytes, seed: int) -> None:
    for grp in range(g.groups):
        desc = raw[grp * g.desc_size: (grp + 1) * g.desc_size]
        c = _crc32c_raw(seed, struct.pack("<I", grp))
        c = _crc32c_raw(c, desc[:0x1E] + b"\0\0" + desc[0x20:])
        if c & 0xFFFF != struct.unpack_from("<H", desc, 0x1E)[0]:
            raise UsageError(f"group descriptor {grp} checksum mismatch")


def _bitmap_csum_ok(g: _Geometry, raw_desc: bytes, grp: int, bitmap: np.ndarray, seed: int) -> bool:
    c = _crc32c_raw(seed, bitmap[: g.cpg // 8].tobytes())
    desc = raw_desc[grp * g.desc_size: (grp + 1) * g.desc_size]
    stored = struct.unpack_from("<H", desc, 0x18)[0]
    if g.desc_size >= 64:
        stored |= struct.unpack_from("<H", desc, 0x38)[0] << 16
        return c == stored
    return c & 0xFFFF == stored


# ---------------------------------------------------------------------------- inode block maps
def _read_inode(vol: Volume, g: _Geometry, d: dict[str, np.ndarray], ino: int) -> bytes:
    if ino < 1 or ino > g.groups * g.ipg:
        raise UsageError(f"inode {ino} out of range")
    grp, idx = divmod(ino - 1, g.ipg)
    return vol.read(int(d["it"][grp]) * g.bs + idx * g.inode_size, 128)


def _inode_blocks(vol: Volume, g: _Geometry, inode: bytes, nblocks: int) -> np.ndarray:
    """Physical block of each of the first ``nblocks`` logical blocks of an inode (0 = hole)."""
    out = np.zeros(nblocks, np.int64)
    flags = struct.unpack_from("<I", inode, 0x20)[0]
    iblock = inode[0x28:0x28 + 60]
    budget = [4096]  # tree blocks we are willing to read: a loop in a damaged tree ends here

    def fetch(block: int) -> bytes:
        budget[0] -= 1
        if budget[0] < 0:
            raise UsageError("journal inode's block map is too large or loops")
        if block <= 0 or block >= g.blocks:
            raise UsageError("journal inode points outside the filesystem")
        return vol.read(block * g.bs, g.bs)

    if flags & 0x80000:  # extents
        def walk(node: bytes, depth_left: int) -> None:
            magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
            if magic != 0xF30A or depth > depth_left or 12 + 12 * entries > len(node):
                raise UsageError("damaged extent tree in the journal inode")
            for i in range(entries):
                e = node[12 + 12 * i: 24 + 12 * i]
                if depth == 0:
                    lblk, ln, hi, lo = struct.unpack("<IHHI", e)
                    if ln > 32768:
                        ln -= 32768
                    phys = lo | (hi << 32)
                    if lblk < nblocks:
                        n = min(ln, nblocks - lblk)
                        out[lblk:lblk + n] = np.arange(phys, phys + n)
                else:
                    _lblk, lo, hi, _u = struct.unpack("<IIHH", e)
                    walk(fetch(lo | (hi << 32)), depth - 1)
        walk(iblock, 5)
    else:  # ext2/3 block map: 12 direct, then single, double and triple indirect
        ptrs = struct.unpack("<15I", iblock)
        per = g.bs // 4
        pos = 0

        def indirect(block: int, level: int) -> None:
            nonlocal pos
            span = per ** level
            if block == 0:
                pos += span
                return
            if level == 0:
                if pos < nblocks:
                    out[pos] = block
                pos += 1
                return
            for p in struct.unpack(f"<{per}I", fetch(block)):
                if pos >= nblocks:
                    return
                indirect(p, level - 1)

        for i in range(12):
            if pos < nblocks:
                out[pos] = ptrs[i]
            pos += 1
        for level, p in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if pos >= nblocks:
                break
            indirect(p, level)
    if ((out < 0) | (out >= g.blocks)).any():
        raise UsageError("journal inode points outside the filesystem")
    return out


# ---------------------------------------------------------------------------- journal replay view
def _journal_copies(vol: Volume, g: _Geometry, d: dict[str, np.ndarray]) -> dict[int, list[bytes]]:
    """Every block copy the journal would replay (committed or not), by home block number."""
    if not g.compat & COMPAT_HAS_JOURNAL or g.journal_inum == 0:
        raise UsageError("needs journal recovery but has no internal journal")
    inode = _read_inode(vol, g, d, g.journal_inum)
    size = struct.unpack_from("<I", inode, 4)[0] | (struct.unpack_from("<I", inode, 0x6C)[0] << 32)
    nblocks = size // g.bs
    if nblocks < 2:
        raise UsageError("journal inode is empty")
    bmap = _inode_blocks(vol, g, inode, nblocks)
    if bmap[0] == 0:
        raise UsageError("journal superblock is missing")
    jsb = vol.read(int(bmap[0]) * g.bs, 1024)
    magic, btype, _seq = struct.unpack_from(">III", jsb, 0)
    if magic != JBD2_MAGIC or btype not in (JBD2_SB_V1, JBD2_SB_V2):
        raise UsageError("bad journal superblock")
    jbs, maxlen, first, seq, start = struct.unpack_from(">IIIII", jsb, 12)
    incompat = struct.unpack_from(">I", jsb, 40)[0] if btype == JBD2_SB_V2 else 0
    if start == 0:
        return {}
    if jbs != g.bs or maxlen > nblocks or not 0 < first < maxlen or not first <= start < maxlen:
        raise UsageError("journal superblock geometry does not fit its inode")
    if incompat & JBD2_INCOMPAT_FAST_COMMIT or g.compat & COMPAT_FAST_COMMIT:
        num_fc = struct.unpack_from(">I", jsb, 84)[0] if btype == JBD2_SB_V2 else 0
        if num_fc or incompat & JBD2_INCOMPAT_FAST_COMMIT:
            raise UsageError("fast-commit journal needs replay")
    csum3 = bool(incompat & JBD2_INCOMPAT_CSUM_V3)
    if csum3:
        tag_bytes = 16
    else:
        tag_bytes = 12 + (2 if incompat & JBD2_INCOMPAT_CSUM_V2 else 0)
        if not incompat & JBD2_INCOMPAT_64BIT:
            tag_bytes -= 4
    tail = 4 if incompat & (JBD2_INCOMPAT_CSUM_V2 | JBD2_INCOMPAT_CSUM_V3) else 0
    is64 = bool(incompat & JBD2_INCOMPAT_64BIT)

    def jread(pos: int) -> bytes:
        phys = int(bmap[pos])
        if phys == 0:
            raise UsageError("hole in the journal")
        return vol.read(phys * g.bs, g.bs)

    def nxt(pos: int) -> int:
        pos += 1
        return first if pos >= maxlen else pos

    copies: dict[int, list[bytes]] = {}
    pos = start
    steps = 0
    while steps < maxlen:
        blk = jread(pos)
        magic, btype, bseq = struct.unpack_from(">III", blk, 0)
        if magic != JBD2_MAGIC or bseq != seq:
            break
        steps += 1
        if btype == JBD2_DESCRIPTOR:
            off = 12
            end = g.bs - tail
            pos = nxt(pos)
            while off + tag_bytes <= end:
                if csum3:
                    lo, flags, hi = struct.unpack_from(">III", blk, off)
                else:
                    lo = struct.unpack_from(">I", blk, off)[0]
                    flags = struct.unpack_from(">H", blk, off + 6)[0]
                    hi = struct.unpack_from(">I", blk, off + 8)[0] if is64 else 0
                target = lo | (hi << 32 if is64 else 0)
                off += tag_bytes
                if not flags & JBD2_FLAG_SAME_UUID:
                    off += 16
                data = jread(pos)
                steps += 1
                if flags & JBD2_FLAG_ESCAPE:
                    data = struct.pack(">I", JBD2_MAGIC) + data[4:]
                copies.setdefault(target, []).append(data)
                pos = nxt(pos)
                if flags & JBD2_FLAG_LAST_TAG:
                    break
            continue
        if btype == JBD2_COMMIT:
            seq = (seq + 1) & 0xFFFFFFFF
        elif btype != JBD2_REVOKE:
            break
        pos = nxt(pos)
    return copies


def _apply_journal(g: _Geometry, d: dict[str, np.ndarray], copies: dict[int, list[bytes]],
                   desc_blocks: list[int]) -> dict[int, list[bytes]]:
    """Check the journal does not move metadata; return the journaled copies of block bitmaps."""
    for i, b in enumerate(desc_blocks):
        for raw in copies.get(b, []):
            lo = i * g.desc_per_block
            hi = min(g.groups, lo + g.desc_per_block)
            if hi <= lo:
                continue
            sub = _Geometry(**{**g.__dict__, "groups": hi - lo})
            jd = _descriptors(sub, raw)
            for k in ("bb", "ib", "it"):
                if not np.array_equal(jd[k], d[k][lo:hi]):
                    raise UsageError("the journal changes the group descriptor layout (resize in progress?)")
    sb_offset = 1024 if g.bs > 1024 else 0  # where the superblock sits inside its block
    for raw in copies.get(g.sb_block, []):
        sb = raw[sb_offset: sb_offset + 1024]
        blocks_lo = struct.unpack_from("<I", sb, 4)[0]
        blocks_hi = struct.unpack_from("<I", sb, 336)[0] if g.incompat & INCOMPAT_64BIT else 0
        if blocks_lo | (blocks_hi << 32) != g.blocks:
            raise UsageError("the journal changes the filesystem size (resize in progress?)")
    return copies


# ---------------------------------------------------------------------------- the analysis
def analyze(vol: Volume) -> FsUsage:
    sb = vol.read(1024, 1024)
    g = _geometry(sb, vol.size)
    notes: list[str] = []
    desc_blocks = _descriptor_blocks(g)
    if max(desc_blocks) >= g.blocks:
        raise UsageError("group descriptors lie outside the filesystem")
    raw_desc = _read_blocks(vol, g.bs, desc_blocks)
    csum = bool(g.ro_compat & RO_METADATA_CSUM)
    seed = 0
    if csum:
        _check_superblock_csum(sb)
        seed = _csum_seed(sb)
        _check_descriptor_csums(g, raw_desc, seed)
    d = _descriptors(g, raw_desc)
    _check_descriptors(g, d)
    if not _check_backup(vol, g, sb, d) and not csum:
        notes.append("no backup superblock to cross-check with")
    recovering = bool(g.incompat & INCOMPAT_RECOVER)
    state = struct.unpack_from("<H", sb, 58)[0]
    if state & 2:
        raise UsageError("the filesystem has recorded errors")
    if not state & 1 and not g.compat & COMPAT_HAS_JOURNAL:
        raise UsageError("not cleanly unmounted and has no journal")
    journal: dict[int, list[bytes]] = {}
    if recovering:
        copies = _journal_copies(vol, g, d)
        journal = _apply_journal(g, d, copies, desc_blocks)
        notes.append(f"journal needs recovery: merged {sum(len(v) for v in journal.values())} journaled "
                     "blocks into the allocation view")
    uninit = (d["flags"] & BG_BLOCK_UNINIT) != 0
    total_clusters = -(-(g.blocks - g.first_data_block) // g.ratio)
    cb = g.bs * g.ratio
    base = g.first_data_block * g.bs
    free_parts = []
    suspicious = 0
    for g0 in range(0, g.groups, GROUPS_PER_PASS):
        g1 = min(g.groups, g0 + GROUPS_PER_PASS)
        bms = np.zeros((g1 - g0, g.bs), np.uint8)
        init = np.flatnonzero(~uninit[g0:g1]) + g0
        # A group still BLOCK_UNINIT on disk can only have been initialized by a transaction
        # that is still in the journal (its descriptor would have reached home otherwise), so
        # its journaled bitmap copies, merged below, say everything about it.
        if len(init):
            order = init[np.argsort(d["bb"][init], kind="stable")]
            raw = _read_blocks(vol, g.bs, [int(x) for x in d["bb"][order]])
            bms[order - g0] = np.frombuffer(raw, np.uint8).reshape(len(order), g.bs)
        if csum and not recovering:
            # A bitmap whose checksum fails is damaged: its whole group counts as used.
            for grp in init:
                if not _bitmap_csum_ok(g, raw_desc, int(grp), bms[grp - g0], seed):
                    bms[grp - g0] = 0xFF
                    suspicious += 1
        if recovering:
            for grp in range(g0, g1):
                for raw in journal.get(int(d["bb"][grp]), []):
                    bms[grp - g0] |= np.frombuffer(raw, np.uint8)
        bits = np.unpackbits(bms, axis=1, bitorder="little")[:, : g.cpg]
        if not recovering:
            # A bitmap claiming more free clusters than its descriptor records is not trusted.
            valid = np.full(g1 - g0, g.cpg, np.int64)
            if g1 == g.groups:
                valid[-1] = total_clusters - (g.groups - 1) * g.cpg
            in_fs = np.arange(g.cpg)[None, :] < valid[:, None]
            free_counts = ((bits == 0) & in_fs).sum(axis=1, dtype=np.int64)
            bad = (free_counts > d["free"][g0:g1]) & ~uninit[g0:g1]
            if bad.any():
                bits[bad] = 1
                suspicious += int(bad.sum())
        flat = bits.reshape(-1)
        n = min(len(flat), total_clusters - g0 * g.cpg)
        free_parts.append(runs_of(flat[:n] == 0, cb, base + g0 * g.cpg * cb))
    if suspicious:
        notes.append(f"{suspicious} group(s) whose bitmap fails its checksum or disagrees with its descriptor "
                     "count as used")
    free = normalize(np.concatenate(free_parts) if free_parts else empty_ranges(), 0, g.blocks * g.bs)
    free = subtract(free, _metadata_ranges(g, d))
    label = sb[120:136].split(b"\0", 1)[0].decode("utf-8", "replace")
    if g.incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) or g.ro_compat & (RO_BIGALLOC | RO_METADATA_CSUM):
        fstype = "ext4"
    elif g.compat & COMPAT_HAS_JOURNAL:
        fstype = "ext3"
    else:
        fstype = "ext2"
    return FsUsage(fstype, free, size=g.blocks * g.bs, label=label, unit=cb, notes=notes)
