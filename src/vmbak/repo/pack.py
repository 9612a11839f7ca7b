"""Pack files: many chunk blobs in one object, with an encrypted header at the end.

Layout (all integers little-endian)::

    blob_0 | blob_1 | ... | blob_n-1 | header_envelope | u32 header_envelope_len | b"VMBKPAK1"

Each blob is an envelope (see crypto.py) of ``codec(1) | data`` with AAD
``b"vmbak-chunk:" + chunk_id``. The header envelope (AAD ``b"vmbak-packheader"``)
holds ``u32 count`` and ``count`` entries of PACK_ENTRY. The pack's name is the hex
BLAKE3 (unkeyed) of the whole file, so check --read-data can verify it.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

import blake3
import numpy as np

from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo.backend import Backend, create_private
from vmbak.repo.crypto import Sealer

PACK_MAGIC = b"VMBKPAK1"
TRAILER = struct.Struct("<I8s")
PACK_ENTRY = np.dtype([("id", "V32"), ("off", "<u8"), ("len", "<u4"), ("raw", "<u4")])
HEADER_AAD = b"vmbak-packheader"

CODEC_RAW = 0
CODEC_ZSTD = 1


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


class PackWriter:
    """Appends sealed blobs to a local temp file; ``finish`` moves it into the repository."""

    def __init__(self, backend: Backend, sealer: Sealer) -> None:
        self.backend = backend
        self.sealer = sealer
        self.path = backend.temp_path("pack")
        try:
            self.f = open(create_private(self.path), "wb", buffering=0)
        except OSError as e:
            raise self._error(e) from None
        self.hasher = blake3.blake3(max_threads=1)
        self.offset = 0
        self.ids: list[bytes] = []
        self.offs: list[int] = []
        self.lens: list[int] = []
        self.raws: list[int] = []

    def _error(self, e: OSError) -> RepositoryError:
        return RepositoryError(f"cannot write a new pack of {self.backend.location} at {self.path}: "
                               f"{e.strerror or e}")

    def _write(self, data: bytes) -> None:
        # An unbuffered write may be short (a full disk returns what fitted before it
        # fails): write the rest, which then raises.
        view = memoryview(data)
        try:
            while view:
                view = view[self.f.write(view):]
        except OSError as e:
            raise self._error(e) from None

    def pad(self, data: bytes) -> None:
        """Write bytes that no entry covers (readers find blobs only through the header).
        Random padding gives a pack a name no other pack had: see engine/prune.py."""
        self._write(data)
        self.hasher.update(data)
        self.offset += len(data)

    def add(self, chunk_id: bytes, blob: bytes, raw_len: int) -> int:
        """Append one sealed blob; return its offset."""
        off = self.offset
        self._write(blob)
        self.hasher.update(blob)
        self.offset += len(blob)
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
        self._write(tail)
        self.hasher.update(tail)
        try:
            self.f.close()
        except OSError as e:
            raise self._error(e) from None
        size = self.offset + len(tail)
        pack_id = self.hasher.hexdigest()
        self.backend.write_file(pack_name(pack_id), self.path)
        return FinishedPack(pack_id, entries, size)

    def abandon(self) -> None:
        try:
            self.f.close()
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
    ends = entries["off"].astype(np.uint64) + entries["len"].astype(np.uint64)
    if count and int(ends.max()) > data_end:
        raise IntegrityError(f"{what}: header points past the data")
    return entries


def read_header(backend: Backend, sealer: Sealer, pack_id: str, size: int | None = None) -> np.ndarray:
    name = pack_name(pack_id)
    if size is None:
        size = backend.size(name)
    want = min(size, 64 * 1024)
    tail = backend.read_range(name, size - want, want)
    if len(tail) >= TRAILER.size:
        hlen, magic = TRAILER.unpack(tail[-TRAILER.size:])
        if magic == PACK_MAGIC and TRAILER.size + hlen > want and hlen <= size - TRAILER.size:
            want = TRAILER.size + hlen
            tail = backend.read_range(name, size - want, want)
    return parse_header(sealer, tail, size, f"pack {pack_id[:16]}")
