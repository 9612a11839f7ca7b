"""The control channel of a running tracker, and the optional TCP listener.

The control socket (``SOCKET.ctl``, a Unix stream socket) speaks JSON lines: one request
object per line, one response object per line. A checkpoint belongs to the connection
that opened it; when that connection ends for any reason (the backup finished, failed or
was killed with -9) before a commit, the checkpoint is aborted and its bitmap merged back.

Requests (``op``): ping, status, checkpoint {since}, commit {change_id}, abort {change_id},
extents {token, start, end}, flush, stop. Responses carry ``ok``; failures carry ``error``
(one line) and ``kind`` ("tracking": the caller must fall back to a scan; "busy"; "state";
"error"). Bitmaps travel as base64 of zlib-compressed little-endian packed bits.
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import socket
import stat
import struct
import threading
import zlib
from collections.abc import Callable

import numpy as np

from vmbak.tracker.core import Tracker, TrackerError
from vmbak.tracker.formats import pack

MAX_LINE = 64 << 20
_serial = itertools.count(1)


def bind_unix(path: str) -> socket.socket:
    """Bind a listening Unix socket at ``path``, replacing a stale socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
        else:
            raise OSError(errno.EADDRINUSE, f"something is already listening on {path}")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(16)
    return s


def _peer(conn: socket.socket) -> str:
    try:
        pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
        return f"pid {pid} (connection {next(_serial)})"
    except OSError:
        return f"connection {next(_serial)}"


class ControlServer:
    def __init__(self, tracker: Tracker, path: str, on_stop: Callable[[], None]) -> None:
        self.tracker = tracker
        self.path = path
        self.on_stop = on_stop
        self.sock = bind_unix(path)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="vmbak-ctl", daemon=True).start()

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="vmbak-ctl-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        owner = _peer(conn)
        owned: list[str] = []
        f = conn.makefile("rwb")
        try:
            while True:
                line = f.readline(MAX_LINE)
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request is not an object")
                    resp = self._handle(req, owner, owned)
                except TrackerError as e:
                    resp = {"ok": False, "error": str(e), "kind": e.kind}
                except (ValueError, KeyError, TypeError) as e:
                    resp = {"ok": False, "error": f"bad request: {e}", "kind": "error"}
                except OSError as e:
                    resp = {"ok": False, "error": f"tracker I/O error: {e.strerror or e}", "kind": "error"}
                f.write(json.dumps(resp).encode() + b"\n")
                f.flush()
                if resp.get("stopping"):
                    self.on_stop()
        except OSError:
            pass
        finally:
            for cid in owned:
                self.tracker.abort(cid, f"the control connection of {owner} closed before a commit")
            try:
                f.close()
                conn.close()
            except OSError:
                pass

    def _handle(self, req: dict, owner: str, owned: list[str]) -> dict:
        t = self.tracker
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "disk": t.ident.path, "size": t.size}
        if op == "status":
            return {"ok": True, "status": t.status()}
        if op == "checkpoint":
            since = req.get("since")
            if since is not None and not isinstance(since, str):
                raise ValueError("since must be a string or null")
            res = t.checkpoint(since, owner)
            owned.append(res["change_id"])
            bm = res.pop("bitmap")
            res["bitmap"] = None if bm is None else base64.b64encode(bm).decode()
            return {"ok": True, **res}
        if op == "commit":
            cid = str(req["change_id"])
            res = t.commit(cid, owner)
            if cid in owned:
                owned.remove(cid)
            return {"ok": True, **res}
        if op == "abort":
            cid = str(req["change_id"])
            done = t.abort(cid, req.get("reason") or f"aborted by {owner}")
            if cid in owned:
                owned.remove(cid)
            return {"ok": True, "aborted": done}
        if op == "extents":
            start, end = int(req["start"]), int(req["end"])
            start = max(0, start) // t.bs * t.bs
            end = min(t.size, end)
            if end <= start:
                data = np.zeros(0, bool)
            else:
                try:
                    data = t.frozen_data_blocks(str(req["token"]), start, end)
                except OSError as e:
                    raise TrackerError(f"the checkpoint has ended ({e.strerror})", "state") from None
            return {"ok": True, "start": start, "block_size": t.bs, "count": len(data),
                    "bitmap": base64.b64encode(zlib.compress(pack(data), 1)).decode()}
        if op == "flush":
            t.flush_rct(force=True)
            return {"ok": True, "rct_generation": t.rct_generation}
        if op == "stop":
            t.shutdown("stop command from " + owner)
            return {"ok": True, "stopping": True}
        raise ValueError(f"unknown op {op!r}")


class TcpForwarder:
    """Accept NBD clients on TCP and relay each connection to the Unix socket."""

    def __init__(self, host: str, port: int, unix_path: str) -> None:
        self.unix_path = unix_path
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.address = self.sock.getsockname()[:2]

    def start(self) -> None:
        threading.Thread(target=self._accept, name="vmbak-tcp", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.unix_path)
            except OSError:
                conn.close()
                up.close()
                continue
            threading.Thread(target=self._relay, args=(conn, up), daemon=True).start()

    def _relay(self, conn: socket.socket, up: socket.socket) -> None:
        t = threading.Thread(target=self._pump, args=(up, conn), daemon=True)
        t.start()
        self._pump(conn, up)
        t.join()
        conn.close()
        up.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
