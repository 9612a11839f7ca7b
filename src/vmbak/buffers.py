"""Per-thread buffers, reused and grown on demand.

Work that fills a buffer of about the same size many times a second (reading a task of
the disk, sealing a chunk, decoding a restore's stretch) takes a page fault for every
4 KiB page of a new buffer; a buffer kept per thread takes its pages once.
"""

from __future__ import annotations

import mmap
import threading


class ThreadBuffers:
    """One buffer per thread, of at least ``least`` bytes and grown on demand; ``aligned``
    buffers are anonymous mappings (page-aligned, as O_DIRECT wants), others bytearrays.
    A grown buffer replaces the old one, which is freed once no view of it is left (it is
    never closed here: a view held by an earlier error's traceback would make that raise)."""

    def __init__(self, least: int = 0, aligned: bool = False) -> None:
        self.least = least
        self.aligned = aligned
        self._local = threading.local()

    def get(self, n: int) -> bytearray | mmap.mmap:
        """This thread's buffer, at least ``n`` bytes long."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            size = max(n, self.least, 1)
            buf = self._local.buf = mmap.mmap(-1, size) if self.aligned else bytearray(size)
        return buf

    def view(self, n: int) -> memoryview:
        """The first ``n`` bytes of this thread's buffer."""
        return memoryview(self.get(n))[:n]
