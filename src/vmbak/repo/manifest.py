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


def is_full(kind: str) -> bool:
    return kind in (FULL, SYNTHETIC)


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
    used: np.ndarray | None = None          # full: bool per block
    changed: np.ndarray | None = None       # incremental/differential: bool per block
    newly_unused: np.ndarray | None = None  # incremental/differential: bool per block
    ext_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ext_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    ext_id: np.ndarray = field(default_factory=lambda: np.zeros(0, "V32"))
    bht_chunks: list[bytes] = field(default_factory=list)
    bht_count: int = 0
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    consistency: str | None = None  # None: a point-in-time view, or a manifest older than the field
    id: str = ""

    @property
    def block_count(self) -> int:
        return (self.disk_size + self.block_size - 1) // self.block_size

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def covered(self) -> np.ndarray:
        """Blocks whose content this manifest defines (all blocks for a full)."""
        if is_full(self.kind):
            return np.ones(self.block_count, dtype=bool)
        c = self.changed.copy()
        if self.newly_unused is not None:
            c |= self.newly_unused
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
        }


def _bits(a: np.ndarray) -> bytes:
    return np.packbits(a.astype(bool), bitorder="little").tobytes()


def encode_manifest(m: Manifest) -> bytes:
    """Return the manifest plaintext (zstd-compressed)."""
    arrays: list[tuple[str, str, int, bytes]] = []
    n = m.block_count
    for name in ("used", "changed", "newly_unused"):
        a = getattr(m, name)
        if a is not None:
            if len(a) != n:
                raise ValueError(f"bitmap {name} has {len(a)} bits, expected {n}")
            arrays.append((name, "bits", n, _bits(a)))
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
    hj = json.dumps(header, sort_keys=True).encode()
    body = b"".join([MANIFEST_MAGIC, struct.pack("<I", len(hj)), hj] + [b for *_, b in arrays])
    return zstandard.ZstdCompressor(level=3).compress(body)


def _text_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


def decode_manifest(payload: bytes, snap_id: str) -> Manifest:
    what = f"snapshot {snap_id[:8]}"
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 32)
    except zstandard.ZstdError:
        raise IntegrityError(f"{what}: manifest cannot be decompressed") from None
    try:
        if raw[:8] != MANIFEST_MAGIC:
            raise IntegrityError(f"{what}: bad manifest magic")
        (hl,) = struct.unpack_from("<I", raw, 8)
        h = json.loads(raw[12:12 + hl])
        if int(h["version"]) > MANIFEST_VERSION:
            raise IntegrityError(f"{what}: manifest version {h['version']} is newer than this vmbak")
        pos = 12 + hl
        arrays: dict[str, np.ndarray] = {}
        for a in h["arrays"]:
            cnt = int(a["count"])
            if a["encoding"] == "bits":
                nb = (cnt + 7) // 8
                arr = np.unpackbits(np.frombuffer(raw, np.uint8, nb, pos), count=cnt,
                                    bitorder="little").astype(bool)
            else:
                dt = np.dtype(a["encoding"])
                nb = cnt * dt.itemsize
                arr = np.frombuffer(raw, dt, cnt, pos)
            if pos + nb > len(raw):
                raise IntegrityError(f"{what}: manifest truncated")
            pos += nb
            arrays[a["name"]] = arr
        m = Manifest(
            name=h["name"], kind=h["type"], time=h["time"], disk_size=int(h["disk_size"]),
            block_size=int(h["block_size"]), chunk_blocks=int(h["chunk_blocks"]), source=h["source"],
            hostname=h["hostname"], change_source=h["change_source"], parent=h["parent"],
            reference=h["reference"], change_id=h["change_id"],
            used=arrays.get("used"), changed=arrays.get("changed"), newly_unused=arrays.get("newly_unused"),
            ext_start=arrays["ext_start"].astype(np.uint64), ext_count=arrays["ext_count"].astype(np.uint32),
            ext_id=arrays["ext_id"], bht_chunks=[bytes(x) for x in arrays["bht_chunks"].tolist()],
            bht_count=int(h["bht_count"]), stats=h.get("stats", {}), notes=h.get("notes", []),
            extra=h.get("extra", {}), consistency=_text_or_none(h.get("consistency")), id=snap_id,
        )
    except (KeyError, ValueError, TypeError, struct.error, json.JSONDecodeError) as e:
        raise IntegrityError(f"{what}: manifest is malformed ({e.__class__.__name__})") from None
    if m.kind not in KINDS or m.block_size <= 0 or m.disk_size < 0:
        raise IntegrityError(f"{what}: manifest has invalid fields")
    if not is_full(m.kind) and m.changed is None:
        raise IntegrityError(f"{what}: incremental manifest without a changed bitmap")
    return m
