"""btrfs (single device only): free space from the device tree and the extent tree.

Two levels, each used only when it can be trusted:

1. **Device level.** Bytes of the device that no chunk occupies are free. The chunk map comes
   from the superblock's sys_chunk_array and the chunk tree; the device tree's DEV_EXTENT items
   must describe exactly the same stripes (otherwise UsageError). The first MiB and every
   superblock copy (64 KiB, 64 MiB, 256 GiB) stay used.
2. **Extent level.** Inside a data, metadata or system chunk with the SINGLE or DUP profile, the
   ranges that no EXTENT_ITEM or METADATA_ITEM covers are free too (on both copies of a DUP
   chunk). A chunk counts as all used unless the extents found in it add up to the ``used``
   bytes its BLOCK_GROUP_ITEM records, and the extent level is skipped altogether when the sum
   over all block groups differs from the superblock's bytes_used, when a log tree awaits
   replay (its blocks are not in the extent tree), or when a compat_ro feature is unknown.

Every tree block read is verified: crc32c checksum, its own logical address, the filesystem
UUID, its level and a generation no newer than the superblock's. Filesystems with several
devices, another checksum type, or an unknown incompat feature (zoned, extent-tree-v2, the
RAID stripe tree...) raise UsageError: they count as all used.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vmbak.usage.crc import crc32c
from vmbak.usage.model import FsUsage, UsageError, Volume, empty_ranges, normalize, subtract, total

NAME = "btrfs"
MAGIC = b"_BHRfS_M"
SUPER_OFFSETS = (0x10000, 0x4000000, 0x4000000000)
SUPER_SIZE = 4096
RESERVED_HEAD = 1 << 20  # btrfs never allocates the first MiB
HEADER = 101
ITEM = 25
KEY_PTR = 33

ROOT_TREE, EXTENT_TREE, CHUNK_TREE, DEV_TREE, BLOCK_GROUP_TREE = 1, 2, 3, 4, 11
ROOT_ITEM, EXTENT_ITEM, METADATA_ITEM, BLOCK_GROUP_ITEM = 132, 168, 169, 192
DEV_EXTENT, DEV_ITEM, CHUNK_ITEM = 204, 216, 228
FIRST_CHUNK_TREE_OBJECTID = 256

BG_DATA, BG_SYSTEM, BG_METADATA, BG_DUP = 0x1, 0x2, 0x4, 0x20
BG_PROFILES = 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400

INCOMPAT_METADATA_UUID = 0x400
INCOMPAT_KNOWN = (0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
                  | 0x10000)  # not: ZONED 0x1000, EXTENT_TREE_V2 0x2000, RAID_STRIPE_TREE 0x4000
COMPAT_RO_BLOCK_GROUP_TREE = 0x8
COMPAT_RO_KNOWN = 0x1 | 0x2 | 0x4 | 0x8


@dataclass
class Super:
    fsid: bytes  # the UUID tree blocks carry
    generation: int
    root: int
    root_level: int
    chunk_root: int
    chunk_root_level: int
    log_root: int
    total_bytes: int
    bytes_used: int
    num_devices: int
    sectorsize: int
    nodesize: int
    sys_chunk_array: bytes
    compat_ro: int
    incompat: int
    devid: int
    dev_total: int
    dev_used: int
    label: str


@dataclass
class Chunk:
    logical: int
    length: int
    type: int
    stripes: list[tuple[int, int]]  # (devid, physical offset)


def probe(vol: Volume) -> bool:
    return vol.size >= SUPER_OFFSETS[0] + SUPER_SIZE and vol.read(SUPER_OFFSETS[0] + 0x40, 8) == MAGIC


def read_super(vol: Volume) -> Super:
    sb = vol.read(SUPER_OFFSETS[0], SUPER_SIZE)
    if sb[0x40:0x48] != MAGIC:
        raise UsageError("no btrfs superblock")
    csum_type, = struct.unpack_from("<H", sb, 0xC4)
    if csum_type != 0:
        raise UsageError(f"checksum type {csum_type} is not supported (only crc32c)")
    if crc32c(sb[0x20:]) != struct.unpack_from("<I", sb, 0)[0]:
        raise UsageError("superblock checksum mismatch")
    bytenr, = struct.unpack_from("<Q", sb, 0x30)
    if bytenr != SUPER_OFFSETS[0]:
        raise UsageError("superblock records the wrong location")
    gen, root, chunk_root, log_root, _ltid, total_b, used_b, _rdo, ndev = struct.unpack_from("<9Q", sb, 0x48)
    sectorsize, nodesize, _leaf, _stripe, sys_size = struct.unpack_from("<5I", sb, 0x90)
    compat, compat_ro, incompat = struct.unpack_from("<3Q", sb, 0xAC)
    del compat
    root_level, chunk_level, _log_level = sb[0xC6], sb[0xC7], sb[0xC8]
    devid, dev_total, dev_used = struct.unpack_from("<3Q", sb, 0xC9)
    if incompat & ~INCOMPAT_KNOWN:
        raise UsageError(f"unknown incompat features {incompat & ~INCOMPAT_KNOWN:#x}")
    if ndev != 1:
        raise UsageError(f"{ndev} devices: only single-device filesystems are understood")
    if sectorsize not in (4096, 8192, 16384, 32768, 65536) or nodesize % sectorsize or not \
            sectorsize <= nodesize <= 65536 or nodesize & (nodesize - 1):
        raise UsageError("impossible sector or node size")
    if sys_size > 2048:
        raise UsageError("sys_chunk_array too large")
    fsid = sb[0x23B:0x24B] if incompat & INCOMPAT_METADATA_UUID else sb[0x20:0x30]
    label = sb[0x12B:0x22B].split(b"\0", 1)[0].decode("utf-8", "replace")
    return Super(fsid, gen, root, root_level, chunk_root, chunk_level, log_root, total_b, used_b, ndev,
                 sectorsize, nodesize, sb[0x32B:0x32B + sys_size], compat_ro, incompat, devid, dev_total,
                 dev_used, label)


def _parse_chunk(data: bytes, off: int, logical: int) -> tuple[Chunk, int]:
    if off + 48 > len(data):
        raise UsageError("chunk item truncated")
    length, _owner, _stripe_len, ctype = struct.unpack_from("<4Q", data, off)
    nst, _sub = struct.unpack_from("<HH", data, off + 44)
    end = off + 48 + 32 * nst
    if nst == 0 or end > len(data) or length == 0:
        raise UsageError("malformed chunk item")
    stripes = [struct.unpack_from("<QQ", data, off + 48 + 32 * i) for i in range(nst)]
    return Chunk(logical, length, ctype, [(int(a), int(b)) for a, b in stripes]), end


class _Reader:
    """Maps logical addresses to the device and reads verified tree blocks."""

    def __init__(self, vol: Volume, sb: Super) -> None:
        self.vol, self.sb = vol, sb
        self.chunks: list[Chunk] = []
        self.blocks_read = 0
        self.max_blocks = max(1024, sb.dev_total // sb.nodesize + 16)

    def add_chunk(self, c: Chunk) -> None:
        for d, _o in c.stripes:
            if d != self.sb.devid:
                raise UsageError("chunk on another device")
        self.chunks.append(c)

    def find(self, logical: int, length: int) -> Chunk:
        for c in self.chunks:
            if c.logical <= logical and logical + length <= c.logical + c.length:
                return c
        raise UsageError(f"logical address {logical:#x} is in no chunk")

    def block(self, logical: int, level: int | None, owner: int | None = None) -> bytes:
        self.blocks_read += 1
        if self.blocks_read > self.max_blocks:
            raise UsageError("tree walk reads more blocks than the filesystem holds")
        ns = self.sb.nodesize
        c = self.find(logical, ns)
        prof = c.type & BG_PROFILES
        if prof not in (0, BG_DUP):
            raise UsageError(f"chunk profile {prof:#x} is not understood")
        err = "tree block not readable"
        for _d, phys in c.stripes:
            b = self.vol.read(phys + logical - c.logical, ns)
            if crc32c(b[0x20:]) != struct.unpack_from("<I", b, 0)[0]:
                err = f"tree block {logical:#x} checksum mismatch"
                continue
            bytenr, = struct.unpack_from("<Q", b, 0x30)
            gen, bowner = struct.unpack_from("<QQ", b, 0x50)
            if bytenr != logical or b[0x20:0x30] != self.sb.fsid:
                err = f"tree block {logical:#x} is not the block it should be"
                continue
            if gen > self.sb.generation or (level is not None and b[0x64] != level):
                err = f"tree block {logical:#x} has a wrong generation or level"
                continue
            if owner is not None and bowner != owner:
                err = f"tree block {logical:#x} belongs to tree {bowner}"
                continue
            return b
        raise UsageError(err)

    def items(self, root: int, level: int, owner: int | None) -> Iterator[tuple[int, int, int, bytes]]:
        """(objectid, type, offset, data) of every leaf item of a tree, in key order."""
        ns = self.sb.nodesize
        stack = [(root, level)]
        while stack:
            logical, lvl = stack.pop()
            b = self.block(logical, lvl, owner)
            n, = struct.unpack_from("<I", b, 0x60)
            if lvl > 0:
                if n == 0 or HEADER + n * KEY_PTR > ns:
                    raise UsageError("tree node with an impossible item count")
                kids = []
                for i in range(n):
                    ptr, _g = struct.unpack_from("<QQ", b, HEADER + i * KEY_PTR + 17)
                    kids.append((ptr, lvl - 1))
                stack.extend(reversed(kids))
                continue
            if HEADER + n * ITEM > ns:
                raise UsageError("tree leaf with an impossible item count")
            for i in range(n):
                oid, typ, off, doff, dsize = struct.unpack_from("<QBQII", b, HEADER + i * ITEM)
                if HEADER + doff + dsize > ns or doff < n * ITEM:
                    raise UsageError("tree leaf item data out of range")
                yield oid, typ, off, b[HEADER + doff: HEADER + doff + dsize]


def _super_ranges(size: int) -> np.ndarray:
    return normalize(np.array([[0, RESERVED_HEAD]] + [[o, o + SUPER_SIZE] for o in SUPER_OFFSETS if o < size],
                              np.int64))


def analyze(vol: Volume) -> FsUsage:
    sb = read_super(vol)
    if sb.dev_total > vol.size:
        raise UsageError(f"filesystem ({sb.dev_total} bytes) is larger than its volume ({vol.size})")
    notes: list[str] = []
    r = _Reader(vol, sb)
    # the system chunks the superblock carries, then the chunk tree
    pos = 0
    arr = sb.sys_chunk_array
    while pos < len(arr):
        if pos + 17 > len(arr):
            raise UsageError("sys_chunk_array truncated")
        _oid, typ, off = struct.unpack_from("<QBQ", arr, pos)
        if typ != CHUNK_ITEM:
            raise UsageError("sys_chunk_array holds something else than chunks")
        c, pos = _parse_chunk(arr, pos + 17, off)
        r.add_chunk(c)
    if not r.chunks:
        raise UsageError("no system chunk")
    sys_chunks = {(c.logical, c.length, c.type, tuple(c.stripes)) for c in r.chunks}
    chunks: list[Chunk] = []
    for oid, typ, off, data in r.items(sb.chunk_root, sb.chunk_root_level, CHUNK_TREE):
        if typ == CHUNK_ITEM and oid == FIRST_CHUNK_TREE_OBJECTID:
            c, _end = _parse_chunk(data, 0, off)
            chunks.append(c)
    if not sys_chunks <= {(c.logical, c.length, c.type, tuple(c.stripes)) for c in chunks}:
        raise UsageError("chunk tree and sys_chunk_array disagree")
    logical = normalize(np.array([[c.logical, c.logical + c.length] for c in chunks], np.int64).reshape(-1, 2))
    if total(logical) != sum(c.length for c in chunks):
        raise UsageError("chunks overlap in the logical address space")
    r.chunks = []
    for c in chunks:
        r.add_chunk(c)
    # the root tree names the device and extent trees
    roots: dict[int, tuple[int, int]] = {}
    for oid, typ, _off, data in r.items(sb.root, sb.root_level, ROOT_TREE):
        if typ == ROOT_ITEM and oid in (EXTENT_TREE, DEV_TREE, BLOCK_GROUP_TREE) and len(data) >= 239:
            bytenr, = struct.unpack_from("<Q", data, 176)
            roots[oid] = (bytenr, data[238])
    if DEV_TREE not in roots or EXTENT_TREE not in roots:
        raise UsageError("root tree lacks the device or extent tree")

    # ---- device level
    stripes = []
    for c in chunks:
        per = c.length  # SINGLE and DUP: each stripe holds the whole chunk
        if c.type & BG_PROFILES not in (0, BG_DUP):
            raise UsageError(f"chunk profile {c.type & BG_PROFILES:#x} on a single device")
        for _d, phys in c.stripes:
            stripes.append((phys, per, c.logical))
    dev_extents = []
    for oid, typ, off, data in r.items(*roots[DEV_TREE], DEV_TREE):
        if typ == DEV_EXTENT:
            if oid != sb.devid or len(data) < 32:
                raise UsageError("device extent of another device, or truncated")
            _tree, _coid, coff, length = struct.unpack_from("<4Q", data, 0)
            dev_extents.append((off, length, coff))
    if sorted(stripes) != sorted(dev_extents):
        raise UsageError("device extents and chunk stripes disagree")
    alloc = normalize(np.array([[p, p + n] for p, n, _c in stripes], np.int64).reshape(-1, 2))
    if total(alloc) != sum(n for _p, n, _c in stripes):
        raise UsageError("chunks overlap on the device")
    if sum(n for _p, n, _c in stripes) != sb.dev_used:
        raise UsageError("device bytes_used disagrees with the device extents")
    if len(alloc) and alloc[-1, 1] > sb.dev_total:
        raise UsageError("a chunk lies past the end of the device")
    device = np.array([[0, sb.dev_total]], np.int64)
    free = subtract(device, alloc)

    # ---- extent level
    reason = None
    if sb.log_root:
        reason = "a log tree awaits replay"
    elif sb.compat_ro & ~COMPAT_RO_KNOWN:
        reason = f"unknown compat_ro features {sb.compat_ro & ~COMPAT_RO_KNOWN:#x}"
    if reason is None:
        try:
            free = np.concatenate((free, _extent_level(r, sb, chunks, roots, notes)))
        except UsageError as e:
            reason = str(e)
    if reason is not None:
        notes.append(f"free space inside chunks not used ({reason}); only unallocated space is free")
    free = subtract(normalize(free, 0, sb.dev_total), _super_ranges(sb.dev_total))
    return FsUsage(NAME, free, size=sb.dev_total, label=sb.label, unit=sb.sectorsize, notes=notes)


def _extent_level(r: _Reader, sb: Super, chunks: list[Chunk], roots: dict[int, tuple[int, int]],
                  notes: list[str]) -> np.ndarray:
    ext: list[tuple[int, int]] = []
    groups: dict[int, tuple[int, int, int]] = {}  # start -> (length, used, flags)

    def take_groups(oid: int, off: int, data: bytes) -> None:
        if len(data) < 24:
            raise UsageError("truncated block group item")
        used, _coid, flags = struct.unpack_from("<3Q", data, 0)
        if oid in groups:
            raise UsageError("block group listed twice")
        groups[oid] = (off, used, flags)

    for oid, typ, off, data in r.items(*roots[EXTENT_TREE], EXTENT_TREE):
        if typ == EXTENT_ITEM:
            ext.append((oid, off))
        elif typ == METADATA_ITEM:
            ext.append((oid, sb.nodesize))
        elif typ == BLOCK_GROUP_ITEM:
            take_groups(oid, off, data)
    if sb.compat_ro & COMPAT_RO_BLOCK_GROUP_TREE:
        if BLOCK_GROUP_TREE not in roots:
            raise UsageError("block group tree missing")
        for oid, typ, off, data in r.items(*roots[BLOCK_GROUP_TREE], BLOCK_GROUP_TREE):
            if typ == BLOCK_GROUP_ITEM:
                take_groups(oid, off, data)
    if sum(g[1] for g in groups.values()) != sb.bytes_used:
        raise UsageError("block groups' used bytes disagree with the superblock")
    e = np.array(ext, np.int64).reshape(-1, 2)
    if len(e) and ((e[:, 1] <= 0).any() or (e % sb.sectorsize).any()):
        raise UsageError("misaligned or empty extent")
    e = np.stack((e[:, 0], e[:, 0] + e[:, 1]), axis=1)
    extents = normalize(e)
    if total(extents) != int((e[:, 1] - e[:, 0]).sum()):
        raise UsageError("extents overlap")
    covered = 0
    out = []
    skipped = 0
    for c in chunks:
        g = groups.get(c.logical)
        span = np.array([[c.logical, c.logical + c.length]], np.int64)
        # extents is normalized (sorted, disjoint): clip just the ones that meet the chunk
        lo, hi = c.logical, c.logical + c.length
        inside = np.clip(extents[np.searchsorted(extents[:, 1], lo, "right"):
                                 np.searchsorted(extents[:, 0], hi, "left")], lo, hi)
        covered += total(inside)
        if g is None or g[0] != c.length or g[2] != c.type or total(inside) != g[1]:
            skipped += 1
            continue
        if not c.type & (BG_DATA | BG_METADATA | BG_SYSTEM):
            skipped += 1
            continue
        free_logical = subtract(span, inside)
        for _d, phys in c.stripes:
            out.append(free_logical - c.logical + phys)
    if covered != total(extents):
        raise UsageError("an extent lies outside every chunk")
    if skipped:
        notes.append(f"{skipped} block group(s) whose extents do not add up count as all used")
    return np.concatenate(out) if out else empty_ranges()
