"""Changing the tags of snapshots that exist (``vmbak tag``).

A manifest's id is the keyed hash of its bytes, tags included, so a snapshot with other
tags is a new manifest: it is written as a replacement of the old one (engine/merge.py,
``reconcile``), the snapshots whose chains run through it are re-pointed to it, and
the old ids keep resolving to the new ones (``extra.aliases``, by "tag"). No data is read
or written, and every snapshot restores as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmbak.engine.backup import check_tags
from vmbak.errors import SnapshotNotFound, VmbakError
from vmbak.repo.filters import SnapshotFilter, filter_snapshots
from vmbak.repo.repository import Repository


@dataclass
class TagResult:
    changed: list[dict] = field(default_factory=list)    # {"id", "new_id", "name", "time", "tags_before", "tags"}
    unchanged: list[dict] = field(default_factory=list)  # selected, and already so: {"id", "name", "time", "tags"}
    repointed: list[dict] = field(default_factory=list)  # later snapshots rewritten: {"id", "new_id"}
    dry_run: bool = False

    def to_json(self) -> dict:
        return {"changed": self.changed, "unchanged": self.unchanged, "repointed": self.repointed,
                "dry_run": self.dry_run}


def new_tags(have: list[str], add: list[str], remove: list[str], replace: list[str] | None) -> list[str]:
    """The tags a snapshot gets: ``replace`` if given, else ``have`` without ``remove`` and
    then with ``add`` (in that order, each once)."""
    if replace is not None:
        return list(replace)
    out = [t for t in have if t not in remove]
    return out + [t for t in add if t not in out]


def tag(repo: Repository, *, snapshots: list[str] | None = None, where: SnapshotFilter | None = None,
        add: list[str] | None = None, remove: list[str] | None = None, replace: list[str] | None = None,
        dry_run: bool = False, log: Callable[[str], None] | None = None) -> TagResult:
    """Give the snapshots named in ``snapshots`` (resolved among those ``where``
    selects), or without names every snapshot ``where`` selects, the tags ``add`` and
    ``remove`` (or exactly ``replace``) make. Holds an exclusive lock: no backup may name
    a snapshot as its parent while its id changes."""
    from vmbak.engine.merge import obsolete_map, reconcile

    if replace is None and not add and not remove:
        raise VmbakError("say what to change: --add TAG, --remove TAG or --set TAG")
    if replace is not None and (add or remove):
        raise VmbakError("--set gives the whole list of tags: use it without --add and --remove")
    if not snapshots and (where is None or where.empty()):
        raise VmbakError("name the snapshots to tag, or select them with --name, --host or --tag "
                         "(without a selection every snapshot would change)")
    add, remove = check_tags(add), check_tags(remove)
    if replace is not None:
        replace = check_tags(replace)
    res = TagResult(dry_run=dry_run)
    with repo.lock(exclusive=True, purpose="tag"):
        all_ms = repo.manifests()
        obsolete = obsolete_map(all_ms)
        current = {m.id: m for m in all_ms if m.id not in obsolete}  # half-finished rewrites count once
        for n in where.names if where is not None else ():
            if not any(m.name == n for m in current.values()):
                raise SnapshotNotFound(f"no snapshot named {n!r}")
        if snapshots:
            picked: dict[str, None] = {}  # ids in the order named, each once
            for spec in snapshots:
                sid, steps = repo.find(spec, where).id, 0
                while sid in obsolete and steps <= len(all_ms):  # to the replacement that stands for it
                    sid, steps = obsolete[sid], steps + 1
                picked[sid] = None
            chosen = [current[sid] for sid in picked if sid in current]
        else:
            chosen = filter_snapshots(current.values(), where)
        retag: dict[str, list[str]] = {}
        for m in chosen:
            tags = check_tags(new_tags(list(m.tags), add, remove, replace))
            if tags == list(m.tags):
                res.unchanged.append({"id": m.id, "name": m.name, "time": m.time, "tags": list(m.tags)})
            else:
                retag[m.id] = tags
        # also with nothing to change: it finishes the rewrites an interrupted run left
        rec = reconcile(repo, retag=retag, dry_run=dry_run, log=log, by="tag")
    for rw in rec.rewrites:
        old = current[rw.old]
        if rw.old in retag:
            res.changed.append({"id": old.id, "new_id": rw.new or None, "name": old.name, "time": old.time,
                                "tags_before": list(old.tags), "tags": retag[rw.old]})
        else:
            res.repointed.append({"id": old.id, "new_id": rw.new or None})
    return res
