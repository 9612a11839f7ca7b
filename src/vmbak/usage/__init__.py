"""Unused block analysis: which blocks of a disk its partitions and filesystems use.

``analyze(disk)`` reads the partition table (MBR, GPT), descends into LVM physical volumes,
recognises the filesystem of each volume and asks its parser for the provably free byte ranges.
Everything else (tables, gaps, unknown or damaged filesystems, encrypted volumes) counts as used.
A used block is never called free: when a parser is unsure it raises UsageError and its whole
volume counts as used, with a note.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from vmbak.disks.base import DiskReader
from vmbak.usage.model import (
    FsUsage,
    UsageError,
    Volume,
    empty_ranges,
    normalize,
    subtract,
    total,
)
from vmbak.usage.partitions import Table, read_table

__all__ = ["DiskUsage", "Entry", "UsageError", "Volume", "analyze", "format_usage_text", "probe_filesystem"]

# Probe order matters only where two signatures could both match; each probe checks its magic.
FILESYSTEM_MODULES = ["ext", "xfs", "ntfs", "exfat", "fat", "btrfs", "swap"]
CONTAINER_MODULES = ["lvm"]


def _modules(names: list[str]) -> list[ModuleType]:
    out = []
    for n in names:
        try:
            out.append(importlib.import_module(f"vmbak.usage.{n}"))
        except ModuleNotFoundError as e:
            if e.name != f"vmbak.usage.{n}":
                raise
    return out


def load_parsers() -> None:
    """Import every partition, container and filesystem parser now (``analyze`` imports
    them as it needs them): the command line does it while the key derivation runs."""
    _modules(FILESYSTEM_MODULES + CONTAINER_MODULES)


@dataclass
class Entry:
    """One volume of the disk and what was found in it."""

    name: str  # "disk", "p1", "vg0/root"
    kind: str  # "disk", "partition" or "lv"
    start: int  # disk offset of its first byte
    size: int
    ptype: str = ""
    fstype: str = "unknown"
    label: str = ""
    free: int = 0  # provably free bytes
    notes: list[str] = field(default_factory=list)

    @property
    def used(self) -> int:
        return self.size - self.free

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "start": self.start, "size": self.size,
                "partition_type": self.ptype, "filesystem": self.fstype, "label": self.label,
                "used_bytes": self.used, "free_bytes": self.free, "notes": self.notes}


@dataclass
class DiskUsage:
    size: int
    scheme: str
    entries: list[Entry]
    free: np.ndarray  # (n, 2) disk byte ranges that no partition or filesystem uses
    notes: list[str] = field(default_factory=list)

    @property
    def free_bytes(self) -> int:
        return total(self.free)

    @property
    def used_bytes(self) -> int:
        return self.size - self.free_bytes

    def used_bitmap(self, block_size: int) -> np.ndarray:
        """One bool per block: False only for blocks that lie wholly inside free ranges."""
        nblocks = (self.size + block_size - 1) // block_size
        # Merge the free block ranges first: then +1/-1 marks never collide and fit in int8
        # (an int32 diff and its int64 prefix sum cost 384 MiB for a 2 TiB disk).
        diff = np.zeros(nblocks + 1, np.int8)
        if len(self.free):
            first = -(-self.free[:, 0] // block_size)  # round up: partial blocks stay used
            end = self.free[:, 1] // block_size
            if self.size % block_size:  # the short last block is free only if all of it is
                end = np.where(self.free[:, 1] >= self.size, -(-self.free[:, 1] // block_size), end)
            ok = end > first
            first, end = first[ok], end[ok]
            if len(first):
                o = np.argsort(first, kind="stable")
                first, end = first[o], np.maximum.accumulate(end[o])
                new = np.ones(len(first), bool)
                new[1:] = first[1:] > end[:-1]  # touching or overlapping ranges join
                starts = np.flatnonzero(new)
                diff[first[starts]] = 1
                diff[end[np.append(starts[1:] - 1, len(first) - 1)]] = -1
        free = diff[:-1]
        np.cumsum(free, out=free)
        return free == 0

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "partition_table": self.scheme, "used_bytes": self.used_bytes,
                "free_bytes": self.free_bytes, "volumes": [e.to_json() for e in self.entries],
                "notes": self.notes}


def probe_filesystem(vol: Volume) -> ModuleType | None:
    """The parser module whose signature matches ``vol``, if any (each parser is imported
    only when the ones before it did not match)."""
    for name in FILESYSTEM_MODULES:
        mods = _modules([name])
        if not mods:
            continue
        mod = mods[0]
        try:
            if mod.probe(vol):
                return mod
        except UsageError:
            continue
    return None


def _is_luks(vol: Volume) -> bool:
    try:
        return vol.size >= 6 and vol.read(0, 6) in (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
    except UsageError:
        return False


def _analyze_volume(vol: Volume, entry: Entry) -> np.ndarray:
    """Free disk ranges of one leaf volume; fills in ``entry``."""
    if _is_luks(vol):
        entry.fstype = "luks"
        entry.notes.append("encrypted (LUKS): all blocks count as used")
        return empty_ranges()
    mod = probe_filesystem(vol)
    if mod is None:
        entry.notes.append("no known filesystem: all blocks count as used")
        return empty_ranges()
    entry.fstype = mod.NAME
    try:
        fs: FsUsage = mod.analyze(vol)
    except UsageError as e:
        entry.notes.append(f"{mod.NAME}: {e}; all blocks count as used")
        return empty_ranges()
    except (ValueError, IndexError, KeyError, OverflowError, ZeroDivisionError, MemoryError) as e:
        # Damaged metadata that slipped past a parser's own checks: be safe, not sorry.
        entry.notes.append(f"{mod.NAME}: metadata not understood ({type(e).__name__}); all blocks count as used")
        return empty_ranges()
    entry.fstype = fs.fstype
    entry.label = fs.label
    entry.notes.extend(fs.notes)
    limit = fs.size if fs.size else vol.size
    free = vol.to_disk(normalize(fs.free, 0, min(limit, vol.size)))
    entry.free = total(free)
    return free


def _volumes(disk: DiskReader, table: Table) -> list[tuple[Volume, Entry]]:
    if table.scheme in ("none",):
        vols = [(Volume.linear(disk, 0, disk.size, "disk"), Entry("disk", "disk", 0, disk.size))]
    else:
        vols = []
        for p in table.partitions:
            name = f"p{p.number}"
            vols.append((Volume.linear(disk, p.start, p.size, name),
                         Entry(name, "partition", p.start, p.size, p.ptype)))
    out: list[tuple[Volume, Entry]] = []
    containers = _modules(CONTAINER_MODULES)
    for vol, entry in vols:
        for mod in containers:
            try:
                if not mod.probe(vol):
                    continue
                inner = mod.volumes(vol)
            except UsageError as e:
                entry.fstype = mod.NAME
                entry.notes.append(f"{mod.NAME}: {e}; all blocks count as used")
                out.append((vol, entry))
                break
            entry.fstype = mod.NAME
            out.append((vol, entry))  # the container itself: no free space of its own
            for lv in inner:
                out.append((lv, Entry(lv.name, "lv", lv.disk_offset, lv.size, mod.NAME)))
            break
        else:
            out.append((vol, entry))
    return out


class _ReadCache:
    """A DiskReader that reads small requests as whole aligned pieces of ``PIECE`` bytes and
    keeps the last few: the parsers read many small structures close together (sectors of
    a label, a superblock, descriptors), and over NBD each read is a round trip."""

    PIECE = 1 << 16
    KEEP = 64

    def __init__(self, disk: DiskReader) -> None:
        self.disk = disk
        self.size = disk.size
        self.description = disk.description
        self._pieces: dict[int, bytes] = {}

    def _piece(self, index: int) -> bytes:
        got = self._pieces.pop(index, None)
        if got is None:
            got = self.disk.pread(self.PIECE, index * self.PIECE)
            if len(self._pieces) >= self.KEEP:
                del self._pieces[next(iter(self._pieces))]
        self._pieces[index] = got  # newest last
        return got

    def pread(self, length: int, offset: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        first, last = offset // self.PIECE, (offset + length - 1) // self.PIECE
        if last - first > 1:
            return self.disk.pread(length, offset)
        data = b"".join(self._piece(i) for i in range(first, last + 1))
        return data[offset - first * self.PIECE:offset - first * self.PIECE + length]

    def data_extents(self, start: int = 0, end: int | None = None):  # noqa: ANN201
        return self.disk.data_extents(start, end)

    def close(self) -> None:
        self._pieces.clear()


def analyze(disk: DiskReader, block_size: int = 65536) -> DiskUsage:
    """Parse ``disk`` and return which bytes are used. Never raises for damaged metadata."""
    del block_size  # the result is byte-exact; used_bitmap() takes the block size
    disk = _ReadCache(disk)  # type: ignore[assignment]
    try:
        table = read_table(disk)
    except UsageError as e:
        return DiskUsage(disk.size, "unknown", [], empty_ranges(), [f"partition table: {e}; all blocks count as used"])
    notes = list(table.notes)
    vols = _volumes(disk, table)
    containers = {m.NAME for m in _modules(CONTAINER_MODULES)}
    frees: list[np.ndarray] = []
    spans: list[np.ndarray] = []
    for vol, entry in vols:
        span = vol.to_disk(np.array([[0, vol.size]]))
        spans.append(span)
        if entry.kind != "lv" and entry.fstype in containers:
            frees.append(empty_ranges())
            continue
        frees.append(_analyze_volume(vol, entry))
    # A block is free only if the volume it belongs to says so and no other leaf volume claims it
    # (overlapping partitions in a damaged table, or an LV overlapping its own PV's metadata).
    result = []
    leaf = [not (e.kind != "lv" and e.fstype in containers) for _v, e in vols]
    for i, free in enumerate(frees):
        if len(free) == 0:
            continue
        others = [spans[j] for j in range(len(vols)) if j != i and leaf[j]]
        if others:
            clean = subtract(free, normalize(np.concatenate(others)))
            if total(clean) != total(free):
                vols[i][1].notes.append("overlaps another volume; the overlap counts as used")
                vols[i][1].free = total(clean)
            free = clean
        result.append(free)
    free_all = normalize(np.concatenate(result), 0, disk.size) if result else empty_ranges()
    return DiskUsage(disk.size, table.scheme, [e for _v, e in vols], free_all, notes)


def _h(n: int) -> str:
    from vmbak.engine.common import human

    return human(n)


def format_usage_text(u: DiskUsage) -> str:
    lines = [f"disk: {_h(u.size)}, partition table: {u.scheme}, used {_h(u.used_bytes)}, free {_h(u.free_bytes)}"]
    for n in u.notes:
        lines.append(f"  note: {n}")
    if u.entries:
        lines.append(f"  {'volume':<14} {'start':>10} {'size':>10} {'filesystem':<10} {'used':>10} {'free':>10}  type")
    for e in u.entries:
        lines.append(f"  {e.name:<14} {_h(e.start):>10} {_h(e.size):>10} {e.fstype:<10} {_h(e.used):>10} "
                     f"{_h(e.free):>10}  {e.ptype}{'  label=' + e.label if e.label else ''}")
        for n in e.notes:
            lines.append(f"      note: {n}")
    return "\n".join(lines)
