"""Maintenance commands: forget (retention), prune, merge, tag, repair, unlock."""

from __future__ import annotations

import argparse
import re

from vmbak.cli.common import counted, emit, emit_summary, log, open_repo, progress
from vmbak.cli.filters import FILTER_HELP, add_filter_options, filter_from_args
from vmbak.engine.common import human
from vmbak.engine.merge import check_mergeable, reconcile, resolve_target
from vmbak.engine.prune import DEFAULT_REPACK_THRESHOLD, PruneOptions, prune, unlock
from vmbak.engine.repair import repair_index
from vmbak.engine.retention import Policy, forget
from vmbak.errors import VmbakError, printable

FORGET_EPILOG = """examples:
  vmbak forget --name web --keep-last 7 --keep-daily 14 --keep-weekly 8 --keep-monthly 12 --dry-run
  vmbak forget --keep-daily 7 --prune          # every disk name, then prune
  vmbak forget 3f2a9c1e                        # one snapshot
  vmbak forget --keep-within 7d --keep-tag release --dry-run   # the last week, and every release
  vmbak forget --name web --tag nightly --keep-last 7          # only nightly snapshots of web are considered

keep-within DURATION keeps every snapshot newer than the newest snapshot of its name
minus DURATION (1y2m3d4h: years, months, days, hours); a DURATION of 0, like a count
of 0, is no rule (it would keep nothing). --keep-tag a,b keeps snapshots
that have both a and b; repeat it to keep either. Filters (--name, --host, --tag)
choose the snapshots the rules apply to; the others stay (one whose forgotten parent it
needs has that parent merged into it, as below).

Incremental snapshots that stay but depend on forgotten ones are merged with them
inside the repository (nothing is read from any disk). The stayer gets a new id, and its
old id keeps naming it (vmbak restore OLD-ID works; snapshots --json lists former_ids).
With --keep-dependencies the forgotten snapshots they need are kept instead, and listed.

""" + FILTER_HELP

PRUNE_EPILOG = """examples:
  vmbak prune --dry-run
  vmbak prune                  # sweep what earlier runs marked (after the grace period), mark new garbage
  vmbak prune --grace 0        # also sweep at once what no running operation can still use

prune runs beside backups and restores. A first run marks garbage; packs are deleted by
a run after the grace period (default 1h) once every operation that was running when
they were marked has finished.
"""


REPAIR_SNAPSHOTS_EPILOG = """examples:
  vmbak repair snapshots --dry-run
  vmbak repair snapshots --read-data          # corrupt chunks too, not only missing packs
  vmbak restore web:latest /tmp/web.raw       # restores again: the lost ranges are zeros

After a repair, a snapshot that lost data keeps its name and time but gets a new id; its
'notes' name the lost block ranges, and 'extra.replaces' the id it replaces.
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("forget", parents=[parent], help="remove snapshots by retention rules",
                       description="Remove snapshots, named or chosen by keep rules applied to each disk "
                       "name: keep-last N keeps the N newest; keep-hourly/daily/weekly/monthly/yearly N keep "
                       "the newest snapshot of each of the N latest hours/days/ISO weeks/months/years that "
                       "have one (UTC). A snapshot is kept if any rule keeps it. Space is freed by prune.",
                       epilog=FORGET_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshots", nargs="*", metavar="SNAP", help="snapshots to forget (id, NAME:latest, NAME@TIME)")
    add_filter_options(p, name_help="apply the rules to this disk name only (repeat for several; default: "
                       "every name)")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N",
                       help=f"keep {'the N newest snapshots' if rule == 'last' else 'N ' + rule + ' snapshots'}"
                       " (-1: all)")
    p.add_argument("--keep-within", default="", metavar="DURATION",
                   help="keep snapshots newer than the newest one minus DURATION (e.g. 7d, 1y6m, 2d12h)")
    p.add_argument("--keep-tag", action="append", default=[], metavar="TAG[,TAG...]",
                   help="keep snapshots that have all these tags (repeat for either list)")
    p.add_argument("--keep-dependencies", action="store_true",
                   help="keep forgotten snapshots that remaining incrementals need (default: merge them)")
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would stay and go, and why; change nothing")
    p.add_argument("--prune", action="store_true", help="run prune afterwards")
    _prune_options(p)
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("prune", parents=[parent], help="delete unreferenced data",
                       description="Delete packs holding only chunks no snapshot references and repack packs "
                       "that are mostly garbage, in two phases: mark, then sweep after a grace period and once "
                       "every operation running at marking time has finished. Safe beside running backups "
                       "and if killed at any moment.",
                       epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would be marked and swept")
    _prune_options(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("merge", parents=[parent], help="fold an incremental chain into a synthetic full",
                       description="Replace a snapshot (the latest of a disk name, or any snapshot) by a "
                       "synthetic full backup built inside the repository from its chain, newest first, so "
                       "that each block is taken once; no disk is read. Restores of it then need no chain. "
                       "The snapshot gets a new id (its old id keeps naming it); the older snapshots of the "
                       "chain stay.",
                       epilog="examples:\n  vmbak merge web --into-full\n  vmbak merge 3f2a9c1e --into-full --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="NAME|SNAP", help="a disk name (its latest snapshot) or a snapshot")
    p.add_argument("--into-full", action="store_true", help="build a synthetic full (the only kind of merge)")
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would be merged")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("tag", parents=[parent], help="add, remove or set tags of snapshots",
                       description="Change the tags of snapshots: the named ones (resolved among those the "
                       "filters select), or every snapshot the filters select. A snapshot's id covers its "
                       "tags, so each changed snapshot gets a new id (its old id keeps naming it), and the "
                       "later snapshots of its chain are re-pointed to it (new ids too). No data is read or "
                       "written; every snapshot restores as before.",
                       epilog="examples:\n  vmbak tag --add keep web:latest          # forget --keep-tag keep spares it"
                       "\n  vmbak tag --remove nightly --name web --tag nightly\n  vmbak tag --set release,v2 "
                       "3f2a9c1e --json\n\n" + FILTER_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshots", nargs="*", metavar="SNAP", help="snapshots to change (id, NAME:latest, NAME@TIME)")
    add_filter_options(p)
    p.add_argument("--add", action="append", metavar="TAG[,TAG...]", help="add these tags (repeatable)")
    p.add_argument("--remove", action="append", metavar="TAG[,TAG...]", help="remove these tags (repeatable)")
    p.add_argument("--set", action="append", metavar="TAG[,TAG...]", dest="set_tags",
                   help="replace the tags with these (repeatable; --set '' removes every tag)")
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would change; change nothing")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("repair", help="repair parts of the repository",
                       description="Repair what can be rebuilt from the data that is there.",
                       epilog="examples:\n  vmbak repair index\n  vmbak repair snapshots --dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    r = rsub.add_parser("index", parents=[parent], help="rebuild the index from the pack headers",
                        description="Write one new index file built from the headers of every pack (packs "
                        "describe themselves), then delete every older index file, damaged or not. Runs "
                        "beside backups and restores, not beside prune. A damaged index file is otherwise "
                        "skipped with a warning, and the packs it named are read from their headers.",
                        epilog="examples:\n  vmbak repair index --dry-run\n  vmbak repair index --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--dry-run", "-n", action="store_true", help="show what would be done; change nothing")
    r.set_defaults(func=cmd_repair_index)
    r = rsub.add_parser("snapshots", parents=[parent], help="rewrite snapshots that reference lost data",
                        description="Make every snapshot restorable after data was lost (missing or damaged "
                        "packs, lost index files): chunks that still read are copied out of damaged packs, "
                        "the damaged packs are set aside, the index is rebuilt, and every snapshot that "
                        "references a lost chunk is replaced by one in which those blocks restore as zeros "
                        "(the lost block ranges are named, here and in the new snapshot's notes); "
                        "incrementals whose parent was replaced are re-pointed. Restores of unaffected "
                        "snapshots do not change. The replaced snapshots and the damaged packs are kept under "
                        "repaired/ until the next 'vmbak prune'. Afterwards 'vmbak check' is clean. Takes an "
                        "exclusive lock.",
                        epilog=REPAIR_SNAPSHOTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--read-data", action="store_true",
                   help="also read every pack, so that corrupt chunks (not only missing ones) count as lost")
    r.add_argument("--dry-run", "-n", action="store_true", help="show what would be rewritten; change nothing")
    r.set_defaults(func=cmd_repair_snapshots)

    p = sub.add_parser("unlock", parents=[parent], help="remove locks left by dead processes",
                       description="Without options, remove every lock that is not held by a live process "
                       "on this host (use it once you know the processes on other hosts are gone). With "
                       "--remove-stale, remove only locks that are provably stale: their process is gone "
                       "from this host, or their host has not written or refreshed them for seven days (a process "
                       "holding a lock refreshes it every hour).",
                       epilog="examples:\n  vmbak unlock --remove-stale\n  vmbak unlock --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remove-stale", action="store_true", help="remove only provably stale locks")
    p.set_defaults(func=cmd_unlock)


def _prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grace", default="1h", metavar="DURATION",
                   help="how long marked packs wait before they may be deleted (e.g. 0, 90s, 15m, 1h, 2d; default 1h)")
    p.add_argument("--repack-threshold", type=float, default=DEFAULT_REPACK_THRESHOLD, metavar="FRACTION",
                   help="repack packs whose garbage is at least this fraction of their bytes (default 0.5)")


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", s)
    if not m:
        raise VmbakError(f"cannot parse duration {s!r} (use e.g. 0, 90s, 15m, 1h, 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _prune_text(r: dict) -> list[str]:
    lines = []
    mk = r["marked"]
    if mk:
        if r["dry_run"]:
            lines.append(f"would mark {counted(len(mk['would_drop']), 'pack')} to delete and repack {len(mk['would_repack'])} "
                         f"({human(mk['garbage_bytes'])} of garbage)")
        else:
            lines.append(f"marked {counted(mk['doomed_packs'], 'pack')} ({human(mk['garbage_bytes'])} of garbage): "
                         f"{mk['dropped_packs']} hold nothing referenced, {mk['repacked_packs']} repacked into "
                         f"{counted(mk['new_packs'], 'new pack')} ({human(mk['copied_bytes'])} copied)")
    for s in r["swept"]:
        lines.append(f"{'would sweep' if r['dry_run'] else 'swept'} mark {s['mark'][:8]} (marked {s['marked'][:19]}): "
                     f"{counted(s['deleted_packs'], 'pack')} deleted, {human(s['freed_bytes'])} freed"
                     + (f"; {counted(len(s['spared']), 'pack')} spared (still needed)" if s["spared"] else ""))
    left = r.get("garbage_left") or {}
    stays = (f"{human(left['bytes'])} of unreferenced data stays: in {counted(left['packs'], 'pack')} it is less "
             "than the repack threshold (--repack-threshold)") if left.get("bytes") else ""
    if not mk and not r["swept"]:
        lines.append(f"nothing to prune: {stays}" if stays else "nothing to prune: every stored chunk is referenced")
    elif stays:
        lines.append(stays)
    for p in r["postponed"]:
        lines.append(f"mark {p['mark'][:8]} not swept yet: {p['reason']}")
    for mid in r.get("removed_damaged_marks", []):
        lines.append(f"removed damaged prune mark {mid[:8]}")
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    if r.get("removed_repaired"):
        lines.append(f"{'would remove' if r['dry_run'] else 'removed'} {len(r['removed_repaired'])} objects that "
                     "'vmbak repair snapshots' had set aside (repaired/)")
    if r.get("upgraded_format"):
        lines.append("repository format upgraded to version 2 (vmbak before prune support can no longer open it)")
    lines.append(f"repository: {counted(r['packs_before'], 'pack')}, {human(r['bytes_before'])} -> "
                 f"{counted(r['packs_after'], 'pack')}, "
                 f"{human(r['bytes_after'])}")
    return lines


def _run_prune(args: argparse.Namespace, repo) -> dict:  # noqa: ANN001
    opts = PruneOptions(grace_s=parse_duration(args.grace), repack_threshold=args.repack_threshold,
                        dry_run=args.dry_run)
    return prune(repo, opts).to_json()


def cmd_prune(args: argparse.Namespace) -> int:
    with progress(args) as bar:
        repo = open_repo(args)
        args.damage_reported = True  # prune refuses to run with a damaged manifest or index file
        bar.phase("prune")
        r = _run_prune(args, repo)
    emit_summary(args, r, "\n".join(_prune_text(r)))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    policy = Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily, weekly=args.keep_weekly,
                    monthly=args.keep_monthly, yearly=args.keep_yearly, within=args.keep_within,
                    tags=list(args.keep_tag))
    parse_duration(args.grace)  # fail before doing anything
    policy.validate()
    where = filter_from_args(args)
    bar = progress(args)
    repo = open_repo(args)
    bar.phase("forget")
    res = forget(repo, policy, snapshots=args.snapshots, where=where,
                 keep_dependencies=args.keep_dependencies, dry_run=args.dry_run, log=log(args))
    out = res.to_json()
    lines = []
    verb = "would " if args.dry_run else ""
    only = "" if where.empty() else f"; only snapshots matching {where.describe()}"
    if not out["names"] and not where.empty():
        lines.append(printable(f"no snapshots match {where.describe()}"))
    for name, rows in out["names"].items():
        lines.append(printable(f"{name}: ({res.policy}{only})"))
        for r in rows:
            rw = r.get("rewrite")
            extra = ""
            if rw:
                extra = f"  -> {verb}become {rw['to'][:8] + ' ' if rw.get('to') else ''}({rw['type']}: {rw['reason']})"
            lines.append(f"  {r['action']:6}  {r['short_id']}  {r['time'][:19]}  {r['type']:14}  "
                         f"{'; '.join(r['reasons'])}{extra}")
    n_del = len([d for d in out["deleted"] if d not in {w['old'] for w in out['rewritten']}])
    lines.append(f"{verb}forget {counted(n_del, 'snapshot')}, {verb}rewrite {len(out['rewritten'])}"
                 + (f", keep {len(out['kept_dependencies'])} that remaining snapshots need"
                    if out["kept_dependencies"] else ""))
    for sid in out["removed_damaged"]:
        lines.append(f"{verb}remove damaged snapshot {sid}")
    if out["recovered_interrupted"]:
        lines.append(f"finished {len(out['recovered_interrupted'])} rewrites an interrupted run had left")
    if args.prune and not args.dry_run:
        bar.phase("prune")
        out["prune"] = _run_prune(args, repo)
        lines += _prune_text(out["prune"])
    elif args.prune:
        lines.append("(prune is not run with --dry-run)")
    emit_summary(args, out, "\n".join(lines))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from vmbak.cli.filters import tags_from_args
    from vmbak.engine.tagging import tag

    replace = None if args.set_tags is None else tags_from_args([v for v in args.set_tags if v])
    where = filter_from_args(args)
    repo = open_repo(args)
    res = tag(repo, snapshots=args.snapshots, where=where, add=tags_from_args(args.add),
              remove=tags_from_args(args.remove), replace=replace, dry_run=args.dry_run)
    verb = "would change" if args.dry_run else "changed"
    lines = []
    for c in res.changed:
        now = f"; now {c['new_id'][:8]}" if c["new_id"] else ""
        lines.append(printable(f"snapshot {c['id'][:8]} ({c['name']} {c['time'][:19]}): tags "
                               f"{','.join(c['tags_before']) or '(none)'} -> {','.join(c['tags']) or '(none)'}{now}"))
    summary = f"{verb} {counted(len(res.changed), 'snapshot')}"
    if res.unchanged:
        summary += f", {len(res.unchanged)} already so"
    if res.repointed:
        summary += (f"; {'would re-point' if args.dry_run else 're-pointed'} "
                    f"{counted(len(res.repointed), 'later snapshot')} to the new ids")
    lines.append(summary)
    emit_summary(args, res.to_json(), "\n".join(lines))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if not args.into_full:
        raise VmbakError("say what to merge into: --into-full (a synthetic full is the only kind of merge)")
    bar = progress(args)
    repo = open_repo(args)
    bar.phase("merge")
    with repo.lock(exclusive=True, purpose="merge"):
        m = resolve_target(repo, args.target)
        check_mergeable(m)
        chain = repo.chain(m)
        res = reconcile(repo, set(), {m.id}, dry_run=args.dry_run, workers=args.workers, by="merge")
    out = res.to_json() | {"snapshot": m.id, "chain_length": len(chain), "dry_run": args.dry_run}
    rw = next((r for r in res.rewrites if r.old == m.id), None)
    out["new_snapshot"] = rw.new if rw else None
    if args.dry_run:
        text = (f"would replace snapshot {m.short_id} ({printable(m.name)} {m.time[:19]}, chain of {len(chain)}) by a "
                f"synthetic full")
    else:
        assert rw is not None
        text = (f"snapshot {m.short_id} ({printable(m.name)} {m.time[:19]}) replaced by synthetic full {rw.new[:8]}: "
                f"chain of {len(chain)} folded, {rw.reused_extents} extents reused, {rw.split_extents} split, "
                f"{human(rw.stored_bytes)} stored")
    others = [r for r in res.rewrites if r.old != m.id]
    if others:
        text += f"\n{len(others)} later snapshots re-pointed to it"
    emit_summary(args, out, text)
    return 0


def cmd_repair_index(args: argparse.Namespace) -> int:
    with progress(args, "repair index") as bar:
        repo = open_repo(args)
        args.damage_reported = True  # the damaged index files are what it replaces
        bar.phase("repair")
        r = repair_index(repo, dry_run=args.dry_run).to_json() | {"dry_run": args.dry_run}
    if args.dry_run:
        emit_summary(args, r, f"would rebuild the index from the headers of {r['packs']} packs ({r['chunks']} "
                     f"chunks) and replace {len(r['removed_index_files'])} index files"
                     + "".join(f"\nwarning: {w}" for w in r["warnings"]))
        return 0
    lines = [f"replaced damaged {name}: {why.removeprefix(f'index file {name}: ')}"
             for name, why in sorted(r["damaged_index_files"].items())]
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines.append(f"index rebuilt from the headers of {r['packs']} packs ({r['chunks']} chunks); "
                 f"{len(r['removed_index_files'])} older index files removed")
    emit_summary(args, r, "\n".join(lines))
    return 0


def cmd_repair_snapshots(args: argparse.Namespace) -> int:
    from vmbak.engine.repair import repair_snapshots

    repo = open_repo(args)
    args.damage_reported = True
    r = repair_snapshots(repo, read_data=args.read_data, dry_run=args.dry_run, log=log(args)).to_json()
    would = "would be " if args.dry_run else ""
    lines = [f"damaged pack {pid[:16]}: {why}" for pid, why in r["bad_packs"].items()]
    if r["salvaged_chunks"]:
        lines.append(f"{'would ' if args.dry_run else ''}copy {r['salvaged_chunks']} chunks that still read out of damaged packs")
    if r["set_aside_packs"]:
        lines.append(f"set {len(r['set_aside_packs'])} damaged packs aside (repaired/data/, removed by prune)")
    for rw in r["rewritten"]:
        new = f" by {rw['new'][:8]}" if rw["new"] else ""
        lost = ", ".join(f"blocks {d['start_block']}-{d['start_block'] + d['blocks'] - 1} (bytes {d['offset']}-"
                         f"{d['offset'] + d['length'] - 1})" for d in rw["lost"])
        lines.append(printable(f"snapshot {rw['old'][:8]} ({rw['name']} {rw['time'][:19]}) {would}replaced{new}: "
                               f"{rw['reason']}" + (f"; zeros in {lost}" if lost else "; restores fully")))
    lines += [f"warning: {w}" for w in r["warnings"]]
    if not r["rewritten"] and not r["bad_packs"]:
        lines.append("nothing to repair: every snapshot's data is there")
    else:
        lines.append(f"{r['lost_chunks']} chunks lost; {len(r['rewritten'])} snapshots {would}replaced"
                     + ("" if args.dry_run else "; the originals are kept in repaired/ until 'vmbak prune'"))
    emit_summary(args, r, "\n".join(lines))
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    r = unlock(repo, args.remove_stale)
    lines = [f"removed {x['lock']} ({x.get('purpose') or '?'} pid {x.get('pid')} on {x.get('host')}): {x['why']}"
             for x in r["removed"]]
    lines += [f"kept {x['lock']} ({x.get('purpose') or '?'} pid {x.get('pid')} on {x.get('host')}): {x['why']}"
              for x in r["kept"]]
    if not lines:
        lines.append("no locks")
    emit(args, r, "\n".join(lines))
    return 0
