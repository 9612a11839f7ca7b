"""The library API the backup engine uses to talk to a running tracker.

::

    client = TrackerClient("/run/vmbak/web.sock")
    try:
        cp = client.checkpoint(since=parent.change_id, block_size=65536)
    except ChangeTrackingError as e:      # unknown/stale ID, tracking invalid: scan instead
        log(str(e))
        cp = client.checkpoint(None, 65536)   # still a consistent, frozen view
    try:
        manifest = backup(repo, cp.reader, ... change_map=cp.change_map, change_id=cp.change_id)
    except BaseException:
        cp.abort()
        raise
    cp.commit()                           # after the manifest is durable
    cp.reader.close(); client.close()

A checkpoint lives as long as the control connection that opened it: if this process
dies, the tracker aborts the checkpoint and no change is lost.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import zlib
from collections.abc import Iterator

import numpy as np

from vmbak.changes.base import ChangeMap
from vmbak.errors import ChangeTrackingError, VmbakError
from vmbak.tracker.formats import resample, unpack
from vmbak.tracker.paths import FROZEN_PREFIX, ctl_path

NBD_MAX_REQUEST = 16 << 20


class TrackerUnavailable(ChangeTrackingError):
    """No tracker answers on the socket (not started, stopped or crashed)."""


class TrackerBusy(VmbakError):
    """Another checkpoint is open on this tracker (another backup is running)."""


class TrackerRequestError(VmbakError):
    """The tracker refused a request."""


def _raise(resp: dict) -> None:
    kind = resp.get("kind")
    msg = resp.get("error") or "the tracker refused the request"
    if kind == "tracking":
        raise ChangeTrackingError(msg)
    if kind == "busy":
        raise TrackerBusy(msg)
    raise TrackerRequestError(msg)


class TrackerClient:
    """A connection to the control socket of ``vmbak track`` serving ``socket_path``."""

    def __init__(self, socket_path: str, timeout: float | None = 600.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.ctl = ctl_path(self.socket_path)
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.ctl)
        except FileNotFoundError:
            sock.close()
            raise TrackerUnavailable(f"no tracker is running for {self.socket_path} "
                                     f"({self.ctl} does not exist)") from None
        except OSError as e:
            sock.close()
            raise TrackerUnavailable(f"no tracker answers on {self.ctl}: {e.strerror or e}") from None
        self._sock = sock
        self._file = sock.makefile("rwb")
        self.pid = int(self.request({"op": "ping"})["pid"])

    def request(self, req: dict) -> dict:
        """Send one request and return the response; raise on a refusal or a lost connection."""
        with self._lock:
            if self._file is None:
                raise TrackerUnavailable(f"the connection to the tracker on {self.socket_path} is closed")
            try:
                self._file.write(json.dumps(req).encode() + b"\n")
                self._file.flush()
                line = self._file.readline()
            except OSError as e:
                raise TrackerUnavailable(f"lost the connection to the tracker on {self.socket_path}: "
                                         f"{e.strerror or e}") from None
        if not line:
            raise TrackerUnavailable(f"the tracker on {self.socket_path} closed the connection "
                                     "(it stopped or crashed)")
        try:
            resp = json.loads(line)
        except ValueError:
            raise TrackerRequestError("the tracker sent an invalid response") from None
        if not resp.get("ok"):
            _raise(resp)
        return resp

    def status(self) -> dict:
        return self.request({"op": "status"})["status"]

    def flush(self) -> int:
        """Write the .rct now; return its generation."""
        return int(self.request({"op": "flush"})["rct_generation"])

    def stop(self) -> None:
        self.request({"op": "stop"})

    def checkpoint(self, since: str | None, block_size: int) -> Checkpoint:
        """Open a checkpoint: later writes go into the next epoch; ``reader`` shows the disk as
        it is now. Raises ChangeTrackingError (and opens nothing) when ``since`` is unknown or
        stale or the tracking is invalid; ``checkpoint(None, ...)`` then still gives a view."""
        if block_size <= 0:
            raise VmbakError("block size must be positive")
        resp = self.request({"op": "checkpoint", "since": since})
        size = int(resp["size"])
        cm = None
        if resp.get("bitmap") is not None:
            tbs = int(resp["block_size"])
            bits = unpack(zlib.decompress(base64.b64decode(resp["bitmap"])), (size + tbs - 1) // tbs)
            cm = ChangeMap(bitmap=resample(bits, tbs, block_size, size), block_size=block_size, source="track",
                           reference=since, new_reference=resp["change_id"])
            cm.notes.append(f"tracker {self.socket_path}: {int(np.count_nonzero(bits))} changed "
                            f"{tbs}-byte blocks since {since}")
        reader = FrozenReader(self, self.socket_path, str(resp["token"]), size,
                              f"{self.socket_path} (checkpoint {resp['change_id']})")
        return Checkpoint(self, str(resp["change_id"]), cm, reader)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                    self._sock.close()
                except OSError:
                    pass
                self._file = None

    def __enter__(self) -> TrackerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Checkpoint:
    """A point in time of the tracked disk, held open until commit() or abort()."""

    def __init__(self, client: TrackerClient, change_id: str, change_map: ChangeMap | None,
                 reader: FrozenReader) -> None:
        self.client = client
        self.change_id = change_id
        self.change_map = change_map
        self.reader = reader
        self.state = "open"

    def commit(self) -> None:
        """The backup of this checkpoint is durable: the tracker forgets the changes before it."""
        if self.state != "open":
            raise TrackerRequestError(f"checkpoint {self.change_id} is already {self.state}")
        try:
            self.client.request({"op": "commit", "change_id": self.change_id})
        finally:
            self.state = "committed"
            self.reader.close()
        # (a failed commit leaves the tracker with the changes merged back: nothing is lost)

    def abort(self) -> None:
        """Give the checkpoint up: its changes stay reported for the next backup."""
        if self.state != "open":
            return
        self.state = "aborted"
        self.reader.close()
        try:
            self.client.request({"op": "abort", "change_id": self.change_id, "reason": "aborted by the backup"})
        except TrackerUnavailable:
            pass  # a dead tracker or connection aborts it anyway

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.state == "open":
            self.abort()


class FrozenReader:
    """The checkpoint's frozen view as a thread-safe DiskReader (one NBD connection per thread)."""

    def __init__(self, client: TrackerClient, socket_path: str, token: str, size: int, description: str) -> None:
        self.client = client
        self.socket_path = socket_path
        self.token = token
        self.size = size
        self.description = description
        self._local = threading.local()
        self._handles: list = []
        self._lock = threading.Lock()
        self._closed = False

    def _handle(self):  # noqa: ANN202 - an nbd.NBD handle
        h = getattr(self._local, "h", None)
        if h is not None:
            return h
        try:
            import nbd
        except ImportError:
            raise ChangeTrackingError("reading from the tracker needs libnbd's Python module "
                                      "(Debian package python3-libnbd)") from None
        with self._lock:
            if self._closed:
                raise VmbakError("the checkpoint's reader is closed")
            h = nbd.NBD()
            try:
                h.set_export_name(FROZEN_PREFIX + self.token)
                h.connect_unix(self.socket_path)
            except nbd.Error as e:
                raise ChangeTrackingError(f"cannot read the checkpoint's frozen view from "
                                          f"{self.socket_path}: {e}") from None
            self._handles.append(h)
        self._local.h = h
        return h

    def pread(self, length: int, offset: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        h = self._handle()
        import nbd

        try:
            if length <= NBD_MAX_REQUEST:
                return bytes(h.pread(length, offset))  # libnbd gives a bytearray; readers give bytes
            parts = []
            pos, end = offset, offset + length
            while pos < end:
                n = min(NBD_MAX_REQUEST, end - pos)
                parts.append(h.pread(n, pos))
                pos += n
            return b"".join(parts)
        except nbd.Error as e:
            raise ChangeTrackingError(f"reading the frozen view at offset {offset} failed ({e}): "
                                      "the checkpoint ended or the tracker stopped") from None

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.size if end is None else min(end, self.size)
        if end <= start:
            return
        resp = self.client.request({"op": "extents", "token": self.token, "start": start, "end": end})
        bs, first = int(resp["block_size"]), int(resp["start"])
        bits = unpack(zlib.decompress(base64.b64decode(resp["bitmap"])), int(resp["count"]))
        d = np.diff(np.concatenate(([0], bits.astype(np.int8), [0])))
        for s, e in zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True):
            lo, hi = max(start, first + s * bs), min(end, first + e * bs)
            if hi > lo:
                yield lo, hi - lo

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
        for h in handles:
            try:
                h.shutdown()
            except Exception:  # noqa: BLE001 - the server may already be gone
                pass
        # the handles close when the last reference goes (each thread's local one included)
