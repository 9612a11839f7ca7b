"""Storage backends: where repository files live. Only whole-object writes are used,
so that an object store (S3) can implement the same interface."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Protocol

from vmbak.errors import RepositoryError


class ObjectMissing(RepositoryError):
    """The named object does not exist (as opposed to an I/O, network or permission error)."""


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

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root
        self.tmpdir = os.path.join(self.root, "tmp")
        self._known_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _wrap(self, e: OSError, name: str) -> RepositoryError:
        if isinstance(e, FileNotFoundError):
            return ObjectMissing(f"repository object missing: {name}")
        where = e.filename or self._path(name)
        return RepositoryError(f"repository I/O error on {name} ({where}): {e.strerror or e}")

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

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except OSError as e:
            raise self._wrap(e, name) from None

    def _ensure_dir(self, d: str) -> None:
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
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._wrap(e, name) from None

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
                    yield os.path.relpath(ent.path, self.root), ent.stat().st_size

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
