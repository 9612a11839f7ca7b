"""The one interface every change source implements: a bitmap of changed blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ChangeMap:
    """Blocks changed since a reference point.

    ``bitmap`` is a numpy bool array with one entry per block (``block_size`` bytes).
    A change source may over-report, never under-report. ``reference`` names the
    point the changes are relative to (a snapshot id, a tracker change ID, a bitmap
    name); ``new_reference`` names the point this backup captures, for the next one.
    """

    bitmap: np.ndarray
    block_size: int
    source: str
    reference: str | None = None
    new_reference: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def changed_bytes(self) -> int:
        return int(np.count_nonzero(self.bitmap)) * self.block_size
