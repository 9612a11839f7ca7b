"""The backup command."""

from __future__ import annotations

import argparse

from vmbak.cli.common import emit, log, open_repo, progress
from vmbak.disks.raw import RawDisk
from vmbak.engine.backup import DEFAULT_BLOCK_SIZE, MODES, BackupOptions, backup
from vmbak.engine.common import human

EPILOG = """examples:
  vmbak backup /var/lib/images/web.raw --name web                      # first full, then incremental
  vmbak backup /var/lib/images/web.raw --name web --mode differential  # changes since the last full
  vmbak backup /dev/vg0/db --name db --mode full --json
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backup", parents=[parent], help="back up a disk",
                       description="Back up a raw disk image or block device. The first backup of a name "
                       "is full; later ones read the disk, compare each block's hash with the previous "
                       "backup (scan) and store only changed blocks. Zero blocks and holes are never "
                       "stored; identical chunks are stored once across all disks and backups.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("disk", metavar="DISK", help="raw image file or block device")
    p.add_argument("--name", required=True, help="the name this disk's backups share (e.g. web)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto (default): full if the name has no backup, else incremental")
    p.add_argument("--changes", choices=("auto", "scan", "full"), default="auto",
                   help="change source: scan (hash every block against the parent) or full (everything)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tracking block size (bytes)")
    p.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    p.add_argument("--no-skip-unused", dest="skip_unused", action="store_false",
                   help="read and store blocks that no filesystem uses (default: skip them)")
    p.set_defaults(func=cmd_backup)


def cmd_backup(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    with RawDisk(args.disk) as disk:
        opts = BackupOptions(name=args.name, mode=args.mode, changes=args.changes, block_size=args.block_size,
                             workers=args.workers, progress=progress(args), log=log(args),
                             source=disk.description, skip_unused=args.skip_unused)
        m = backup(repo, disk, opts)
    s = m.stats
    text = (f"snapshot {m.short_id} saved ({m.kind}, source {m.change_source}): "
            f"read {human(s['read_bytes'])}, changed {human(s['changed_bytes'])}, "
            f"added {human(s['new_stored_bytes'])} in {s['duration_s']} s")
    emit(args, m.summary(), text)
    return 0
