"""Bounded zstd decompression for everything read back from a repository.

python-zstandard's one-shot ``decompress(data, max_output_size=N)`` honours N only for
frames that do not declare their content size; a frame that declares one is decompressed
into a buffer of the declared size, whatever N says (measured: a 32 KiB frame declaring
1 GiB came back as 1 GiB with N = 1 MiB). A hostile repository could make any reader
allocate gigabytes that way. So every decompression of repository data goes through
:func:`decompress`, which refuses a declared size above the limit before allocating, and
:func:`reader`, which streams with the same check for objects read piece by piece.
"""

from __future__ import annotations

import threading

import zstandard

from vmbak.errors import IntegrityError

_tls = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "d", None)
    if d is None:
        d = _tls.d = zstandard.ZstdDecompressor()
    return d


def _declared(data: bytes | memoryview, limit: int, what: str) -> None:
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise IntegrityError(f"{what}: cannot decompress (corrupt data)") from None
    if size > limit:
        raise IntegrityError(f"{what}: declares {size} bytes uncompressed, more than the {limit} "
                             "its format allows (corrupt or hostile data)")


def decompress(data: bytes | memoryview, limit: int, what: str) -> bytes:
    """The first zstd frame of ``data``, refused (IntegrityError naming ``what``) if it
    would exceed ``limit`` bytes; thread-safe."""
    _declared(data, limit, what)
    try:
        return _dctx().decompress(data, max_output_size=limit)
    except zstandard.ZstdError:
        raise IntegrityError(f"{what}: cannot decompress (corrupt data, or larger than the "
                             f"{limit} bytes its format allows)") from None


def decompress_into(data: bytes | memoryview, out: memoryview, what: str) -> int:
    """Decompress the first zstd frame of ``data`` into ``out`` (no allocation of the
    result); return its length. IntegrityError naming ``what`` if the frame is corrupt or
    holds more than ``len(out)`` bytes; thread-safe."""
    _declared(data, len(out), what)
    try:
        r = _dctx().stream_reader(data, read_across_frames=False)
        n = 0
        while n < len(out):
            k = r.readinto(out[n:])
            if not k:
                break
            n += k
        if n == len(out) and r.read(1):
            raise IntegrityError(f"{what}: cannot decompress (larger than the {len(out)} bytes "
                                 "its format allows)")
    except zstandard.ZstdError:
        raise IntegrityError(f"{what}: cannot decompress (corrupt data)") from None
    return n


class Reader:
    """Reads a zstd frame piece by piece, so that a caller can derive the limit of the
    rest from what it has read so far (a manifest's header gives its geometry)."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        _declared(data, 1 << 62, what)  # a readable frame header at least
        self.what = what
        self._r = _dctx().stream_reader(data, read_across_frames=False)
        self.total = 0

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` more bytes, or IntegrityError (the frame ends early or is corrupt)."""
        parts = []
        want = n
        try:
            while want > 0:
                b = self._r.read(min(want, 8 << 20))
                if not b:
                    raise IntegrityError(f"{self.what}: truncated")
                parts.append(b)
                want -= len(b)
        except zstandard.ZstdError:
            raise IntegrityError(f"{self.what}: cannot decompress (corrupt data)") from None
        self.total += n
        return b"".join(parts)

    def expect_end(self) -> None:
        """IntegrityError unless the frame has no more bytes."""
        try:
            extra = self._r.read(1)
        except zstandard.ZstdError:
            raise IntegrityError(f"{self.what}: cannot decompress (corrupt data)") from None
        if extra:
            raise IntegrityError(f"{self.what}: longer than its header says (corrupt or hostile data)")
