"""``vmbak mount``: a FUSE filesystem (pyfuse3, libfuse 3) showing a snapshot's disk as a
read-only raw file, read through a SnapshotView.

Reads run in worker threads (the view is thread-safe), so several readers proceed at once.
The mount ends when it is unmounted (``fusermount3 -u``), or on SIGTERM/SIGINT, which
unmount it cleanly.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import subprocess
import sys
import time
from typing import Any

from vmbak.engine.view import SnapshotView
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository

DISK_INODE = 2


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


def _operations(view: SnapshotView, file_name: str, mtime_ns: int) -> Any:
    import pyfuse3
    import trio

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
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode = stat.S_IFDIR | 0o555
                a.st_nlink = 2
            elif inode == DISK_INODE:
                a.st_mode = stat.S_IFREG | 0o444
                a.st_nlink = 1
                a.st_size = view.size
                a.st_blksize = 65536
                a.st_blocks = (view.data_bytes + 511) // 512
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return a

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return self._attr(inode)

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            if parent_inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if name == self.name:
                return self._attr(DISK_INODE)
            if name in (b".", b".."):
                return self._attr(pyfuse3.ROOT_INODE)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, self.name, self._attr(DISK_INODE), 1)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            if inode != DISK_INODE:
                raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            try:
                return await trio.to_thread.run_sync(view.pread, size, off)
            except VmbakError as e:
                print(f"vmbak: error: {e}", file=sys.stderr, flush=True)
                raise pyfuse3.FUSEError(errno.EIO) from None

        async def statfs(self, ctx: Any) -> Any:
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 65536
            s.f_blocks = (view.size + 65535) // 65536
            s.f_files = 2
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
    info = {"mountpoint": mp, "file": os.path.join(mp, name), "snapshot": snapshot.id,
            "short_id": snapshot.short_id, "name": snapshot.name, "disk_size": snapshot.disk_size,
            "pid": os.getpid()}
    if json_out:
        print(json.dumps(info, sort_keys=True), flush=True)
    elif not quiet:
        print(f"vmbak: mounted snapshot {snapshot.short_id} ({snapshot.name}) at {mp}: {info['file']}; "
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
    argv = [a for a in sys.argv[1:] if a != "--background"]
    if "--json" not in argv:
        argv.append("--json")
    _check_mountpoint(args.mountpoint)
    proc = subprocess.Popen([sys.executable, "-m", "vmbak.cli.main", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            close_fds=True, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().strip().splitlines()
        proc.wait()
        msg = err[-1] if err else f"exit status {proc.returncode}"
        raise VmbakError(msg.removeprefix("vmbak: error: "))
    info = json.loads(line)
    deadline = time.monotonic() + timeout
    while not os.path.ismount(info["mountpoint"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.stdout.close()
    proc.stderr.close()
    info["pid"] = proc.pid
    return info
