"""ls, cat, extract and mount: the files and disks inside a backup, without restoring it."""

from __future__ import annotations

import argparse
import json
import stat
import sys
import time

from vmbak.cli.common import emit, emit_summary, log, open_repo, parse_size, progress
from vmbak.engine.common import human
from vmbak.errors import EXIT_PARTIAL, VmbakError, printable

LS_EPILOG = """examples:
  vmbak ls web:latest                      # the volumes: /p1, /p2 ... (/disk without a partition table)
  vmbak ls web:latest /p2/var/log
  vmbak ls web@2026-11-20 /p1/etc/nginx --json
  vmbak ls web:latest /p2/home -R          # recursive
"""
CAT_EPILOG = """examples:
  vmbak cat web@2026-11-20 /p1/etc/nginx/nginx.conf
  vmbak cat web:latest /p2/var/log/syslog | tail
"""
EXTRACT_EPILOG = """examples:
  vmbak extract web:latest /p2/home/alice /p2/srv/www --target ./out
  vmbak extract web@2026-11-20 /p1/etc/hosts --target /tmp/restore --json
"""
MOUNT_EPILOG = """examples:
  vmbak mount web:latest /mnt/web            # foreground; Ctrl-C, SIGTERM or fusermount3 -u unmounts
  vmbak mount web:latest /mnt/web --background
  ls -l /mnt/web                             # web.raw: the disk, read-only; files/: the file trees
  cp /mnt/web/files/p1/etc/fstab .           # one directory per partition, as in vmbak ls
  fusermount3 -u /mnt/web
"""


def _add_cache(p: argparse.ArgumentParser) -> None:

    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="N",
                   help="memory for decompressed chunks (default 256M)")


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ls", parents=[parent], help="list files inside a backup",
                       description="List a directory (or show one entry) of a filesystem inside a snapshot. "
                       "Partitions and LVM logical volumes are the top-level entries (/p1, /p2, /vg0/root; /disk "
                       "without a partition table). ext2/3/4, XFS, NTFS, FAT, exFAT and btrfs are read; only the chunks "
                       "holding what is listed are fetched.",
                       epilog=LS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP", help="snapshot id (prefix), NAME:latest or NAME@TIME (UTC)")
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="path inside the snapshot (default /)")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    _add_cache(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cat", parents=[parent], help="print a file from inside a backup",
                       description="Write one file of a filesystem inside a snapshot to standard output, "
                       "streamed in pieces.",
                       epilog=CAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP")
    p.add_argument("path", metavar="PATH")
    _add_cache(p)
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("extract", parents=[parent], help="copy files out of a backup",
                       description="Copy files, directories and symlinks from inside a snapshot into DIR, "
                       "keeping mode and modification time. Nothing is ever written outside DIR: names from the "
                       "backup are checked, and no symlink is followed while writing (symlinks are recreated as "
                       "they are). Each file appears under its name only once it is complete (it is written to a "
                       "temporary name and renamed). An existing file with the same content is left as it is "
                       "(unchanged); one that differs is replaced (updated), as restic restore does. Entries that "
                       "cannot be read are named on stderr, the rest is extracted, and the exit status is 3.",
                       epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--target", metavar="DIR", required=True, help="directory to extract into (created if missing)")
    _add_cache(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("mount", parents=[parent], help="mount a snapshot's disk and files read-only (FUSE)",
                       description="Mount a FUSE filesystem at MOUNTPOINT that shows the disk of the snapshot "
                       "as a read-only raw file NAME.raw (sparse: holes read as zeros without fetching "
                       "anything), for losetup -r, qemu-img or any tool that reads images, and the files "
                       "inside it under files/ (one directory per partition or logical volume, as vmbak ls "
                       "shows them; only the chunks a read needs are fetched). Runs in the "
                       "foreground until unmounted (fusermount3 -u MOUNTPOINT), SIGTERM or SIGINT; "
                       "--background returns once it is mounted.",
                       epilog=MOUNT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--background", action="store_true", help="return once mounted, keep serving in the background")
    p.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    _add_cache(p)
    p.set_defaults(func=cmd_mount)


PARTIAL = EXIT_PARTIAL  # 3: some entries could not be read (restic's "partial" exit code); the rest was done


def _files(args: argparse.Namespace):  # noqa: ANN202 - (SnapshotFiles, SnapshotView)
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles

    repo = open_repo(args)
    m = repo.find(args.snapshot)
    view = SnapshotView(repo, m, args.cache_size)
    files = SnapshotFiles(view)

    def warn(path: str, why: str) -> None:  # one line per path that cannot be read, even with -q
        print(f"vmbak: warning: {printable(path)}: {why}", file=sys.stderr, flush=True)

    files.on_problem = warn
    return files, view


def _partial(files, what: str) -> int:  # noqa: ANN001
    n = len({p for p, _ in files.problems})
    if not n:
        return 0
    print(f"vmbak: warning: {n} path{'s' if n != 1 else ''} could not be read; {what}", file=sys.stderr)
    return PARTIAL


def _mode_text(kind: str, mode: int) -> str:
    t = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "file": stat.S_IFREG}.get(kind, 0)
    return stat.filemode(t | mode) if t else "?" + stat.filemode(mode)[1:]


def _when(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ns / 1e9)) if ns else " " * 16
    except (OverflowError, OSError, ValueError):  # a damaged timestamp
        return "?".ljust(16)


def cmd_ls(args: argparse.Namespace) -> int:

    files, _view = _files(args)
    node, entries = files.listdir(args.path)
    if args.recursive and node.kind == "dir":
        fs, _vol, n, norm = files.resolve(args.path)
        if fs is None:
            top = entries
            entries = []
            for path, e in top:
                try:
                    sub_fs, _v, sn, snorm = files.resolve(path)
                except VmbakError as err:  # a volume whose filesystem cannot be read: the others still are
                    entries.append((path, e))
                    files.problem(path, str(err).removeprefix(f"{files.label}:{path}: "))
                    continue
                if sub_fs is None:
                    entries.append((path, e))
                    continue
                entries.extend(files.walk(sub_fs, sn, snorm))
        else:
            entries = files.walk(fs, n, norm)
            next(entries)  # the directory itself
    if args.json:
        print(json.dumps([e.to_json(p) for p, e in entries], indent=2))
        return _partial(files, "the listing is incomplete")
    out = sys.stdout
    for path, e in entries:  # streamed: a long walk shows its progress
        when = _when(e.mtime_ns)
        name = printable(path) if args.recursive or node.kind != "dir" else printable(e.name, slash=True)
        if e.kind == "dir" and not name.endswith("/"):
            name += "/"
        tail = f" -> {printable(e.target)}" if e.target is not None else ""
        out.write(f"{_mode_text(e.kind, e.mode)} {e.size:>12} {when} {name}{tail}\n")
    out.flush()
    return _partial(files, "the listing is incomplete")


def cmd_cat(args: argparse.Namespace) -> int:

    files, _view = _files(args)
    fs, _vol, node, norm = files.resolve(args.path)
    if fs is None or node.kind == "dir":
        raise VmbakError(f"{files.label}: is a directory: {printable(norm)}")
    if node.kind != "file":
        raise VmbakError(f"{files.label}: not a regular file ({node.kind}): {printable(norm)}")
    out = sys.stdout.buffer

    def write(b: bytes) -> None:
        out.write(b)

    files.copy_out(fs, node, norm, write)
    out.flush()
    return 0


def _terminate_as_interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does: no partial file is left


def cmd_extract(args: argparse.Namespace) -> int:
    import signal

    bar = progress(args)
    files, view = _files(args)
    old = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        bar.phase("extract")
        r = files.extract(args.paths, args.target, log=log(args))
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old)
    r["snapshot"] = view.snapshot.id
    st = view.stats()
    r["repository_bytes_read"] = st["fetched_bytes"]
    r["repository_chunks_read"] = st["fetched_chunks"]
    r["cache"] = st
    more = [f"{r['updated']} updated" if r["updated"] else "", f"{r['unchanged']} unchanged" if r["unchanged"] else "",
            f"{len(r['skipped'])} skipped" if r["skipped"] else "",
            f"{len(r['errors'])} could not be read" if r["errors"] else ""]
    text = (f"extracted {r['files']} files ({human(r['bytes'])}), {r['dirs']} directories and {r['symlinks']} "
            f"symlinks to {r['target']}" + "".join(f"; {m}" for m in more if m))
    emit_summary(args, r, text)
    return _partial(files, "the extract is incomplete")


def cmd_mount(args: argparse.Namespace) -> int:
    from vmbak.serve.fuse import mount_background, mount_foreground

    if args.background:
        info = mount_background(args)
        emit(args, info, f"mounted snapshot {info['short_id']} at {info['mountpoint']} (pid {info['pid']}); "
             f"unmount with: fusermount3 -u {info['mountpoint']}")
        return 0
    repo = open_repo(args)
    m = repo.find(args.snapshot)
    with repo.lock(purpose="mount"):
        stats = mount_foreground(repo, m, args.mountpoint, cache_bytes=args.cache_size,
                                 allow_other=args.allow_other, json_out=args.json, quiet=args.quiet)
    if not args.quiet and not args.json:
        print(f"vmbak: unmounted {args.mountpoint}; {human(stats.get('read_bytes', 0))} read", file=sys.stderr)
    return 0
