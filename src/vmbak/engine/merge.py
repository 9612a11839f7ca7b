"""Merging snapshots inside the repository: synthetic fulls and folded incrementals.

Nothing here reads a disk. A *segment* is a run of a chain, newest first
``[Y, X1, ..., Xj]``; collapsing it gives one manifest that restores exactly like Y:

* if Xj is a full, a **synthetic full** (every block);
* otherwise an **incremental** relative to Xj's parent that defines every block one of
  the segment defines.

Each block is taken from the newest manifest of the segment that defines it, as the
chain restore does. An extent that is wholly taken is referenced as it is (no data is
read or stored); an extent that a newer manifest partly overrides is read back
(authenticated), and the runs of blocks still taken from it are stored as new chunks
(deduplicated like any chunk).

:func:`reconcile` applies a set of deletions (``forget``), synthetic fulls
(``merge --into-full``) and new tags (``tag``: a manifest's id covers its tags, so a
snapshot with other tags is a new manifest) to the repository without breaking any
remaining snapshot, and
finishes rewrites that a killed run left half done. Its steps are ordered so that a
kill at any moment leaves every snapshot restorable:

1. write every replacement manifest (chunks first, then the manifest, as a backup
   does). A replacement carries ``extra.replaces`` = the id it stands for, and
   ``extra.aliases`` = every id it had before, oldest first (so a recorded id keeps
   resolving after any number of rewrites);
2. delete the replaced and forgotten manifests, newest first, so a remaining manifest's
   parent is never deleted before it.

A replacement whose original still exists means a run was killed between 1 and 2; the
next run re-points the original's children to the replacement and deletes it.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmbak.engine.common import BHT_DTYPE, bounded_map, extents, load_bht, resolve_bht, runs, store_bht
from vmbak.errors import IntegrityError, VmbakError
from vmbak.repo.manifest import ALIASES_KEY, INCREMENTAL, SYNTHETIC, Manifest, is_full
from vmbak.repo.repository import ChunkWriter, Repository, _now_iso


@dataclass
class Rewrite:
    """One manifest replaced by another that restores identically."""

    old: str
    segment: list[str]          # ids folded in, newest first (segment[0] == old)
    new_parent: str | None      # None for a synthetic full
    kind: str                   # the replacement's type
    reason: str
    new: str = ""               # set once written
    stored_bytes: int = 0
    reused_extents: int = 0
    split_extents: int = 0


@dataclass
class ReconcileResult:
    deleted: list[str] = field(default_factory=list)      # forgotten (and replaced) ids, in deletion order
    rewrites: list[Rewrite] = field(default_factory=list)
    kept_dependencies: dict[str, list[str]] = field(default_factory=dict)  # id -> ids that need it
    recovered: list[str] = field(default_factory=list)    # originals of interrupted rewrites
    duration_s: float = 0.0

    def to_json(self) -> dict:
        return {
            "deleted": self.deleted,
            "rewritten": [dataclasses.asdict(r) for r in self.rewrites],
            "kept_dependencies": self.kept_dependencies,
            "recovered_interrupted": self.recovered,
            "duration_s": round(self.duration_s, 3),
        }


def _check_geometry(top: Manifest, m: Manifest) -> None:
    if m.block_size != top.block_size or m.disk_size != top.disk_size:
        raise IntegrityError(f"snapshot {top.short_id}: parent {m.short_id} has a different geometry")


def collapse(repo: Repository, segment: list[Manifest], writer: ChunkWriter, workers: int = 2) -> Manifest:
    """One manifest restoring like ``segment[0]`` from the segment (newest first); see the
    module docstring. Its ``parent`` is left as the bottom's parent (None for a full)."""
    top = segment[0]
    for m in segment[1:]:
        _check_geometry(top, m)
    bottom = segment[-1]
    full = is_full(bottom.kind)
    n = top.block_count
    bs = top.block_size
    size = top.disk_size
    level = np.full(n, -1, np.int32)
    for i, m in enumerate(segment):
        cov = m.covered()
        if len(cov) != n:
            raise IntegrityError(f"snapshot {m.short_id}: bitmaps have the wrong length")
        level[cov & (level < 0)] = i
    # Extents: whole ones are reused; partly overridden ones are cut.
    ext: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    cuts: list[tuple[Manifest, bytes, int, int, list[tuple[int, int]]]] = []
    for i, m in enumerate(segment):
        if len(m.ext_start) == 0:
            continue
        st, ct, en = extents(m, n)
        own = level == i
        cs = np.concatenate(([0], np.cumsum(own, dtype=np.int64)))
        need = cs[en] - cs[st]
        whole = need == ct
        ext.append((m.ext_start[whole], m.ext_count[whole], m.ext_id[whole]))
        for j in np.flatnonzero((need > 0) & ~whole).tolist():
            s, c = int(st[j]), int(ct[j])
            rs, rl = runs(own[s:s + c])
            cuts.append((m, bytes(m.ext_id[j]), s, c, [(s + a, b) for a, b in
                                                     zip(rs.tolist(), rl.tolist(), strict=True)]))

    index = repo.index
    for e in ext:
        for cid in e[2].tolist():
            if index.get(cid) is None:
                raise IntegrityError(f"chunk {cid.hex()[:16]} (named by snapshot {top.short_id}'s chain) is missing "
                                     "from the repository; run 'vmbak check'")

    def cut(job: tuple[Manifest, bytes, int, int, list[tuple[int, int]]]) -> list[tuple[int, int, bytes, bytes, int]]:
        m, cid, s, c, pieces = job
        what = f"chunk {cid.hex()[:16]} (blocks {s}-{s + c - 1} of snapshot {m.short_id})"
        data = repo.read_chunk(cid, what)
        if len(data) != min(c * bs, size - s * bs):
            raise IntegrityError(f"{what}: has the wrong length")
        out = []
        mv = memoryview(data)
        for a, b in pieces:
            piece = bytes(mv[(a - s) * bs:min((a - s + b) * bs, len(data))])
            pid = repo.sealer.chunk_id(piece)
            blob = b"" if writer.has(pid) else repo.encode_chunk(pid, piece)
            out.append((a, b, pid, blob, len(piece)))
        return out

    new_start: list[int] = []
    new_count: list[int] = []
    new_id: list[bytes] = []
    stored = 0
    if cuts:
        with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmbak-merge") as pool:
            for pieces in bounded_map(pool, cut, cuts, 2 * workers + 2):
                for a, b, pid, blob, raw in pieces:
                    if blob and writer.add(pid, blob, raw):
                        stored += len(blob)
                    new_start.append(a)
                    new_count.append(b)
                    new_id.append(pid)
    starts = np.concatenate([e[0].astype(np.uint64) for e in ext] + [np.asarray(new_start, np.uint64)])
    counts = np.concatenate([e[1].astype(np.uint32) for e in ext] + [np.asarray(new_count, np.uint32)])
    ids = np.concatenate([np.asarray(e[2], "V32") for e in ext]
                         + [np.asarray(new_id, "V32") if new_id else np.zeros(0, "V32")])
    order = np.argsort(starts, kind="stable")
    # Block hash table and bitmaps.
    out = Manifest(name=top.name, kind=SYNTHETIC if full else (top.kind if top.kind != SYNTHETIC else INCREMENTAL),
                   time=top.time, disk_size=size, block_size=bs, chunk_blocks=top.chunk_blocks,
                   source=top.source, hostname=top.hostname, change_source=top.change_source,
                   parent=None if full else bottom.parent, reference=top.reference, change_id=top.change_id,
                   consistency=top.consistency, tags=list(top.tags))
    if full:
        table = resolve_bht(repo, segment)
        ub = bottom.bits("used")
        used = ub.bools() if ub is not None and len(ub) == n else np.ones(n, bool)
        for m in reversed(segment[:-1]):
            used[m.changed] = True
            nu = m.newly_unused
            if nu is not None:
                used[nu] = False
            del nu
        out.used = used
    else:
        table = np.zeros((n, 2), BHT_DTYPE)
        changed = np.zeros(n, bool)
        newly = np.zeros(n, bool)
        for i, m in enumerate(segment):
            sel = level == i
            changed |= sel & m.changed
            nu = m.newly_unused
            if nu is not None:
                newly |= sel & nu
            del nu
        for m in reversed(segment):
            cov = m.covered()
            rows = load_bht(repo, m)
            if len(rows) != int(np.count_nonzero(cov)):
                raise IntegrityError(f"snapshot {m.short_id}: block hash table does not match its bitmaps")
            table[cov] = rows
        table = table[changed | newly]
        out.changed = changed
        out.newly_unused = newly
    out.ext_start = starts[order]
    out.ext_count = counts[order]
    out.ext_id = ids[order]
    out.bht_count = len(table)
    out.bht_chunks = store_bht(writer, repo, table)
    out.stats = dict(top.stats)
    out.stats["data_bytes"] = int(out.ext_count.sum()) * bs if len(out.ext_count) else 0
    out.stats["merge"] = {"segment": [m.id for m in segment], "reused_extents": int(sum(len(e[0]) for e in ext)),
                          "split_extents": len(cuts), "new_chunk_bytes": stored}
    out.notes = list(top.notes)
    out.extra = dict(top.extra)
    out.guest_consistency = top.guest_consistency  # the point in time is the top's
    return out


def _depths(ms: dict[str, Manifest]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for sid in ms:
        path = []
        cur: str | None = sid
        while cur is not None and cur in ms and cur not in depth and len(path) <= len(ms):
            path.append(cur)
            cur = ms[cur].parent
        base = depth.get(cur, -1) if cur is not None else -1
        for k, p in enumerate(reversed(path)):
            depth[p] = base + 1 + k
    return depth


def obsolete_map(ms: list[Manifest]) -> dict[str, str]:
    """Manifests that a replacement stands for (a rewrite was interrupted): old -> new."""
    ids = {m.id for m in ms}
    out: dict[str, str] = {}
    for m in ms:
        r = m.extra.get("replaces") if isinstance(m.extra, dict) else None
        if isinstance(r, str) and r in ids and r != m.id:
            out[r] = m.id
    return out


def plan(ms: dict[str, Manifest], delete: set[str], into_full: set[str], keep_dependencies: bool,
         retag: dict[str, list[str]] | None = None) -> tuple[list[Rewrite], list[str], dict[str, list[str]], list[str]]:
    """Work out the rewrites and deletions (no I/O). Return (rewrites in write order,
    ids to delete newest first, kept dependencies, originals of interrupted rewrites).
    ``retag`` (id -> new tags) rewrites those snapshots with other tags."""
    retag = retag or {}
    obsolete = obsolete_map(list(ms.values()))
    delete = {d for d in delete if d in ms}

    def resolve(p: str | None) -> str | None:
        """Follow interrupted rewrites to the manifest that stands for ``p``."""
        seen = 0
        while p is not None and p in obsolete and seen <= len(ms):
            p = obsolete[p]
            seen += 1
        return p

    kept_deps: dict[str, list[str]] = {}
    if keep_dependencies:
        # Every snapshot that stays keeps its whole chain; say which forgotten ones stay.
        for m in ms.values():
            if m.id in delete or m.id in obsolete:
                continue
            p = resolve(m.parent)
            steps = 0
            while p is not None and p in ms and steps <= len(ms):
                if p in delete:
                    kept_deps.setdefault(p, []).append(m.id)
                p = resolve(ms[p].parent)
                steps += 1
        delete -= set(kept_deps)
    gone = delete | set(obsolete)
    depth = _depths(ms)
    live = sorted((m for m in ms.values() if m.id not in gone), key=lambda m: (depth.get(m.id, 0), m.time, m.id))
    rewrites: list[Rewrite] = []
    rewritten: set[str] = set()

    for y in live:
        segment = [y.id]
        force = y.id in into_full and not is_full(y.kind)
        p = resolve(y.parent)
        steps = 0
        while p is not None and (p in delete or force) and steps <= len(ms):
            if p not in ms:
                raise IntegrityError(f"snapshot {y.short_id}: parent snapshot {p[:8]} is missing")
            segment.append(p)
            p = resolve(ms[p].parent)
            steps += 1
        if p is not None and p not in ms:
            # Its chain reaches a missing or damaged manifest: it cannot be restored. It is
            # left as it is, or (when forgotten parents are folded into it) still points there.
            if len(segment) == 1 and not force and y.id not in retag:
                continue
            if force:
                raise IntegrityError(f"snapshot {ms[segment[-1]].short_id}: parent snapshot {p[:8]} is missing "
                                     "or damaged")
        if len(segment) == 1 and p == y.parent and p not in rewritten and y.id not in retag:
            continue
        bottom = ms[segment[-1]]
        if len(segment) > 1 and is_full(bottom.kind):
            kind, reason = SYNTHETIC, ("synthetic full of its chain" if force else
                                       "synthetic full: absorbed " + ", ".join(s[:8] for s in segment[1:]))
            new_parent = None
        elif len(segment) > 1:
            kind = y.kind if y.kind != SYNTHETIC else INCREMENTAL
            reason = "absorbed " + ", ".join(s[:8] for s in segment[1:])
            new_parent = p
        else:
            kind, reason, new_parent = y.kind, "tags changed" if y.id in retag else "parent rewritten", p
        if not is_full(bottom.kind) and p is None:
            raise IntegrityError(f"snapshot {bottom.short_id} has no parent but is not a full backup")
        rewrites.append(Rewrite(old=y.id, segment=segment, new_parent=new_parent, kind=kind, reason=reason))
        rewritten.add(y.id)
    order_del = sorted(gone | {r.old for r in rewrites}, key=lambda s: (ms[s].time, s), reverse=True)
    return rewrites, order_del, kept_deps, sorted(obsolete)


def reconcile(repo: Repository, delete: set[str] | None = None, into_full: set[str] | None = None, *,
              keep_dependencies: bool = False, dry_run: bool = False, workers: int = 2,
              log: Callable[[str], None] | None = None, by: str = "merge",
              retag: dict[str, list[str]] | None = None) -> ReconcileResult:
    """Delete ``delete``, turn ``into_full`` into synthetic fulls, give the snapshots of
    ``retag`` (id -> tags) those tags, and keep every other snapshot restorable (see the
    module docstring). The caller holds an exclusive lock. ``by`` (the command: "forget",
    "merge", "tag") is recorded in each replacement's aliases."""
    log = log or (lambda s: None)
    retag = retag or {}
    t0 = time.monotonic()
    ms = {m.id: m for m in repo.manifests()}
    rewrites, order_del, kept_deps, recovered = plan(ms, set(delete or ()), set(into_full or ()),
                                                     keep_dependencies, retag)
    res = ReconcileResult(kept_dependencies=kept_deps, recovered=recovered)
    res.rewrites = rewrites
    if dry_run:
        res.deleted = order_del
        res.duration_s = time.monotonic() - t0
        return res
    new_id: dict[str, str] = {}
    for rw in rewrites:
        y = ms[rw.old]
        parent = new_id.get(rw.new_parent, rw.new_parent) if rw.new_parent else None
        if len(rw.segment) == 1:
            out = dataclasses.replace(y, parent=parent, extra=dict(y.extra), notes=list(y.notes),
                                      stats=dict(y.stats), id="")
        else:
            writer = repo.chunk_writer()
            try:
                out = collapse(repo, [ms[s] for s in rw.segment], writer, workers)
                writer.flush()  # chunks are durable before the manifest names them
            except BaseException:
                writer.abandon()
                raise
            out.parent = parent
            merge = out.stats.get("merge", {})
            rw.stored_bytes = int(merge.get("new_chunk_bytes", 0))
            rw.reused_extents = int(merge.get("reused_extents", 0))
            rw.split_extents = int(merge.get("split_extents", 0))
            out.notes.append(f"{rw.reason} (vmbak merge, {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC)")
        out.kind = rw.kind
        if y.id in retag:
            out.tags = list(retag[y.id])
        out.extra["replaces"] = y.id
        # The old id keeps resolving to the replacement, also after later rewrites (the
        # history is carried over from y): see Repository.resolve.
        history = [a for a in y.aliases() if a["id"] != y.id]
        out.extra[ALIASES_KEY] = [*history, {"id": y.id, "by": by, "time": _now_iso()}]
        repo.save_manifest(out)
        new_id[rw.old] = out.id
        rw.new = out.id
        log(f"snapshot {y.short_id} ({y.name} {y.time[:19]}) rewritten as {out.short_id}: {rw.reason}")
    for sid in order_del:
        repo.delete_manifest(sid)
        res.deleted.append(sid)
    res.duration_s = time.monotonic() - t0
    return res


def resolve_target(repo: Repository, spec: str) -> Manifest:
    """The snapshot ``merge`` works on: a snapshot spec, or a disk name (its latest)."""
    ms = repo.manifests()
    obsolete = obsolete_map(ms)
    names = {m.name for m in ms}
    if spec in names and not spec.endswith(":latest"):
        cand = [m for m in ms if m.name == spec and m.id not in obsolete]
        return cand[-1]
    m = repo.find(spec)
    seen = 0
    while m.id in obsolete and seen < len(ms):
        m = repo.load_manifest(obsolete[m.id])
        seen += 1
    return m


def check_mergeable(m: Manifest) -> None:
    if is_full(m.kind):
        raise VmbakError(f"snapshot {m.short_id} ({m.name} {m.time[:19]}) is already a {m.kind} backup")
