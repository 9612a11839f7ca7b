"""Snapshot filters: which snapshots ``--name``, ``--host`` and ``--tag`` select.

One rule for every command that takes them (snapshots, forget, restore, copy), as in
restic:

* ``names`` and ``hosts``: a snapshot matches if its name (host) is any of them;
* ``tags``: groups of tags; a snapshot matches if it has every tag of at least one
  group. ``--tag a,b`` is the group (a, b): both; ``--tag a --tag b`` are two groups:
  either. The empty group (``--tag ''``) matches snapshots without tags;
* a snapshot matches the filter if it matches every kind given. An empty filter
  matches everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest


def parse_tag_group(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``; ``""`` -> ``()`` (no tags); a one-line error for an
    empty piece (``"a,,b"``, ``"a,"``)."""
    if text == "":
        return ()
    parts = tuple(p.strip() for p in text.split(","))
    if any(not p for p in parts):
        raise VmbakError(f"bad tag list {text!r}: empty tag (use --tag a,b for both, --tag a --tag b for either)")
    return parts


@dataclass(frozen=True)
class SnapshotFilter:
    """Which snapshots a command works on (see the module docstring)."""

    names: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    tags: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def make(cls, names: Iterable[str] | str | None = None, hosts: Iterable[str] | str | None = None,
             tags: Iterable[str] | str | None = None) -> SnapshotFilter:
        """Build a filter from command-line style values: each of ``tags`` is a
        comma-separated group (``"a,b"``); a single string counts as a list of one."""
        def seq(v: Iterable[str] | str | None) -> tuple[str, ...]:
            if v is None:
                return ()
            return (v,) if isinstance(v, str) else tuple(v)

        return cls(names=seq(names), hosts=seq(hosts), tags=tuple(parse_tag_group(t) for t in seq(tags)))

    def empty(self) -> bool:
        return not (self.names or self.hosts or self.tags)

    def matches(self, m: Manifest) -> bool:
        if self.names and m.name not in self.names:
            return False
        if self.hosts and m.hostname not in self.hosts:
            return False
        if self.tags:
            have = set(m.tags)
            if not any((set(g) <= have) if g else not have for g in self.tags):
                return False
        return True

    def describe(self) -> str:
        """The filter as options (``--name web --tag a,b``), for messages."""
        parts = [f"--name {n}" for n in self.names] + [f"--host {h}" for h in self.hosts]
        parts += [f"--tag {','.join(g)}" if g else "--tag ''" for g in self.tags]
        return " ".join(parts) or "(no filter)"

    def to_json(self) -> dict:
        return {"names": list(self.names), "hosts": list(self.hosts), "tags": [list(g) for g in self.tags]}


def filter_snapshots(ms: Iterable[Manifest], where: SnapshotFilter | None) -> list[Manifest]:
    """The manifests ``where`` selects, in their order (all of them without a filter)."""
    if where is None or where.empty():
        return list(ms)
    return [m for m in ms if where.matches(m)]


__all__ = ["SnapshotFilter", "filter_snapshots", "parse_tag_group"]
