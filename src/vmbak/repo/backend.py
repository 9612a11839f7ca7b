"""Storage backends: where repository files live. Only whole-object writes are used,
so that an object store (S3) can implement the same interface."""

from __future__ import annotations

import errno
import os
import resource
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from vmbak.errors import RepositoryError


class ObjectMissing(RepositoryError):
    """The named object does not exist (as opposed to an I/O, network or permission error)."""


class ReadOnlyRepository(RepositoryError):
    """An object could not be written: the repository's file system is read-only."""


class AccessDenied(RepositoryError):
    """The repository refused access to an object (file permissions, an S3 policy)."""


class Backend(Protocol):
    """A flat namespace of immutable objects named by '/'-separated paths."""

    location: str

    def read(self, name: str) -> bytes: ...
    def read_range(self, name: str, offset: int, length: int) -> bytes: ...
    def size(self, name: str) -> int: ...
    def write(self, name: str, data: bytes) -> None:
        """Write an object atomically and durably (all or nothing)."""
        ...
    def write_file(self, name: str, path: str) -> None:
        """Move a finished local file into place atomically and durably."""
        ...
    def exists(self, name: str) -> bool: ...
    def delete(self, name: str) -> None: ...
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield (name, size) of the objects under a directory-like prefix."""
        ...
    def temp_path(self, hint: str) -> str:
        """A local path for building an object before write_file()."""
        ...


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_private(path: str, durable: bool = False) -> None:
    """Create ``path`` and any missing parents with mode 0700 (whatever the umask; unlike
    os.makedirs, which gives parents the default mode). With ``durable``, each new
    directory's parent is fsynced, so that the new entry survives a crash."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue
        os.chmod(d, 0o700)  # the umask may have taken bits away; never adds any
        if durable:
            _fsync_dir(os.path.dirname(d))


def create_private(path: str) -> int:
    """Create a new file with mode 0600 (whatever the umask) and return its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class LocalBackend:
    """A repository in a local directory."""

    # PackWriter writes packs with O_DIRECT where the filesystem allows it (repo/pack.py).
    direct_writes = True
    # Packs written at once (ChunkWriter). With one, a full backup's stretch of random data
    # (stored raw, so little work per chunk) waited on the pack writer: on the benchmark
    # image the main thread spent 0.6-0.7 s in ChunkWriter._reap, 0.17-0.22 s with two.
    pack_writers = 2

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root
        self.tmpdir = os.path.join(self.root, "tmp")
        self._known_dirs: set[str] = set()
        # Held while a directory is made durable: another pack writer must not move a pack
        # into it before its parent's fsync is done.
        self._dirs_lock = threading.Lock()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _wrap(self, e: OSError, name: str) -> RepositoryError:
        if isinstance(e, FileNotFoundError):
            return ObjectMissing(f"repository object missing: {name}")
        where = e.filename or self._path(name)
        kind = ReadOnlyRepository if e.errno == errno.EROFS else \
            AccessDenied if e.errno in (errno.EACCES, errno.EPERM) else RepositoryError
        return kind(f"repository I/O error on {name} ({where}): {e.strerror or e}")

    def read(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except OSError as e:
            raise self._wrap(e, name) from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except OSError as e:
            raise self._wrap(e, name) from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def read_range_into(self, name: str, offset: int, out: memoryview, files: OpenFiles | None = None) -> int:
        """:meth:`read_range` of ``len(out)`` bytes into ``out``; return how many were read.
        With ``files``, the object's descriptor is taken from (and kept in) that cache
        instead of being opened and closed for this one read."""
        path = self._path(name)
        try:
            fd = files.get(path) if files is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._wrap(e, name) from None
        try:
            n = 0
            while n < len(out):
                k = os.preadv(fd, [out[n:]], offset + n)
                if not k:
                    break
                n += k
            return n
        except OSError as e:
            raise self._wrap(e, name) from None
        finally:
            if files is None:
                os.close(fd)

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except OSError as e:
            raise self._wrap(e, name) from None

    def _ensure_dir(self, d: str) -> None:
        if d in self._known_dirs:
            return
        with self._dirs_lock:
            if d not in self._known_dirs:
                # A new data/XX directory is fsynced into its parent before any pack lands
                # in it: a crash must not lose the directory that holds durable packs.
                makedirs_private(d, durable=True)
                self._known_dirs.add(d)

    def temp_path(self, hint: str) -> str:
        self._ensure_dir(self.tmpdir)
        host = socket.gethostname().replace("-", "_")
        return os.path.join(self.tmpdir, f"{hint}-{host}-{os.getpid()}-{os.urandom(6).hex()}")

    def write(self, name: str, data: bytes) -> None:
        tmp = self.temp_path("obj")
        try:
            with open(create_private(tmp), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.write_file(name, tmp)
        except BaseException as e:  # an error, or a signal (Interrupted): no temp file stays behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise self._wrap(e, name) from None
            raise

    def write_file(self, name: str, path: str) -> None:
        dest = self._path(name)
        d = os.path.dirname(dest)
        try:
            self._ensure_dir(d)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(path, dest)
            _fsync_dir(d)
        except OSError as e:
            raise self._wrap(e, name) from None

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._wrap(e, name) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._path(prefix)
        if not os.path.isdir(base):
            return
        stack = [base]
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError as e:
                raise self._wrap(e, os.path.relpath(d, self.root)) from None
            for ent in entries:
                if ent.name.startswith("."):
                    continue
                if ent.is_dir(follow_symlinks=False):
                    stack.append(ent.path)
                elif ent.is_file(follow_symlinks=False):
                    rel = os.path.relpath(ent.path, self.root)
                    try:
                        size = ent.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # removed since the directory was read (a lock released, a pack pruned)
                    except OSError as e:
                        raise self._wrap(e, rel) from None
                    yield rel, size

    def clean_stale_temp(self) -> int:
        """Remove temp files left by dead processes of this host; return how many."""
        if not os.path.isdir(self.tmpdir):
            return 0
        return remove_dead_temp_files(self.tmpdir)


_HOST_ID: str | None = None


def host_id() -> str:
    """What makes a pid meaningful: this kernel's boot id and this pid namespace.

    Two processes see each other's pids only when both match, even if their hostnames
    are equal (containers often share one). Lock files record it, so that stale-lock
    detection never judges another machine's or container's process by a local pid.
    """
    global _HOST_ID
    if _HOST_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                boot = f.read().strip()
        except OSError:
            boot = "?"
        try:
            ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            ns = "?"
        _HOST_ID = f"{boot}/{ns}"
    return _HOST_ID


def remove_dead_temp_files(directory: str) -> int:
    """Remove the temp files in ``directory`` (named ``X-HOST-PID-Y``, see temp_path) of
    processes of this host that are gone; return how many."""
    host = socket.gethostname().replace("-", "_")
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for ent in entries:
        parts = ent.name.split("-")
        if len(parts) != 4 or parts[1] != host:
            continue
        try:
            pid = int(parts[2])
        except ValueError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            os.unlink(ent.path)
            removed += 1
        except OSError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OpenFiles:
    """Read-only descriptors of local files kept open across many range reads.

    A restore reads thousands of small chunks from the same few packs (a chain's
    incrementals are many scattered 64 KiB chunks): opening and closing the pack for each
    one cost an open and a close per chunk. Each thread keeps its own descriptors (so one
    thread never closes a descriptor another is reading from), at most ``per_thread`` of
    them, the least recently used closed first. :meth:`close` closes every thread's; call
    it once no thread reads any more.
    """

    def __init__(self, per_thread: int) -> None:
        self.per_thread = max(1, per_thread)
        self._local = threading.local()
        self._all: list[OrderedDict[str, int]] = []
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def budget(threads: int) -> int:
        """A per-thread limit for ``threads`` readers that leaves at least half of this
        process's descriptor limit to the rest of it."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
        return max(4, min(4096, soft // 2) // max(1, threads))

    def get(self, path: str) -> int:
        """An open read-only descriptor of ``path`` (OSError if it cannot be opened)."""
        fds: OrderedDict[str, int] | None = getattr(self._local, "fds", None)
        if fds is None:
            fds = OrderedDict()
            with self._lock:
                if self._closed:
                    raise OSError(f"{path}: read after the restore's files were closed")
                self._all.append(fds)
            self._local.fds = fds
        fd = fds.get(path)
        if fd is not None:
            fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            if self._closed:
                os.close(fd)
                raise OSError(f"{path}: read after the restore's files were closed")
            fds[path] = fd
            while len(fds) > self.per_thread:
                os.close(fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fds in self._all:
                while fds:
                    os.close(fds.popitem()[1])
            self._all.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
