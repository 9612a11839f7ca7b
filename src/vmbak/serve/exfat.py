"""A small, lazy exFAT reader for browsing backups: directories, names, times, file data.

dissect.fat has an exFAT module, but it parses the whole tree when it opens a volume (every
directory cluster of the filesystem is fetched before the first ``ls``), reads only the
first cluster of a contiguous directory, and follows FAT chains without a bound, so one
looping chain in a damaged image hangs it. This reader follows the published exFAT layout
and reads only what is asked for:

* the boot region is parsed and checksum-verified by ``vmbak.usage.exfat.parse_boot`` (the
  backup boot region is used when the main one is damaged);
* a directory is read when it is listed: its clusters come from its stream extension entry
  (contiguous when the NoFatChain flag is set, else chained in the active FAT; the root
  directory is always chained). Entry sets are a File entry (0x85), a Stream Extension
  (0xC0) and File Name entries (0xC1, 15 UTF-16 units each); a set whose checksum does not
  match is skipped, as a driver would;
* FAT sectors are read on demand in 64 KiB pieces and kept; a chain is bounded by the
  clusters its data length needs (or the cluster count), so loops end in an error;
* file data is read by cluster runs; bytes past the stream's valid data length read as
  zeros (as the specification says).
"""

from __future__ import annotations

import io
import struct
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from vmbak.engine.view import RangeFile
from vmbak.serve.files import BrowseError, Filesystem, Node
from vmbak.usage.exfat import EOC, Geometry, _set_checksum, parse_boot
from vmbak.usage.model import UsageError, Volume

FAT_PIECE = 64 << 10
MAX_DIR_BYTES = 256 << 20  # the specification's limit for one directory
ATTR_READ_ONLY = 0x01
ATTR_DIRECTORY = 0x10


class _FileDisk:
    """A RangeFile as the DiskReader that vmbak.usage's Volume wants."""

    def __init__(self, f: RangeFile) -> None:
        self.f = f
        self.size = f.size

    def pread(self, length: int, offset: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(length)


def _timestamp_ns(stamp: int, ten_ms: int, utc_offset: int) -> int:
    """An exFAT timestamp (local time, 2 s resolution), its 10 ms increment and UTC offset."""
    if not stamp:
        return 0
    year = 1980 + (stamp >> 25)
    month, day = (stamp >> 21) & 0xF, (stamp >> 16) & 0x1F
    hour, minute, sec2 = (stamp >> 11) & 0x1F, (stamp >> 5) & 0x3F, stamp & 0x1F
    try:
        dt = datetime(year, month, day, hour, minute, min(sec2 * 2, 59), tzinfo=UTC)
    except ValueError:
        return 0
    ns = int(dt.timestamp()) * 10**9 + min(ten_ms, 199) * 10**7
    if utc_offset & 0x80:  # the offset is valid: local time = UTC + offset (15-minute steps)
        off = utc_offset & 0x7F
        if off & 0x40:
            off -= 0x80
        ns -= int(timedelta(minutes=15 * off).total_seconds()) * 10**9
    return max(ns, 0)


class ExfatEntry:
    """One file or directory: its name, attributes, times and allocation."""

    __slots__ = ("name", "attributes", "mtime_ns", "first", "length", "valid", "contiguous", "allocated")

    def __init__(self, name: str, attributes: int, mtime_ns: int, first: int, length: int, valid: int,
                 contiguous: bool, allocated: bool) -> None:
        self.name = name
        self.attributes = attributes
        self.mtime_ns = mtime_ns
        self.first = first
        self.length = length
        self.valid = valid
        self.contiguous = contiguous
        self.allocated = allocated

    @property
    def is_dir(self) -> bool:
        return bool(self.attributes & ATTR_DIRECTORY)


class Exfat:
    """An exFAT filesystem in the volume file ``f``."""

    def __init__(self, f: RangeFile) -> None:
        self.vol = Volume(_FileDisk(f), [(0, 0, f.size)])
        try:
            self.geo: Geometry = parse_boot(self.vol)[0]
        except UsageError as e:
            raise BrowseError(f"exFAT boot sector: {e}") from None
        g = self.geo
        self.cluster_size = g.cluster_size
        active = (g.flags & 1) if g.nfats == 2 else 0
        self._fat_base = (g.fat_offset + active * g.fat_length) * g.bps
        self._fat_pieces: dict[int, bytes] = {}

    # -------------------------------------------------------------- clusters
    def _read(self, offset: int, length: int) -> bytes:
        try:
            return self.vol.read(offset, length)
        except UsageError as e:
            raise BrowseError(f"exFAT: {e}") from None

    def fat(self, c: int) -> int:
        pos = 4 * c
        k = pos // FAT_PIECE
        piece = self._fat_pieces.get(k)
        if piece is None:
            end = min((k + 1) * FAT_PIECE, 4 * (self.geo.count + 2))
            piece = self._fat_pieces[k] = self._read(self._fat_base + k * FAT_PIECE, end - k * FAT_PIECE)
        return struct.unpack_from("<I", piece, pos - k * FAT_PIECE)[0]

    def runs(self, first: int, length: int | None, contiguous: bool) -> list[tuple[int, int]]:
        """(first cluster, cluster count) runs holding ``length`` bytes from ``first``
        (``length`` None: a FAT chain to its end, as the root directory's)."""
        g = self.geo
        cs = self.cluster_size
        need = None if length is None else -(-length // cs)
        if need == 0:
            return []
        if not 2 <= first < g.count + 2:
            raise BrowseError(f"exFAT: cluster {first:#x} is outside the cluster heap")
        if contiguous:
            assert need is not None
            if first + need > g.count + 2:
                raise BrowseError("exFAT: a contiguous allocation runs past the cluster heap")
            return [(first, need)]
        out: list[tuple[int, int]] = []
        limit = g.count if need is None else need
        c, n = first, 0
        seen: set[int] = set()
        while True:
            if not 2 <= c < g.count + 2:
                raise BrowseError(f"exFAT: a cluster chain leaves the cluster heap at {c:#x}")
            if n >= limit or c in seen:
                raise BrowseError(f"exFAT: the cluster chain from {first:#x} loops")
            seen.add(c)
            if out and out[-1][0] + out[-1][1] == c:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((c, 1))
            n += 1
            if need is not None and n == need:
                return out  # the data ends here, whatever the FAT says next
            nxt = self.fat(c)
            if nxt == EOC:
                break
            c = nxt
        if need is not None and n < need:
            raise BrowseError("exFAT: a cluster chain is shorter than its data")
        return out

    def segments(self, runs: list[tuple[int, int]], length: int) -> list[tuple[int, int, int]]:
        """(file offset, volume offset, length) pieces of the first ``length`` bytes of ``runs``."""
        out = []
        pos = 0
        for c, n in runs:
            if pos >= length:
                break
            take = min(n * self.cluster_size, length - pos)
            out.append((pos, self.geo.cluster_offset(c), take))
            pos += take
        return out

    def read_runs(self, runs: list[tuple[int, int]], length: int) -> bytes:
        return b"".join(self._read(v, n) for _, v, n in self.segments(runs, length))

    # -------------------------------------------------------------- directories
    def root_runs(self) -> list[tuple[int, int]]:
        return self.runs(self.geo.root_cluster, None, False)

    def listdir(self, runs: list[tuple[int, int]], length: int) -> list[ExfatEntry]:
        if length > MAX_DIR_BYTES:
            raise BrowseError(f"exFAT: a directory of {length} bytes is larger than exFAT allows")
        raw = self.read_runs(runs, length)
        out: list[ExfatEntry] = []
        n = len(raw) // 32
        i = 0
        while i < n:
            t = raw[32 * i]
            if t == 0x00:  # end of directory
                break
            if t != 0x85:
                # unused/deleted entries, the bitmap, up-case and label entries, stray
                # secondaries: one entry each; benign primaries carry their secondaries
                i += 1 + (raw[32 * i + 1] if t & 0xE0 == 0xA0 else 0)
                continue
            sec = raw[32 * i + 1]
            whole = raw[32 * i: 32 * (i + 1 + sec)]
            if not 2 <= sec <= 18 or len(whole) < 32 * (1 + sec) or whole[32] != 0xC0 \
                    or _set_checksum(whole) != struct.unpack_from("<H", whole, 2)[0]:
                i += 1  # a damaged entry set: skipped
                continue
            i += 1 + sec
            attrs, = struct.unpack_from("<H", whole, 4)
            mstamp, = struct.unpack_from("<I", whole, 12)
            mtime = _timestamp_ns(mstamp, whole[21], whole[23])
            flags, name_len = whole[33], whole[35]
            valid, = struct.unpack_from("<Q", whole, 40)
            first, length_ = struct.unpack_from("<IQ", whole, 52)
            units = []
            for k in range(2, 1 + sec):
                e = whole[32 * k: 32 * k + 32]
                if e[0] != 0xC1:
                    break
                units.append(e[2:32])
            name = b"".join(units).decode("utf-16-le", "replace")[:name_len]
            if len(name) != name_len or not name:
                continue  # fewer name entries than the name's length
            out.append(ExfatEntry(name, attrs, mtime, first, length_, min(valid, length_), bool(flags & 2),
                                  bool(flags & 1)))
        return out

    def entry_runs(self, e: ExfatEntry) -> list[tuple[int, int]]:
        if not e.allocated or e.length == 0 or e.first == 0:
            return []
        return self.runs(e.first, e.length, e.contiguous)

    def open(self, e: ExfatEntry) -> BinaryIO:
        """The file's data (zeros past its valid data length)."""
        segs = self.segments(self.entry_runs(e), e.valid)
        if sum(n for _, _, n in segs) < e.valid:
            raise BrowseError(f"exFAT: {e.name} has less allocation than data")
        size, read = e.length, self._read

        def pread(length: int, offset: int) -> bytes:
            end = min(offset + length, size)
            parts = []
            for fo, vo, n in segs:
                lo, hi = max(offset, fo), min(end, fo + n)
                if hi > lo:
                    parts.append(read(vo + lo - fo, hi - lo))
            data = b"".join(parts)
            # the pieces cover [0, valid) without gaps; past it the file reads as zeros
            return data + bytes(max(0, end - offset) - len(data))

        if size == 0:
            return io.BytesIO(b"")
        return RangeFile(pread, size, e.name)


class ExfatFs(Filesystem):
    """The browsing adapter (vmbak.serve.files.Filesystem) over Exfat."""

    fstype = "exfat"

    def __init__(self, f: RangeFile) -> None:
        self.fs = Exfat(f)

    @staticmethod
    def _node(e: ExfatEntry) -> Node:
        ro = bool(e.attributes & ATTR_READ_ONLY)
        if e.is_dir:
            return Node(e.name, "dir", 0, 0o555 if ro else 0o755, e.mtime_ns, ident=("d", e.first), obj=e)
        return Node(e.name, "file", e.length, 0o444 if ro else 0o644, e.mtime_ns, obj=e)

    def root(self) -> Node:
        return Node("/", "dir", 0, 0o755, 0, ident=("d", self.fs.geo.root_cluster), obj=None)

    def listdir(self, node: Node) -> list[Node]:
        if node.obj is None:
            runs = self.fs.root_runs()
            length = sum(n for _, n in runs) * self.fs.cluster_size
        else:
            e: ExfatEntry = node.obj
            runs, length = self.fs.entry_runs(e), e.length
        return [self._node(e) for e in self.fs.listdir(runs, length)]

    def open(self, node: Node) -> BinaryIO:
        return self.fs.open(node.obj)
