"""The snapshot filter options (--name, --host, --tag) shared by snapshots, forget, tag,
restore and copy; the rule itself is vmbak.repo.filters."""

from __future__ import annotations

import argparse

from vmbak.repo.filters import SnapshotFilter

FILTER_HELP = """snapshot filters (the same in snapshots, forget, tag, restore and copy):
  --name N        snapshots of disk name N; repeat for any of several names
  --host H        snapshots taken on host H; repeat for any of several hosts
  --tag a,b       snapshots that have both tags a and b; repeat for either list
                  (--tag a --tag b: a or b); --tag '' selects snapshots without tags
"""


def add_filter_options(p: argparse.ArgumentParser, name_help: str = "only snapshots of this disk name "
                       "(repeat for any of several)") -> None:
    """Add --name, --host and --tag (each repeatable) to a command's parser."""
    p.add_argument("--name", action="append", metavar="NAME", help=name_help)
    p.add_argument("--host", action="append", metavar="HOST",
                   help="only snapshots taken on this host (repeat for any of several)")
    p.add_argument("--tag", action="append", metavar="TAG[,TAG...]",
                   help="only snapshots with all these tags (repeat for either list; '' = no tags)")


def filter_from_args(args: argparse.Namespace) -> SnapshotFilter:
    """The filter the options give (empty when none was given)."""
    return SnapshotFilter.make(names=args.name, hosts=args.host, tags=args.tag)


def tags_from_args(values: list[str] | None) -> list[str]:
    """The tags ``backup --tag`` gives: each value may list several, comma-separated."""
    from vmbak.engine.backup import check_tags
    from vmbak.errors import VmbakError

    tags = []
    for v in values or ():
        parts = v.split(",")
        if len(parts) > 1 and any(not p for p in parts):
            raise VmbakError(f"bad tag list {v!r}: empty tag (use --tag a,b or --tag a --tag b)")
        tags += parts
    return check_tags(tags)
