"""Retention rules: which snapshots a keep-last/hourly/daily/weekly/monthly/yearly,
keep-within and keep-tag policy keeps.

The rules work as in restic and borg. Snapshots of one disk name are taken newest
first. ``keep-last N`` keeps the N newest. Each calendar rule (hourly, daily, weekly,
monthly, yearly) keeps the newest snapshot of each of the N most recent periods that
hold a snapshot. ``keep-within DURATION`` (``1y2m3d4h``: years, months, days, hours)
keeps every snapshot newer than the newest snapshot of the name minus DURATION (as in
restic: relative to the newest snapshot, not to the clock, so a name that stopped
being backed up keeps its last ones). ``keep-tag`` keeps every snapshot that has all
the tags of one of its tag lists. A snapshot is kept if any rule keeps it, and the
result says which rules did. All periods are in UTC, as snapshot times are; weeks are
ISO weeks (Monday to Sunday, ``2026-W47``). A count of -1 means "every period".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from vmbak.errors import SnapshotNotFound, VmbakError
from vmbak.repo.filters import SnapshotFilter, filter_snapshots, parse_tag_group
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
DURATION_RULE = "a duration is a sequence of NUMBER UNIT with units y, m (months), d and h, e.g. 7d, 1y6m, 2d12h"


def parse_within(text: str) -> tuple[int, int, int, int]:
    """``1y2m3d4h`` -> (years, months, days, hours); each unit at most once, in that order,
    at least one; a one-line VmbakError otherwise."""
    m = re.fullmatch(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?", text.strip())
    if not text.strip() or m is None:
        raise VmbakError(f"cannot parse --keep-within {text!r}: {DURATION_RULE}")
    y, mo, d, h = (int(g) if g else 0 for g in m.groups())
    if y > 10000 or mo > 120000 or d > 3650000 or h > 87600000:
        raise VmbakError(f"--keep-within {text!r} is too long")
    return y, mo, d, h


def within_on(text: str) -> bool:
    """Whether a keep-within duration is a rule: an empty or zero one ("0d", "0y0h") is
    none, as a count of 0 is none (and as in restic). A zero duration taken as a rule
    would keep no snapshot at all, not even the newest, and forget would remove every
    snapshot of the name. A duration that does not parse counts as a rule, so that
    Policy.validate names it."""
    if not text.strip():
        return False
    try:
        return any(parse_within(text))
    except VmbakError:
        return True


def within_limit(newest: datetime, text: str) -> datetime:
    """The instant ``text`` (a keep-within duration) before ``newest``. Years and months
    are calendar steps; a day that the month lacks rolls over into the next month (as Go's
    AddDate in restic: 31 March minus 1 month is 3 March, or 2 March in a leap year)."""
    y, mo, d, h = parse_within(text)
    months = newest.year * 12 + (newest.month - 1) - (12 * y + mo)
    if months < 12:  # before year 1: every snapshot is within
        return datetime.min.replace(tzinfo=UTC)
    first = newest.replace(year=months // 12, month=months % 12 + 1, day=1)
    try:
        return first + timedelta(days=newest.day - 1) - timedelta(days=d, hours=h)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


@dataclass
class Policy:
    """How many of each to keep; 0 = the rule is off, -1 = unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: str = ""  # keep-within duration ("7d", "1y2m"); "" or a zero one ("0d") = off
    tags: list[str] = field(default_factory=list)  # keep-tag lists ("a,b" = both); any of them

    def empty(self) -> bool:
        return all(getattr(self, r) == 0 for r in RULES) and not within_on(self.within) and not self.tags

    def validate(self) -> None:
        for r in RULES:
            v = getattr(self, r)
            if not isinstance(v, int) or v < -1:
                raise VmbakError(f"--keep-{r} must be a count (or -1 for unlimited), not {v!r}")
        if self.within:
            parse_within(self.within)
        for t in self.tags:
            if not parse_tag_group(t):
                raise VmbakError("--keep-tag needs a tag (or a list a,b)")

    def describe(self) -> str:
        parts = [f"keep-{r} {'all' if getattr(self, r) == -1 else getattr(self, r)}"
                 for r in RULES if getattr(self, r)]
        if within_on(self.within):
            parts.append(f"keep-within {self.within}")
        parts += [f"keep-tag {t}" for t in self.tags]
        return ", ".join(parts) or "no keep rules"


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


def apply_policy(snapshots: Iterable[tuple[str, str] | tuple[str, str, list[str]]], policy: Policy
                 ) -> list[Decision]:
    """Decide for each ``(id, time)`` or ``(id, time, tags)`` of one disk name; return
    decisions newest first.

    Ties in time are broken by id, so the result never depends on listing order.
    """
    policy.validate()
    snaps = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    decisions = [Decision(s[0], s[1], False) for s in snaps]
    times = [parse_snapshot_time(s[1]) for s in snaps]
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
    if within_on(policy.within) and decisions:
        limit = within_limit(times[0], policy.within)
        for i, d in enumerate(decisions):
            if times[i] > limit:
                d.keep = True
                d.reasons.append(f"within {policy.within}")
    if policy.tags:
        groups = [parse_tag_group(t) for t in policy.tags]
        for s, d in zip(snaps, decisions, strict=True):
            have = set(s[2]) if len(s) > 2 else set()  # type: ignore[misc]
            for g in groups:
                if set(g) <= have:
                    d.keep = True
                    d.reasons.append(f"tag {','.join(g)}")
    return decisions


@dataclass
class ForgetResult:
    policy: str
    groups: dict[str, list[dict]] = field(default_factory=dict)  # name -> rows, newest first
    reconcile: dict = field(default_factory=dict)
    dry_run: bool = False
    removed_damaged: list[str] = field(default_factory=list)  # damaged manifests named by full id
    filter: dict | None = None  # SnapshotFilter.to_json() when one was given

    def to_json(self) -> dict:
        return {"policy": self.policy, "dry_run": self.dry_run, "names": self.groups, **self.reconcile,
                "removed_damaged": self.removed_damaged, "filter": self.filter}


def _retention_series(snapshots: list) -> dict[str, dict[str, list]]:
    """The snapshots that retention rules count, as series of units: a disk name's snapshots
    one by one, and a libvirt backup (every disk and state file of one checkpoint, named
    with one prefix) as one unit in the series of its prefix. Counting libvirt backups by
    disk name would split them: with a disk removed, ``--keep-last 1`` kept the removed
    disk's last snapshot and forgot the rest of that backup; and a backup whose members'
    times straddle an hour or a day went in different periods for different disks."""
    from vmbak.engine.sources import _lv_info

    series: dict[str, dict[str, list]] = {}
    for m in snapshots:
        lv = _lv_info(m)
        prefix = (lv.get("prefix") or lv.get("domain")) if lv is not None else None
        checkpoint = lv.get("checkpoint") if lv is not None else None
        if isinstance(prefix, str) and isinstance(checkpoint, str) and checkpoint:
            series.setdefault("libvirt\0" + prefix, {}).setdefault("libvirt\0" + checkpoint, []).append(m)
        else:
            series.setdefault("name\0" + m.name, {})[m.id] = [m]
    return series


def forget(repo: Repository, policy: Policy, *, name: str | None = None, snapshots: list[str] | None = None,
           keep_dependencies: bool = False, dry_run: bool = False, workers: int = 2,
           log: Callable[[str], None] | None = None, where: SnapshotFilter | None = None) -> ForgetResult:
    """Apply ``policy`` per disk name (or to ``name`` only) and forget ``snapshots``;
    snapshots that remain and depend on forgotten ones are merged (or, with
    ``keep_dependencies``, their dependencies are kept). Holds an exclusive lock.

    ``where`` (repo/filters.py) limits the rules to the snapshots it selects (the others
    stay, untouched unless a forgotten parent is merged into them), and ``snapshots``
    are resolved among them. Every name of ``where.names`` (and ``name``) must exist."""
    from vmbak.engine.merge import obsolete_map, reconcile

    log = log or (lambda s: None)
    snapshots = snapshots or []
    if policy.empty() and not snapshots:
        raise VmbakError("nothing to forget: name snapshots or give --keep-* rules "
                         "(without a rule every snapshot would go; a count or duration of 0 is no rule)")
    policy.validate()
    res = ForgetResult(policy=policy.describe(), dry_run=dry_run)
    if where is not None and not where.empty():
        res.filter = where.to_json()
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
            m = repo.find(spec, where)
            explicit.add(obsolete.get(m.id, m.id))
        for n in ([name] if name is not None else []) + list(where.names if where is not None else ()):
            if not any(m.name == n for m in current):
                raise SnapshotNotFound(f"no snapshot named {n!r}")
        selected = [m for m in filter_snapshots(current, where) if name is None or m.name == name]
        delete: set[str] = set(explicit)
        reasons: dict[str, list[str]] = {}
        if not policy.empty():
            for units in _retention_series(selected).values():
                rows = [(key, min(m.time for m in ms), sorted({t for m in ms for t in m.tags}))
                        for key, ms in units.items()]
                for d in apply_policy(rows, policy):
                    for m in units[d.id]:
                        reasons[m.id] = list(d.reasons)
                        if not d.keep:
                            delete.add(m.id)
        rec = reconcile(repo, delete, keep_dependencies=keep_dependencies, dry_run=dry_run, workers=workers,
                        log=log, by="forget")
        new_of = {r.old: r for r in rec.rewrites}
        # Shown: what the rules looked at, and the other selected snapshots of the names of
        # snapshots named on the command line.
        shown_ids = {m.id for m in selected} if not policy.empty() else set()
        explicit_names = {by_id[i].name for i in explicit if i in by_id}
        shown_ids |= {m.id for m in filter_snapshots(current, where) if m.name in explicit_names}
        shown_ids |= {i for i in explicit if i in by_id}
        shown = sorted((m for m in current if m.id in shown_ids), key=lambda m: (m.time, m.id), reverse=True)
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
                   "reasons": why, "tags": list(m.tags)}
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
