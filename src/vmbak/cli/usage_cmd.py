"""The usage command: which blocks of a disk its partitions and filesystems use."""

from __future__ import annotations

import argparse

from vmbak.cli.common import emit, parse_size


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from vmbak import usage

    if not hasattr(usage, "analyze"):
        raise ImportError("usage analysis not available")
    p = sub.add_parser("usage", parents=[parent], help="show used and free space per partition",
                       description="Parse the disk's partition tables and filesystems and show, per "
                       "partition, the filesystem type and its used and provably free bytes. Backups "
                       "skip the free blocks. Anything not understood counts as used, with a note.",
                       epilog="examples:\n  vmbak usage disk.raw\n  vmbak usage /dev/vg0/web --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("disk", metavar="DISK", help="raw file, block device or image file (qcow2, vhdx, vpc, vmdk, ...)")
    p.add_argument("--format", metavar="FMT",
                   help="image format of DISK (default: detected as by vmbak backup)")
    p.add_argument("--block-size", type=parse_size, default=65536, metavar="N",
                   help="block size of the used map (default 64K)")
    p.set_defaults(func=cmd_usage)


def cmd_usage(args: argparse.Namespace) -> int:
    from vmbak import usage
    from vmbak.engine.sources import check_image_format, open_disk

    disk = open_disk(args.disk, check_image_format(args.format, write=False))
    try:
        u = usage.analyze(disk, args.block_size)
    finally:
        disk.close()
    emit(args, u.to_json(), usage.format_usage_text(u))
    return 0
