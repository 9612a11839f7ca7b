"""The restore command."""

from __future__ import annotations

import argparse

from vmbak.cli.common import emit, open_repo, progress
from vmbak.engine.common import human
from vmbak.engine.restore import restore

EPILOG = """examples:
  vmbak restore web:latest /tmp/web-restored.raw
  vmbak restore web@2026-11-22T10:00 /tmp/web-monday.raw
  vmbak restore 3f2a9c1e /dev/vg0/web --overwrite
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("restore", parents=[parent], help="restore a snapshot to a raw file or device",
                       description="Write a snapshot's disk to a new sparse raw file (zeros become holes) "
                       "or over an existing file or block device at least as large. An incremental is "
                       "restored with its chain, newest first, writing every block once. The result is "
                       "then re-read and checked against the snapshot's block hashes. A new file appears "
                       "only once it is complete and verified.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP", help="snapshot id (prefix), NAME:latest or NAME@TIME (UTC)")
    p.add_argument("target", metavar="TARGET", help="new file, or existing file/block device")
    p.add_argument("--overwrite", action="store_true", help="allow writing over an existing regular file")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading the target after writing")
    p.add_argument("--sync", action="store_true",
                   help="flush the restored data to stable storage before reporting success")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_restore)


def cmd_restore(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    m = repo.find(args.snapshot)
    r = restore(repo, m, args.target, overwrite=args.overwrite, verify=not args.no_verify,
                workers=args.workers, progress=progress(args), sync=args.sync)
    text = (f"restored snapshot {m.short_id} ({m.name}, {m.time}) to {r['target']}: "
            f"{human(r['written_bytes'])} written from a chain of {r['chain_length']}"
            + (", verified" if r["verified"] else "") + f" in {r['duration_s']} s")
    emit(args, r, text)
    return 0
