"""Retention rules: which snapshots a keep-last/hourly/daily/weekly/monthly/yearly policy keeps.

The rules work as in restic and borg. Snapshots of one disk name are taken newest
first. ``keep-last N`` keeps the N newest. Each calendar rule (hourly, daily, weekly,
monthly, yearly) keeps the newest snapshot of each of the N most recent periods that
hold a snapshot. A snapshot is kept if any rule keeps it, and the result says which
rules did. All periods are in UTC, as snapshot times are; weeks are ISO weeks (Monday
to Sunday, ``2026-W47``). A count of -1 means "every period".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmbak.errors import SnapshotNotFound, VmbakError
from vmbak.repo.repository import Repository


def _period_formats() -> dict[str, Callable[[datetime], str]]:
    return {
        "last": lambda t: "",  # every snapshot is its own period (see keep())
        "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
        "daily": lambda t: t.strftime("%Y-%m-%d"),
        "weekly": lambda t: f"{t.isocalendar()[0]:04d}-W{t.isocalendar()[1]:02d}",
        "monthly": lambda t: t.strftime("%Y-%m"),
        "yearly": lambda t: t.strftime("%Y"),
    }


RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass
class Policy:
    """How many of each to keep; 0 = the rule is off, -1 = unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return all(getattr(self, r) == 0 for r in RULES)

    def validate(self) -> None:
        for r in RULES:
            v = getattr(self, r)
            if not isinstance(v, int) or v < -1:
                raise VmbakError(f"--keep-{r} must be a count (or -1 for unlimited), not {v!r}")

    def describe(self) -> str:
        return ", ".join(f"keep-{r} {'all' if getattr(self, r) == -1 else getattr(self, r)}"
                         for r in RULES if getattr(self, r)) or "no keep rules"


@dataclass
class Decision:
    id: str
    time: str
    keep: bool
    reasons: list[str] = field(default_factory=list)


def parse_snapshot_time(s: str) -> datetime:
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(s, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise VmbakError(f"cannot parse snapshot time {s!r}")


def apply_policy(snapshots: Iterable[tuple[str, str]], policy: Policy) -> list[Decision]:
    """Decide for each ``(id, time)`` of one disk name; return decisions newest first.

    Ties in time are broken by id, so the result never depends on listing order.
    """
    policy.validate()
    snaps = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    decisions = [Decision(sid, t, False) for sid, t in snaps]
    times = [parse_snapshot_time(t) for _, t in snaps]
    fmts = _period_formats()
    for rule in RULES:
        count = getattr(policy, rule)
        if count == 0:
            continue
        last_period: str | None = None
        kept = 0
        for i, d in enumerate(decisions):
            if count != -1 and kept >= count:
                break
            period = d.id if rule == "last" else fmts[rule](times[i])
            if period == last_period:
                continue
            last_period = period
            kept += 1
            d.keep = True
            d.reasons.append("last snapshot" if rule == "last" else f"{rule} {period}")
    return decisions


@dataclass
class ForgetResult:
    policy: str
    groups: dict[str, list[dict]] = field(default_factory=dict)  # name -> rows, newest first
    reconcile: dict = field(default_factory=dict)
    dry_run: bool = False
    removed_damaged: list[str] = field(default_factory=list)  # damaged manifests named by full id

    def to_json(self) -> dict:
        return {"policy": self.policy, "dry_run": self.dry_run, "names": self.groups, **self.reconcile,
                "removed_damaged": self.removed_damaged}


def forget(repo: Repository, policy: Policy, *, name: str | None = None, snapshots: list[str] | None = None,
           keep_dependencies: bool = False, dry_run: bool = False, workers: int = 2,
           log: Callable[[str], None] | None = None) -> ForgetResult:
    """Apply ``policy`` per disk name (or to ``name`` only) and forget ``snapshots``;
    snapshots that remain and depend on forgotten ones are merged (or, with
    ``keep_dependencies``, their dependencies are kept). Holds an exclusive lock."""
    from vmbak.engine.merge import obsolete_map, reconcile

    snapshots = snapshots or []
    if policy.empty() and not snapshots:
        raise VmbakError("nothing to forget: name snapshots or give --keep-* rules "
                         "(without a rule every snapshot would go)")
    policy.validate()
    res = ForgetResult(policy=policy.describe(), dry_run=dry_run)
    with repo.lock(exclusive=True, purpose="forget"):
        all_ms = repo.manifests()
        obsolete = obsolete_map(all_ms)
        current = [m for m in all_ms if m.id not in obsolete]  # half-finished rewrites count once
        by_id = {m.id: m for m in current}
        explicit: set[str] = set()
        damaged = repo.damaged_manifests()
        for spec in snapshots:
            if spec in damaged:  # a damaged manifest goes only by its full id (see the format doc)
                res.removed_damaged.append(spec)
                continue
            m = repo.find(spec)
            explicit.add(obsolete.get(m.id, m.id))
        if name is not None and not any(m.name == name for m in current):
            raise SnapshotNotFound(f"no snapshot named {name!r}")
        delete: set[str] = set(explicit)
        reasons: dict[str, list[str]] = {}
        if not policy.empty():
            names = sorted({m.name for m in current if name is None or m.name == name})
            for n in names:
                group = [(m.id, m.time) for m in current if m.name == n]
                for d in apply_policy(group, policy):
                    reasons[d.id] = d.reasons
                    if not d.keep:
                        delete.add(d.id)
        rec = reconcile(repo, delete, keep_dependencies=keep_dependencies, dry_run=dry_run, workers=workers,
                        log=log)
        new_of = {r.old: r for r in rec.rewrites}
        if name is not None:
            names_shown = {name}
        elif not policy.empty():
            names_shown = {m.name for m in current}
        else:
            names_shown = {by_id[i].name for i in explicit if i in by_id}
        names_shown |= {by_id[i].name for i in explicit if i in by_id}
        shown = sorted((m for m in current if m.name in names_shown), key=lambda m: (m.time, m.id), reverse=True)
        shown.sort(key=lambda m: m.name)  # names in order, each newest first
        for m in shown:
            if m.id in rec.kept_dependencies:
                action = "keep"
                why = ["needed by " + ", ".join(by_id[c].short_id if c in by_id else c[:8]
                                                for c in rec.kept_dependencies[m.id])]
            elif m.id in delete:
                action = "forget"
                why = ["named on the command line"] if m.id in explicit else ["no keep rule matches"]
            else:
                action = "keep"
                why = list(reasons.get(m.id, [])) or (["not named"] if policy.empty() else
                                                      ["not covered by the rules (other name)"])
            row = {"id": m.id, "short_id": m.short_id, "time": m.time, "type": m.kind, "action": action,
                   "reasons": why}
            rw = new_of.get(m.id)
            if rw is not None:
                row["rewrite"] = {"to": rw.new or None, "type": rw.kind, "reason": rw.reason}
            res.groups.setdefault(m.name, []).append(row)
        res.reconcile = rec.to_json()
        if not dry_run:
            for sid in res.removed_damaged:
                repo.delete_manifest(sid)
                log(f"removed damaged snapshot {sid}")
    return res
