"""exFAT: free clusters from the allocation bitmap, cross-checked against the FAT and the tree.

The boot region and its backup (24 sectors), everything up to the cluster heap (the FATs
included) and the sectors after the last cluster count as used. A cluster is free only when

* its bit is 0 in every allocation bitmap (TexFAT volumes have two), and
* its entry is 0 in every FAT (clusters of fragmented files are chained there), and
* no directory entry of the whole tree allocates it (contiguous "NoFatChain" files have no
  FAT entries; the walk finds them from their stream extension entries).

The bitmap has no checksum, so the two other views make a single damaged bit harmless. The boot
sector is checksummed (the main boot region, or else the backup one, must verify), each
directory entry set carries a checksum, and the bitmap must mark its own clusters, the up-case
table's and every directory's as used; anything that does not hold raises UsageError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vmbak.usage.model import FsUsage, UsageError, Volume, runs_of

NAME = "exfat"
MAX_DIR_BYTES = 256 << 20  # total directory bytes read in the tree walk
EOC = 0xFFFFFFFF


@dataclass
class Geometry:
    bps: int
    spc: int
    volume_length: int  # sectors
    fat_offset: int  # sectors
    fat_length: int  # sectors
    heap_offset: int  # sectors
    count: int  # clusters 2 .. count+1
    root_cluster: int
    nfats: int
    flags: int

    @property
    def cluster_size(self) -> int:
        return self.bps * self.spc

    def cluster_offset(self, c: int) -> int:
        return self.heap_offset * self.bps + (c - 2) * self.cluster_size


def probe(vol: Volume) -> bool:
    return vol.size >= 512 and vol.read(3, 8) == b"EXFAT   "


def boot_checksum(region: bytes, bps: int) -> int:
    """The exFAT boot checksum of sectors 0..10 (VolumeFlags and PercentInUse skipped)."""
    data = region[: 11 * bps]
    s = 0
    # rotate-right-and-add does not vectorise; but it is only 11 sectors
    for x in data[:106] + data[108:112] + data[113:]:
        s = (((s >> 1) | ((s & 1) << 31)) + x) & 0xFFFFFFFF
    return s


def _parse_region(vol: Volume, base: int) -> Geometry:
    bs = vol.read(base, 512)
    if bs[3:11] != b"EXFAT   " or bs[510:512] != b"\x55\xaa" or any(bs[11:64]):
        raise UsageError("not an exFAT boot sector")
    bps_shift, spc_shift, nfats = bs[108], bs[109], bs[110]
    if not 9 <= bps_shift <= 12 or spc_shift > 25 - bps_shift:
        raise UsageError("impossible exFAT sector or cluster size")
    bps = 1 << bps_shift
    if base % bps:
        raise UsageError("backup boot region misaligned")
    region = vol.read(base, 12 * bps)
    want = boot_checksum(region, bps)
    got = np.frombuffer(region[11 * bps: 12 * bps], "<u4")
    if not (got == want).all():
        raise UsageError("exFAT boot region checksum mismatch")
    _poff, vlen, fat_off, fat_len, heap_off, count, root = struct.unpack_from("<QQIIIII", bs, 64)
    flags, = struct.unpack_from("<H", bs, 106)
    version, = struct.unpack_from("<H", bs, 104)
    if version >> 8 != 1:
        raise UsageError(f"unknown exFAT revision {version >> 8}.{version & 0xFF}")
    return Geometry(bps, 1 << spc_shift, vlen, fat_off, fat_len, heap_off, count, root, nfats, flags)


def parse_boot(vol: Volume) -> tuple[Geometry, list[str]]:
    notes: list[str] = []
    try:
        geo = _parse_region(vol, 0)
    except UsageError as e:
        for shift in range(9, 13):
            try:
                geo = _parse_region(vol, 12 << shift)
                break
            except UsageError:
                continue
        else:
            raise e from None
        notes.append(f"main boot region damaged ({e}); used the backup boot region")
    if geo.nfats not in (1, 2):
        raise UsageError(f"exFAT with {geo.nfats} FATs")
    if geo.volume_length * geo.bps > vol.size:
        raise UsageError(f"filesystem ({geo.volume_length * geo.bps} bytes) is larger than its volume ({vol.size})")
    if geo.fat_offset < 24 or geo.fat_offset + geo.nfats * geo.fat_length > geo.heap_offset:
        raise UsageError("exFAT FATs overlap the boot region or the cluster heap")
    if geo.count < 1 or geo.count > 0xFFFFFFF5 - 2:
        raise UsageError("impossible exFAT cluster count")
    if geo.heap_offset + geo.count * geo.spc > geo.volume_length:
        raise UsageError("exFAT cluster heap extends past the volume")
    if geo.fat_length * geo.bps < (geo.count + 2) * 4:
        raise UsageError("exFAT FAT is too small for its clusters")
    if not 2 <= geo.root_cluster < geo.count + 2:
        raise UsageError("exFAT root directory cluster out of range")
    return geo, notes


class _Walker:
    """Reads cluster chains and directories; marks every allocation it sees."""

    def __init__(self, vol: Volume, geo: Geometry, fats: list[np.ndarray]) -> None:
        self.vol, self.geo = vol, geo
        self.fat = fats[(geo.flags & 1) if len(fats) == 2 else 0]  # the active FAT for chains
        self.used = np.zeros(geo.count + 2, bool)  # clusters the tree allocates
        self.dir_bytes = 0

    def chain(self, first: int, nclusters: int | None, contiguous: bool) -> list[int] | range:
        g = self.geo
        if contiguous:
            if nclusters is None or not 2 <= first or first + nclusters > g.count + 2:
                raise UsageError("contiguous allocation outside the cluster heap")
            return range(first, first + nclusters)
        out = []
        c = first
        limit = g.count if nclusters is None else nclusters
        while True:
            if not 2 <= c < g.count + 2:
                raise UsageError(f"cluster chain leaves the heap at {c:#x}")
            if len(out) >= limit:
                raise UsageError("cluster chain longer than its data or loops")
            out.append(c)
            nxt = int(self.fat[c])
            if nxt == EOC:
                break
            c = nxt
        if nclusters is not None and len(out) != nclusters:
            raise UsageError("cluster chain shorter than its data")
        return out

    def mark(self, clusters: list[int] | range) -> None:
        if isinstance(clusters, range):  # contiguous, inside the heap (chain() checked)
            self.used[clusters.start:clusters.stop] = True
        elif clusters:
            self.used[np.array(clusters, np.int64)] = True

    def read_clusters(self, clusters: list[int] | range) -> bytes:
        self.dir_bytes += len(clusters) * self.geo.cluster_size
        if self.dir_bytes > MAX_DIR_BYTES:
            raise UsageError("directories too large to walk")
        parts = []
        run_start = prev = None
        for c in [*clusters, None]:
            if c is not None and prev is not None and c == prev + 1:
                prev = c
                continue
            if run_start is not None:
                parts.append(self.vol.read(self.geo.cluster_offset(run_start), (prev - run_start + 1) * self.geo.cluster_size))
            run_start = prev = c
        return b"".join(parts)


def _set_checksum(entries: bytes) -> int:
    s = 0
    for i, x in enumerate(entries):
        if i in (2, 3):
            continue
        s = ((((s & 1) << 15) | (s >> 1)) + x) & 0xFFFF
    return s


def _walk(w: _Walker, geo: Geometry) -> tuple[list[tuple[int, int, int]], str]:
    """Walk the whole tree from the root; return the bitmaps (flags, first, length) and the label."""
    cs = geo.cluster_size
    root = w.chain(geo.root_cluster, None, False)
    w.mark(root)
    bitmaps: list[tuple[int, int, int]] = []
    label = ""
    todo: list[tuple[bytes, bool]] = [(w.read_clusters(root), True)]
    seen_dirs = {geo.root_cluster}
    while todo:
        raw, is_root = todo.pop()
        n = len(raw) // 32
        i = 0
        while i < n:
            e = raw[32 * i: 32 * i + 32]
            t = e[0]
            if t == 0:
                break
            if not t & 0x80:  # deleted or unused
                i += 1
                continue
            if t in (0x81, 0x82):  # allocation bitmap, up-case table
                if not is_root:
                    raise UsageError("bitmap or up-case entry outside the root directory")
                first, length = struct.unpack_from("<IQ", e, 20)
                nclus = -(-length // cs)
                if nclus == 0:
                    raise UsageError("empty bitmap or up-case table")
                w.mark(w.chain(first, nclus, False))
                if t == 0x81:
                    bitmaps.append((e[1], first, length))
                i += 1
                continue
            if t == 0x83:
                if is_root:
                    cnt = e[1]
                    label = e[2: 2 + 2 * min(cnt, 11)].decode("utf-16-le", "replace")
                i += 1
                continue
            if t == 0x85 or (t & 0x60) == 0x20:  # a file, or a benign primary entry: a set
                sec = e[1]
                if i + 1 + sec > n:
                    raise UsageError("directory entry set runs past its directory")
                whole = raw[32 * i: 32 * (i + 1 + sec)]
                if t == 0x85 and (sec < 2 or whole[32] != 0xC0):
                    raise UsageError("file entry without a stream extension")
                if _set_checksum(whole) != struct.unpack_from("<H", e, 2)[0]:
                    raise UsageError("directory entry set checksum mismatch")
                if t != 0x85 and e[4] & 1:  # a benign primary entry with its own allocation
                    first, length = struct.unpack_from("<IQ", e, 20)
                    w.mark(w.chain(first, max(1, -(-length // cs)), bool(e[4] & 2)))
                for k in range(1, sec + 1):
                    s = whole[32 * k: 32 * k + 32]
                    if not s[0] & 0x80 or not s[0] & 0x40:
                        raise UsageError("malformed secondary directory entry")
                    flags = s[1]
                    if not flags & 1:  # AllocationPossible
                        continue
                    first, length = struct.unpack_from("<IQ", s, 20)
                    if first == 0 and length == 0:
                        continue
                    nclus = -(-length // cs)
                    if nclus == 0:
                        raise UsageError("allocation of zero bytes with a first cluster")
                    clusters = w.chain(first, nclus, bool(flags & 2))
                    w.mark(clusters)
                    if t == 0x85 and k == 1 and e[4] & 0x10:  # a directory: walk it
                        if first in seen_dirs:
                            raise UsageError("directory loop")
                        seen_dirs.add(first)
                        todo.append((w.read_clusters(clusters), False))
                i += 1 + sec
                continue
            if t & 0x40:  # a secondary entry without its primary
                raise UsageError(f"stray secondary directory entry {t:#x}")
            raise UsageError(f"unknown critical directory entry {t:#x}")
    return bitmaps, label


def analyze(vol: Volume) -> FsUsage:
    geo, notes = parse_boot(vol)
    n = geo.count + 2
    fats = []
    for k in range(geo.nfats):
        raw = vol.read((geo.fat_offset + k * geo.fat_length) * geo.bps, n * 4)
        f = np.frombuffer(raw, "<u4")
        if int(f[0]) != 0xFFFFFFF8 or int(f[1]) != 0xFFFFFFFF:
            raise UsageError(f"exFAT FAT {k + 1} has invalid reserved entries")
        fats.append(f)
    w = _Walker(vol, geo, fats)
    bitmaps, label = _walk(w, geo)
    if not bitmaps or len(bitmaps) != geo.nfats or len({b[0] & 1 for b in bitmaps}) != len(bitmaps):
        raise UsageError(f"{len(bitmaps)} allocation bitmaps for {geo.nfats} FATs")
    free = np.ones(geo.count, bool)
    for _flags, first, length in bitmaps:
        if length * 8 < geo.count:
            raise UsageError("allocation bitmap shorter than the cluster count")
        clusters = w.chain(first, -(-length // geo.cluster_size), False)
        raw = w.read_clusters(clusters)[: -(-geo.count // 8)]
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: geo.count].astype(bool)
        for c in clusters:  # a bitmap that does not mark itself is not the bitmap
            if not bits[c - 2]:
                raise UsageError("allocation bitmap does not mark its own clusters")
        free &= ~bits
    tree = w.used[2:]
    if (free & tree).any():
        raise UsageError(f"allocation bitmap calls {int((free & tree).sum())} clusters free that files use")
    for f in fats:
        free &= f[2:n] == 0
    ranges = runs_of(free, geo.cluster_size, geo.cluster_offset(2))
    return FsUsage(NAME, ranges, size=geo.volume_length * geo.bps, label=label.rstrip("\0"),
                   unit=geo.cluster_size, notes=notes)
