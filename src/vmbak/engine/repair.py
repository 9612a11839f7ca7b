"""repair index: rebuild the index from the pack headers; repair snapshots: rewrite the
manifests that reference lost chunks.

Packs describe themselves (docs/repository-format.md, "Packs"), so the index can always
be rebuilt from them. ``repair_index`` writes index files (at most CONSOLIDATED_ENTRIES
entries each) naming every pack whose header reads, each with ``supersedes`` = every
index file it listed (damaged or not), and then deletes those files: the same order as a prune sweep (new index first, old ones
after), so a kill at any moment leaves a valid repository. It holds a lock that
excludes prune (whose sweep also rewrites the index) but not backups or restores: an
index file written by a backup after the listing is not touched, and a pack a backup
has just landed is complete, so naming it is correct.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmbak.engine.common import BHT_DTYPE, hash_blocks, load_bht, range_text, runs, store_bht
from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo.backend import ObjectMissing
from vmbak.repo.manifest import Manifest, is_full
from vmbak.repo.pack import PackWriter, list_packs, pack_name, read_header
from vmbak.repo.repository import Repository


@dataclass
class RepairReport:
    index_files_read: int = 0
    damaged_index_files: dict[str, str] = field(default_factory=dict)
    removed_index_files: list[str] = field(default_factory=list)
    new_index: str | None = None  # the first of new_index_files
    new_index_files: list[str] = field(default_factory=list)
    packs: int = 0
    chunks: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"index_files_read": self.index_files_read, "damaged_index_files": self.damaged_index_files,
                "removed_index_files": self.removed_index_files, "new_index": self.new_index,
                "new_index_files": self.new_index_files,
                "packs": self.packs, "chunks": self.chunks, "warnings": self.warnings}


def repair_index(repo: Repository, log: Callable[[str], None] | None = None, dry_run: bool = False,
                 locked: bool = False) -> RepairReport:
    """Replace every index file by one built from the pack headers (see the module docstring);
    with ``dry_run``, only report what would be done. With ``locked``, the caller already
    holds a lock that excludes prune."""
    log = log or (lambda s: None)
    rep = RepairReport()
    with contextlib.nullcontext() if locked else repo.lock(purpose="repair"):
        files = sorted(n for n, _ in repo.backend.list("index"))
        from_index: dict[str, np.ndarray] = {}
        for name in files:
            try:
                packs = repo.read_index_file(name)
            except ObjectMissing:
                continue
            except IntegrityError as e:
                rep.damaged_index_files[name] = str(e)
                log(f"{e}; replaced")
                continue
            rep.index_files_read += 1
            for pid, ent in packs:
                from_index.setdefault(pid, ent)
        present = list_packs(repo.backend)
        keep: list[tuple[str, np.ndarray]] = []
        for pid in sorted(present):
            try:
                ent = read_header(repo.backend, repo.sealer, pid, present[pid])
            except ObjectMissing:
                continue  # deleted meanwhile (only a prune deletes packs, and it is locked out)
            except RepositoryError as e:
                if pid in from_index:
                    ent = from_index[pid]
                    rep.warnings.append(f"{e}; its entries are taken from the index file that names it")
                else:
                    rep.warnings.append(f"{e}; it stays out of the index (its chunks are not used)")
                    continue
            keep.append((pid, ent))
        for pid in sorted(set(from_index) - set(present)):
            rep.warnings.append(f"pack {pid[:16]} is named by the index but missing; it is left out")
        rep.packs = len(keep)
        rep.chunks = int(sum(len(e) for _, e in keep))
        if dry_run:
            rep.removed_index_files = list(files)
            return rep
        if keep:  # first the new index files ...
            rep.new_index_files = repo.write_consolidated_index(keep, [f.rsplit("/", 1)[-1] for f in files])
            rep.new_index = rep.new_index_files[0]
        for f in files:  # ... then the ones they supersede
            if f not in rep.new_index_files:
                repo.backend.delete(f)
                rep.removed_index_files.append(f)
        repo._index = None  # noqa: SLF001 - the index changed under us
        log(f"index rebuilt from {len(keep)} pack headers: {rep.chunks} chunks; "
            f"{len(rep.removed_index_files)} index files replaced")
    return rep


# ---------------------------------------------------------------------------- snapshots
REPAIRED_DIR = "repaired"  # originals kept until the next prune (docs/repository-format.md)


@dataclass
class SnapshotRepair:
    """One manifest replaced by ``repair snapshots``."""

    old: str
    new: str | None
    name: str
    time: str
    own_lost: list[tuple[int, int]]        # block ranges this manifest's own extents lost
    lost: list[tuple[int, int]]            # block ranges a restore of it gets as zeros (whole chain)
    reason: str                            # "lost data", "new parent", "block hash table rebuilt"

    def to_json(self, block_size: int, disk_size: int) -> dict:
        def rng(r: list[tuple[int, int]]) -> list[dict]:
            return [{"start_block": a, "blocks": b, "offset": a * block_size,
                     "length": min(b * block_size, disk_size - a * block_size)} for a, b in r]
        return {"old": self.old, "new": self.new, "name": self.name, "time": self.time,
                "own_lost": rng(self.own_lost), "lost": rng(self.lost), "reason": self.reason}


@dataclass
class RepairSnapshotsReport:
    dry_run: bool = False
    bad_packs: dict[str, str] = field(default_factory=dict)     # pack -> why (missing, damaged)
    salvaged_chunks: int = 0        # referenced chunks copied out of damaged packs
    salvaged_packs: list[str] = field(default_factory=list)     # the new packs holding them
    lost_chunks: int = 0            # referenced chunks that could not be found or read
    set_aside_packs: list[str] = field(default_factory=list)    # damaged packs moved to repaired/data/
    rewritten: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    index: dict | None = None

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "bad_packs": self.bad_packs, "salvaged_chunks": self.salvaged_chunks,
                "salvaged_packs": self.salvaged_packs, "lost_chunks": self.lost_chunks,
                "set_aside_packs": self.set_aside_packs, "rewritten": self.rewritten,
                "warnings": self.warnings, "index": self.index}


def _order(ms: list[Manifest]) -> list[Manifest]:
    """Manifests parents first (a manifest whose parent is not among them counts as a root)."""
    by_id = {m.id: m for m in ms}
    depth: dict[str, int] = {}

    def d(m: Manifest) -> int:
        seen = []
        cur: Manifest | None = m
        while cur is not None and cur.id not in depth and cur.id not in seen and len(seen) <= len(by_id):
            seen.append(cur.id)
            cur = by_id.get(cur.parent) if cur.parent else None
        base = depth.get(cur.id, 0) if cur is not None and cur.id in depth else -1
        for sid in reversed(seen):
            base += 1
            depth[sid] = base
        return depth[m.id]

    return sorted(ms, key=lambda m: (d(m), m.time, m.id))


def _salvage(repo: Repository, bad: set[str], refs: set[bytes], write: bool,
             rep: RepairSnapshotsReport) -> None:
    """Copy every referenced chunk that the index places in a damaged pack, and that still
    reads and authenticates there, into new packs (indexed)."""
    where: dict[str, list[tuple[bytes, object]]] = {}
    for cid, loc in repo.index.items():
        if loc.pack in bad and cid in refs:
            where.setdefault(loc.pack, []).append((cid, loc))
    pw: PackWriter | None = None
    finished = []
    try:
        for pid in sorted(where):
            for cid, loc in sorted(where[pid], key=lambda t: t[1].offset):  # type: ignore[attr-defined]
                try:
                    blob = repo.backend.read_range(pack_name(pid), loc.offset, loc.length)  # type: ignore[attr-defined]
                    if len(blob) != loc.length:  # type: ignore[attr-defined]
                        raise IntegrityError(f"pack {pid[:16]} is truncated")
                    repo.decode_chunk(cid, blob, loc.raw_length)  # type: ignore[attr-defined]
                except RepositoryError:
                    continue
                rep.salvaged_chunks += 1
                if not write:
                    continue
                if pw is None:
                    pw = PackWriter(repo.backend, repo.sealer)
                    pw.pad(os.urandom(16))  # never the name of the damaged pack
                pw.add(cid, blob, loc.raw_length)  # type: ignore[attr-defined]
                if pw.offset >= repo.pack_size:
                    finished.append(pw.finish())
                    pw = None
        if pw is not None and len(pw):
            finished.append(pw.finish())
            pw = None
    finally:
        if pw is not None:
            pw.abandon()
    if finished:
        repo.write_index([(fp.pack_id, fp.entries) for fp in finished])
        rep.salvaged_packs = [fp.pack_id for fp in finished]


def _mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    rs, rl = runs(mask)
    return [(int(a), int(b)) for a, b in zip(rs.tolist(), rl.tolist(), strict=True)]


def _rebuilt_bht(repo: Repository, m: Manifest, keep: np.ndarray, lost_mask: np.ndarray,
                 usable: Callable[[bytes], bool]) -> np.ndarray:
    """``m``'s block hash rows with the lost blocks set to "reads as zeros"; when the stored
    table itself is lost, rows are recomputed from the extents that remain."""
    cov = m.covered()
    if all(usable(c) for c in m.bht_chunks):
        table = load_bht(repo, m)
    else:
        full = np.zeros((m.block_count, 2), BHT_DTYPE)
        zero_hash = np.frombuffer(repo.sealer.block_hash(bytes(m.block_size)), BHT_DTYPE)
        for j in np.flatnonzero(keep).tolist():
            s, c = int(m.ext_start[j]), int(m.ext_count[j])
            cid = bytes(m.ext_id[j])
            data = repo.read_chunk(cid, f"chunk {cid.hex()[:16]} of snapshot {m.short_id}")
            full[s:s + c], _ = hash_blocks(repo.sealer.block_hash, data, c, m.block_size, zero_hash)
        table = full[cov] if not is_full(m.kind) else full
    if is_full(m.kind):
        table[lost_mask] = 0
    else:
        table[lost_mask[cov]] = 0
    return table


def repair_snapshots(repo: Repository, read_data: bool = False, dry_run: bool = False,
                     log: Callable[[str], None] | None = None) -> RepairSnapshotsReport:
    """Make every snapshot restorable again after data was lost (see docs/repository-format.md,
    "Repairing snapshots"): salvage what still reads from damaged packs, set the damaged
    packs aside, rebuild the index, and replace each manifest that references a lost chunk
    (or whose parent was replaced) by one in which those blocks read as zeros, naming them.
    The originals are moved to ``repaired/`` and removed by the next prune."""
    from vmbak.engine.check import check

    log = log or (lambda s: None)
    rep = RepairSnapshotsReport(dry_run=dry_run)
    with repo.lock(exclusive=True, purpose="repair"):
        chk = check(repo, read_data=read_data, locked=True)
        if chk.damaged_manifests:
            rep.warnings.append(f"{len(chk.damaged_manifests)} manifests are damaged and cannot be repaired here "
                                "('vmbak forget <id>' removes them); snapshots that depend on them are left as "
                                "they are")
        ms = repo.manifests()
        refs: set[bytes] = set()
        for m in ms:
            refs.update(m.ext_id.tolist())
            refs.update(m.bht_chunks)
        present = {n.rsplit("/", 1)[-1] for n, _ in repo.backend.list("data")}
        rep.bad_packs = dict(sorted(chk.bad_packs.items()))
        bad = set(chk.bad_packs)
        _salvage(repo, bad, refs, write=not dry_run, rep=rep)
        if dry_run:
            index = repo.index

            def usable(cid: bytes) -> bool:
                loc = index.get(cid)
                return loc is not None and (loc.pack not in bad or _readable(repo, cid, loc))
        else:
            for pid in sorted(bad & present):
                try:
                    blob = repo.backend.read(pack_name(pid))
                    repo.backend.write(f"{REPAIRED_DIR}/{pack_name(pid)}", blob)
                    repo.backend.delete(pack_name(pid))
                    rep.set_aside_packs.append(pid)
                except ObjectMissing:
                    continue
            if bad:
                rep.index = repair_index(repo, log, locked=True).to_json()
            repo._index = None  # noqa: SLF001 - reload: salvaged packs in, damaged ones out
            index = repo.index

            def usable(cid: bytes) -> bool:
                return cid in index
        lost_ids = {cid for cid in refs if not usable(cid)}
        rep.lost_chunks = len(lost_ids)
        _rewrite(repo, ms, lost_ids, usable, dry_run, rep, log)
    return rep


def _readable(repo: Repository, cid: bytes, loc) -> bool:  # noqa: ANN001
    try:
        repo.read_at(cid, loc)
        return True
    except RepositoryError:
        return False


def _rewrite(repo: Repository, ms: list[Manifest], lost_ids: set[bytes], usable: Callable[[bytes], bool],
             dry_run: bool, rep: RepairSnapshotsReport, log: Callable[[str], None]) -> None:
    """Replace the manifests that lost data or whose parent is replaced (parents first), then
    move the originals to repaired/ (children first)."""
    new_id: dict[str, str] = {}
    own: dict[str, np.ndarray] = {}
    done: list[tuple[Manifest, SnapshotRepair]] = []
    by_id = {m.id: m for m in ms}
    writer = None if dry_run else repo.chunk_writer()
    try:
        for m in _order(ms):
            ids = m.ext_id.tolist()
            lost_ext = np.array([cid in lost_ids for cid in ids], bool)
            lost_mask = np.zeros(m.block_count, bool)
            for j in np.flatnonzero(lost_ext).tolist():
                s, c = int(m.ext_start[j]), int(m.ext_count[j])
                lost_mask[s:s + c] = True
            own[m.id] = lost_mask
            bht_lost = any(c in lost_ids for c in m.bht_chunks)
            parent = new_id.get(m.parent) if m.parent else None
            if not lost_ext.any() and not bht_lost and parent is None:
                continue
            # what a restore of m gets as zeros: its chain's lost blocks that it takes from them
            eff = np.zeros(m.block_count, bool)
            unrestored = np.ones(m.block_count, bool)
            cur: Manifest | None = m
            while cur is not None:
                cov = cur.covered()
                ol = own.get(cur.id)
                if ol is not None and len(ol) == len(eff):
                    eff |= ol & unrestored & cov
                unrestored &= ~cov
                cur = by_id.get(cur.parent) if cur.parent and not is_full(cur.kind) else None
            reason = ("lost data" if lost_ext.any() else "block hash table rebuilt" if bht_lost
                      else "its parent was replaced")
            nm = dataclasses.replace(m, id="", extra=dict(m.extra), notes=list(m.notes), stats=dict(m.stats))
            keep = ~lost_ext
            nm.ext_start, nm.ext_count, nm.ext_id = m.ext_start[keep], m.ext_count[keep], m.ext_id[keep]
            if parent is not None:
                nm.parent = parent
                if m.reference == m.parent:
                    nm.reference = parent
            own_runs = _mask_runs(lost_mask)
            if lost_ext.any() or bht_lost:
                if not dry_run:
                    assert writer is not None
                    table = _rebuilt_bht(repo, m, keep, lost_mask, usable)
                    nm.bht_count = len(table)
                    nm.bht_chunks = store_bht(writer, repo, table)
                    writer.flush()
                    writer = repo.chunk_writer()
            if own_runs:
                nm.notes.append(f"repaired: blocks {range_text([a for a, _ in own_runs], [b for _, b in own_runs], 50)} "
                                "were lost and restore as zeros")
            nm.extra["replaces"] = m.id
            nm.extra["repair"] = {"replaces": m.id, "lost_blocks": [[a, b] for a, b in own_runs],
                                  "reason": reason}
            sr = SnapshotRepair(m.id, None, m.name, m.time, own_runs, _mask_runs(eff), reason)
            if not dry_run:
                sr.new = repo.save_manifest(nm)
                new_id[m.id] = sr.new
                log(f"snapshot {m.short_id} replaced by {sr.new[:8]} ({reason})")
            else:
                new_id[m.id] = "(new)"
            done.append((m, sr))
    finally:
        if writer is not None:
            writer.flush()
    if not dry_run:
        for m, _ in reversed(done):  # children first: a remaining manifest never loses its parent
            try:
                blob = repo.backend.read(f"snapshots/{m.id}")
            except ObjectMissing:
                continue
            repo.backend.write(f"{REPAIRED_DIR}/snapshots/{m.id}", blob)
            repo.delete_manifest(m.id)
    rep.rewritten = [sr.to_json(m.block_size, m.disk_size) for m, sr in done]
