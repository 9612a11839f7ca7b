"""The track command group: serve a disk over NBD while tracking its changed blocks."""

from __future__ import annotations

import argparse
import json
import sys

from vmbak.cli.common import parse_size
from vmbak.errors import VmbakError

EPILOG = """examples:
  vmbak track start /var/lib/images/web.raw --socket /run/vmbak/web.sock
  qemu-system-x86_64 ... -drive file=nbd+unix:///web?socket=/run/vmbak/web.sock,format=raw
  vmbak track status /run/vmbak/web.sock --json
  vmbak track log /run/vmbak/web.sock
  vmbak track stop /run/vmbak/web.sock
"""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser | None = None) -> None:
    parents = [common] if common is not None else []
    p = subparsers.add_parser(
        "track", parents=parents, help="track a disk's changed blocks behind an NBD socket",
        description="Serve a raw disk image over NBD and record every block that is written, trimmed "
        "or zeroed, in memory, in a lazily written .rct file and in a written-through .mrt region table, "
        "so that changes survive crashes. Backups read a consistent checkpoint of it with "
        "--changes track:SOCKET.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="track_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: _usage(p))

    s = sub.add_parser("start", parents=parents, help="start tracking a disk",
                       description="Start the tracking NBD server for DISK on the Unix socket SOCKET "
                       "(and SOCKET.ctl for control). Returns once the socket accepts connections.")
    s.add_argument("disk", metavar="DISK", help="raw disk image file")
    s.add_argument("--socket", required=True, metavar="PATH", help="NBD Unix socket to create")
    s.add_argument("--tcp", metavar="[HOST:]PORT", help="also accept NBD on TCP (host 127.0.0.1 by default)")
    s.add_argument("--block-size", type=parse_size, default=65536, metavar="N", help="tracking block (default 64K)")
    s.add_argument("--mrt-region", type=parse_size, default=1 << 20, metavar="N",
                   help="region of the written-through .mrt table (default 1M)")
    s.add_argument("--rct-interval", type=float, default=5.0, metavar="SEC",
                   help="write the .rct back every SEC seconds (default 5)")
    s.add_argument("--state-dir", metavar="DIR", help="where DISK.vmbak.{rct,mrt,log} live (default: next "
                   "to the disk)")
    s.add_argument("--identity-hash-limit", type=parse_size, default=256 << 20, metavar="N",
                   help="at a clean stop, hash the whole disk when it holds at most N bytes of data (holes "
                   "are free), so the next start can prove nothing wrote it meanwhile; a larger disk gets a "
                   "sample hash and its times are trusted (default 256M; 0: always a sample)")
    s.add_argument("--crash-lease", type=float, default=60.0, metavar="SEC",
                   help="the tracker writes the disk only within SEC seconds of a lease renewed in the .mrt; "
                   "after a crash, a disk changed after the lease counts as written by something else "
                   "and the next backup scans (default 60)")
    s.add_argument("--foreground", action="store_true", help="stay in the foreground (do not daemonise)")
    s.add_argument("--history", type=int, default=8, help=argparse.SUPPRESS)
    s.add_argument("--no-mrt-write-through", dest="mrt_sync", action="store_false", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_start)

    st = sub.add_parser("status", parents=parents, help="show what the tracker knows",
                        description="Dirty bytes, change IDs, open checkpoint and health of .rct/.mrt.")
    st.add_argument("socket", metavar="SOCKET")
    st.set_defaults(func=cmd_status)

    sp = sub.add_parser("stop", parents=parents, help="stop the tracker cleanly",
                        description="Save the bitmaps with the clean-shutdown flag and stop serving.")
    sp.add_argument("socket", metavar="SOCKET")
    sp.set_defaults(func=cmd_stop)

    lg = sub.add_parser("log", parents=parents, help="show the change log",
                        description="Every start, recovery, checkpoint, commit, abort and stop.")
    lg.add_argument("target", metavar="SOCKET|DISK")
    lg.add_argument("--state-dir", metavar="DIR", help="the state directory used at start (with DISK)")
    lg.add_argument("--last", type=int, default=0, metavar="N", help="only the last N records")
    lg.set_defaults(func=cmd_log)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    elif not getattr(args, "quiet", False):
        print(text)


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def format_status(s: dict) -> str:
    lines = [
        f"disk:        {s['disk']} ({_human(s['size'])}, {_human(s['block_size'])} blocks, "
        f"{_human(s['mrt_region_size'])} MRT regions)",
        f"serving:     {s['socket']}" + (f" and TCP {s['tcp']}" if s.get("tcp") else "") + f" (pid {s['pid']})",
        f"tracking:    {s['tracking']}" + (f" - {s['invalid_reason']}" if s.get("invalid_reason") else ""),
        f"change ID:   {s['committed_change_id'] or '(none committed yet)'}",
        f"changed:     {_human(s['dirty_bytes'])} ({s['dirty_blocks']} blocks) since that change ID; "
        f"{s['mrt_dirty_regions']} MRT regions marked",
        f"start:       {s['recovery']}",
        f".rct:        {s['rct']} (generation {s['rct_generation']}, written {s['rct_age_s']} s ago)"
        + (f" ERROR: {s['rct_error']}" if s.get("rct_error") else ""),
        f".mrt:        {s['mrt']} ({s['mrt_syncs']} syncs, write-through "
        f"{'on' if s['mrt_write_through'] else 'OFF'})",
        f"log:         {s['log']}",
    ]
    cp = s.get("checkpoint")
    if cp:
        lines.append(f"checkpoint:  {cp['change_id']} open for {cp['age_s']} s by {cp['owner']}, "
                     f"{_human(cp['cow_bytes'])} copied aside")
    for n in s.get("notes") or []:
        lines.append(f"note:        {n}")
    return "\n".join(lines)


def cmd_start(args: argparse.Namespace) -> int:
    from vmbak.tracker import daemon

    if args.tcp:
        host, _ = daemon.parse_tcp(args.tcp)
        if not daemon.is_loopback(host):
            print(f"vmbak: warning: NBD on {host} is reachable from the network without authentication",
                  file=sys.stderr)
    st = daemon.start(args.disk, args.socket, tcp=args.tcp, block_size=args.block_size,
                      mrt_region=args.mrt_region, rct_interval=args.rct_interval, state_dir=args.state_dir,
                      foreground=args.foreground, mrt_sync=args.mrt_sync, history=args.history,
                      identity_hash_limit=args.identity_hash_limit, crash_lease=args.crash_lease)
    _emit(args, st, f"tracking {st['disk']} on {st['socket']} (pid {st['pid']}, tracking {st['tracking']})"
          + "".join(f"\nnote: {n}" for n in st.get("notes") or []))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from vmbak.tracker.client import TrackerClient, TrackerUnavailable

    try:
        with TrackerClient(args.socket, timeout=30) as c:
            st = c.status()
    except TrackerUnavailable as e:
        raise VmbakError(str(e)) from None
    _emit(args, st, format_status(st))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from vmbak.tracker import daemon

    res = daemon.stop(args.socket)
    _emit(args, res, f"stopped the tracker of {res['disk']} (pid {res['pid']}); bitmaps saved")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from vmbak.tracker import changelog, daemon

    path, recs = daemon.read_log(args.target, args.state_dir)
    if args.last > 0:
        recs = recs[-args.last:]
    _emit(args, recs, "\n".join(changelog.format_record(r) for r in recs) if recs else f"(no records in {path})")
    return 0
