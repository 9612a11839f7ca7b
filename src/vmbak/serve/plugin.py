"""nbdkit python plugin (API version 2, parallel threads): a read-only export of a snapshot.

Run by ``vmbak serve`` (vmbak.serve.server) as::

    nbdkit --foreground --exit-with-parent -r --unix SOCKET python PLUGIN.py \\
        repo=LOCATION snapshot=FULL_ID cache=BYTES stats=PATH

The repository password, if any, comes in the environment variable VMBAK_SERVE_PASSWORD
(removed as soon as it is read). Reads go through vmbak.engine.view.SnapshotView, which
fetches only the chunks a request touches and caches decompressed chunks; ``extents``
answers base:allocation, so clients skip holes. Any export name is accepted except names
of the form ``vmbak-ID`` with another snapshot's id (overlays name their backing so).
"""

from __future__ import annotations

import os
import sys

for _p in reversed(os.environ.get("VMBAK_SERVE_PYPATH", "").split(os.pathsep)):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)

import builtins  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402

import nbdkit  # noqa: E402

from vmbak.engine.view import SnapshotView  # noqa: E402
from vmbak.errors import VmbakError  # noqa: E402
from vmbak.repo.repository import Repository  # noqa: E402

API_VERSION = 2
ERROR_MARK = "vmbak-serve-error: "
EXPORT_PREFIX = "vmbak-"

_keys: dict[str, str] = {}
_view: SnapshotView | None = None


def _fail(msg: str) -> None:
    print(ERROR_MARK + msg, file=sys.stderr, flush=True)
    raise RuntimeError(msg)


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    _keys[key] = value


def config_complete() -> None:
    global _view
    for k in ("repo", "snapshot"):
        if k not in _keys:
            _fail(f"the plugin needs {k}=")
    password = os.environ.pop("VMBAK_SERVE_PASSWORD", None)
    try:
        repo = Repository.open(_keys["repo"], password)
        m = repo.load_manifest(_keys["snapshot"])
        _view = SnapshotView(repo, m, int(_keys.get("cache", 256 << 20)))
    except VmbakError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(f"bad plugin parameter: {e}")


def cleanup() -> None:
    path = _keys.get("stats")
    if _view is not None and path:
        try:
            with builtins.open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(_view.stats(), f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass


def open(readonly: bool) -> int:  # noqa: A001 - the name nbdkit calls
    name = nbdkit.export_name()
    assert _view is not None
    if name.startswith(EXPORT_PREFIX) and name != EXPORT_PREFIX + _view.snapshot.id:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"this server exports snapshot {_view.snapshot.id}, not {name}")
    return 1


def get_size(h: int) -> int:
    assert _view is not None
    return _view.size


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True


def can_extents(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return nbdkit.CACHE_NONE


def is_rotational(h: int) -> bool:
    return False


def pread(h: int, buf: memoryview, offset: int, flags: int) -> None:
    assert _view is not None
    try:
        _view.readinto(buf, offset)
    except VmbakError as e:
        print(ERROR_MARK + str(e), file=sys.stderr, flush=True)
        nbdkit.set_error(errno.EIO)
        raise
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


_HOLE = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    assert _view is not None
    ext = _view.extents(offset, count)
    if flags & nbdkit.FLAG_REQ_ONE:
        ext = ext[:1]
    return [(o, n, 0 if data else _HOLE) for o, n, data in ext]
