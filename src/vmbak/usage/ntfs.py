"""NTFS: free clusters from the $Bitmap file, clamped to the volume's cluster count.

The boot sector gives the cluster size, the cluster count and where the MFT starts. MFT record
0 ($MFT) maps the MFT itself; record 6 ($Bitmap) holds one bit per cluster, of which only the
first ``total_sectors // sectors_per_cluster`` count (the padding bits after them, and the
sectors after the last whole cluster, are used). The $Boot region (8 KiB) and the backup boot
sector (the sector after the last one the boot sector counts, at the end of the volume) count
as used whatever the bitmap says.

Cross-checks, each of which raises UsageError (the volume counts as all used):

* every MFT record read must carry ``FILE``, valid update-sequence fixups, the in-use flag and
  (in the XP format) its own record number; attributes must lie inside their record;
* the backup boot sector, when the volume holds one, must agree with the boot sector about the
  geometry;
* $MFT's data must start at the boot sector's MFT cluster; every run list must stay inside the
  volume and have no holes where data must be;
* $Bitmap must be as long as the cluster count needs (and not much longer), fully
  initialized, and must mark as used the boot sector, the MFT, $MFTMirr, $LogFile and
  $Bitmap itself;
* $Volume must not be flagged dirty (chkdsk pending) and $LogFile must be clean: empty (all
  0xFF, as ntfs-3g and mkntfs leave it) or with restart areas that record a clean shutdown.
  A volume that needs log replay (a live or crashed Windows, a hibernated one) may have
  allocations that reached the log but not $Bitmap, so it counts as all used.

Written here rather than with dissect.ntfs: the parse needs only the boot sector, four MFT
records and their run lists, and every field it reads must be range-checked against the
volume before it is believed; that is shorter to write than to wrap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vmbak.usage.model import FsUsage, UsageError, Volume, empty_ranges, normalize, runs_of, subtract, total

NAME = "ntfs"
OEM = b"NTFS    "
BOOT_BYTES = 8192  # $Boot
USA_STRIDE = 512
MAX_RUNS = 1 << 20
BITMAP_CHUNK = 8 << 20  # bytes of $Bitmap unpacked at a time (64 Mi clusters)

AT_VOLUME_INFORMATION = 0x70
AT_DATA = 0x80
AT_ATTRIBUTE_LIST = 0x20
AT_END = 0xFFFFFFFF
VOLUME_IS_DIRTY = 0x0001
MFT_RECORD_IN_USE = 0x0001
REC_MFT, REC_MFTMIRR, REC_LOGFILE, REC_VOLUME, REC_BITMAP = 0, 1, 2, 3, 6
LOGFILE_NO_CLIENT = 0xFFFF
RESTART_VOLUME_IS_CLEAN = 0x0002


@dataclass
class Geometry:
    bps: int
    spc: int
    total_sectors: int
    mft_lcn: int
    mftmirr_lcn: int
    record_size: int

    @property
    def cluster_size(self) -> int:
        return self.bps * self.spc

    @property
    def clusters(self) -> int:
        return self.total_sectors // self.spc


Runs = list[tuple[int, int, int]]  # (vcn, lcn, length) in clusters


def probe(vol: Volume) -> bool:
    return vol.size >= 512 and vol.read(3, 8) == OEM


def _parse_boot(bs: bytes) -> Geometry:
    if bs[3:11] != OEM or bs[510:512] != b"\x55\xaa":
        raise UsageError("not an NTFS boot sector")
    bps, spc_raw = struct.unpack_from("<HB", bs, 11)
    if bps not in (256, 512, 1024, 2048, 4096):
        raise UsageError(f"impossible sector size {bps}")
    if spc_raw <= 0x80:
        spc = spc_raw
    elif spc_raw >= 0xF4:  # negative: the cluster size is 2**-n bytes (large clusters)
        spc = (1 << (256 - spc_raw)) // bps
    else:
        spc = 0
    if spc == 0 or spc & (spc - 1):
        raise UsageError(f"impossible sectors per cluster ({spc_raw:#x})")
    total_sectors, mft_lcn, mftmirr_lcn = struct.unpack_from("<QQQ", bs, 0x28)
    rec_raw, = struct.unpack_from("<b", bs, 0x40)
    record_size = rec_raw * bps * spc if rec_raw > 0 else (1 << -rec_raw if -31 < rec_raw < 0 else 0)
    if record_size < 256 or record_size > 65536 or record_size & (record_size - 1) or record_size < USA_STRIDE:
        raise UsageError(f"impossible MFT record size {record_size}")
    geo = Geometry(bps, spc, total_sectors, mft_lcn, mftmirr_lcn, record_size)
    if geo.clusters < 16:
        raise UsageError("volume has too few clusters")
    if not 0 < mft_lcn < geo.clusters or not 0 < mftmirr_lcn < geo.clusters:
        raise UsageError("the MFT lies outside the volume")
    return geo


def parse_boot_sector(vol: Volume) -> Geometry:
    """The geometry of the NTFS in ``vol``; UsageError when it cannot be trusted."""
    bs = vol.read(0, 512)
    geo = _parse_boot(bs)
    if geo.total_sectors * geo.bps > vol.size:
        raise UsageError(f"filesystem ({geo.total_sectors * geo.bps} bytes) is larger than its volume ({vol.size})")
    backup_off = geo.total_sectors * geo.bps
    if backup_off + 512 <= vol.size:
        backup = vol.read(backup_off, 512)
        if backup[3:11] == OEM and backup[0x0B:0x48] != bs[0x0B:0x48]:
            raise UsageError("boot sector and its backup disagree about the geometry")
    return geo


def apply_fixups(rec: bytes, magic: bytes, what: str) -> bytes:
    """The record with its update sequence array applied; UsageError when a sector is torn."""
    if rec[:4] != magic:
        raise UsageError(f"{what}: bad magic")
    usa_ofs, usa_count = struct.unpack_from("<HH", rec, 4)
    nsect = len(rec) // USA_STRIDE
    if usa_count != nsect + 1 or usa_ofs < 8 or usa_ofs + 2 * usa_count > min(len(rec), USA_STRIDE) or usa_ofs & 1:
        raise UsageError(f"{what}: bad update sequence array")
    out = bytearray(rec)
    usn = rec[usa_ofs:usa_ofs + 2]
    for i in range(nsect):
        end = (i + 1) * USA_STRIDE
        if rec[end - 2:end] != usn:
            raise UsageError(f"{what}: torn write (update sequence mismatch in sector {i})")
        out[end - 2:end] = rec[usa_ofs + 2 + 2 * i:usa_ofs + 4 + 2 * i]
    return bytes(out)


def parse_runlist(data: bytes, pos: int, end: int, geo: Geometry, lowest_vcn: int, highest_vcn: int,
                  what: str) -> Runs:
    """Decode mapping pairs. Sparse runs are returned with lcn -1."""
    # dissect.ntfs decodes these too; ours also checks every run against the volume.
    runs: Runs = []
    vcn, lcn = lowest_vcn, 0
    while True:
        if pos >= end:
            raise UsageError(f"{what}: run list runs past its attribute")
        head = data[pos]
        if head == 0:
            break
        nlen, noff = head & 0xF, head >> 4
        if nlen == 0 or nlen > 8 or noff > 8 or pos + 1 + nlen + noff > end:
            raise UsageError(f"{what}: malformed run list")
        length = int.from_bytes(data[pos + 1:pos + 1 + nlen], "little", signed=True)
        if length <= 0:
            raise UsageError(f"{what}: run of non-positive length")
        if noff:
            lcn += int.from_bytes(data[pos + 1 + nlen:pos + 1 + nlen + noff], "little", signed=True)
            if lcn < 0 or lcn + length > geo.clusters:
                raise UsageError(f"{what}: run points outside the volume")
            runs.append((vcn, lcn, length))
        else:
            runs.append((vcn, -1, length))
        vcn += length
        pos += 1 + nlen + noff
        if len(runs) > MAX_RUNS:
            raise UsageError(f"{what}: too many runs")
    if vcn != highest_vcn + 1:
        raise UsageError(f"{what}: run list does not cover its VCN range")
    return runs


@dataclass
class Attribute:
    type: int
    name: str
    resident: bool
    value: bytes = b""  # resident
    runs: Runs | None = None  # non-resident
    data_size: int = 0
    initialized_size: int = 0


def parse_record(rec: bytes, number: int, geo: Geometry) -> list[Attribute]:
    """The attributes of an in-use MFT record (fixups already applied)."""
    what = f"MFT record {number}"
    seq_ofs, flags, bytes_used, bytes_alloc = struct.unpack_from("<HHII", rec, 20)
    if bytes_alloc != len(rec) or not 24 <= bytes_used <= len(rec) or not 24 <= seq_ofs < bytes_used:
        raise UsageError(f"{what}: header sizes are impossible")
    if not flags & MFT_RECORD_IN_USE:
        raise UsageError(f"{what} is not in use")
    usa_ofs, = struct.unpack_from("<H", rec, 4)
    if usa_ofs >= 0x30:  # NTFS 3.1 records carry their own number
        own, = struct.unpack_from("<I", rec, 44)
        if own != number:
            raise UsageError(f"{what} claims to be record {own}")
    out = []
    pos = seq_ofs
    while True:
        if pos + 8 > bytes_used:
            raise UsageError(f"{what}: attributes run past the record")
        atype, alen = struct.unpack_from("<II", rec, pos)
        if atype == AT_END:
            break
        if alen < 16 or alen & 7 or pos + alen > bytes_used:
            raise UsageError(f"{what}: attribute of impossible length")
        nonres, name_len, name_ofs = struct.unpack_from("<BBH", rec, pos + 8)
        if name_len and name_ofs + 2 * name_len > alen:
            raise UsageError(f"{what}: attribute name outside the attribute")
        name = rec[pos + name_ofs:pos + name_ofs + 2 * name_len].decode("utf-16-le", "replace")
        a = rec[pos:pos + alen]
        if nonres == 0:
            vlen, vofs = struct.unpack_from("<IH", a, 16)
            if vofs + vlen > alen:
                raise UsageError(f"{what}: resident value outside its attribute")
            out.append(Attribute(atype, name, True, value=a[vofs:vofs + vlen]))
        elif nonres == 1:
            if alen < 64:
                raise UsageError(f"{what}: non-resident attribute too short")
            low, high, mp_ofs = struct.unpack_from("<qqH", a, 16)
            _alloc, dsize, isize = struct.unpack_from("<qqq", a, 40)
            if low < 0 or high < low - 1 or not 64 <= mp_ofs < alen or dsize < 0 or not 0 <= isize <= dsize:
                raise UsageError(f"{what}: non-resident attribute header is impossible")
            runs = parse_runlist(a, mp_ofs, alen, geo, low, high, what)
            out.append(Attribute(atype, name, False, runs=runs, data_size=dsize if low == 0 else 0,
                                 initialized_size=isize if low == 0 else 0))
        else:
            raise UsageError(f"{what}: attribute with an unknown form")
        pos += alen
    return out


def _data(attrs: list[Attribute], what: str, first_extent_only: bool = False) -> Attribute:
    """The unnamed $DATA attribute. With an attribute list its runs may continue in extension
    records, which are not followed: that is an error unless only the first extent (the one
    in the base record, from VCN 0) is wanted."""
    if any(a.type == AT_ATTRIBUTE_LIST for a in attrs) and not first_extent_only:
        raise UsageError(f"{what} has an attribute list")
    found = [a for a in attrs if a.type == AT_DATA and a.name == "" and (a.runs is None or a.runs[0][0] == 0)]
    if len(found) != 1:
        raise UsageError(f"{what} has {len(found)} unnamed data attributes")
    return found[0]


def read_runs(vol: Volume, geo: Geometry, runs: Runs, offset: int, length: int, what: str) -> bytes:
    """``length`` bytes at byte ``offset`` of a non-resident attribute; holes are an error."""
    cs = geo.cluster_size
    parts = []
    end = offset + length
    pos = offset
    for vcn, lcn, n in runs:
        s, e = vcn * cs, (vcn + n) * cs
        if e <= pos or s >= end:
            continue
        if lcn < 0:
            raise UsageError(f"{what}: sparse where data must be")
        a, b = max(pos, s), min(end, e)
        if a != pos:
            raise UsageError(f"{what}: run list has a gap")
        parts.append(vol.read(lcn * cs + (a - s), b - a))
        pos = b
        if pos >= end:
            break
    if pos != end:
        raise UsageError(f"{what}: shorter than needed")
    return b"".join(parts)


def run_ranges(runs: Runs, cs: int) -> np.ndarray:
    r = [(lcn * cs, (lcn + n) * cs) for _v, lcn, n in runs if lcn >= 0]
    return np.array(r, np.int64).reshape(-1, 2)


class Ntfs:
    """The parts of an NTFS volume the free-space analysis reads."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.geo = geo = parse_boot_sector(vol)
        rs = geo.record_size
        rec0 = self._fixed(vol.read(geo.mft_lcn * geo.cluster_size, rs), 0)
        # a very fragmented MFT continues its run list in extension records; records 0-15,
        # all this module reads, are always in the first extent
        mft = _data(parse_record(rec0, 0, geo), "$MFT", first_extent_only=True)
        if not mft.runs or mft.runs[0][0] != 0 or mft.runs[0][1] != geo.mft_lcn:
            raise UsageError("$MFT's data does not start where the boot sector says")
        if mft.data_size < 16 * rs:
            raise UsageError("$MFT is too small")
        self.mft_runs = mft.runs
        self._records: dict[int, list[Attribute]] = {}  # parsed records, each read once

    @staticmethod
    def _fixed(raw: bytes, number: int) -> bytes:
        return apply_fixups(raw, b"FILE", f"MFT record {number}")

    def record(self, number: int) -> list[Attribute]:
        got = self._records.get(number)
        if got is None:
            rs = self.geo.record_size
            raw = read_runs(self.vol, self.geo, self.mft_runs, number * rs, rs, "$MFT")
            got = self._records[number] = parse_record(self._fixed(raw, number), number, self.geo)
        return got


def check_clean(fs: Ntfs) -> None:
    """UsageError unless $Volume is not dirty and $LogFile records a clean shutdown."""
    vi = [a for a in fs.record(REC_VOLUME) if a.type == AT_VOLUME_INFORMATION and a.resident]
    if len(vi) != 1 or len(vi[0].value) < 12:
        raise UsageError("$Volume has no volume information")
    vflags, = struct.unpack_from("<H", vi[0].value, 10)
    if vflags & VOLUME_IS_DIRTY:
        raise UsageError("the volume is flagged dirty (chkdsk pending)")
    log = _data(fs.record(REC_LOGFILE), "$LogFile")
    if log.resident or log.runs is None:
        raise UsageError("$LogFile is resident")
    head_len = min(log.initialized_size, 2 * 65536)
    if head_len < 8192:
        raise UsageError("$LogFile is too small")
    head = read_runs(fs.vol, fs.geo, log.runs, 0, head_len, "$LogFile")
    if head == b"\xff" * head_len:
        return  # emptied: nothing to replay (mkntfs and ntfs-3g leave it so)
    found = 0
    for off in (0, *(1 << k for k in range(12, 17))):
        if off + 512 > head_len or head[off:off + 4] not in (b"RSTR", b"CHKD"):
            continue
        if head[off:off + 4] == b"CHKD":
            raise UsageError("$LogFile was left by chkdsk in an unknown state")
        psize, = struct.unpack_from("<I", head, off + 16)
        if psize < 512 or psize & (psize - 1) or off + psize > head_len:
            raise UsageError("$LogFile restart page has an impossible size")
        page = apply_fixups(head[off:off + psize], b"RSTR", "$LogFile restart page")
        ra_ofs, = struct.unpack_from("<H", page, 24)
        if ra_ofs + 16 > psize:
            raise UsageError("$LogFile restart area outside its page")
        in_use, ra_flags = struct.unpack_from("<HH", page, ra_ofs + 12)
        if in_use != LOGFILE_NO_CLIENT and not ra_flags & RESTART_VOLUME_IS_CLEAN:
            raise UsageError("$LogFile needs replay (the volume was not shut down cleanly)")
        found += 1
        if off:
            break  # the two restart pages: at 0 and at the system page size
    if not found:
        raise UsageError("$LogFile has no restart area")


def analyze(vol: Volume) -> FsUsage:
    fs = Ntfs(vol)
    geo = fs.geo
    cs = geo.cluster_size
    check_clean(fs)
    bm = _data(fs.record(REC_BITMAP), "$Bitmap")
    if bm.resident or bm.runs is None:
        raise UsageError("$Bitmap is resident")
    need = -(-geo.clusters // 8)
    if bm.data_size < need or bm.data_size > need + 8 + cs:
        raise UsageError(f"$Bitmap ({bm.data_size} bytes) does not fit {geo.clusters} clusters")
    if bm.initialized_size < need:
        raise UsageError("$Bitmap is not fully initialized")
    parts = []
    for start in range(0, need, BITMAP_CHUNK):  # bounded memory on huge volumes
        raw = read_runs(vol, geo, bm.runs, start, min(BITMAP_CHUNK, need - start), "$Bitmap")
        first = start * 8
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: geo.clusters - first]
        if not bits.all():
            parts.append(runs_of(bits == 0, cs, first * cs))
    free = normalize(np.concatenate(parts)) if parts else empty_ranges()
    # the structures that must be in use: if $Bitmap calls them free it is not to be believed
    must = [np.array([[0, BOOT_BYTES]], np.int64), run_ranges(fs.mft_runs, cs), run_ranges(bm.runs, cs)]
    for number, name in ((REC_MFTMIRR, "$MFTMirr"), (REC_LOGFILE, "$LogFile")):
        must.append(run_ranges(_data(fs.record(number), name).runs or [], cs))
    must_used = np.concatenate(must)
    if total(subtract(must_used, subtract(must_used, free))):
        raise UsageError("$Bitmap calls the boot sector, MFT, $MFTMirr, $LogFile or itself free")
    backup = geo.total_sectors * geo.bps
    # $Boot is in must_used, which free was just shown not to meet: only the backup boot sector
    free = subtract(free, np.array([[backup, backup + geo.bps]], np.int64))
    return FsUsage("ntfs", free, size=min(vol.size, backup + geo.bps), label=_label(fs), unit=cs)


def _label(fs: Ntfs) -> str:
    try:
        names = [a for a in fs.record(REC_VOLUME) if a.type == 0x60 and a.resident]
    except UsageError:
        return ""
    return names[0].value.decode("utf-16-le", "replace") if names else ""
