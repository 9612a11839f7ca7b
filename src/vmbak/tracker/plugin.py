"""nbdkit python plugin (API version 2, parallel thread model): the tracking NBD front.

Run by ``vmbak track start`` as::

    nbdkit --foreground --unix SOCKET python PLUGIN.py disk=DISK ctl=SOCKET.ctl [key=value ...]

Keys: disk, ctl, socket, statedir, blocksize, region, rctinterval, tcp (HOST:PORT), history,
hashlimit (bytes of data hashed in full at a clean stop; more: a sample), lease (seconds the
tracker may write the disk after renewing its lease in the .mrt header), mrtsync (1; 0 turns the MRT's write-through off, for benchmarks only).

The default export is the disk (read, write, flush, trim, zero, extents). The export
``vmbak-frozen:TOKEN`` is the read-only frozen view of the open checkpoint whose secret
token is TOKEN. All locking is done by vmbak.tracker.core; nbdkit calls us from many
threads at once.
"""

from __future__ import annotations

import os
import sys

for _p in reversed(os.environ.get("VMBAK_TRACKER_PYPATH", "").split(os.pathsep)):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)

import errno  # noqa: E402

import nbdkit  # noqa: E402

from vmbak.tracker.control import ControlServer, TcpForwarder  # noqa: E402
from vmbak.tracker.core import DEFAULT_LEASE, Config, Tracker, TrackerStartError  # noqa: E402
from vmbak.tracker.identity import DEFAULT_HASH_LIMIT  # noqa: E402
from vmbak.tracker.paths import FROZEN_PREFIX  # noqa: E402

API_VERSION = 2

_keys: dict[str, str] = {}
_tracker: Tracker | None = None
_ctl: ControlServer | None = None
_tcp: TcpForwarder | None = None
ERROR_MARK = "vmbak-tracker-error: "


def _fail(msg: str) -> None:
    print(ERROR_MARK + msg, file=sys.stderr, flush=True)
    raise RuntimeError(msg)


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    _keys[key] = value


def config_complete() -> None:
    global _tracker, _ctl, _tcp
    if "disk" not in _keys or "ctl" not in _keys:
        _fail("the plugin needs disk= and ctl=")
    try:
        cfg = Config(disk=_keys["disk"], state_dir=_keys.get("statedir") or None,
                     block_size=int(_keys.get("blocksize", 65536)), region_size=int(_keys.get("region", 1 << 20)),
                     rct_interval=float(_keys.get("rctinterval", 5.0)), mrt_sync=_keys.get("mrtsync", "1") != "0",
                     history=int(_keys.get("history", 8)),
                     hash_limit=int(_keys.get("hashlimit", DEFAULT_HASH_LIMIT)),
                     lease=float(_keys.get("lease", DEFAULT_LEASE)), socket=_keys.get("socket"), tcp=_keys.get("tcp"))
    except ValueError as e:
        _fail(f"bad plugin parameter: {e}")
    try:
        _tracker = Tracker(cfg)
    except TrackerStartError as e:
        _fail(str(e))
    try:
        _ctl = ControlServer(_tracker, _keys["ctl"], nbdkit.shutdown)
    except OSError as e:
        _tracker.shutdown("start failed")
        _fail(f"cannot listen on {_keys['ctl']}: {e.strerror or e}")
    if cfg.tcp:
        host, _, port = cfg.tcp.rpartition(":")
        try:
            _tcp = TcpForwarder(host.strip("[]") or "127.0.0.1", int(port), cfg.socket or "")
        except (OSError, ValueError) as e:
            _tracker.shutdown("start failed")
            _ctl.close()
            _fail(f"cannot listen on TCP {cfg.tcp}: {getattr(e, 'strerror', None) or e}")
        cfg.tcp = f"{_tcp.address[0]}:{_tcp.address[1]}"


def after_fork() -> None:
    # Threads do not survive nbdkit's fork, so they start here.
    assert _tracker is not None and _ctl is not None
    _tracker.start_background()
    _ctl.start()
    if _tcp is not None:
        _tcp.start()


def cleanup() -> None:
    if _tracker is not None:
        _tracker.shutdown("server exit")
    if _tcp is not None:
        _tcp.close()
    if _ctl is not None:
        _ctl.close()


class _Handle:
    __slots__ = ("token",)

    def __init__(self, token: str | None) -> None:
        self.token = token


def _err(e: OSError) -> None:
    nbdkit.set_error(e.errno or errno.EIO)


def open(readonly: bool) -> _Handle:  # noqa: A001 - the name nbdkit calls
    name = nbdkit.export_name()
    if name.startswith(FROZEN_PREFIX):
        token = name[len(FROZEN_PREFIX):]
        cp = _tracker.pending
        if cp is None or cp.token != token:
            nbdkit.set_error(errno.ENOENT)
            raise RuntimeError("no open checkpoint has this frozen export")
        return _Handle(token)
    return _Handle(None)


def get_size(h: _Handle) -> int:
    return _tracker.size


def can_write(h: _Handle) -> bool:
    return h.token is None


def can_flush(h: _Handle) -> bool:
    return h.token is None


def can_trim(h: _Handle) -> bool:
    return h.token is None


def can_zero(h: _Handle) -> bool:
    return h.token is None


def can_fast_zero(h: _Handle) -> bool:
    return False


def can_fua(h: _Handle) -> int:
    return nbdkit.FUA_EMULATE


def can_multi_conn(h: _Handle) -> bool:
    return True


def can_extents(h: _Handle) -> bool:
    return True


def is_rotational(h: _Handle) -> bool:
    return False


def pread(h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
    try:
        if h.token is None:
            _tracker.read(buf, offset)
        else:
            _tracker.frozen_read(h.token, buf, offset)
    except OSError as e:
        _err(e)
        raise


def pwrite(h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
    try:
        _tracker.write(buf, offset)
    except OSError as e:
        _err(e)
        raise


def flush(h: _Handle, flags: int) -> None:
    try:
        _tracker.flush()
    except OSError as e:
        _err(e)
        raise


def trim(h: _Handle, count: int, offset: int, flags: int) -> None:
    try:
        _tracker.trim(count, offset)
    except OSError as e:
        _err(e)
        raise


def zero(h: _Handle, count: int, offset: int, flags: int) -> None:
    try:
        _tracker.zero(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM))
    except OSError as e:
        _err(e)
        raise


_HOLE = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


def extents(h: _Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        if h.token is None:
            ext = _tracker.extents(offset, count)
        else:
            ext = _tracker.frozen_extents(h.token, offset, count)
    except OSError as e:
        _err(e)
        raise
    if flags & nbdkit.FLAG_REQ_ONE:
        ext = ext[:1]
    return [(o, n, 0 if data else _HOLE) for o, n, data in ext]
