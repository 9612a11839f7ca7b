"""Random-access disk readers. Every source of disk data implements DiskReader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class DiskReader(Protocol):
    """A read-only, random-access, thread-safe view of a disk.

    ``pread`` must be safe to call from several threads at once.
    """

    size: int
    description: str

    def pread(self, length: int, offset: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` (short only at the end of the disk), as
        ``bytes`` (never a bytearray or memoryview: parsers and hashes rely on the type)."""
        ...

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) ranges that may hold non-zero data, in order.

        Anything outside these ranges reads as zeros. A reader that does not know
        yields the whole range.
        """
        ...

    def close(self) -> None: ...

    # Optional, not part of the protocol: ``source_state() -> tuple | None`` on a reader of
    # a live disk read directly (no checkpoint or point-in-time view: RawDisk, ImageDisk).
    # The backup compares it before and after reading, and reads a sample of blocks again,
    # to tell whether the disk changed while it was read (``Manifest.consistency``).
