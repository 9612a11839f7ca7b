"""FAT12, FAT16 and FAT32: free clusters from the file allocation tables.

The reserved sectors, every FAT copy, the FAT12/16 root directory region and the sectors after
the last cluster count as used. A data cluster is free only when its entry is zero in *every*
FAT copy (a damaged or stale copy can only make fewer clusters free).

The FAT says which cluster *numbers* are free; the boot sector says where cluster N lies. A
damaged boot sector can therefore move every free cluster onto used data, so the geometry is
cross-checked before anything is called free (UsageError otherwise):

* FAT32: the BIOS parameter block must equal the one in the backup boot sector;
* every FAT copy must start with the media descriptor and an end-of-chain entry, so a wrong
  reserved-sector count, FAT size or FAT count shows;
* the FAT must be as large as the cluster count needs, and not much larger (a wrong
  sectors-per-cluster or total-sector count shows), and a FAT too small to describe every
  cluster is clamped only when the shortfall is small;
* the root directory's entries must be well formed and point at allocated clusters, and the
  first cluster of every subdirectory it lists must begin with the ``.`` entry naming that
  same cluster (this anchors where the data area starts, to the sector).

Which FAT type a volume has follows Linux and dosfstools: a zero 16-bit FAT size means FAT32;
otherwise fewer than 4085 clusters means FAT12.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vmbak.usage.model import FsUsage, UsageError, Volume, runs_of

NAME = "fat"

MAX_SUBDIR_CHECKS = 64  # subdirectories of the root whose "." entry anchors the data area
MAX_ROOT_CLUSTERS = 256  # FAT32 root directory clusters read for the checks
_BAD_NAME_CHARS = frozenset(b'"*+,./:;<=>?[\\]|')


@dataclass
class Geometry:
    bps: int
    spc: int
    reserved: int
    nfats: int
    root_entries: int
    total_sectors: int
    media: int
    fat_sectors: int
    bits: int  # 12, 16 or 32
    root_cluster: int  # FAT32 only
    count: int  # data clusters (numbered 2 .. count+1)
    root_dir_sectors: int
    label: str

    @property
    def cluster_size(self) -> int:
        return self.bps * self.spc

    @property
    def fat_offset(self) -> int:
        return self.reserved * self.bps

    @property
    def root_offset(self) -> int:
        return (self.reserved + self.nfats * self.fat_sectors) * self.bps

    @property
    def data_offset(self) -> int:
        return self.root_offset + self.root_dir_sectors * self.bps

    @property
    def fstype(self) -> str:
        return f"fat{self.bits}"

    def cluster_offset(self, c: int) -> int:
        return self.data_offset + (c - 2) * self.cluster_size


def _looks_like_fat(bs: bytes) -> bool:
    if len(bs) < 512 or bs[0] not in (0xEB, 0xE9):
        return False
    if bs[3:11] in (b"NTFS    ", b"EXFAT   "):
        return False
    bps, spc, reserved, nfats = struct.unpack_from("<HBHB", bs, 11)
    fat16, = struct.unpack_from("<H", bs, 22)
    fat32, = struct.unpack_from("<I", bs, 36)
    return (bps in (512, 1024, 2048, 4096) and spc != 0 and spc & (spc - 1) == 0 and reserved >= 1
            and nfats >= 1 and (fat16 != 0 or fat32 != 0))


def probe(vol: Volume) -> bool:
    return vol.size >= 512 and _looks_like_fat(vol.read(0, 512))


def _label(raw: bytes) -> str:
    s = raw.rstrip(b" \0").decode("cp437", "replace")
    return "" if s == "NO NAME" else s


def parse_boot_sector(vol: Volume) -> Geometry:
    """The geometry of the FAT in ``vol``; UsageError when the boot sector is not consistent."""
    bs = vol.read(0, 512)
    if not _looks_like_fat(bs):
        raise UsageError("boot sector is not a FAT boot sector")
    bps, spc, reserved, nfats, root_entries, tot16, media, fat16 = struct.unpack_from("<HBHBHHBH", bs, 11)
    tot32, = struct.unpack_from("<I", bs, 32)
    if nfats > 4:
        raise UsageError(f"implausible number of FATs ({nfats})")
    if media not in (0xF0, *range(0xF8, 0x100)):
        raise UsageError(f"invalid media descriptor 0x{media:02x}")
    total_sectors = tot16 if tot16 else tot32
    if total_sectors == 0:
        raise UsageError("total sector count is zero")
    if total_sectors * bps > vol.size:
        raise UsageError(f"filesystem ({total_sectors * bps} bytes) is larger than its volume ({vol.size})")
    if fat16 == 0:  # FAT32
        fat_sectors, ext_flags, version, root_cluster, _fsinfo, backup = struct.unpack_from("<IHHIHH", bs, 36)
        if root_entries != 0 or tot16 != 0:
            raise UsageError("FAT32 boot sector with FAT12/16 fields set")
        if version != 0:
            raise UsageError(f"unknown FAT32 version {version:#x}")
        del ext_flags  # the active-FAT flag does not matter: every copy must agree a cluster is free
        label = _label(bs[71:82]) if bs[66] == 0x29 else ""
        root_dir_sectors = 0
        if 0 < backup < reserved and backup != 0xFFFF:
            copy = vol.read(backup * bps, 512)
            if copy[11:52] != bs[11:52] or copy[510:512] != bs[510:512]:
                raise UsageError("boot sector and its backup disagree about the geometry")
    else:
        fat_sectors = fat16
        root_cluster = 0
        if root_entries == 0 or root_entries * 32 % bps:
            raise UsageError(f"implausible root directory size ({root_entries} entries)")
        root_dir_sectors = root_entries * 32 // bps
        label = _label(bs[43:54]) if bs[38] == 0x29 else ""
    meta = reserved + nfats * fat_sectors + root_dir_sectors
    if meta >= total_sectors:
        raise UsageError("the FATs and root directory do not fit in the filesystem")
    count = (total_sectors - meta) // spc
    if fat16 == 0:
        bits = 32
        count = min(count, 0x0FFFFFF5 - 1)
    elif count < 4085:
        bits = 12
    elif count < 65525:
        bits = 16
    else:
        raise UsageError(f"too many clusters ({count}) for FAT16")
    geo = Geometry(bps, spc, reserved, nfats, root_entries, total_sectors, media, fat_sectors, bits,
                   root_cluster, count, root_dir_sectors, label)
    entries = fat_sectors * bps * 8 // bits
    needed = count + 2
    if entries < needed:
        # A FAT shorter than the data area: the clusters it cannot describe stay used. A large
        # shortfall means the geometry is wrong (e.g. a damaged sectors-per-cluster count).
        if needed - entries > max(16, count // 64):
            raise UsageError(f"FAT has {entries} entries for {count} clusters")
        geo.count = entries - 2
    else:
        needed_sectors = -(-needed * bits // 8 // bps)
        if fat_sectors > needed_sectors + spc + 8 + needed_sectors // 32:
            raise UsageError(f"FAT of {fat_sectors} sectors is far larger than {count} clusters need")
    if geo.count < 1:
        raise UsageError("no data clusters")
    return geo


def unpack_fat(raw: bytes, bits: int, n: int) -> np.ndarray:
    """The first ``n`` entries of a FAT (uint32)."""
    if bits == 32:
        return np.frombuffer(raw, "<u4", count=n).copy()
    if bits == 16:
        return np.frombuffer(raw, "<u2", count=n).astype(np.uint32)
    nbytes = (n * 3 + 1) // 2
    b = np.frombuffer(raw, np.uint8, count=nbytes)
    pad = (-len(b)) % 3
    if pad:
        b = np.concatenate((b, np.zeros(pad, np.uint8)))
    t = b.reshape(-1, 3).astype(np.uint32)
    out = np.empty(2 * len(t), np.uint32)
    out[0::2] = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
    out[1::2] = (t[:, 1] >> 4) | (t[:, 2] << 4)
    return out[:n]


def _check_fat_head(entries: np.ndarray, geo: Geometry, which: int) -> None:
    mask = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}[geo.bits]
    e0 = int(entries[0]) & mask
    e1 = int(entries[1]) & mask
    if e0 != (mask & ~0xFF) | geo.media:
        raise UsageError(f"FAT copy {which + 1} does not start with the media descriptor")
    # entry 1 is end-of-chain; FAT16/32 use its top bits as clean-shutdown and no-error flags
    flags = {12: 0, 16: 0xC000, 32: 0x0C000000}[geo.bits]
    if (e1 | flags) < mask - 7:
        raise UsageError(f"FAT copy {which + 1} has an invalid reserved entry 1")


def read_fats(vol: Volume, geo: Geometry) -> list[np.ndarray]:
    """Every FAT copy's first count+2 entries."""
    n = geo.count + 2
    nbytes = min(geo.fat_sectors * geo.bps, -(-n * geo.bits // 8) + 3)
    out = []
    for i in range(geo.nfats):
        raw = vol.read(geo.fat_offset + i * geo.fat_sectors * geo.bps, nbytes)
        entries = unpack_fat(raw, geo.bits, n)
        _check_fat_head(entries, geo, i)
        out.append(entries)
    return out


def _dir_entries(raw: bytes) -> list[tuple[bytes, int, int, int]]:
    """(name, attributes, first cluster, size) of the in-use short entries up to the end marker."""
    out = []
    for off in range(0, len(raw) - 31, 32):
        e = raw[off:off + 32]
        if e[0] == 0:
            break
        if e[0] == 0xE5:
            continue
        attr = e[11]
        if attr & 0x3F == 0x0F:  # long name entry
            if attr & 0xC0 or e[26:28] != b"\0\0":
                raise UsageError("root directory holds a malformed long-name entry")
            continue
        if attr & 0xC0:
            raise UsageError("root directory holds an entry with invalid attributes")
        hi, = struct.unpack_from("<H", e, 20)
        lo, size = struct.unpack_from("<HI", e, 26)
        out.append((bytes(e[:11]), attr, (hi << 16) | lo, size))
    return out


def _valid_short_name(name: bytes) -> bool:
    first = name[0]
    if first == 0x20:
        return False
    for i, c in enumerate(name):
        if c < 0x20 and not (i == 0 and c == 0x05):
            return False
        if c in _BAD_NAME_CHARS:
            return False
    return True


def _read_chain(vol: Volume, geo: Geometry, fat: np.ndarray, mask: int, first: int, limit: int) -> bytes:
    parts = []
    c = first
    seen = set()
    while 2 <= c < geo.count + 2 and len(parts) < limit and c not in seen:
        seen.add(c)
        parts.append(vol.read(geo.cluster_offset(c), geo.cluster_size))
        c = int(fat[c]) & mask
    return b"".join(parts)


def check_directories(vol: Volume, geo: Geometry, used: np.ndarray, fat: np.ndarray) -> None:
    """Cross-check the root directory against the FATs and the data area's position."""
    mask = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}[geo.bits]
    if geo.bits == 32:
        rc = geo.root_cluster
        if not 2 <= rc < geo.count + 2 or not used[rc]:
            raise UsageError(f"root directory cluster {rc} is outside the data area or free")
        raw = _read_chain(vol, geo, fat, mask, rc, MAX_ROOT_CLUSTERS)
    else:
        raw = vol.read(geo.root_offset, geo.root_dir_sectors * geo.bps)
    subdirs = []
    for name, attr, first, size in _dir_entries(raw):
        if attr & 0x08:  # volume label
            if not attr & 0x10 and first == 0:
                lab = _label(name)
                if lab:
                    geo.label = lab
                continue
            raise UsageError("root directory holds a malformed volume label entry")
        if not _valid_short_name(name):
            raise UsageError("root directory holds an entry with an invalid name")
        if geo.bits != 32 and first >> 16:
            raise UsageError("FAT12/16 directory entry with a high cluster number")
        if attr & 0x10 or size:
            if not 2 <= first < geo.count + 2:
                raise UsageError(f"root directory entry points at cluster {first}, outside the data area")
            if not used[first]:
                raise UsageError(f"root directory entry points at free cluster {first}")
            if attr & 0x10:
                subdirs.append(first)
    for c in subdirs[:MAX_SUBDIR_CHECKS]:
        head = vol.read(geo.cluster_offset(c), 64)
        dot, dotdot = head[:32], head[32:64]
        hi, = struct.unpack_from("<H", dot, 20)
        lo, = struct.unpack_from("<H", dot, 26)
        dot_cluster = ((hi << 16) | lo) if geo.bits == 32 else lo
        if (dot[:11] != b".          " or not dot[11] & 0x10 or dot_cluster != c
                or dotdot[:11] != b"..         " or not dotdot[11] & 0x10):
            raise UsageError(f"subdirectory at cluster {c} does not start with its '.' entry: "
                             "the data area is not where the boot sector says")


def analyze(vol: Volume) -> FsUsage:
    geo = parse_boot_sector(vol)
    fats = read_fats(vol, geo)
    used = np.zeros(geo.count + 2, bool)
    for f in fats:
        used |= f != 0
    check_directories(vol, geo, used, fats[0])
    free = ~used[2:]
    ranges = runs_of(free, geo.cluster_size, geo.data_offset)
    notes = []
    if geo.nfats == 1:
        notes.append("single FAT copy: its free entries cannot be cross-checked")
    return FsUsage(geo.fstype, ranges, size=geo.total_sectors * geo.bps, label=geo.label,
                   unit=geo.cluster_size, notes=notes)
