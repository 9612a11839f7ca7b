"""The data model of disk usage analysis: volumes, free ranges and the per-disk result.

A *volume* is a run of bytes a filesystem lives in: a partition, the whole disk, or an LVM
logical volume (whose segments may be scattered over the disk). A filesystem parser reads its
volume and returns the byte ranges, relative to the volume, that are *provably free*. Anything
it is unsure about stays out of the free set: a used block must never be called free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vmbak.disks.base import DiskReader

RANGES_DTYPE = np.int64


class UsageError(Exception):
    """Metadata that cannot be trusted: the volume counts as all used, with this message as a note."""


def empty_ranges() -> np.ndarray:
    return np.zeros((0, 2), RANGES_DTYPE)


def runs_of(bits: np.ndarray, unit: int, base: int = 0) -> np.ndarray:
    """Byte ranges [start, end) of the runs of True in ``bits``; bit i covers unit bytes at base+i*unit."""
    b = np.asarray(bits, bool)
    if b.size == 0:
        return empty_ranges()
    edges = np.diff(np.concatenate(([0], b.view(np.int8), [0])).astype(np.int8))
    starts = np.flatnonzero(edges == 1).astype(RANGES_DTYPE)
    ends = np.flatnonzero(edges == -1).astype(RANGES_DTYPE)
    out = np.empty((len(starts), 2), RANGES_DTYPE)
    out[:, 0] = starts * unit + base
    out[:, 1] = ends * unit + base
    return out


def normalize(ranges: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Sort, clip to [lo, hi), drop empty ranges and merge overlapping or touching ones."""
    r = np.asarray(ranges, RANGES_DTYPE).reshape(-1, 2)
    if hi is not None:
        r = np.clip(r, lo, hi)
    else:
        r = np.maximum(r, lo)
    r = r[r[:, 1] > r[:, 0]]
    if len(r) == 0:
        return empty_ranges()
    r = r[np.argsort(r[:, 0], kind="stable")]
    # A range starts a new group unless it begins at or before the running maximum end.
    run_end = np.maximum.accumulate(r[:, 1])
    new = np.ones(len(r), bool)
    new[1:] = r[1:, 0] > run_end[:-1]
    idx = np.flatnonzero(new)
    out = np.empty((len(idx), 2), RANGES_DTYPE)
    out[:, 0] = r[idx, 0]
    out[:, 1] = np.maximum.reduceat(r[:, 1], idx)
    return out


def subtract(ranges: np.ndarray, remove: np.ndarray) -> np.ndarray:
    """The part of ``ranges`` not covered by ``remove`` (both normalized)."""
    a = normalize(ranges)
    b = normalize(remove)
    if len(a) == 0 or len(b) == 0:
        return a
    # Sweep over all boundaries: coverage count of a minus indicator of b.
    pts = np.concatenate((a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
    delta_a = np.concatenate((np.ones(len(a)), -np.ones(len(a)), np.zeros(2 * len(b))))
    delta_b = np.concatenate((np.zeros(2 * len(a)), np.ones(len(b)), -np.ones(len(b))))
    order = np.argsort(pts, kind="stable")
    pts = pts[order]
    ca = np.cumsum(delta_a[order])
    cb = np.cumsum(delta_b[order])
    inside = (ca > 0) & (cb <= 0)
    # The state after each point holds until the next point.
    starts = pts[:-1][inside[:-1]]
    ends = pts[1:][inside[:-1]]
    return normalize(np.stack((starts, ends), axis=1) if len(starts) else empty_ranges())


def total(ranges: np.ndarray) -> int:
    r = np.asarray(ranges, RANGES_DTYPE).reshape(-1, 2)
    return int((r[:, 1] - r[:, 0]).sum())


class Volume:
    """A byte-addressed view of part of a disk, made of one or more linear segments.

    ``segments`` are (volume_offset, disk_offset, length) triples in volume order, without gaps.
    Reads outside the volume, or short reads, raise UsageError: a parser that asks for them is
    looking at damaged metadata.
    """

    def __init__(self, disk: DiskReader, segments: Iterable[tuple[int, int, int]], name: str = "") -> None:
        self.disk = disk
        self.segments = [(int(v), int(d), int(n)) for v, d, n in segments if n > 0]
        pos = 0
        for v, _, n in self.segments:
            if v != pos:
                raise ValueError("volume segments must be contiguous")
            pos += n
        self.size = pos
        self.name = name

    @classmethod
    def linear(cls, disk: DiskReader, offset: int, length: int, name: str = "") -> Volume:
        length = max(0, min(length, disk.size - offset))
        return cls(disk, [(0, offset, length)], name)

    @property
    def disk_offset(self) -> int:
        return self.segments[0][1] if self.segments else 0

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of the volume."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"metadata points outside the volume (offset {offset}, length {length})")
        parts = []
        want_end = offset + length
        for v, d, n in self.segments:
            if v + n <= offset or v >= want_end:
                continue
            s = max(offset, v)
            e = min(want_end, v + n)
            data = self.disk.pread(e - s, d + (s - v))
            if len(data) != e - s:
                raise UsageError(f"short read at volume offset {s}")
            parts.append(data)
        return b"".join(parts)

    def sub(self, offset: int, length: int, name: str = "") -> Volume:
        """A volume for [offset, offset+length) of this one (clipped to it)."""
        end = min(self.size, offset + length)
        segs = []
        pos = 0
        for v, d, n in self.segments:
            s = max(offset, v)
            e = min(end, v + n)
            if e > s:
                segs.append((pos, d + (s - v), e - s))
                pos += e - s
        return Volume(self.disk, segs, name)

    def to_disk(self, ranges: np.ndarray) -> np.ndarray:
        """Map volume byte ranges to disk byte ranges (clipped to the volume)."""
        r = normalize(ranges, 0, self.size)
        if len(r) == 0:
            return r
        out = []
        for v, d, n in self.segments:
            c = np.clip(r, v, v + n)
            c = c[c[:, 1] > c[:, 0]]
            if len(c):
                out.append(c - v + d)
        return normalize(np.concatenate(out)) if out else empty_ranges()


@dataclass
class FsUsage:
    """What a filesystem parser found in a volume."""

    fstype: str
    free: np.ndarray  # (n, 2) int64 [start, end) byte ranges relative to the volume, provably free
    size: int = 0  # bytes the filesystem spans (0: the whole volume)
    label: str = ""
    unit: int = 0  # allocation unit in bytes (block or cluster)
    notes: list[str] = field(default_factory=list)


class FilesystemParser(Protocol):
    """What each filesystem module provides."""

    NAME: str

    def probe(self, vol: Volume) -> bool:
        """Cheap test of the magic numbers: is this filesystem (perhaps damaged) in ``vol``?"""
        ...

    def analyze(self, vol: Volume) -> FsUsage:
        """Parse the allocation structures; raise UsageError when they cannot be trusted."""
        ...
