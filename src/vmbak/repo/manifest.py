"""Manifests: one backup of one disk. Byte layout in docs/repository-format.md.

Plaintext (before zstd and the envelope, AAD ``b"vmbak-manifest"``)::

    b"VMBKMAN1" | u32 header_len | header (UTF-8 JSON) | array bytes...

The JSON header lists the arrays in the order they follow, each with its name,
encoding (``bits``: numpy packbits, little bit order; or a numpy dtype string) and
element count.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import zstandard

from vmbak.errors import IntegrityError
from vmbak.repo import zstd

MANIFEST_MAGIC = b"VMBKMAN1"
MANIFEST_AAD = b"vmbak-manifest"
MANIFEST_VERSION = 1

FULL = "full"
INCREMENTAL = "incremental"
DIFFERENTIAL = "differential"
SYNTHETIC = "synthetic-full"
KINDS = (FULL, INCREMENTAL, DIFFERENTIAL, SYNTHETIC)
# Manifest.consistency: what a backup that read a live disk directly saw of it.
TORN = "torn"            # the disk changed while it was read: the snapshot may be inconsistent
UNCHANGED = "unchanged"  # a file whose size, times and sampled blocks did not change during the read
UNKNOWN = "unknown"      # a block device: sampled blocks did not change, but writes leave no other trace
CONSISTENCIES = (TORN, UNCHANGED, UNKNOWN)
# extra key of the ids a rewritten manifest had before (engine/merge.py, docs/repository-format.md)
ALIASES_KEY = "aliases"


def is_full(kind: str) -> bool:
    return kind in (FULL, SYNTHETIC)


BITMAPS = ("used", "changed", "newly_unused")
_BITS_PREFIX = "_bits_"
# Packed bitmaps larger than this are held zstd-compressed in memory (a disk above 32 GiB
# at 64 KiB blocks); smaller ones stay plain, so normal-size disks pay nothing.
_COMPRESS_ABOVE = 64 << 10
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


class Bits:
    """A bitmap of ``n`` bits (one per block) as the manifest stores it: numpy packbits
    with little bit order, the padding bits of the last byte zero.

    A manifest keeps its bitmaps in this form, zstd-compressed when large, and unpacks one
    only when it is read: a 2 TiB disk's bitmap is 32 MiB as a bool array, 4 MiB packed,
    and a few KiB compressed when few blocks are set. Every snapshot of a repository is
    loaded to list or resolve them, so a bool array each made the memory of any command
    grow by 64 MiB per incremental of a 2 TiB disk. Immutable.
    """

    __slots__ = ("_data", "_nbytes", "_z", "n")

    def __init__(self, packed: bytes | np.ndarray, n: int) -> None:
        nbytes = (n + 7) // 8
        buf = np.frombuffer(packed, np.uint8) if isinstance(packed, (bytes, bytearray, memoryview)) \
            else np.ascontiguousarray(packed, np.uint8).ravel()
        if len(buf) != nbytes:
            raise ValueError(f"{len(buf)} bytes of packed bits for {n} bits")
        if n % 8 and buf[-1] >> (n % 8):  # clear the padding bits (a reader ignores them)
            buf = buf.copy()
            buf[-1] &= (1 << (n % 8)) - 1
        data = buf.tobytes()
        self.n = n
        self._nbytes = nbytes
        self._z = False
        if nbytes > _COMPRESS_ABOVE:
            z = zstandard.ZstdCompressor(level=1).compress(data)
            if len(z) < nbytes // 2:
                data, self._z = z, True
        self._data = data

    @classmethod
    def from_bools(cls, a: np.ndarray) -> Bits:
        """Pack a bool (or 0/1) array."""
        a = np.asarray(a)
        return cls(np.packbits(a if a.dtype == bool else a.astype(bool), bitorder="little"), len(a))

    @classmethod
    def ones(cls, n: int) -> Bits:
        b = np.full((n + 7) // 8, 0xFF, np.uint8)
        return cls(b, n)  # the padding is cleared by __init__

    def __len__(self) -> int:
        return self.n

    def tobytes(self) -> bytes:
        """The packed bytes (the manifest's on-disk encoding)."""
        if not self._z:
            return self._data
        return zstd.decompress(self._data, self._nbytes, "bitmap")

    def packed(self) -> np.ndarray:
        """The packed bytes as a read-only uint8 array."""
        return np.frombuffer(self.tobytes(), np.uint8)

    def bools(self) -> np.ndarray:
        """A new bool array of ``n`` elements."""
        return _unpack(self.packed(), self.n)

    def count(self) -> int:
        """The number of bits set."""
        p = self.packed()
        if hasattr(np, "bitwise_count"):
            return int(np.bitwise_count(p).sum(dtype=np.int64))
        return int(_POPCOUNT[p].sum(dtype=np.int64))

    def __or__(self, other: Bits) -> Bits:
        if other.n != self.n:
            raise ValueError(f"bitmaps of {self.n} and {other.n} bits")
        return Bits(np.bitwise_or(self.packed(), other.packed()), self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bits) and other.n == self.n and other.tobytes() == self.tobytes()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Bits(n={self.n}, stored={len(self._data)} bytes{', zstd' if self._z else ''})"


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    nz = np.flatnonzero(packed)
    if len(nz) * 16 > len(packed):
        # unpackbits gives 0/1 bytes, which are valid bools: a view instead of a second array
        return np.unpackbits(packed, count=n, bitorder="little").view(bool)
    # Few bits set (the usual incremental): zeros, then only the non-zero bytes unpacked,
    # 4 times faster at 2 TiB than unpacking every byte.
    out = np.zeros(len(packed) * 8, bool)
    out.reshape(-1, 8)[nz] = np.unpackbits(packed[nz, None], axis=1, bitorder="little").view(bool)
    return out[:n]


class BitmapField:
    """A Manifest field that reads as a bool array (a new one each time: changing it does
    not change the manifest) and is stored as :class:`Bits`. Assign a bool array, a
    :class:`Bits` or None. (A descriptor-typed dataclass field, default None.)"""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = _BITS_PREFIX + name

    def __get__(self, obj: object, objtype: type | None = None) -> np.ndarray | None:
        if obj is None:
            return None  # the dataclass default
        b = obj.__dict__.get(self.key)
        return None if b is None else b.bools()

    def __set__(self, obj: object, value: np.ndarray | Bits | None) -> None:
        obj.__dict__[self.key] = value if value is None or isinstance(value, Bits) else Bits.from_bools(value)


@dataclass
class Manifest:
    name: str
    kind: str
    time: str
    disk_size: int
    block_size: int
    chunk_blocks: int
    source: str
    hostname: str
    change_source: str
    parent: str | None = None
    reference: str | None = None
    change_id: str | None = None
    # The bitmaps read and assign as bool arrays, one element per block, but are kept as
    # Bits (packed, compressed when large): see BitmapField.
    used: np.ndarray | None = BitmapField()          # full
    changed: np.ndarray | None = BitmapField()       # incremental/differential
    newly_unused: np.ndarray | None = BitmapField()  # incremental/differential
    ext_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ext_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    ext_id: np.ndarray = field(default_factory=lambda: np.zeros(0, "V32"))
    bht_chunks: list[bytes] = field(default_factory=list)
    bht_count: int = 0
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    consistency: str | None = None  # None: a point-in-time view, or a manifest older than the field
    guest_consistency: dict | None = None  # how the guest was quiesced (see docs/repository-format.md)
    tags: list[str] = field(default_factory=list)  # given at backup time (absent in older manifests)
    id: str = ""

    @property
    def block_count(self) -> int:
        return (self.disk_size + self.block_size - 1) // self.block_size

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def bits(self, name: str) -> Bits | None:
        """The bitmap ``name`` (used, changed, newly_unused) as stored, without unpacking it."""
        if name not in BITMAPS:
            raise KeyError(name)
        return self.__dict__.get(_BITS_PREFIX + name)

    def covered(self) -> np.ndarray:
        """Blocks whose content this manifest defines (all blocks for a full), as a new
        bool array."""
        if is_full(self.kind):
            return np.ones(self.block_count, dtype=bool)
        c = self._changed_bits()
        u = self.bits("newly_unused")
        return c.bools() if u is None else _unpack(np.bitwise_or(c.packed(), u.packed()), c.n)

    def covered_bits(self) -> Bits:
        """:meth:`covered`, packed: one bit per block."""
        if is_full(self.kind):
            return Bits.ones(self.block_count)
        c = self._changed_bits()
        u = self.bits("newly_unused")
        return c if u is None else c | u

    def _changed_bits(self) -> Bits:
        c = self.bits("changed")
        if c is None:
            raise IntegrityError(f"snapshot {self.short_id}: incremental manifest without a changed bitmap")
        return c

    def summary(self) -> dict:
        return {
            "id": self.id,
            "short_id": self.short_id,
            "name": self.name,
            "type": self.kind,
            "time": self.time,
            "parent": self.parent,
            "disk_size": self.disk_size,
            "block_size": self.block_size,
            "source": self.source,
            "hostname": self.hostname,
            "change_source": self.change_source,
            "reference": self.reference,
            "change_id": self.change_id,
            "stats": self.stats,
            "notes": self.notes,
            "consistency": self.consistency,
            "guest_consistency": self.guest_consistency,
            "tags": list(self.tags),
            "former_ids": self.former_ids(),
        }

    def aliases(self) -> list[dict]:
        """The ids this snapshot had before forget or merge rewrote it, oldest first, as
        ``{"id", "by", "time"}`` (``by`` and ``time`` are None for a rewrite recorded only
        in ``extra.replaces``, by a vmbak that kept no history). See docs/repository-format.md."""
        extra = self.extra if isinstance(self.extra, dict) else {}
        out: list[dict] = []
        seen: set[str] = set()
        hist = extra.get(ALIASES_KEY)
        for a in hist if isinstance(hist, list) else []:
            if isinstance(a, dict) and isinstance(a.get("id"), str) and a["id"] not in seen:
                seen.add(a["id"])
                out.append({"id": a["id"], "by": a.get("by") if isinstance(a.get("by"), str) else None,
                            "time": a.get("time") if isinstance(a.get("time"), str) else None})
        r = extra.get("replaces")
        if isinstance(r, str) and r not in seen:
            out.append({"id": r, "by": None, "time": None})
        return out

    def former_ids(self) -> list[str]:
        """The full ids of :meth:`aliases`, oldest first."""
        return [a["id"] for a in self.aliases()]


def encode_manifest(m: Manifest) -> bytes:
    """Return the manifest plaintext (zstd-compressed)."""
    arrays: list[tuple[str, str, int, bytes]] = []
    n = m.block_count
    for name in BITMAPS:
        b = m.bits(name)
        if b is not None:
            if len(b) != n:
                raise ValueError(f"bitmap {name} has {len(b)} bits, expected {n}")
            arrays.append((name, "bits", n, b.tobytes()))
    ne = len(m.ext_start)
    arrays.append(("ext_start", "<u8", ne, np.ascontiguousarray(m.ext_start, dtype="<u8").tobytes()))
    arrays.append(("ext_count", "<u4", ne, np.ascontiguousarray(m.ext_count, dtype="<u4").tobytes()))
    arrays.append(("ext_id", "V32", ne, np.ascontiguousarray(m.ext_id, dtype="V32").tobytes()))
    arrays.append(("bht_chunks", "V32", len(m.bht_chunks), b"".join(m.bht_chunks)))
    header = {
        "version": MANIFEST_VERSION,
        "name": m.name,
        "type": m.kind,
        "time": m.time,
        "disk_size": m.disk_size,
        "block_size": m.block_size,
        "chunk_blocks": m.chunk_blocks,
        "source": m.source,
        "hostname": m.hostname,
        "change_source": m.change_source,
        "parent": m.parent,
        "reference": m.reference,
        "change_id": m.change_id,
        "bht_count": m.bht_count,
        "stats": m.stats,
        "notes": m.notes,
        "extra": m.extra,
        "arrays": [{"name": a, "encoding": enc, "count": cnt} for a, enc, cnt, _ in arrays],
    }
    if m.consistency is not None:  # absent when there is nothing to say (as in older manifests)
        header["consistency"] = m.consistency
    if m.guest_consistency is not None:  # optional: absent in manifests of older versions
        header["guest_consistency"] = m.guest_consistency
    if m.tags:  # absent when there are none (as in older manifests)
        header["tags"] = list(m.tags)
    hj = json.dumps(header, sort_keys=True).encode()
    body = b"".join([MANIFEST_MAGIC, struct.pack("<I", len(hj)), hj] + [b for *_, b in arrays])
    return zstandard.ZstdCompressor(level=3).compress(body)


# Limits a manifest must respect before anything is allocated from it: its header is
# at most MAX_HEADER bytes, the disk at most MAX_DISK_SIZE, and every array's length
# follows from the disk's block count (see docs/repository-format.md). A crafted
# manifest can therefore make a reader allocate no more than a real one of that
# geometry needs.
MAX_HEADER = 16 << 20
MAX_DISK_SIZE = 1 << 50
# name -> (encoding, item size in bytes or 0 for bits)
_ARRAYS = {"used": ("bits", 0), "changed": ("bits", 0), "newly_unused": ("bits", 0),
           "ext_start": ("<u8", 8), "ext_count": ("<u4", 4), "ext_id": ("V32", 32), "bht_chunks": ("V32", 32)}


def _geometry(h: dict, what: str) -> int:
    """The block count the header declares; IntegrityError if its sizes are implausible."""
    ds, bs = h["disk_size"], h["block_size"]
    if type(ds) is not int or type(bs) is not int or not (0 <= ds <= MAX_DISK_SIZE) \
            or not (512 <= bs <= 1 << 30) or bs & (bs - 1):
        raise IntegrityError(f"{what}: manifest has an implausible disk or block size")
    return (ds + bs - 1) // bs


def _array_bytes(a: dict, n: int, what: str) -> tuple[str, str, int, int]:
    """(name, encoding, count, byte length) of one array entry of the header, checked
    against the block count ``n``."""
    name, enc, cnt = a["name"], a["encoding"], a["count"]
    if name not in _ARRAYS or _ARRAYS[name][0] != enc or type(cnt) is not int or cnt < 0:
        raise IntegrityError(f"{what}: manifest lists an unknown or malformed array")
    size = _ARRAYS[name][1]
    if size == 0 and cnt != n:
        raise IntegrityError(f"{what}: bitmap {name} has {cnt} bits for {n} blocks")
    if size and cnt > n + 1:  # extents cover distinct blocks; block hashes take >= 1 block each
        raise IntegrityError(f"{what}: array {name} has {cnt} entries for {n} blocks")
    return name, enc, cnt, (cnt + 7) // 8 if size == 0 else cnt * size


def _text_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _tags(v: object) -> list[str]:
    """The header's tags: a list of strings (anything else counts as no tags)."""
    return [t for t in v if isinstance(t, str)] if isinstance(v, list) else []


def decode_manifest(payload: bytes, snap_id: str) -> Manifest:
    what = f"snapshot {snap_id[:8]}"
    try:
        r = zstd.Reader(payload, f"{what}: manifest")
        head = r.read_exact(12)
        if head[:8] != MANIFEST_MAGIC:
            raise IntegrityError(f"{what}: bad manifest magic")
        (hl,) = struct.unpack_from("<I", head, 8)
        if hl > MAX_HEADER:
            raise IntegrityError(f"{what}: manifest header of {hl} bytes is too large")
        h = json.loads(r.read_exact(hl))
        if int(h["version"]) > MANIFEST_VERSION:
            raise IntegrityError(f"{what}: manifest version {h['version']} is newer than this vmbak")
        n = _geometry(h, what)
        arrays: dict[str, np.ndarray | Bits] = {}
        for a in h["arrays"]:
            name, enc, cnt, nb = _array_bytes(a, n, what)
            raw = r.read_exact(nb)
            # bitmaps stay packed (see Bits)
            arrays[name] = Bits(raw, cnt) if enc == "bits" else np.frombuffer(raw, np.dtype(enc), cnt)
        r.expect_end()
        m = Manifest(
            name=h["name"], kind=h["type"], time=h["time"], disk_size=int(h["disk_size"]),
            block_size=int(h["block_size"]), chunk_blocks=int(h["chunk_blocks"]), source=h["source"],
            hostname=h["hostname"], change_source=h["change_source"], parent=h["parent"],
            reference=h["reference"], change_id=h["change_id"],
            used=arrays.get("used"), changed=arrays.get("changed"), newly_unused=arrays.get("newly_unused"),
            ext_start=arrays["ext_start"].astype(np.uint64), ext_count=arrays["ext_count"].astype(np.uint32),
            ext_id=arrays["ext_id"], bht_chunks=[bytes(x) for x in arrays["bht_chunks"].tolist()],
            bht_count=int(h["bht_count"]), stats=h.get("stats", {}), notes=h.get("notes", []),
            extra=h.get("extra", {}), consistency=_text_or_none(h.get("consistency")),
            guest_consistency=h.get("guest_consistency"), tags=_tags(h.get("tags")), id=snap_id,
        )
    except (KeyError, ValueError, TypeError, struct.error, json.JSONDecodeError) as e:
        raise IntegrityError(f"{what}: manifest is malformed ({e.__class__.__name__})") from None
    if m.kind not in KINDS or not (len(m.ext_start) == len(m.ext_count) == len(m.ext_id)):
        raise IntegrityError(f"{what}: manifest has invalid fields")
    texts = (m.name, m.time, m.source, m.hostname, m.change_source)
    optional = (m.parent, m.reference, m.change_id)
    if not all(isinstance(t, str) for t in texts) or not all(t is None or isinstance(t, str) for t in optional) \
            or not isinstance(m.stats, dict) or not isinstance(m.notes, list) or not isinstance(m.extra, dict) \
            or not (m.guest_consistency is None or isinstance(m.guest_consistency, dict)
                    and isinstance(m.guest_consistency.get("level"), str)):
        raise IntegrityError(f"{what}: manifest has fields of the wrong type")
    if not is_full(m.kind) and m.bits("changed") is None:
        raise IntegrityError(f"{what}: incremental manifest without a changed bitmap")
    return m
