"""A local cache of immutable repository objects (index files and manifests).

Remote repositories (S3) keep a copy of every index file and manifest they download in
``$VMBAK_CACHE_DIR/<repo id>/`` (default ``$XDG_CACHE_HOME/vmbak`` or ``~/.cache/vmbak``),
so that repeated runs list the repository and read only what is new.

Those objects never change once written (their names are hashes of their content), so
a cached copy is as good as the remote one. Each cache file is the object's bytes
followed by the BLAKE3 of those bytes (32 bytes): a truncated or damaged cache file is
noticed and ignored. A cached copy is used only when the remote listing shows an
object of that name with the same size, and the caller authenticates its content as it
would a downloaded one (the sealer). Deleting the cache loses nothing.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

import blake3

from vmbak.repo.backend import makedirs_private

CACHEABLE = re.compile(r"(index|snapshots)/[0-9a-f]{64}")
_DIGEST = 32


def cache_root() -> str:
    """The directory that holds every repository's cache."""
    d = os.environ.get("VMBAK_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmbak")


class ObjectCache:
    """Immutable objects of one repository, by name. Failures to use the cache are never
    errors: the object is then read from the repository."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.hits = 0
        self.misses = 0

    @staticmethod
    def cacheable(name: str) -> bool:
        return CACHEABLE.fullmatch(name) is not None

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def get(self, name: str, size: int) -> bytes | None:
        """The cached object if present, intact and of ``size`` bytes."""
        try:
            with open(self._path(name), "rb") as f:
                raw = f.read()
        except OSError:
            self.misses += 1
            return None
        data, digest = raw[:-_DIGEST], raw[-_DIGEST:]
        if len(raw) < _DIGEST or len(data) != size or blake3.blake3(data).digest() != digest:
            self.drop(name)
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        d = os.path.dirname(path)
        try:
            makedirs_private(d)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.write(blake3.blake3(data).digest())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError:
            pass  # a cache that cannot be written is only slower

    def drop(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except OSError:
            pass

    def retain(self, directory: str, names: set[str]) -> None:
        """Forget cached objects of ``directory`` that the repository no longer has."""
        d = self._path(directory)
        try:
            entries = os.listdir(d)
        except OSError:
            return
        for ent in entries:
            if ent.startswith("."):
                try:  # a temp file of a process killed while writing
                    if ent.startswith(".tmp-") and time.time() - os.stat(os.path.join(d, ent)).st_mtime > 3600:
                        os.unlink(os.path.join(d, ent))
                except OSError:
                    pass
                continue
            name = f"{directory}/{ent}"
            if name not in names:
                self.drop(name)
