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
FIND_EPILOG = """examples:
  vmbak find '*.conf'                            # every snapshot; a pattern without / matches the end of paths
  vmbak find '/p2/etc/*' --name web --latest 1   # anchored at the top; the newest snapshot of web only
  vmbak find -i 'readme*' -s web:latest -s 3f2a9c1e
  vmbak find 'log/**/*.gz' --json                # ** matches any number of directories
"""
DUMP_EPILOG = """examples:
  vmbak dump web:latest /p2/etc/fstab > fstab       # a file: its bytes
  vmbak dump web:latest /p2/etc > etc.tar           # a directory: a tar stream (etc/..., p2/etc/... inside)
  vmbak dump web:latest /p2/home/alice | tar -tvf -
  vmbak dump web@2026-11-20 /p2/srv --target srv.tar --json
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

    p = sub.add_parser("find", parents=[parent], help="find files across snapshots",
                       description="List the files, directories and symlinks whose path matches PATTERN in "
                       "every snapshot (or those chosen with --name, --snapshot, --latest), with type, mode, "
                       "size and modification time. Patterns are restic's: shell globs per path component "
                       "(*, ?, [...]), ** for any number of directories; a pattern starting with / matches "
                       "the whole path (/p2/etc/*), any other the end of it (*.conf, etc/*.conf). Paths that "
                       "cannot be read are named on stderr, the rest is searched, and the exit status is 3.",
                       epilog=FIND_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", metavar="PATTERN", nargs="+")
    p.add_argument("-i", "--ignore-case", action="store_true", help="match case-insensitively")
    p.add_argument("--name", action="append", metavar="NAME", help="only snapshots of this disk name (repeatable)")
    p.add_argument("-s", "--snapshot", action="append", metavar="SNAP",
                   help="only this snapshot: id (prefix), NAME:latest or NAME@TIME (repeatable)")
    p.add_argument("--latest", type=int, metavar="N", help="only the N newest snapshots of each disk name")
    _add_cache(p)
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("dump", parents=[parent], help="write a file or a directory (as tar) from a backup",
                       description="Write PATH from inside a snapshot to standard output (or --target FILE): a "
                       "regular file as its bytes, a directory as a POSIX tar stream of everything below it "
                       "(names are the paths without the leading /, with mode, modification time and "
                       "symlinks; uid and gid 0; device nodes left out). Refuses to write to a terminal: "
                       "redirect it, or use vmbak cat to print a file. Entries that cannot be read are named "
                       "on stderr and left out of the tar (a file that fails part-way is zero-filled to its "
                       "size), and the exit status is 3. With --target, the file appears only once complete.",
                       epilog=DUMP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", metavar="SNAP")
    p.add_argument("path", metavar="PATH")
    p.add_argument("-t", "--target", metavar="FILE", help="write to FILE instead of standard output")
    _add_cache(p)
    p.set_defaults(func=cmd_dump)

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


def _snapshot_warner(label: str):  # noqa: ANN202
    def warn(path: str, why: str) -> None:
        print(f"vmbak: warning: {label}: {printable(path)}: {why}", file=sys.stderr, flush=True)

    return warn


def _select_snapshots(repo, args: argparse.Namespace) -> list:  # noqa: ANN001
    """The snapshots find searches, oldest first."""
    if args.snapshot:
        chosen = {m.id: m for m in (repo.find(s) for s in args.snapshot)}
        ms = sorted(chosen.values(), key=lambda m: (m.time, m.id))
    else:
        ms = repo.manifests()
    if args.name:
        ms = [m for m in ms if m.name in args.name]
    if args.latest is not None:
        if args.latest < 1:
            raise VmbakError("--latest needs a number of snapshots of at least 1")
        keep: dict[str, list] = {}
        for m in ms:
            keep.setdefault(m.name, []).append(m)
        ids = {m.id for group in keep.values() for m in group[-args.latest:]}
        ms = [m for m in ms if m.id in ids]
    return ms


def cmd_find(args: argparse.Namespace) -> int:
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles
    from vmbak.serve.find import Pattern, WalkCache, find_in

    patterns = [Pattern(p, args.ignore_case) for p in args.patterns]
    repo = open_repo(args)
    ms = _select_snapshots(repo, args)
    cache = WalkCache(repo)
    found: list[dict] = []
    problems = 0
    count = 0
    hit_snapshots = 0
    out = sys.stdout
    for m in ms:
        try:
            files = SnapshotFiles(SnapshotView(repo, m, args.cache_size))
        except VmbakError as e:  # a broken chain: the other snapshots are still searched
            print(f"vmbak: warning: snapshot {m.short_id}: cannot be read ({printable(str(e))}); not searched",
                  file=sys.stderr, flush=True)
            problems += 1
            continue
        files.on_problem = _snapshot_warner(files.label)
        hits = 0
        for match in find_in(files, patterns, cache):
            hits += 1
            e = match.node
            if args.json:
                found.append({"snapshot": m.id, "short_id": m.short_id, "snapshot_name": m.name,
                              "snapshot_time": m.time, **e.to_json(match.path)})
            elif not args.quiet:
                tail = f" -> {printable(e.target)}" if e.target is not None else ""
                name = printable(match.path) + ("/" if e.kind == "dir" else "")
                out.write(f"{m.short_id} {_mode_text(e.kind, e.mode)} {e.size:>12} {_when(e.mtime_ns)} "
                          f"{name}{tail}\n")
        out.flush()
        count += hits
        hit_snapshots += bool(hits)
        problems += len({p for p, _ in files.problems})
    if args.json:
        print(json.dumps(found, indent=2))
    elif not args.quiet:
        reused = (f" ({cache.reused} volume{'s' if cache.reused != 1 else ''} unchanged since an earlier "
                  "snapshot: not walked again)") if cache.reused else ""
        print(f"{count} match{'es' if count != 1 else ''} in {hit_snapshots} of {len(ms)} "
              f"snapshot{'s' if len(ms) != 1 else ''}{reused}")
    if problems:
        print(f"vmbak: warning: {problems} path{'s' if problems != 1 else ''} could not be read; "
              "the search is incomplete", file=sys.stderr)
        return PARTIAL
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    import os

    from vmbak.serve.find import dump

    if args.target is None:
        if args.json:
            raise VmbakError("--json needs --target FILE (the dump itself goes to standard output)")
        if sys.stdout.isatty():
            raise VmbakError("refusing to write a dump to a terminal: redirect standard output, use --target "
                             "FILE, or vmbak cat to print a file")
    files, view = _files(args)
    if args.target is None:
        r = dump(files, args.path, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return _partial(files, "the dump is incomplete")
    target = os.path.abspath(args.target)
    if os.path.isdir(target):
        raise VmbakError(f"--target {printable(args.target)} is a directory; give a file name")
    d, base = os.path.split(target)
    tmp = os.path.join(d, f".{base}.vmbak-partial")
    try:
        os.unlink(tmp)  # left by a dump that was killed
    except FileNotFoundError:
        pass
    try:
        with open(tmp, "xb") as f:
            r = dump(files, args.path, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    r["target"] = target
    r["snapshot"] = view.snapshot.id
    what = (f"{r['bytes']} bytes" if r["type"] == "file" else
            f"a tar of {r['files']} files ({human(r['bytes'])}), {r['dirs']} directories and {r['symlinks']} symlinks")
    emit(args, r, f"wrote {what} to {target}")
    return _partial(files, "the dump is incomplete")


def diff_files(args: argparse.Namespace) -> int:
    """``vmbak diff A B --files`` (called by cli.snapshots.cmd_diff)."""
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles
    from vmbak.serve.treediff import FileDiff, changed_blocks, check_same_disk

    repo = open_repo(args)
    a = repo.find(args.a)
    b = repo.find(args.b)
    check_same_disk(a, b)
    fa = SnapshotFiles(SnapshotView(repo, a, args.cache_size))
    fb = SnapshotFiles(SnapshotView(repo, b, args.cache_size))
    fa.on_problem = _snapshot_warner(fa.label)
    fb.on_problem = _snapshot_warner(fb.label)
    fd = FileDiff(fa, fb, changed_blocks(repo, a, b), a.block_size, metadata=args.metadata)
    counts = {k: {"added": 0, "removed": 0, "changed": 0, "type_changed": 0, "metadata": 0}
              for k in ("files", "dirs", "symlinks", "others")}
    col = {"+": "added", "-": "removed", "M": "changed", "T": "type_changed", "U": "metadata"}
    changes = []
    out = sys.stdout
    if not args.json and not args.quiet:
        print(f"comparing snapshot {a.short_id} to snapshot {b.short_id}:")
    for c in fd.changes():
        kind = {"file": "files", "dir": "dirs", "symlink": "symlinks"}.get(c.kind, "others")
        counts[kind][col[c.modifier]] += 1
        if args.json:
            changes.append(c.to_json())
        elif not args.quiet:
            out.write(f"{c.modifier:<5}{printable(c.path)}{'/' if c.kind == 'dir' else ''}\n")
    problems = len({p for p, _ in fa.problems} | {p for p, _ in fb.problems})
    errors = [{"snapshot": m.id, "path": p, "error": why} for m, f in ((a, fa), (b, fb)) for p, why in f.problems]
    doc = {"a": a.id, "b": b.id, "changes": changes, "stats": counts, **fd.stats, "errors": errors}
    if args.json:
        print(json.dumps(doc, indent=2))
    elif not args.quiet:
        for k in ("files", "dirs", "symlinks", "others"):
            s = counts[k]
            extra = "".join(f", {s[x]} {x.replace('_', ' ')}" for x in ("type_changed", "metadata") if s[x])
            print(f"{k.capitalize() + ':':<10}{s['added']:>5} new, {s['removed']:>5} removed, "
                  f"{s['changed']:>5} changed{extra}")
    if problems:
        print(f"vmbak: warning: {problems} path{'s' if problems != 1 else ''} could not be read; "
              "the comparison is incomplete", file=sys.stderr)
        return PARTIAL
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    # SIGTERM and SIGHUP raise an interrupt as Ctrl-C does (vmbak.interrupts, installed by
    # cli/main.py), so the extract's cleanup removes its partial file on all three.
    bar = progress(args)
    files, view = _files(args)
    try:
        bar.phase("extract")
        r = files.extract(args.paths, args.target, log=log(args))
    finally:
        bar.close()
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
