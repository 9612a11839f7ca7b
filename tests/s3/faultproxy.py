"""A fault-injecting HTTP proxy for S3 tests: sits between vmbak and the S3 server.

Each request from the client is read whole, then one fault may be applied (chosen at
random with the configured probabilities):

* ``drop``: close the client's connection without forwarding the request;
* ``drop_after``: forward it, then close without answering (the request took effect,
  the client does not know);
* ``error500`` / ``error503``: answer ``500 InternalError`` / ``503 SlowDown`` without
  forwarding;
* ``truncate``: forward, then send the response headers (with the real Content-Length)
  and only part of the body, and close;
* ``delay``: wait ``delay_s`` before forwarding;
* ``stall``: wait ``stall_s`` (longer than the client's timeout) before forwarding.

The request is forwarded byte for byte (headers unchanged, so signatures stay valid) on
a fresh connection to the upstream server. ``counts`` tells which faults happened.
"""

from __future__ import annotations

import http.client
import random
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field

FAULTS = ("drop", "drop_after", "error500", "error503", "truncate", "delay", "stall")

_ERR = {
    500: ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    503: ("Service Unavailable", "SlowDown", "Please reduce your request rate."),
}


@dataclass
class FaultConfig:
    rates: dict[str, float] = field(default_factory=dict)  # fault -> probability per request
    delay_s: float = 0.2
    stall_s: float = 3.0
    only_methods: tuple[str, ...] = ()  # apply faults only to these methods (empty: all)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 1) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.config = FaultConfig()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.requests = 0
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, delay_s: float | None = None, stall_s: float | None = None,
            only_methods: tuple[str, ...] = (), **rates: float) -> None:
        """Set the fault probabilities (unnamed faults get 0)."""
        for k in rates:
            if k not in FAULTS:
                raise ValueError(k)
        with self.lock:
            self.config = FaultConfig(dict(rates), delay_s if delay_s is not None else self.config.delay_s,
                                      stall_s if stall_s is not None else self.config.stall_s, only_methods)

    def clear(self) -> None:
        self.set()

    def reset_counts(self) -> None:
        with self.lock:
            self.counts = dict.fromkeys(FAULTS, 0)
            self.requests = 0
            self.log = []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ internals
    def _choose(self, method: str, target: str) -> str | None:
        with self.lock:
            self.requests += 1
            self.log.append((method, target))
            cfg = self.config
            if cfg.only_methods and method not in cfg.only_methods:
                return None
            x = self.rng.random()
            for name in FAULTS:
                p = cfg.rates.get(name, 0.0)
                if x < p:
                    self.counts[name] += 1
                    return name
                x -= p
        return None

    @staticmethod
    def _read_request(f, sock: socket.socket) -> tuple[bytes, str, str, list[tuple[str, str]], bytes] | None:  # noqa: ANN001
        line = f.readline(65537)
        if not line:
            return None
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = f.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
        length = 0
        chunked = False
        if any(k.lower() == "expect" and "100-continue" in v.lower() for k, v in headers):
            # answer for the server at once (the client waits for it before sending the body)
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        for k, v in headers:
            if k.lower() == "content-length":
                length = int(v)
            elif k.lower() == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        if chunked:  # de-chunk (not expected from vmbak, which always sends a length)
            parts = []
            while True:
                size = int(f.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    f.readline()
                    break
                parts.append(f.read(size))
                f.readline()
            body = b"".join(parts)
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
            headers.append(("Content-Length", str(len(body))))
        else:
            body = f.read(length) if length else b""
        return line, method, target, headers, body

    def _forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> tuple[
            int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body if body else None)
            r = conn.getresponse()
            data = r.read()
            return r.status, r.reason, r.getheaders(), data
        finally:
            conn.close()

    def _serve(self, sock: socket.socket) -> None:
        f = sock.makefile("rb")
        try:
            while True:
                req = self._read_request(f, sock)
                if req is None:
                    return
                _, method, target, headers, body = req
                fault = self._choose(method, target)
                cfg = self.config
                if fault == "drop":
                    return
                if fault in ("error500", "error503"):
                    code = 500 if fault == "error500" else 503
                    reason, scode, msg = _ERR[code]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{scode}</Code><Message>{msg}'
                           f"</Message><RequestId>faultproxy</RequestId></Error>").encode()
                    sock.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\n"
                                 f"Content-Length: {len(xml)}\r\n\r\n".encode() + (xml if method != "HEAD" else b""))
                    continue
                if fault == "delay":
                    time.sleep(cfg.delay_s)
                elif fault == "stall":
                    time.sleep(cfg.stall_s)
                status, reason, rh, data = self._forward(method, target, headers, body)
                if fault == "drop_after":
                    return
                out = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
                has_len = False
                close = False
                for k, v in rh:
                    kl = k.lower()
                    if kl == "transfer-encoding":
                        continue
                    if kl == "content-length":
                        has_len = True
                        if method != "HEAD":
                            v = str(len(data))
                    if kl == "connection" and v.lower() == "close":
                        close = True
                    out.append(f"{k}: {v}\r\n".encode())
                if not has_len and method != "HEAD":
                    out.append(f"Content-Length: {len(data)}\r\n".encode())
                out.append(b"\r\n")
                if fault == "truncate" and method != "HEAD" and len(data) > 1:
                    sock.sendall(b"".join(out) + data[:len(data) // 2])
                    return
                sock.sendall(b"".join(out) + (data if method != "HEAD" else b""))
                if close:
                    return
        except (OSError, ValueError):
            return
        finally:
            try:
                f.close()
                sock.close()
            except OSError:
                pass
