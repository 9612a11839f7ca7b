"""The serve command: an NBD export of any backup, read-only or copy-on-write."""

from __future__ import annotations

import argparse
import json
import sys

from vmbak.cli.common import emit, open_repo_and_password, parse_size, run_detached
from vmbak.engine.common import human
from vmbak.errors import printable

EPILOG = """examples:
  vmbak serve web:latest --socket /run/vmbak/web.sock          # read-only, Ctrl-C or SIGTERM stops it
  nbdinfo --map nbd+unix:///?socket=/run/vmbak/web.sock        # holes are reported (base:allocation)
  qemu-img convert -O qcow2 nbd+unix:///?socket=/run/vmbak/web.sock /tmp/web.qcow2
  vmbak serve web@2026-11-20 --tcp 10809                        # loopback TCP: nbd://127.0.0.1:10809/
  vmbak serve web:latest --socket /run/vmbak/web.sock --writable --overlay /var/tmp/web-ovl.qcow2
  qemu-system-x86_64 ... -drive file=nbd+unix:///?socket=/run/vmbak/web.sock,format=raw   # boot it now
  vmbak restore --from-serve /run/vmbak/web.sock /var/lib/images/web.raw   # copy out while it runs, switch
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", parents=[parent], help="export a snapshot over NBD (read-only or copy-on-write)",
        description="Export the disk of a snapshot over NBD, chain included, without restoring it: only "
        "the chunks a client reads are fetched, decompressed chunks are cached (--cache-size), and holes "
        "are reported through base:allocation so clients skip them. With --writable, writes go to a "
        "qcow2 overlay (created if missing, reused if it belongs to this snapshot), never into the "
        "repository: a VM can boot from the backup at once. 'vmbak restore --from-serve SOCKET TARGET' "
        "then copies the disk with the overlay's writes to TARGET while the VM runs and switches the "
        "export over to it. Runs in the foreground until SIGTERM or SIGINT; prints the NBD URI once "
        "clients can connect.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP", help="snapshot id (prefix), NAME:latest or NAME@TIME (UTC)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="Unix socket to listen on")
    where.add_argument("--tcp", metavar="[HOST:]PORT", help="TCP port to listen on (host 127.0.0.1 by default)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --tcp address (the export has no authentication)")
    p.add_argument("--writable", action="store_true", help="copy-on-write export; needs --overlay")
    p.add_argument("--overlay", metavar="FILE.qcow2", help="qcow2 file that receives the writes")
    p.add_argument("--qmp", metavar="PATH", help="QMP socket of the copy-on-write server "
                   "(default SOCKET.qmp, or a private path with --tcp)")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="N",
                   help="memory for decompressed chunks (default 256M)")
    p.add_argument("--threads", type=int, default=8, help="NBD server threads (default 8)")
    p.add_argument("--background", action="store_true",
                   help="return once the export is ready and keep serving in the background "
                   "(stop it with kill PID)")
    p.set_defaults(func=cmd_serve)


def _ready_text(info: dict) -> str:
    lines = [info["uri"]]
    mode = "copy-on-write into " + str(info["overlay"]) if info["writable"] else "read-only"
    lines.append(f"vmbak: serving snapshot {info['short_id']} ({printable(info['name'])}, {info['time']}, "
                 f"{human(info['disk_size'])}) {mode}; pid {info['pid']}")
    if info.get("qmp"):
        lines.append(f"vmbak: QMP socket {info['qmp']} (vmbak restore --from-serve makes the recovery permanent)")
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.background:
        return _background(args)
    from vmbak.serve.server import Server, serve_forever

    repo, pw = open_repo_and_password(args)
    m = repo.find(args.snapshot)
    if repo.encryption == "none":
        pw = None
    server = Server(repo, m, pw, socket=args.socket, tcp=args.tcp, allow_remote=args.allow_remote,
                    writable=args.writable, overlay=args.overlay, qmp=args.qmp, cache_bytes=args.cache_size,
                    threads=args.threads)

    def ready(info: dict) -> None:
        if args.json:
            print(json.dumps(info, sort_keys=True), flush=True)
        else:
            text = _ready_text(info).split("\n")
            print(text[0], flush=True)
            if not args.quiet:
                print("\n".join(text[1:]), file=sys.stderr, flush=True)

    with repo.lock(purpose="serve"):
        stats = serve_forever(server, ready)
    if not args.quiet and stats:
        print(f"vmbak: stopped; {human(stats.get('read_bytes', 0))} served, "
              f"{stats.get('fetched_chunks', 0)} chunks ({human(stats.get('fetched_bytes', 0))}) fetched, "
              f"cache hit rate {stats.get('hit_rate', 0):.0%}", file=sys.stderr)
    return 0


def _background(args: argparse.Namespace) -> int:
    proc, info = run_detached(args)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()
    emit(args, info, _ready_text(info))
    return 0
