"""prune: delete packs that hold only unreferenced chunks, repack packs that are mostly
garbage, in two phases that are safe beside running backups and against kill -9.

**Mark.** Compute the chunks every snapshot references. For each chunk id keep one
copy (the one in the pack that is most alive); every other copy, and every unreferenced
chunk, is garbage. A pack with no copy to keep is *dropped*; a pack whose garbage is at
least ``repack_threshold`` of its bytes is *repacked*: its kept blobs are copied, still
sealed, into new packs, which are indexed before anything else happens. Then a mark
(``prune/mark-*``) names the dropped and repacked packs: they are *doomed*. From the
moment the mark exists, every writer treats a chunk whose only copies are in doomed
packs as absent (it stores it again), and readers prefer other copies. Last, the locks
that exist now are recorded in a ready record (``prune/ready-*``): they are the only
processes that may have loaded the index without seeing the mark.

**Sweep** (a later run, or the same run with ``--grace 0``). A mark is swept once it is
older than the grace period and none of its recorded locks remains. The references are
computed again (snapshots written since count). A doomed pack that holds the only copy
of a chunk some snapshot now references is spared. Then: index files naming every
surviving pack are written (each superseding every index file read; at most
CONSOLIDATED_ENTRIES entries each), the superseded index files are deleted, the doomed packs are deleted, and last the mark.

A kill at any moment leaves a valid repository: before the new index exists nothing is
removed; after them, every deleted index file's surviving content is in them; a doomed
pack is deleted only after no index file names it, and loaders never bring back an
unindexed pack that a mark dooms. Rerunning prune finishes the work.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from vmbak.errors import IntegrityError, RepositoryError, VmbakError
from vmbak.repo.backend import ObjectMissing
from vmbak.repo.marks import Mark, delete_mark, load_marks, parse_time, write_mark, write_ready
from vmbak.repo.pack import PackWriter, list_packs, pack_name, read_header
from vmbak.repo.repository import PRUNE_VERSION, Repository, _lock_stale

DEFAULT_GRACE_S = 3600.0
DEFAULT_REPACK_THRESHOLD = 0.5


@dataclass
class PruneOptions:
    grace_s: float = DEFAULT_GRACE_S
    repack_threshold: float = DEFAULT_REPACK_THRESHOLD
    dry_run: bool = False
    workers: int = 2


@dataclass
class Pack:
    pack_id: str
    size: int                       # bytes in data/ (0 if missing)
    entries: np.ndarray | None      # id, off, len, raw; None when unknown (damaged header)
    indexed: bool
    present: bool


@dataclass
class Survey:
    packs: dict[str, Pack]
    index_files: list[str]
    warnings: list[str]


@dataclass
class PruneReport:
    dry_run: bool = False
    swept: list[dict] = field(default_factory=list)
    marked: dict | None = None
    postponed: list[dict] = field(default_factory=list)
    removed_incomplete_marks: list[str] = field(default_factory=list)
    removed_damaged_marks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    packs_before: int = 0
    bytes_before: int = 0
    packs_after: int = 0
    bytes_after: int = 0
    freed_bytes: int = 0
    upgraded_format: bool = False
    removed_repaired: list[str] = field(default_factory=list)  # originals 'repair snapshots' kept
    # unreferenced bytes left in packs whose share of garbage is below the repack threshold
    garbage_left: dict = field(default_factory=lambda: {"bytes": 0, "packs": 0})
    duration_s: float = 0.0

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in (
            "dry_run", "swept", "marked", "postponed", "removed_incomplete_marks", "removed_damaged_marks", "warnings", "packs_before",
            "bytes_before", "packs_after", "bytes_after", "freed_bytes", "upgraded_format", "removed_repaired",
            "garbage_left")} | {
            "duration_s": round(self.duration_s, 3)}


def survey(repo: Repository) -> Survey:
    """Every pack with its entries (from the index, else from its header) and the index
    files. A damaged index file stops prune: what it names cannot be judged."""
    warnings: list[str] = []
    files = sorted(n for n, _ in repo.backend.list("index"))
    from_index: dict[str, np.ndarray] = {}
    for name in files:
        try:
            packs = repo.read_index_file(name)
        except IntegrityError as e:
            raise IntegrityError(f"{e}; prune changes nothing while an index file is damaged: run "
                                 "'vmbak repair index' first") from None
        for pid, ent in packs:
            from_index.setdefault(pid, ent)
    present = list_packs(repo.backend)
    packs: dict[str, Pack] = {}
    for pid, size in present.items():
        ent = from_index.get(pid)
        indexed = ent is not None
        if ent is None:
            try:
                ent = read_header(repo.backend, repo.sealer, pid, size)
            except RepositoryError as e:
                warnings.append(f"{e}; the pack is kept")
                ent = None
        packs[pid] = Pack(pid, size, ent, indexed, True)
    for pid in sorted(set(from_index) - set(present)):
        warnings.append(f"pack {pid[:16]} is named by the index but missing; the next index leaves it out, "
                        "so its chunks are stored again when backed up again")
        packs[pid] = Pack(pid, 0, from_index[pid], True, False)
    return Survey(packs, files, warnings)


def references(repo: Repository) -> set[bytes]:
    """Every chunk id some snapshot names (extents and block hash tables)."""
    refs: set[bytes] = set()
    ms = repo.manifests()
    refuse_damaged_manifests(repo)  # prune must not guess
    for m in ms:
        refs.update(m.ext_id.tolist())
        refs.update(m.bht_chunks)
    return refs


def refuse_damaged_manifests(repo: Repository) -> None:
    """Stop when a manifest is damaged: what it references cannot be known, so any chunk
    might be its, and deleting one could destroy the data of a snapshot that a copy of the
    manifest (or undoing a rename) would bring back."""
    damaged = repo.damaged_manifests()
    if not damaged:
        return
    sid, why = sorted(damaged.items())[0]
    more = f" (and {len(damaged) - 1} more damaged snapshots)" if len(damaged) > 1 else ""
    raise IntegrityError(f"snapshot {sid} is damaged ({why.removeprefix(f'snapshot {sid[:8]}: ')}){more}: prune "
                         "cannot tell what it references, so it deletes nothing; restore the file from a "
                         f"copy, or remove it with 'vmbak forget {sid}', then prune again")


def _fresh(repo: Repository) -> None:
    repo._manifests = None  # noqa: SLF001 - reload what other processes wrote meanwhile


def plan_mark(sv: Survey, refs: set[bytes], exclude: set[str], threshold: float) -> tuple[
        list[str], dict[str, np.ndarray], dict]:
    """Decide which packs to drop and which to repack (with the entries to copy); the
    statistics include ``garbage_left``, the garbage in packs below the threshold."""
    cands = [p for p in sv.packs.values() if p.present and p.entries is not None and p.pack_id not in exclude]
    info = []
    for p in cands:
        e = p.entries
        assert e is not None
        live = np.fromiter((cid in refs for cid in e["id"].tolist()), bool, len(e))
        lens = e["len"].astype(np.int64)
        total = int(lens.sum())
        info.append((p, live, lens, total, int(lens[live].sum())))
    # The most alive pack keeps the copy of a chunk stored more than once.
    info.sort(key=lambda t: (-(t[4] / t[3]) if t[3] else 0.0, t[0].pack_id))
    owned: set[bytes] = set()
    drop: list[str] = []
    repack: dict[str, np.ndarray] = {}
    garbage_bytes = 0
    keep_bytes_copied = 0
    left_bytes = left_packs = 0  # garbage in packs below the threshold, left where it is
    for p, live, lens, total, _ in info:
        e = p.entries
        assert e is not None
        ids = e["id"].tolist()
        mine = np.zeros(len(e), bool)
        for k in np.flatnonzero(live).tolist():
            if ids[k] not in owned:
                owned.add(ids[k])
                mine[k] = True
        need = int(lens[mine].sum())
        garbage = total - need
        if not mine.any():
            drop.append(p.pack_id)
            garbage_bytes += p.size
        elif total and garbage / total >= threshold:
            repack[p.pack_id] = e[mine]
            garbage_bytes += garbage
            keep_bytes_copied += need
        elif garbage:
            left_bytes += garbage
            left_packs += 1
    stats = {"dropped_packs": len(drop), "repacked_packs": len(repack), "garbage_bytes": garbage_bytes,
             "copied_bytes": keep_bytes_copied, "garbage_left": {"bytes": left_bytes, "packs": left_packs}}
    return drop, repack, stats


def _repack(repo: Repository, sv: Survey, repack: dict[str, np.ndarray], warnings: list[str]) -> tuple[
        list[str], int, int]:
    """Copy the kept blobs of some packs into new packs (authenticated first), index the
    new packs; return the packs whose blobs were all copied, new pack count, bytes."""
    done: list[str] = []
    finished = []
    pw: PackWriter | None = None
    copied = 0
    new_packs = 0
    try:
        for pid, ent in sorted(repack.items()):
            try:
                data = repo.backend.read(pack_name(pid))
                if len(data) != sv.packs[pid].size:
                    raise IntegrityError(f"pack {pid[:16]}: size changed while pruning")
                blobs = []
                for cid, off, ln, raw in zip(ent["id"].tolist(), ent["off"].tolist(), ent["len"].tolist(),
                                             ent["raw"].tolist(), strict=True):
                    blob = data[off:off + ln]
                    repo.decode_chunk(cid, blob, raw, f"chunk {cid.hex()[:16]} in pack {pid[:16]}")
                    blobs.append((cid, blob, raw))
            except RepositoryError as e:
                warnings.append(f"{e}; pack {pid[:16]} is kept as it is")
                continue
            for cid, blob, raw in blobs:
                if pw is None:
                    pw = PackWriter(repo.backend, repo.sealer)
                    pw.pad(os.urandom(16))  # never the name of a doomed pack
                pw.add(cid, blob, raw)
                copied += len(blob)
                if pw.offset >= repo.pack_size:
                    finished.append(pw.finish())
                    new_packs += 1
                    pw = None
            done.append(pid)
        if pw is not None and len(pw):
            finished.append(pw.finish())
            new_packs += 1
            pw = None
    finally:
        if pw is not None:
            pw.abandon()
    if finished:
        repo.write_index([(fp.pack_id, fp.entries) for fp in finished])  # before the mark dooms the old ones
    return done, new_packs, copied


def _lock_gone(repo: Repository, name: str) -> bool:
    try:
        d = json.loads(repo.backend.read(name))
    except ObjectMissing:
        return True  # deleted: its process finished
    except RepositoryError:
        return False  # cannot be read now (I/O, network): assume alive
    except ValueError:
        return False  # unreadable: assume alive
    return bool(_lock_stale(d)) if isinstance(d, dict) else False


def _age_s(t: str) -> float:
    return (datetime.now(UTC) - parse_time(t)).total_seconds()


def _sweep(repo: Repository, marks: list[Mark], rep: PruneReport, log: Callable[[str], None]) -> None:
    """Delete the packs of eligible marks (see the module docstring)."""
    _fresh(repo)
    refs = references(repo)
    sv = survey(repo)
    for w in sv.warnings:
        if w not in rep.warnings:
            rep.warnings.append(w)
    doomed = {p for m in marks for p in m.doomed}
    spared: dict[str, str] = {}
    survivors_have: set[bytes] = set()
    for p in sv.packs.values():
        if p.present and p.pack_id not in doomed and p.entries is not None:
            survivors_have.update(p.entries["id"].tolist())
    for pid in sorted(doomed):
        p = sv.packs.get(pid)
        if p is None or not p.present:
            continue
        if p.entries is None:
            spared[pid] = "its header cannot be read"
            continue
        for cid in p.entries["id"].tolist():
            if cid in refs and cid not in survivors_have:
                spared[pid] = f"chunk {cid.hex()[:16]} is referenced again and stored nowhere else"
                break
    delete = sorted(p for p in doomed if p not in spared and p in sv.packs and sv.packs[p].present)
    keep = [(p.pack_id, p.entries) for p in sorted(sv.packs.values(), key=lambda p: p.pack_id)
            if p.present and p.entries is not None and p.pack_id not in delete]
    superseded = [f.rsplit("/", 1)[-1] for f in sv.index_files]
    # 1. index files naming every surviving pack (CONSOLIDATED_ENTRIES entries each at
    # most), superseding every index file read
    new_names = set(repo.write_consolidated_index(keep, superseded))
    # 2. the superseded index files; 3. the doomed packs; 4. the marks
    for f in sv.index_files:
        if f not in new_names:
            repo.backend.delete(f)
    freed = 0
    for pid in delete:
        repo.backend.delete(pack_name(pid))
        freed += sv.packs[pid].size
    for m in marks:
        delete_mark(repo.backend, m.mark_id)
    repo._index = None  # noqa: SLF001 - the index changed under us
    rep.freed_bytes += freed
    for m in marks:
        mine = [p for p in m.doomed if p in delete]
        rep.swept.append({"mark": m.mark_id, "marked": m.time, "deleted_packs": len(mine),
                          "freed_bytes": sum(sv.packs[p].size for p in mine),
                          "spared": {p: spared[p] for p in m.doomed if p in spared}})
    log(f"swept {len(marks)} mark(s): deleted {len(delete)} packs, freed {freed} bytes"
        + (f"; spared {len(spared)} packs" if spared else ""))


def _eligible(repo: Repository, marks: list[Mark], grace_s: float, own_lock: str | None) -> tuple[
        list[Mark], list[dict]]:
    ok, later = [], []
    for m in marks:
        if not m.ready:
            later.append({"mark": m.mark_id, "reason": "incomplete (no ready record)"})
            continue
        age = _age_s(m.time)
        if age < grace_s:
            later.append({"mark": m.mark_id, "reason": f"grace period: sweepable in {int(grace_s - age) + 1} s",
                          "doomed_packs": len(m.doomed)})
            continue
        running = [lk for lk in m.locks if lk != own_lock and not _lock_gone(repo, lk)]
        if running:
            later.append({"mark": m.mark_id, "reason": f"{len(running)} operation(s) that started before the "
                          "mark are still running", "doomed_packs": len(m.doomed), "locks": running})
            continue
        ok.append(m)
    return ok, later


def _upgrade_format(repo: Repository) -> bool:
    if int(repo.config.get("version", 1)) >= PRUNE_VERSION:
        return False
    cfg = dict(repo.config)
    cfg["version"] = PRUNE_VERSION
    repo.backend.write("config", json.dumps(cfg, indent=1).encode())
    repo.config = cfg
    return True


def prune(repo: Repository, opts: PruneOptions | None = None, log: Callable[[str], None] | None = None) -> PruneReport:
    """Sweep what earlier marks allow, then mark (and repack) the current garbage."""
    opts = opts or PruneOptions()
    log = log or (lambda s: None)
    if not 0.0 < opts.repack_threshold <= 1.0:
        raise VmbakError("repack threshold must be a fraction in (0, 1]")
    if opts.grace_s < 0:
        raise VmbakError("grace period must not be negative")
    t0 = time.monotonic()
    rep = PruneReport(dry_run=opts.dry_run)
    with repo.lock(exclusive=False, purpose="prune"):
        lock_name = list(repo.held_locks)
        own = lock_name[-1]
        _fresh(repo)
        refuse_damaged_manifests(repo)  # before anything changes
        sv0 = survey(repo)
        rep.warnings.extend(sv0.warnings)
        rep.packs_before = sum(1 for p in sv0.packs.values() if p.present)
        rep.bytes_before = sum(p.size for p in sv0.packs.values())
        marks, problems = load_marks(repo.backend, repo.sealer)
        # A damaged mark is never acted upon: writers and readers already ignore it, so
        # removing it changes nothing but the clutter (only one prune runs at a time, and
        # objects are written whole, so it is not one being written). Its garbage, if any
        # is left, is marked again below.
        readable = {m.mark_id for m in marks}
        damaged_marks = sorted({p.mark_id for p in problems} - readable)
        for p in problems:
            gone = p.mark_id in damaged_marks and not opts.dry_run
            rep.warnings.append(f"{p}; never acted upon" + ("; removed" if gone else ""))
        if not opts.dry_run:
            for mid in damaged_marks:
                delete_mark(repo.backend, mid)
                rep.removed_damaged_marks.append(mid)
        # Marks without a ready record belong to a prune that died (only one runs at a time).
        if not opts.dry_run:
            for m in [m for m in marks if not m.ready]:
                delete_mark(repo.backend, m.mark_id)
                rep.removed_incomplete_marks.append(m.mark_id)
            marks = [m for m in marks if m.ready]
        eligible, rep.postponed = _eligible(repo, marks, opts.grace_s, own)
        if opts.dry_run:
            refs = references(repo)
            for m in eligible:
                rep.swept.append({"mark": m.mark_id, "marked": m.time, "deleted_packs": len(m.doomed),
                                  "freed_bytes": sum(sv0.packs[p].size for p in m.doomed if p in sv0.packs),
                                  "spared": {}})
            exclude = {p for m in marks for p in m.doomed}
            drop, repack, stats = plan_mark(sv0, refs, exclude, opts.repack_threshold)
            rep.marked = stats | {"would_drop": drop, "would_repack": sorted(repack)}
            rep.garbage_left = stats.pop("garbage_left")  # the report's, not the mark's
        else:
            if eligible:
                _sweep(repo, eligible, rep, log)
                marks = [m for m in marks if m not in eligible]
            _fresh(repo)
            refs = references(repo)
            # Only a sweep removes packs or index files (one prune runs at a time): without
            # one, the first survey still holds.
            sv = survey(repo) if eligible else sv0
            exclude = {p for m in marks for p in m.doomed}
            drop, repack, stats = plan_mark(sv, refs, exclude, opts.repack_threshold)
            rep.garbage_left = stats.pop("garbage_left")  # the report's, not the mark's
            if drop or repack:
                rep.upgraded_format = _upgrade_format(repo)
                done, new_packs, copied = _repack(repo, sv, repack, rep.warnings) if repack else ([], 0, 0)
                doomed = sorted(set(drop) | set(done))
                stats |= {"repacked_packs": len(done), "new_packs": new_packs, "copied_bytes": copied,
                          "doomed_packs": len(doomed)}
                if doomed:
                    mark = write_mark(repo.backend, repo.sealer, doomed, stats)
                    others = [n for n, _ in repo.backend.list("locks") if n not in lock_name]
                    write_ready(repo.backend, repo.sealer, mark, others)
                    rep.marked = stats | {"mark": mark.mark_id, "time": mark.time, "locks": mark.locks}
                    log(f"marked {len(doomed)} packs ({stats['garbage_bytes']} bytes of garbage); "
                        f"repacked {len(done)} into {new_packs} new packs")
                    now, later = _eligible(repo, [mark], opts.grace_s, own)
                    if now:
                        _sweep(repo, now, rep, log)
                    else:
                        rep.postponed.extend(later)
        # The originals 'vmbak repair snapshots' replaced (and the damaged packs it set
        # aside) are kept until a prune: their chunks were not counted as referenced above.
        for name, _ in list(repo.backend.list("repaired")):
            if not opts.dry_run:
                repo.backend.delete(name)
            rep.removed_repaired.append(name)
        data = list(repo.backend.list("data"))
        rep.packs_after = len(data)
        rep.bytes_after = sum(s for _, s in data)
    rep.duration_s = time.monotonic() - t0
    return rep


def unlock(repo: Repository, remove_stale_only: bool) -> dict:
    """Remove stale locks (a process gone from this host, or not refreshed for seven days), and
    without ``remove_stale_only`` also every lock that cannot be shown alive: locks of
    other hosts and unreadable lock files. Locks of live processes on this host stay."""
    import socket

    removed, kept = [], []
    for name, _ in repo.backend.list("locks"):
        try:
            d = json.loads(repo.backend.read(name))
            if not isinstance(d, dict):
                raise ValueError
        except RepositoryError:
            continue  # gone meanwhile
        except ValueError:
            d = None
        row = {"lock": name, **({k: d.get(k) for k in ("host", "pid", "time", "refreshed", "exclusive", "purpose")} if d else {})}
        if d is not None and _lock_stale(d):
            row["why"] = "stale (its process is gone)" if d.get("host") == socket.gethostname() else "stale (not refreshed for 7 days)"
        elif d is not None and d.get("host") == socket.gethostname():
            row["why"] = "its process is alive on this host"
            kept.append(row)
            continue
        elif remove_stale_only:
            row["why"] = "held by another host (cannot check; not stale)" if d else "unreadable"
            kept.append(row)
            continue
        else:
            row["why"] = "held by another host (removed as asked)" if d else "unreadable lock file"
        repo.backend.delete(name)
        removed.append(row)
    return {"removed": removed, "kept": kept}
