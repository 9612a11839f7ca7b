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

import itertools
import struct
import threading
from collections.abc import Iterator

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


# Codec 2 (docs/repository-format.md, "Chunks"): a chunk compressed as independent zstd
# frames of FRAME_SIZE plaintext bytes each, behind a table of their lengths, so that a
# restore decodes only the frames holding blocks it needs. The head of the benchmark's
# chain of 30 incrementals needs 43% of the blocks of the first full's 1 MiB chunks that it
# reads (later incrementals replaced the rest); one frame per chunk made it decode them
# whole. Measured on the benchmark image's 848 compressible MiB at level 1: 64 KiB frames
# store 5% more than 1 MiB frames (282 against 269 MiB) and compress as fast.
FRAME_SIZE = 64 << 10
FRAMES_HEAD = struct.Struct("<II")  # plaintext bytes per frame, number of frames
MIN_FRAME_SIZE = 4096


def compress_frames(cctx: zstandard.ZstdCompressor, data: bytes | memoryview, frame_size: int = FRAME_SIZE) -> bytes:
    """Codec 2's body for ``data``: the frame table, then each FRAME_SIZE piece of
    ``data`` as its own zstd frame."""
    with memoryview(data) as mv:
        frames = [cctx.compress(mv[i:i + frame_size]) for i in range(0, len(mv), frame_size)]
    table = struct.pack(f"<{len(frames)}I", *map(len, frames))
    return b"".join([FRAMES_HEAD.pack(frame_size, len(frames)), table, *frames])


def frames_table(body: memoryview, raw_len: int, what: str) -> tuple[int, list[int]]:
    """Codec 2's frame size and the offsets in ``body`` where each frame starts (and,
    last, where the final one ends), checked against the chunk's length ``raw_len``;
    IntegrityError naming ``what`` if the table does not describe ``body``."""
    bad = f"{what}: bad frame table (corrupt or hostile data)"
    if len(body) < FRAMES_HEAD.size:
        raise IntegrityError(bad)
    size, count = FRAMES_HEAD.unpack_from(body)
    if size < MIN_FRAME_SIZE or count != -(-raw_len // size) or count == 0:
        raise IntegrityError(bad)
    start = FRAMES_HEAD.size + 4 * count
    if start > len(body):
        raise IntegrityError(bad)
    lens = struct.unpack_from(f"<{count}I", body, FRAMES_HEAD.size)
    if min(lens) == 0 or start + sum(lens) != len(body):
        raise IntegrityError(bad)
    return size, list(itertools.accumulate(lens, initial=start))


def frames_into(body: memoryview, out: memoryview, what: str,
                ranges: list[tuple[int, int]] | None = None) -> None:
    """Decode codec 2's ``body`` into ``out`` (exactly the chunk's length): every frame,
    or only those holding a byte of ``ranges`` ((start, end) offsets in the chunk); the
    rest of ``out`` is left as it is. IntegrityError naming ``what`` if the table or a
    frame is corrupt, or a frame does not hold exactly its share of the chunk."""
    raw_len = len(out)
    size, offs = frames_table(body, raw_len, what)
    if ranges is None:
        wanted: range | list[int] = range(len(offs) - 1)
    else:
        n = len(offs) - 1
        wanted = sorted({i for lo, hi in ranges if hi > lo for i in range(lo // size, min((hi - 1) // size + 1, n))})
    for i in wanted:
        dest = out[i * size:min((i + 1) * size, raw_len)]
        if decompress_into(body[offs[i]:offs[i + 1]], dest, what) != len(dest):
            raise IntegrityError(f"{what}: cannot decompress (a frame is shorter than its share of the chunk)")


def frames(body: memoryview, raw_len: int, what: str) -> Iterator[bytes]:
    """Codec 2's ``body`` decoded frame by frame (each checked to hold exactly its share
    of the ``raw_len`` bytes)."""
    size, offs = frames_table(body, raw_len, what)
    for i in range(len(offs) - 1):
        want = min(size, raw_len - i * size)
        part = decompress(body[offs[i]:offs[i + 1]], want, what)
        if len(part) != want:
            raise IntegrityError(f"{what}: cannot decompress (a frame is shorter than its share of the chunk)")
        yield part


def decompress_frames(body: memoryview, raw_len: int, what: str) -> bytes:
    """Codec 2's ``body`` decoded whole (``raw_len`` bytes, checked)."""
    return b"".join(frames(body, raw_len, what))


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
