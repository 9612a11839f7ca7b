"""The vmbak server as a real process on loopback, with helpers to talk to it.

* ``server_env(tmp)`` -> ``ServerEnv``: tokens, a password file and a config file (mode 0600)
  under ``tmp``; ``.write_config(text)``; ``.start()`` -> ``ServerProc``
* ``ServerProc``: ``.get(path, token=...)``, ``.post(...)``, ``.wait_run(id)``, ``.wait_for(pred)``,
  ``.stop()`` (SIGTERM; exit status 0 expected), ``.kill9()``, ``.log`` (its stderr lines)
* ``webhook_receiver``: a real HTTP server on loopback collecting JSON POSTs
* ``smtp_server``: aiosmtpd on loopback collecting messages
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

VMBAK = [sys.executable, "-m", "vmbak.cli.main"]
FINAL = ("succeeded", "failed", "aborted", "interrupted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    e["LC_ALL"] = "C.UTF-8"
    return e


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class ServerProc:
    proc: subprocess.Popen
    url: str
    admin: str
    read: str
    log: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, token: str | None = "admin", data: bytes | None = None,
                headers: dict | None = None) -> Response:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {self.admin if token == 'admin' else self.read if token == 'read' else token}"
        req = urllib.request.Request(self.url + path, method=method, data=data if data is not None else
                                     (b"" if method == "POST" else None), headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return Response(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return Response(e.code, e.read(), dict(e.headers))

    def get(self, path: str, token: str | None = "admin") -> Response:
        return self.request("GET", path, token)

    def post(self, path: str, token: str | None = "admin") -> Response:
        return self.request("POST", path, token)

    def wait_for(self, pred, timeout: float = 60, what: str = "condition"):  # noqa: ANN001, ANN201
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n" + "\n".join(self.log)
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; server log:\n" + "\n".join(self.log[-40:]))

    def wait_run(self, rid: int, timeout: float = 90) -> dict:
        def done() -> dict | None:
            r = self.get(f"/api/v1/runs/{rid}").json()
            return r if r["state"] in FINAL else None
        return self.wait_for(done, timeout, f"run {rid} to end")

    def runs(self, job: str | None = None) -> list[dict]:
        return self.get("/api/v1/runs" + (f"?job={job}" if job else "")).json()  # type: ignore[return-value]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.poll()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class ServerEnv:
    dir: Path
    port: int
    admin: str
    read: str
    config: Path
    servers: list[ServerProc] = field(default_factory=list)

    def write_config(self, text: str) -> Path:
        return private(self.config, text)

    def header(self, **extra: str) -> str:
        """The [server] table for this environment."""
        lines = ["[server]", f'listen = "127.0.0.1:{self.port}"', 'token_file = "admin.token"',
                 'read_token_file = "read.token"', 'state_dir = "state"', "stop_timeout = 30"]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def start(self, wait: bool = True) -> ServerProc:
        proc = subprocess.Popen([*VMBAK, "server", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                                cwd=self.dir)
        sp = ServerProc(proc, f"http://127.0.0.1:{self.port}", self.admin, self.read)

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                sp.log.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        self.servers.append(sp)
        if wait:
            sp.wait_for(lambda: any("listening on" in line for line in sp.log), 60, "the server to listen")
        return sp

    def vmbak(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*VMBAK, *args], capture_output=True, text=True, env=env(), cwd=self.dir, timeout=300)
        if check:
            assert p.returncode == 0, f"vmbak {args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p


@pytest.fixture
def server_env(tmp_path: Path):  # noqa: ANN201
    """Tokens, a password file and a config path under tmp_path; every server started is stopped."""
    admin, read = secrets.token_hex(24), secrets.token_hex(24)
    private(tmp_path / "admin.token", admin + "\n")
    private(tmp_path / "read.token", read + "\n")
    private(tmp_path / "password", "correct horse battery staple\n")
    se = ServerEnv(tmp_path, free_port(), admin, read, tmp_path / "vmbak.toml")
    yield se
    for sp in se.servers:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length", 0))
        self.server.received.append(json.loads(self.rfile.read(n)))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def webhook_receiver():  # noqa: ANN201
    """A real HTTP server on loopback: ``.url``, ``.received`` (the JSON bodies posted)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    srv.received = []  # type: ignore[attr-defined]
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/hook"  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def smtp_server():  # noqa: ANN201
    """aiosmtpd on loopback: ``.port``, ``.messages`` (email.message.Message objects)."""
    from email import message_from_bytes

    from aiosmtpd.controller import Controller

    class Handler:
        def __init__(self) -> None:
            self.messages: list = []

        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201, N802
            self.messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    h = Handler()
    port = free_port()
    c = Controller(h, hostname="127.0.0.1", port=port)
    c.start()
    c.messages = h.messages  # type: ignore[attr-defined]
    c.port = port  # type: ignore[attr-defined]
    yield c
    c.stop()


# ---------------------------------------------------------------------- the dashboard
DASH_PASSWORD = "correct horse battery staple"
DASH_USERS = {"alice": "alice's long password", "bob": "bob reads only"}  # dashboard users: admin, read


@dataclass
class Dashboard:
    """A server with a real encrypted repository: disk ``db`` (ext4, a full, an incremental and
    a differential snapshot), job ``web`` (a raw disk, on demand) and job ``broken`` (its disk
    is missing: its run failed)."""

    sp: ServerProc
    env: ServerEnv
    files: dict[str, bytes]
    db_snapshots: list[str]
    users: dict[str, str] = field(default_factory=lambda: dict(DASH_USERS))  # name -> password


def _dash_tree(root: Path) -> dict[str, bytes]:
    import random

    rnd = random.Random(11)
    files = {
        "etc/hostname": b"db01\n",
        "etc/motd": b"Welcome to db01.\n" * 40,
        "srv/data/blob.bin": rnd.randbytes(300_000),
        "srv/data/report 2026.txt": ("line %d of a report\n" * 1).encode() * 2000,
        "home/admin/notes.md": b"# notes\n\nrestore me from a browser\n",
    }
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return files


@pytest.fixture(scope="session")
def dashboard_server(tmp_path_factory, init_repo, new_disk):  # noqa: ANN001, ANN201
    """One ``Dashboard`` for the dashboard's tests (xdist_group "dashboard": one worker builds
    it, in ~15 s); stopped at the end."""
    tmp = tmp_path_factory.mktemp("dash")
    admin, read = secrets.token_hex(24), secrets.token_hex(24)
    private(tmp / "admin.token", admin + "\n")
    private(tmp / "read.token", read + "\n")
    private(tmp / "password", DASH_PASSWORD + "\n")
    repo = init_repo(tmp / "repo", "aes-256-gcm", password=DASH_PASSWORD)
    src = tmp / "db.src"
    files = _dash_tree(src)
    db = tmp / "db.img"
    db.write_bytes(bytes(16 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(db)], check=True, capture_output=True)
    web = new_disk(tmp, "web.raw", 4 << 20, seed=5)
    se = ServerEnv(tmp, free_port(), admin, read, tmp / "vmbak.toml")
    snaps = []
    for mode in ("full", "incremental", "differential"):
        p = se.vmbak("-r", str(repo.path), "--password-file", str(tmp / "password"), "backup", str(db),
                     "--name", "db", "--mode", mode, "--json")
        snaps.append(json.loads(p.stdout.strip().splitlines()[-1])["id"])
    from vmbak.server.passwords import hash_password

    se.write_config(se.header() + f'''
[server.users.alice]
password_hash = "{hash_password(DASH_USERS["alice"])}"
role = "admin"

[server.users.bob]
password_hash = "{hash_password(DASH_USERS["bob"])}"

[repositories.main]
location = "{repo.path}"
password_file = "password"

[jobs.db]
repository = "main"
disk = "{db}"
name = "db"

[jobs.web]
repository = "main"
disk = "{web.path}"
name = "web"

[jobs.broken]
repository = "main"
disk = "{tmp / 'missing.raw'}"
name = "broken"
''')
    sp = se.start()
    rid = sp.post("/api/v1/jobs/broken/run").json()["run"]["id"]  # type: ignore[index]
    assert sp.wait_run(rid)["state"] == "failed"
    yield Dashboard(sp, se, files, snaps)
    if sp.proc.poll() is None:
        assert sp.stop() == 0, "\n".join(sp.log)
