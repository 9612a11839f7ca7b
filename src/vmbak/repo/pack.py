"""Pack files: many chunk blobs in one object, with an encrypted header at the end.

Layout (all integers little-endian)::

    blob_0 | blob_1 | ... | blob_n-1 | header_envelope | u32 header_envelope_len | b"VMBKPAK1"

Each blob is an envelope (see crypto.py) of ``codec(1) | data`` with AAD
``b"vmbak-chunk:" + chunk_id``. The header envelope (AAD ``b"vmbak-packheader"``)
holds ``u32 count`` and ``count`` entries of PACK_ENTRY. The pack's name is the hex
BLAKE3 (unkeyed) of the whole file, so check --read-data can verify it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import numpy as np

from vmbak.errors import IntegrityError, RepositoryError
from vmbak.interrupts import deferred
from vmbak.repo.backend import Backend, create_private
from vmbak.repo.crypto import Sealer, copy_unlocked

PACK_MAGIC = b"VMBKPAK1"
TRAILER = struct.Struct("<I8s")
PACK_ENTRY = np.dtype([("id", "V32"), ("off", "<u8"), ("len", "<u4"), ("raw", "<u4")])
HEADER_AAD = b"vmbak-packheader"

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_ZSTD_FRAMES = 2  # independent zstd frames behind a table of their lengths (repo/zstd.py)


def chunk_aad(chunk_id: bytes) -> bytes:
    return b"vmbak-chunk:" + chunk_id


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


_PACK_ID = re.compile(r"[0-9a-f]{64}")


def list_packs(backend: Backend) -> dict[str, int]:
    """The packs stored under data/, as {pack id: size}; names that are not a pack's
    (not 64 hex digits, or in the wrong data/XX folder) are left out."""
    present = {}
    for name, size in backend.list("data"):
        pid = name.rsplit("/", 1)[-1]
        if _PACK_ID.fullmatch(pid) and name == pack_name(pid):
            present[pid] = size
    return present


@dataclass
class FinishedPack:
    pack_id: str
    entries: np.ndarray  # PACK_ENTRY
    size: int


# Packs are written through a page-aligned staging buffer, in pieces of STAGE_BYTES, with
# O_DIRECT where the backend allows it (a local repository): the pack's bytes then go from
# the buffer to the disk without being copied into the page cache. Measured on the 2-core
# development VM: copying a new pack into the page cache cost about 0.8 CPU-seconds per
# GiB (every page-cache page was a fresh page of memory), O_DIRECT 0.04. The buffer is
# kept per thread, so its pages are faulted in once.
STAGE_BYTES = 4 << 20
DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT writes: a multiple of any logical block size in use

_stage_tls = threading.local()


def _take_stage() -> mmap.mmap:
    free = getattr(_stage_tls, "free", None)
    if free:
        return free.pop()
    return mmap.mmap(-1, STAGE_BYTES)  # page-aligned, as O_DIRECT wants


def _give_stage(buf: mmap.mmap) -> None:
    if not hasattr(_stage_tls, "free"):
        _stage_tls.free = []
    _stage_tls.free.append(buf)


class PackWriter:
    """Appends sealed blobs to a local temp file; ``finish`` moves it into the repository.

    Blobs are gathered in a staging buffer and written in large aligned pieces (O_DIRECT
    when the backend's ``direct_writes`` says so and the filesystem accepts it; buffered
    otherwise). Not thread-safe: one thread writes one pack.
    """

    def __init__(self, backend: Backend, sealer: Sealer) -> None:
        self.backend = backend
        self.sealer = sealer
        self.path = backend.temp_path("pack")
        try:
            with deferred():  # a signal between creating the file and holding it would orphan it
                self.fd = create_private(self.path)
        except OSError as e:
            raise self._error(e) from None
        self.direct = False
        if getattr(backend, "direct_writes", False) and hasattr(os, "O_DIRECT"):
            try:
                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
                self.direct = True
            except OSError:
                pass  # a filesystem without O_DIRECT (tmpfs): buffered writes
        self.buf: mmap.mmap | None = _take_stage()
        self.fill = 0  # bytes of buf not yet written
        self.hasher = blake3.blake3(max_threads=1)
        self.offset = 0
        self.ids: list[bytes] = []
        self.offs: list[int] = []
        self.lens: list[int] = []
        self.raws: list[int] = []

    def _error(self, e: OSError) -> RepositoryError:
        return RepositoryError(f"cannot write a new pack of {self.backend.location} at {self.path}: "
                               f"{e.strerror or e}")

    def _write_out(self, view: memoryview) -> None:
        # A write may be short (a full disk returns what fitted before it fails): write the
        # rest, which then raises. A filesystem that refuses an O_DIRECT write (EINVAL) gets
        # this and every later write buffered.
        try:
            while view:
                try:
                    view = view[os.write(self.fd, view):]
                except OSError as e:
                    if not (self.direct and e.errno == errno.EINVAL):
                        raise
                    self._buffered()
        except OSError as e:
            raise self._error(e) from None

    def _buffered(self) -> None:
        if self.direct:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False

    def _append(self, data: bytes | memoryview) -> None:
        """Stage ``data``; write every full buffer (a multiple of DIRECT_ALIGN)."""
        self.hasher.update(data)
        self.offset += len(data)
        src = memoryview(data)
        while src:
            n = min(len(src), STAGE_BYTES - self.fill)
            with memoryview(self.buf) as mv:  # copied without the GIL: the workers go on
                copy_unlocked(mv[self.fill:self.fill + n], src[:n])
            self.fill += n
            src = src[n:]
            if self.fill == STAGE_BYTES:
                with memoryview(self.buf) as mv:
                    self._write_out(mv)
                self.fill = 0

    def _drain(self) -> None:
        """Write what is staged: the aligned part as it is, the short rest buffered."""
        aligned = self.fill - self.fill % DIRECT_ALIGN
        with memoryview(self.buf) as mv:
            if aligned:
                self._write_out(mv[:aligned])
            if self.fill > aligned:
                try:
                    self._buffered()
                except OSError as e:
                    raise self._error(e) from None
                self._write_out(mv[aligned:self.fill])
        self.fill = 0

    def pad(self, data: bytes) -> None:
        """Write bytes that no entry covers (readers find blobs only through the header).
        Random padding gives a pack a name no other pack had: see engine/prune.py."""
        self._append(data)

    def add(self, chunk_id: bytes, blob: bytes, raw_len: int) -> int:
        """Append one sealed blob; return its offset."""
        off = self.offset
        self._append(blob)
        self.ids.append(chunk_id)
        self.offs.append(off)
        self.lens.append(len(blob))
        self.raws.append(raw_len)
        return off

    def __len__(self) -> int:
        return len(self.ids)

    def finish(self) -> FinishedPack:
        entries = np.zeros(len(self.ids), dtype=PACK_ENTRY)
        entries["id"] = self.ids
        entries["off"] = self.offs
        entries["len"] = self.lens
        entries["raw"] = self.raws
        header = self.sealer.seal(struct.pack("<I", len(entries)) + entries.tobytes(), HEADER_AAD)
        tail = header + TRAILER.pack(len(header), PACK_MAGIC)
        self._append(tail)
        self._drain()
        self._release()
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError as e:
            raise self._error(e) from None
        size = self.offset
        pack_id = self.hasher.hexdigest()
        self.backend.write_file(pack_name(pack_id), self.path)
        return FinishedPack(pack_id, entries, size)

    def _release(self) -> None:
        if self.buf is not None:
            _give_stage(self.buf)
            self.buf = None

    def abandon(self) -> None:
        self._release()
        try:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def parse_header(sealer: Sealer, tail: bytes, pack_size: int, what: str) -> np.ndarray:
    """Parse a pack header from the pack's last bytes (``tail`` ends at the end of the pack)."""
    if len(tail) < TRAILER.size:
        raise IntegrityError(f"{what}: truncated (no trailer)")
    hlen, magic = TRAILER.unpack(tail[-TRAILER.size:])
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{what}: not a vmbak pack (bad trailer; truncated?)")
    if hlen > pack_size - TRAILER.size or hlen > len(tail) - TRAILER.size:
        raise IntegrityError(f"{what}: header length out of range")
    plain = sealer.open(tail[-TRAILER.size - hlen:-TRAILER.size], HEADER_AAD, f"{what} header")
    if len(plain) < 4:
        raise IntegrityError(f"{what}: header truncated")
    (count,) = struct.unpack_from("<I", plain)
    if len(plain) != 4 + count * PACK_ENTRY.itemsize:
        raise IntegrityError(f"{what}: header size mismatch")
    entries = np.frombuffer(plain, dtype=PACK_ENTRY, count=count, offset=4)
    data_end = pack_size - TRAILER.size - hlen
    # offsets first: an offset near 2**64 plus a length would wrap around in uint64
    ends = entries["off"].astype(np.uint64) + entries["len"].astype(np.uint64)
    if count and (int(entries["off"].max()) > data_end or int(ends.max()) > data_end):
        raise IntegrityError(f"{what}: header points past the data")
    return entries


def read_header(backend: Backend, sealer: Sealer, pack_id: str, size: int | None = None) -> np.ndarray:
    name = pack_name(pack_id)
    if size is None:
        size = backend.size(name)
    return header_at(lambda pos, n: backend.read_range(name, pos, n), sealer, size, f"pack {pack_id[:16]}")


def header_at(read: Callable[[int, int], bytes], sealer: Sealer, size: int, what: str) -> np.ndarray:
    """Parse the header of a pack of ``size`` bytes that ``read(pos, n)`` returns: its last
    64 KiB are read, and then as many as a longer header needs."""
    want = min(size, 64 * 1024)
    tail = read(size - want, want)
    if len(tail) >= TRAILER.size:
        hlen, magic = TRAILER.unpack(tail[-TRAILER.size:])
        if magic == PACK_MAGIC and TRAILER.size + hlen > want and hlen <= size - TRAILER.size:
            want = TRAILER.size + hlen
            tail = read(size - want, want)
    return parse_header(sealer, tail, size, what)
