"""Linux swap: only the header page is used; the rest holds nothing worth keeping.

A swap area holding a hibernation image carries another signature (S1SUSPEND and friends) and
is deliberately not recognised here, so it counts as all used.
"""

from __future__ import annotations

import struct

import numpy as np

from vmbak.usage.model import FsUsage, UsageError, Volume

NAME = "swap"
PAGE_SIZES = (4096, 8192, 16384, 65536)


def _page_size(vol: Volume) -> int | None:
    for ps in PAGE_SIZES:
        if vol.size >= ps and vol.read(ps - 10, 10) == b"SWAPSPACE2":
            return ps
    return None


def probe(vol: Volume) -> bool:
    return _page_size(vol) is not None


def analyze(vol: Volume) -> FsUsage:
    ps = _page_size(vol)
    if ps is None:
        raise UsageError("swap signature vanished")
    version, last_page = struct.unpack("<II", vol.read(1024, 8))
    if version != 1:
        raise UsageError(f"unknown swap header version {version}")
    end = min(vol.size, (last_page + 1) * ps)
    label = vol.read(1024 + 28, 16).split(b"\0", 1)[0].decode("utf-8", "replace")
    free = np.array([[ps, end]], np.int64) if end > ps else np.zeros((0, 2), np.int64)
    return FsUsage(NAME, free, label=label, unit=ps)
