"""The chunk index: chunk id → (pack, offset, length, raw length).

Index files (``index/<hex>``) are envelopes (AAD ``b"vmbak-index"``) of a zstd frame of::

    b"VMBKIDX1" | u32 n_supersedes | n × 32-byte index ids it replaces
                | u32 n_packs | n × 32-byte pack ids
                | u32 n_entries | n × INDEX_ENTRY

They are written only after the packs they describe are durable. Packs that no
index file names (after a crash) are found by listing ``data/`` and read from their
own headers, so nothing that landed is ever stored twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import numpy as np
import zstandard

from vmbak.errors import IntegrityError
from vmbak.repo import zstd

INDEX_MAGIC = b"VMBKIDX1"
INDEX_AAD = b"vmbak-index"
INDEX_ENTRY = np.dtype([("id", "V32"), ("pack", "<u4"), ("off", "<u8"), ("len", "<u4"), ("raw", "<u4")])


@dataclass(frozen=True)
class Location:
    pack: str  # hex pack id
    offset: int
    length: int
    raw_length: int


class Index:
    """In-memory chunk index. Lookups are safe from several threads while one thread adds."""

    def __init__(self) -> None:
        self.packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._map: dict[bytes, tuple[int, int, int, int]] = {}
        self.pack_sizes: dict[str, int] = {}
        # Packs a prune mark condemned (see repo/marks.py): their copies of a chunk are
        # used only when no other copy is known, and never to deduplicate against.
        self.doomed: frozenset[str] = frozenset()
        self._doomed_no: set[int] = set()

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._map

    def _pno(self, pack_id: str) -> int:
        n = self._pack_no.get(pack_id)
        if n is None:
            n = len(self.packs)
            self.packs.append(pack_id)
            self._pack_no[pack_id] = n
        return n

    def set_doomed(self, packs: set[str] | frozenset[str]) -> None:
        """Declare the packs prune marks condemned; call before adding packs."""
        self.doomed = frozenset(packs)
        self._doomed_no = {self._pno(p) for p in packs}

    def add_pack(self, pack_id: str, entries: np.ndarray, size: int | None = None) -> None:
        n = self._pno(pack_id)
        if size is not None:
            self.pack_sizes[pack_id] = size
        m = self._map
        dn = self._doomed_no
        ids, offs, lens, raws = (entries["id"].tolist(), entries["off"].tolist(), entries["len"].tolist(),
                                 entries["raw"].tolist())
        if not dn:
            for cid, off, ln, raw in zip(ids, offs, lens, raws, strict=True):
                if cid not in m:
                    m[cid] = (n, off, ln, raw)
            return
        replace = n not in dn  # a copy outside doomed packs wins over a doomed one
        for cid, off, ln, raw in zip(ids, offs, lens, raws, strict=True):
            t = m.get(cid)
            if t is None or (replace and t[0] in dn):
                m[cid] = (n, off, ln, raw)

    def usable(self, chunk_id: bytes) -> bool:
        """Whether a writer may reference this chunk without storing it: it has a copy in
        a pack that no prune mark condemned."""
        t = self._map.get(chunk_id)
        return t is not None and t[0] not in self._doomed_no

    def get(self, chunk_id: bytes) -> Location | None:
        t = self._map.get(chunk_id)
        if t is None:
            return None
        return Location(self.packs[t[0]], t[1], t[2], t[3])

    def known_packs(self) -> set[str]:
        return set(self.packs)

    def items(self):  # noqa: ANN201 - iterator of (id, Location)
        for cid, t in self._map.items():
            yield cid, Location(self.packs[t[0]], t[1], t[2], t[3])


def encode_index(pack_entries: list[tuple[str, np.ndarray]], supersedes: list[str] | None = None) -> bytes:
    """Serialise the entries of some packs into an index file's plaintext."""
    supersedes = supersedes or []
    parts = [INDEX_MAGIC, struct.pack("<I", len(supersedes))]
    parts += [bytes.fromhex(s) for s in supersedes]
    parts.append(struct.pack("<I", len(pack_entries)))
    parts += [bytes.fromhex(p) for p, _ in pack_entries]
    total = sum(len(e) for _, e in pack_entries)
    arr = np.zeros(total, dtype=INDEX_ENTRY)
    pos = 0
    for i, (_, e) in enumerate(pack_entries):
        sl = arr[pos:pos + len(e)]
        sl["id"] = e["id"]
        sl["pack"] = i
        sl["off"] = e["off"]
        sl["len"] = e["len"]
        sl["raw"] = e["raw"]
        pos += len(e)
    parts.append(struct.pack("<I", total))
    parts.append(arr.tobytes())
    return zstandard.ZstdCompressor(level=3).compress(b"".join(parts))


def max_plain_size(compressed: int) -> int:
    """The most an index file (or a prune mark) of ``compressed`` bytes may decompress to.

    Both consist mostly of keyed hashes (chunk and pack ids), which do not compress: a
    real index entry of 52 bytes compresses to about 38, so 8 times the compressed size
    leaves a wide margin while a decompression bomb is refused."""
    return 8 * compressed + (64 << 10)


def decode_index(payload: bytes, what: str) -> tuple[list[str], list[tuple[str, np.ndarray]]]:
    """Return (supersedes, [(pack_id, PACK-like entries)]) from an index plaintext."""
    raw = zstd.decompress(payload, max_plain_size(len(payload)), what)
    try:
        if raw[:8] != INDEX_MAGIC:
            raise IntegrityError(f"{what}: bad magic")
        pos = 8
        (ns,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        sup = [raw[pos + 32 * i:pos + 32 * (i + 1)].hex() for i in range(ns)]
        pos += 32 * ns
        (npk,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        packs = [raw[pos + 32 * i:pos + 32 * (i + 1)].hex() for i in range(npk)]
        pos += 32 * npk
        (ne,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if len(raw) != pos + ne * INDEX_ENTRY.itemsize:
            raise IntegrityError(f"{what}: size mismatch")
        arr = np.frombuffer(raw, dtype=INDEX_ENTRY, count=ne, offset=pos)
    except struct.error:
        raise IntegrityError(f"{what}: truncated") from None
    if ne and int(arr["pack"].max()) >= npk:
        raise IntegrityError(f"{what}: entry names an unknown pack")
    order = np.argsort(arr["pack"], kind="stable")
    arr = arr[order]
    bounds = np.searchsorted(arr["pack"], np.arange(npk + 1))
    out = []
    for i, p in enumerate(packs):
        out.append((p, arr[bounds[i]:bounds[i + 1]]))
    return sup, out


def index_id(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()
