"""``vmbak mount``: a FUSE filesystem (pyfuse3, libfuse 3) showing a snapshot's disk as a
read-only raw file, read through a SnapshotView, and the file trees inside it under
``files/`` (the same tree as ``vmbak ls``: one directory per partition or logical volume).

Disk reads run in worker threads (the view is thread-safe), so several readers proceed at
once. The filesystem parsers are not thread-safe: everything under ``files/`` runs in
worker threads too, but one at a time, behind one lock.
The mount ends when it is unmounted (``fusermount3 -u``), or on SIGTERM/SIGINT, which
unmount it cleanly.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from vmbak.engine.view import SnapshotView
from vmbak.errors import VmbakError, printable
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository
from vmbak.serve.files import Filesystem, Node, SnapshotFiles, safe_name

DISK_INODE = 2
FILES_INODE = 3
FIRST_TREE_INODE = 16
FILES_DIR = b"files"
T = TypeVar("T")


def _safe_file_name(name: str) -> str:
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "disk"
    return clean + ".raw"


def _check_mountpoint(mountpoint: str) -> str:
    mp = os.path.abspath(mountpoint)
    if not os.path.isdir(mp):
        raise VmbakError(f"mount point is not a directory: {mp}")
    if os.path.ismount(mp):
        raise VmbakError(f"something is already mounted at {mp}")
    if not os.path.exists("/dev/fuse"):
        raise VmbakError("FUSE is not available (/dev/fuse is missing)")
    return mp


def _say(line: str) -> None:
    """One line on stderr; with --background nobody may be reading it any more (a closed
    pipe), which must not take the mount down."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _warn(path: str, why: str) -> None:
    _say(f"vmbak: warning: {printable(path)}: {why}")


class _Trees:
    """The ``files/`` side of the mount: inode numbers for paths of a SnapshotFiles, listings,
    open files. Every call runs under one lock (the dissect parsers share state).

    Each inode keeps its node and filesystem, so listing or opening it never walks the
    path again; the volume directories at the top (no filesystem yet) are resolved once."""

    def __init__(self, view: SnapshotView) -> None:
        self.view = view
        self.lock = threading.Lock()
        self._files: SnapshotFiles | None = None
        root = Node("files", "dir", 0, 0o555)
        self.paths: dict[int, tuple[str, Node, Filesystem | None]] = {FILES_INODE: ("/", root, None)}
        self.inodes: dict[str, int] = {"/": FILES_INODE}
        self.listings: dict[int, dict[bytes, int]] = {}
        self.open_files: dict[int, BinaryIO] = {}
        self._next_fh = 1

    @property
    def files(self) -> SnapshotFiles:
        if self._files is None:
            self._files = SnapshotFiles(self.view)
            self._files.on_problem = _warn
        return self._files

    def node(self, ino: int) -> Node | None:
        got = self.paths.get(ino)
        return got[1] if got else None

    def inode(self, path: str, node: Node, fs: Filesystem | None) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = self.inodes[path] = FIRST_TREE_INODE + len(self.inodes)
        self.paths[ino] = (path, node, fs)
        return ino

    def listing(self, ino: int) -> dict[bytes, int]:
        """name -> inode of a directory's entries, in order; special files (devices, fifos)
        are left out."""
        got = self.listings.get(ino)
        if got is None:
            path, node, fs = self.paths[ino]
            if fs is None:  # the top, a volume directory, or a directory of volumes (vg0/)
                fs, _vol, node, _norm = self.files.resolve(path)
            if fs is None:
                entries = self.files.listdir(path)[1]
            else:
                entries = self.files.entries(fs, node, path, strict=True)
            got = {}
            for p, n in entries:
                if n.kind == "other":
                    continue
                if not safe_name(n.name):  # "/" or NUL inside a name: not a name FUSE can show
                    _warn(p, "a name holding '/' or NUL; left out")
                    continue
                got[os.fsencode(n.name)] = self.inode(p, n, fs)
            self.listings[ino] = got
        return got

    def lookup(self, parent: int, name: bytes) -> int | None:
        return self.listing(parent).get(name)

    def open(self, ino: int) -> int:
        path, node, fs = self.paths[ino]
        assert fs is not None  # only files are opened, and files live in a filesystem
        f = self.files.open_node(fs, node, path)
        fh = self._next_fh
        self._next_fh += 1
        self.open_files[fh] = f
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        f = self.open_files[fh]
        f.seek(off)
        return f.read(size)

    def release(self, fh: int) -> None:
        f = self.open_files.pop(fh, None)
        if f is not None:
            f.close()

    def locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self.lock:
            return fn(*args)


def _operations(view: SnapshotView, file_name: str, mtime_ns: int) -> Any:
    import pyfuse3
    import trio

    trees = _Trees(view)

    def fail(e: Exception, code: int = errno.EIO) -> Exception:
        _say(f"vmbak: error: {e}")
        return pyfuse3.FUSEError(code)

    async def in_tree(fn: Callable[..., T], *args: Any) -> T:
        """Run a files/ operation in a worker thread; errors become EIO with one line on stderr."""
        try:
            return await trio.to_thread.run_sync(trees.locked, fn, *args)
        except pyfuse3.FUSEError:
            raise
        except VmbakError as e:  # BrowseError included: the path is named in the message
            raise fail(e) from None
        except Exception as e:  # noqa: BLE001 - a parser tripping on damaged metadata
            raise fail(VmbakError(f"{type(e).__name__}: {e}")) from None

    class Ops(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.name = os.fsencode(file_name)

        def _attr(self, inode: int) -> Any:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_uid = os.getuid()
            a.st_gid = os.getgid()
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = mtime_ns
            a.entry_timeout = a.attr_timeout = 3600
            a.st_blksize = 65536
            if inode in (pyfuse3.ROOT_INODE, FILES_INODE):
                a.st_mode = stat.S_IFDIR | 0o555
                a.st_nlink = 2
            elif inode == DISK_INODE:
                a.st_mode = stat.S_IFREG | 0o444
                a.st_nlink = 1
                a.st_size = view.size
                a.st_blocks = (view.data_bytes + 511) // 512
            elif (node := trees.node(inode)) is not None:
                kind = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(node.kind, stat.S_IFREG)
                # read-only: the backup's permission bits without write, setuid and setgid bits,
                # and always readable (directories searchable) by the user who mounted it
                perm = (node.mode & 0o555) | (0o500 if node.kind == "dir" else 0o400)
                a.st_mode = kind | (perm if node.kind != "symlink" else 0o777)
                a.st_nlink = 2 if node.kind == "dir" else 1
                a.st_size = len(os.fsencode(node.target or "")) if node.kind == "symlink" else node.size
                a.st_blocks = (a.st_size + 511) // 512
                if node.mtime_ns:
                    a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = node.mtime_ns
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return a

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return self._attr(inode)

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            if name == b".":
                return self._attr(parent_inode)
            if parent_inode == pyfuse3.ROOT_INODE:
                if name == self.name:
                    return self._attr(DISK_INODE)
                if name == FILES_DIR:
                    return self._attr(FILES_INODE)
                if name == b"..":
                    return self._attr(pyfuse3.ROOT_INODE)
                raise pyfuse3.FUSEError(errno.ENOENT)
            if parent_inode not in trees.paths:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            ino = await in_tree(trees.lookup, parent_inode, name)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            node = trees.node(inode)
            if node is None or node.kind != "symlink":
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(node.target or "")

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode == pyfuse3.ROOT_INODE:
                return inode
            node = trees.node(inode)
            if node is None or node.kind != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            await in_tree(trees.listing, inode)  # errors surface at opendir, not halfway
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            if fh == pyfuse3.ROOT_INODE:
                entries = [(self.name, DISK_INODE), (FILES_DIR, FILES_INODE)]
            else:
                entries = list((await in_tree(trees.listing, fh)).items())
            for i, (name, ino) in enumerate(entries[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                    break

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            if inode == DISK_INODE:
                return pyfuse3.FileInfo(fh=0, keep_cache=True)
            node = trees.node(inode)
            if node is None or inode in (pyfuse3.ROOT_INODE, FILES_INODE):
                raise pyfuse3.FUSEError(errno.EISDIR if inode in (pyfuse3.ROOT_INODE, FILES_INODE)
                                        else errno.ENOENT)
            if node.kind == "dir":
                raise pyfuse3.FUSEError(errno.EISDIR)
            fh = await in_tree(trees.open, inode)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            if fh:
                return await in_tree(trees.read, fh, off, size)
            try:
                return await trio.to_thread.run_sync(view.pread, size, off)
            except VmbakError as e:
                raise fail(e) from None

        async def release(self, fh: int) -> None:
            if fh:
                await in_tree(trees.release, fh)

        async def statfs(self, ctx: Any) -> Any:
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 65536
            s.f_blocks = (view.size + 65535) // 65536
            s.f_files = 2 + len(trees.paths)
            s.f_namemax = 255
            return s

    return Ops()


def mount_foreground(repo: Repository, snapshot: Manifest, mountpoint: str, *, cache_bytes: int = 256 << 20,
                     allow_other: bool = False, json_out: bool = False, quiet: bool = False) -> dict:
    """Mount and serve until unmounted or signalled; return the view's statistics."""
    try:
        import pyfuse3
        import trio
    except ImportError:
        raise VmbakError("vmbak mount needs pyfuse3 (Debian package python3-pyfuse3)") from None
    mp = _check_mountpoint(mountpoint)
    view = SnapshotView(repo, snapshot, cache_bytes)
    name = _safe_file_name(snapshot.name)
    ops = _operations(view, name, int(_mtime_ns(snapshot.time)))
    options = set(pyfuse3.default_options) | {"fsname=vmbak", "subtype=vmbak", "ro"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mp, options)
    except RuntimeError as e:
        raise VmbakError(f"cannot mount at {mp}: {e}") from None
    info = {"mountpoint": mp, "file": os.path.join(mp, name), "files": os.path.join(mp, "files"),
            "snapshot": snapshot.id,
            "short_id": snapshot.short_id, "name": snapshot.name, "disk_size": snapshot.disk_size,
            "pid": os.getpid()}
    if json_out:
        print(json.dumps(info, sort_keys=True), flush=True)
    elif not quiet:
        print(f"vmbak: mounted snapshot {snapshot.short_id} ({snapshot.name}) at {mp}: {info['file']}, "
              f"file trees under {info['files']}; "
              f"unmount with fusermount3 -u {mp} or Ctrl-C", file=sys.stderr, flush=True)

    async def run() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as rx:
                    async for _ in rx:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    unmount = True
    try:
        trio.run(run)
        unmount = os.path.ismount(mp)
    finally:
        pyfuse3.close(unmount=unmount)
    return view.stats()


def _mtime_ns(iso: str) -> int:
    from datetime import UTC, datetime

    try:
        return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp() * 1e9)
    except ValueError:
        return 0


def mount_background(args: argparse.Namespace, timeout: float = 60.0) -> dict:
    """Run ``vmbak mount`` (foreground) detached; return once it is mounted."""
    from vmbak.cli.common import run_detached

    _check_mountpoint(args.mountpoint)
    proc, info = run_detached(args)
    deadline = time.monotonic() + timeout
    while not os.path.ismount(info["mountpoint"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()
    return info
