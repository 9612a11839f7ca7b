"""copy: replicate snapshots from one repository into another (local or S3, either way).

Each chosen snapshot is copied with its whole parent chain (full first), so that every
copy restores in the destination on its own. Only chunks the destination lacks are
stored there.

* **Same keys** (the destination was made from the same master key): chunk ids and
  block hashes agree. A chunk the destination already has is not even read from the
  source; a missing one is read, authenticated and stored (its sealed blob as it is
  when the encryption matches too, else re-sealed).
* **Different keys** (the usual case: two ``vmbak init``): chunk ids are keyed hashes,
  so every chunk of a copied snapshot is read from the source, authenticated and
  decompressed; its destination id and the blocks' destination hashes (the block hash
  table) are computed; it is stored, still compressed but sealed with the destination's
  key, unless the destination has that id already.

A copy carries ``extra.copy_of = {"repository": source id, "snapshot": source id}``;
its parent (and a scan ``reference``) are the copies of the source's. The order of
work is a backup's: chunks, then the index file naming their packs, then the manifest,
parents before children. A killed copy leaves packs without a manifest; a rerun skips
every snapshot already copied, finds those packs (they are indexed on load) and sends
only what is still missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmbak.engine.common import BHT_DTYPE, bounded_map, hash_blocks, store_bht
from vmbak.engine.progress import NoProgress, Progress
from vmbak.errors import IntegrityError, SnapshotNotFound, VmbakError
from vmbak.repo.filters import SnapshotFilter, filter_snapshots
from vmbak.repo.manifest import ALIASES_KEY, Manifest
from vmbak.repo.pack import CODEC_ZSTD_FRAMES, chunk_aad, pack_name
from vmbak.repo.repository import ChunkWriter, Repository


@dataclass
class CopyReport:
    source: str = ""
    destination: str = ""
    same_keys: bool = False
    dry_run: bool = False
    copied: list[dict] = field(default_factory=list)    # {"source", "destination", "name", "time", "type"}
    present: list[dict] = field(default_factory=list)   # already in the destination
    chunks_read: int = 0
    bytes_read: int = 0         # stored (sealed) bytes read from the source
    chunks_sent: int = 0
    bytes_sent: int = 0         # stored bytes written to the destination (chunk blobs)
    raw_bytes_sent: int = 0
    chunks_present: int = 0     # chunks the destination had already
    duration_s: float = 0.0

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "source", "destination", "same_keys", "dry_run", "copied", "present", "chunks_read", "bytes_read",
            "chunks_sent", "bytes_sent", "raw_bytes_sent", "chunks_present")}
        return d | {"duration_s": round(self.duration_s, 3)}


def select(src: Repository, specs: list[str], name: str | None, where: SnapshotFilter | None = None
           ) -> list[Manifest]:
    """The snapshots asked for: ``specs`` (ids, NAME:latest, NAME@TIME, resolved among
    the snapshots ``where`` selects), plus every snapshot named ``name``; without either,
    every snapshot ``where`` selects (everything without a filter)."""
    chosen: dict[str, Manifest] = {}
    for spec in specs:
        m = src.find(spec, where)
        chosen[m.id] = m
    if name is not None:
        ms = [m for m in src.manifests() if m.name == name]
        if not ms:
            raise SnapshotNotFound(f"no snapshot named {name!r} in {src.location}")
        chosen.update((m.id, m) for m in filter_snapshots(ms, where))
    if not specs and name is None:
        for n in where.names if where is not None else ():
            if not any(m.name == n for m in src.manifests()):
                raise SnapshotNotFound(f"no snapshot named {n!r} in {src.location}")
        chosen = {m.id: m for m in filter_snapshots(src.manifests(), where)}
    return sorted(chosen.values(), key=lambda m: (m.time, m.id))


def _plan(src: Repository, chosen: list[Manifest]) -> list[Manifest]:
    """Every manifest the chosen ones need, each after its parent."""
    out: list[Manifest] = []
    seen: set[str] = set()
    for m in chosen:
        for x in reversed(src.chain(m)):  # full first
            if x.id not in seen:
                seen.add(x.id)
                out.append(x)
    return out


def _existing(src: Repository, dst: Repository) -> dict[str, str]:
    """source snapshot id -> destination snapshot id, for what earlier copies (either way) left."""
    have = {m.id for m in dst.manifests()}
    out: dict[str, str] = {}
    for m in dst.manifests():
        c = m.extra.get("copy_of")
        if isinstance(c, dict) and c.get("repository") == src.id and isinstance(c.get("snapshot"), str):
            out.setdefault(c["snapshot"], m.id)
    for m in src.manifests():  # copied the other way before: the original is in the destination
        c = m.extra.get("copy_of")
        if isinstance(c, dict) and c.get("repository") == dst.id and c.get("snapshot") in have:
            out.setdefault(m.id, c["snapshot"])
    return out


class _Copier:
    def __init__(self, src: Repository, dst: Repository, workers: int, progress: Progress,
                 rep: CopyReport) -> None:
        self.src = src
        self.dst = dst
        self.workers = max(1, workers)
        self.progress = progress
        self.rep = rep
        # Chunk ids carry over when both repositories compute them alike (same key, same scheme).
        self.same_ids = src.sealer.id_key == dst.sealer.id_key and src.sealer.chunk_ids == dst.sealer.chunk_ids
        self.same_seal = (self.same_ids and src.encryption == dst.encryption
                          and src.master.enc_key == dst.master.enc_key)
        # source chunk id -> (destination chunk id, destination hash rows of its blocks)
        self.memo: dict[bytes, tuple[bytes, np.ndarray | None]] = {}
        self._zero: dict[int, np.ndarray] = {}  # block size -> destination hash of a zero block

    def _zero_hash(self, bs: int) -> np.ndarray:
        z = self._zero.get(bs)
        if z is None:  # worker threads may both compute it: same value
            z = self._zero[bs] = np.frombuffer(self.dst.sealer.block_hash(bytes(bs)), BHT_DTYPE)
        return z

    def _read(self, cid: bytes, what: str) -> tuple[bytes, bytes, int]:
        """(sealed blob, authenticated payload, raw length) of a source chunk."""
        src = self.src
        loc = src.index.get(cid)
        if loc is None:
            raise IntegrityError(f"{what}: chunk {cid.hex()[:16]} is missing from the source repository")
        blob = src.backend.read_range(pack_name(loc.pack), loc.offset, loc.length)
        if len(blob) != loc.length:
            raise IntegrityError(f"{what}: pack {loc.pack[:16]} of the source is truncated")
        payload = src.sealer.open(blob, chunk_aad(cid), f"{what}: chunk {cid.hex()[:16]}")
        return blob, payload, loc.raw_length

    def _plain(self, cid: bytes, payload: bytes, raw: int, what: str) -> bytes:
        return self.src.decode_payload(cid, payload, raw, f"{what}: chunk {cid.hex()[:16]}")

    def _legible(self, payload: bytes) -> bool:
        """Whether the destination's readers know the payload's codec: chunks compressed
        in frames go into an older-version repository compressed again (as one frame)."""
        return payload[0] != CODEC_ZSTD_FRAMES or self.dst.frames

    def job(self, item: tuple[bytes, int, int, str]) -> tuple[bytes, bytes, bytes | memoryview | None, int,
                                                           np.ndarray | None, int]:
        """Read one source chunk; return (source id, destination id, blob to store or None,
        raw length, hash rows or None, bytes read)."""
        cid, nblocks, bs, what = item
        dst = self.dst
        if self.same_ids:
            if dst.index.usable(cid):
                return cid, cid, None, 0, None, 0
            blob, payload, raw = self._read(cid, what)
            data = self._plain(cid, payload, raw, what)  # authenticate fully before storing
            if not self._legible(payload):
                out = dst.encode_chunk(cid, data)
            else:
                out = blob if self.same_seal else dst.sealer.seal(payload, chunk_aad(cid))
            return cid, cid, out, raw, None, len(blob)
        blob, payload, raw = self._read(cid, what)
        data = self._plain(cid, payload, raw, what)
        new = dst.sealer.chunk_id(data)
        rows = None
        if nblocks:
            rows, _ = hash_blocks(dst.sealer.block_hash, data, nblocks, bs, self._zero_hash(bs))
        sealed = None
        if not dst.index.usable(new):
            sealed = dst.sealer.seal(payload, chunk_aad(new)) if self._legible(payload) else dst.encode_chunk(new, data)
        return cid, new, sealed, raw, rows, len(blob)

    def run_jobs(self, writer: ChunkWriter, items: list[tuple[bytes, int, int, str]]) -> None:
        todo = [it for it in items if it[0] not in self.memo]
        if not todo:
            return
        with cf.ThreadPoolExecutor(self.workers, thread_name_prefix="vmbak-copy") as pool:
            for cid, new, blob, raw, rows, nread in bounded_map(pool, self.job, todo, 2 * self.workers + 2):
                self.memo[cid] = (new, rows)
                if nread:
                    self.rep.chunks_read += 1
                    self.rep.bytes_read += nread
                if blob is not None and writer.add(new, blob, raw):
                    self.rep.chunks_sent += 1
                    self.rep.bytes_sent += len(blob)
                    self.rep.raw_bytes_sent += raw
                else:
                    self.rep.chunks_present += 1
                self.progress.advance(raw or nread)

    def copy_one(self, m: Manifest, mapping: dict[str, str]) -> Manifest:
        src, dst = self.src, self.dst
        bs = m.block_size
        if m.chunk_blocks * bs > dst.chunk_size:
            raise VmbakError(f"snapshot {m.short_id} has chunks of up to {m.chunk_blocks * bs} bytes, more than "
                             f"the destination's chunk size ({dst.chunk_size})")
        if m.parent is not None and m.parent not in mapping:
            raise VmbakError(f"internal error: parent of snapshot {m.short_id} was not copied first")
        what = f"snapshot {m.short_id}"
        writer = dst.chunk_writer()
        try:
            starts = m.ext_start.astype(np.int64)
            counts = m.ext_count.astype(np.int64)
            ids = m.ext_id.tolist()
            items: dict[bytes, tuple[bytes, int, int, str]] = {}
            for cid, cnt in zip(ids, counts.tolist(), strict=True):
                items.setdefault(cid, (cid, 0 if self.same_ids else cnt, bs, what))
            if self.same_ids:
                for cid in m.bht_chunks:
                    items.setdefault(cid, (cid, 0, bs, f"{what} (block hash table)"))
            self.run_jobs(writer, list(items.values()))
            new = Manifest(
                name=m.name, kind=m.kind, time=m.time, disk_size=m.disk_size, block_size=bs,
                chunk_blocks=m.chunk_blocks, source=m.source, hostname=m.hostname,
                change_source=m.change_source, parent=mapping[m.parent] if m.parent else None,
                reference=mapping.get(m.reference, m.reference) if m.reference else None,
                change_id=m.change_id, used=m.bits("used"), changed=m.bits("changed"),
                newly_unused=m.bits("newly_unused"),
                ext_start=m.ext_start.copy(), ext_count=m.ext_count.copy(), stats=dict(m.stats),
                notes=list(m.notes), extra=dict(m.extra), consistency=m.consistency,
                guest_consistency=m.guest_consistency, tags=list(m.tags))
            new.extra.pop(ALIASES_KEY, None)  # ids of the source repository: they name nothing here
            rep_of = new.extra.pop("replaces", None)
            if isinstance(rep_of, str) and rep_of in mapping:
                new.extra["replaces"] = mapping[rep_of]
            new.extra["copy_of"] = {"repository": src.id, "snapshot": m.id}
            if self.same_ids:
                new.ext_id = m.ext_id.copy()
                new.bht_chunks = list(m.bht_chunks)
                new.bht_count = m.bht_count
            else:
                new.ext_id = (np.asarray([self.memo[c][0] for c in ids], "V32") if ids else np.zeros(0, "V32"))
                cov = m.covered()
                pos = np.cumsum(cov) - 1  # row of each covered block in the table
                table = np.zeros((int(np.count_nonzero(cov)), 2), BHT_DTYPE)
                for cid, s, c in zip(ids, starts.tolist(), counts.tolist(), strict=True):
                    rows = self.memo[cid][1]
                    assert rows is not None and len(rows) == c
                    table[pos[s:s + c]] = rows
                new.bht_count = len(table)
                new.bht_chunks = store_bht(writer, dst, table)
            writer.flush()
        except BaseException:
            writer.abandon()
            raise
        dst.save_manifest(new)
        return new


def copy(src: Repository, dst: Repository, specs: list[str] | None = None, name: str | None = None, *,
         workers: int = 4, dry_run: bool = False, progress: Progress | None = None,
         log: Callable[[str], None] | None = None, where: SnapshotFilter | None = None) -> CopyReport:
    """Copy snapshots (with their parent chains) from ``src`` to ``dst``; see the module
    docstring. ``where`` filters the snapshots chosen (:func:`select`); the parents they
    need are copied whether or not they match it."""
    progress = progress or NoProgress()
    log = log or (lambda s: None)
    t0 = time.monotonic()
    if src.id == dst.id and src.location == dst.location:
        raise VmbakError("source and destination are the same repository")
    rep = CopyReport(source=src.location, destination=dst.location, dry_run=dry_run,
                     same_keys=src.sealer.id_key == dst.sealer.id_key)
    with src.lock(purpose="copy-source"), dst.lock(purpose="copy"):
        plan = _plan(src, select(src, list(specs or []), name, where))
        mapping = _existing(src, dst)
        todo = [m for m in plan if m.id not in mapping]
        for m in plan:
            if m.id in mapping:
                rep.present.append({"source": m.id, "destination": mapping[m.id], "name": m.name, "time": m.time,
                                    "type": m.kind})
        if dry_run:
            rep.copied = [{"source": m.id, "destination": None, "name": m.name, "time": m.time, "type": m.kind}
                          for m in todo]
            rep.duration_s = time.monotonic() - t0
            return rep
        copier = _Copier(src, dst, workers, progress, rep)
        progress.start(sum(int(m.stats.get("data_bytes", 0)) for m in todo), "copy")
        try:
            for m in todo:
                new = copier.copy_one(m, mapping)
                mapping[m.id] = new.id
                rep.copied.append({"source": m.id, "destination": new.id, "name": m.name, "time": m.time,
                                   "type": m.kind})
                log(f"copied snapshot {m.short_id} ({m.name} {m.kind} {m.time}) as {new.short_id}")
        finally:
            progress.close()
    rep.duration_s = time.monotonic() - t0
    return rep


__all__ = ["copy", "select", "CopyReport"]
