"""Commands that list and compare snapshots: snapshots, diff."""

from __future__ import annotations

import argparse

from vmbak.cli.common import counted, emit, open_repo, parse_size
from vmbak.cli.filters import FILTER_HELP, add_filter_options, filter_from_args
from vmbak.engine.common import human
from vmbak.engine.info import diff
from vmbak.errors import VmbakError, printable
from vmbak.repo.filters import filter_snapshots
from vmbak.repo.manifest import TORN


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("snapshots", parents=[parent], help="list snapshots",
                       description="List the snapshots in the repository, oldest first, or those the "
                       "filters select. A snapshot that forget or merge rewrote lists its earlier ids in "
                       "--json (former_ids); those ids still name it everywhere.",
                       epilog="examples:\n  vmbak snapshots\n  vmbak snapshots --name web --json\n"
                       "  vmbak snapshots --tag nightly --host hv1\n  vmbak snapshots --tag weekly,verified "
                       "--tag monthly\n\n" + FILTER_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_filter_options(p)
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("diff", parents=[parent], help="show what changed between two snapshots",
                       description="Compare two snapshots of the same disk block by block (by their block "
                       "hashes; no data is read) and list the changed extents and bytes. With --files, compare the file "
                       "trees inside them instead (restic's diff): + added, - removed, M content changed, T type "
                       "changed, U (with --metadata) mode or modification time changed; paths that cannot be read "
                       "are named on stderr and the exit status is 3.",
                       epilog="examples:\n  vmbak diff 3f2a9c1e web:latest --json\n"
                       "  vmbak diff web@2026-11-20 web:latest --files          # + new, - removed, M changed, T type\n"
                       "  vmbak diff 3f2a9c1e 9b0d7e11 --files --metadata --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="SNAP_A")
    p.add_argument("b", metavar="SNAP_B")
    p.add_argument("--files", action="store_true",
                   help="list the files added (+), removed (-), changed (M) and changed in type (T) "
                   "(docs/browse.md)")
    p.add_argument("--metadata", action="store_true", help="with --files: also files whose mode or "
                   "modification time alone changed (U)")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="N",
                   help="with --files: memory for decompressed chunks (default 256M)")
    p.set_defaults(func=cmd_diff)


def cmd_snapshots(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    ms = filter_snapshots(repo.manifests(), filter_from_args(args))
    head = ("ID", "TIME (UTC)", "NAME", "TYPE", "SOURCE", "SIZE", "ADDED", "PARENT", "CONSISTENCY", "TAGS")
    # Every cell from the repository is escaped: a hostile manifest cannot break the table.
    table = [tuple(printable(str(c)) for c in (m.short_id, m.time[:19], m.name,
                                               m.kind + ("!" if m.consistency == TORN else ""), m.change_source,
                                               human(m.disk_size), human(m.stats.get("new_stored_bytes", 0)),
                                               (m.parent or "")[:8],
                                               (m.guest_consistency or {}).get("level", "-"), ",".join(m.tags)))
             for m in ms]
    widths = [max([len(head[i])] + [len(r[i]) for r in table]) for i in range(len(head))]
    right = {5, 6}  # sizes are right-aligned

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rows = [line(head)] + [line(r) for r in table] if table else []  # no header over no rows
    torn = sum(m.consistency == TORN for m in ms)
    if torn:
        rows.append(f"! torn: the disk changed while it was read; the snapshot may be inconsistent ({torn})")
    rows.append(counted(len(ms), "snapshot"))
    emit(args, [m.summary() for m in ms], "\n".join(rows))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    if args.files:
        from vmbak.cli.browse import diff_files

        return diff_files(args)
    if args.metadata:
        raise VmbakError("--metadata needs --files")
    repo = open_repo(args)
    a = repo.find(args.a)
    b = repo.find(args.b)
    d = diff(repo, a, b)
    lines = [f"{a.short_id} -> {b.short_id}: {d['changed_blocks']} blocks changed "
             f"({human(d['changed_bytes'])}) in {d['extent_count']} extents"]
    for e in d["extents"][:50]:
        lines.append(f"  offset {e['offset']:>14}  length {e['length']:>10}")
    if d["extent_count"] > 50:
        lines.append(f"  ... {d['extent_count'] - 50} more (use --json for all)")
    emit(args, d, "\n".join(lines))
    return 0
