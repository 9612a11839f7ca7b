"""``vmbak serve``: an NBD export of a snapshot, read-only or copy-on-write, and the way to
make an instant recovery permanent.

Read-only: nbdkit runs vmbak's python plugin (vmbak.serve.plugin) on the user's unix socket
or loopback TCP port. The plugin reads through a SnapshotView, so only the chunks a client
asks for are fetched, and it answers base:allocation so clients skip holes.

Copy-on-write (``writable=True``): nbdkit serves the snapshot read-only on a private socket,
and qemu-storage-daemon exports a qcow2 overlay whose backing is that export. Writes land
in the overlay, never in the repository. Why qemu-storage-daemon and qcow2 rather than a
write layer in the plugin: the overlay is then a standard image that every QEMU tool
understands (``qemu-img info/commit/convert``), it survives a restart of the server (serve
again with the same overlay and the VM's writes are still there), QEMU's block layer gives
flush/FUA/trim/zero semantics for free, and QEMU's mirror job can copy the merged disk to a
local file while the VM keeps writing, then switch the export over to that file
(``make_permanent``): that is the hand-over of instant recovery.

The overlay records its backing as ``nbd+unix:///vmbak-<snapshot id>?socket=...``; serving
an existing overlay with another snapshot is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable

from vmbak.disks.qemu import _private_dir, _tool, run_qemu_img
from vmbak.errors import DiskError, VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository
from vmbak.tracker.daemon import _check_socket_path, _python_path, is_loopback, parse_tcp

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
ERROR_MARK = "vmbak-serve-error: "
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
OVERLAY_NODE = "ovl"
EXPORT_PREFIX = "vmbak-"
JOB_ID = "vmbak-permanent"
TARGET_NODE = "vmbak-permanent-target"


class ServeError(VmbakError):
    """The export could not be started or failed while running."""


def nbd_uri(socket_path: str | None, tcp: tuple[str, int] | None, export: str = "") -> str:
    if socket_path:
        return f"nbd+unix:///{export}?socket={socket_path}"
    assert tcp is not None
    host, port = tcp
    h = f"[{host}]" if ":" in host else host
    return f"nbd://{h}:{port}/{export}"


def qmp_path_for(socket_path: str) -> str:
    return socket_path + ".qmp"


# ---------------------------------------------------------------------------- overlays
def _qcow2_header(path: str) -> tuple[int, str]:
    """(virtual size, backing file name) of a qcow2 image; raise DiskError otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
            if len(head) < 32 or head[:4] != b"QFI\xfb":
                raise DiskError(f"overlay {path} exists and is not a qcow2 image")
            boff, blen = struct.unpack_from(">QI", head, 8)
            (size,) = struct.unpack_from(">Q", head, 24)
            backing = ""
            if boff and 0 < blen < 4096:
                f.seek(boff)
                backing = f.read(blen).decode("utf-8", "replace")
    except OSError as e:
        raise DiskError(f"cannot read overlay {path}: {e.strerror}") from None
    return size, backing


def prepare_overlay(path: str, snapshot: Manifest, backing_uri: str, repo_root: str | None) -> bool:
    """Create the qcow2 overlay, or check that an existing one belongs to ``snapshot``;
    return True if it was created."""
    path = os.path.abspath(path)
    if repo_root and os.path.commonpath([path, os.path.abspath(repo_root)]) == os.path.abspath(repo_root):
        raise VmbakError(f"the overlay must not lie inside the repository: {path}")
    if os.path.exists(path):
        size, backing = _qcow2_header(path)
        if size != snapshot.disk_size:
            raise DiskError(f"overlay {path} has {size} bytes, snapshot {snapshot.short_id} has "
                            f"{snapshot.disk_size}")
        if f"/{EXPORT_PREFIX}{snapshot.id}?" not in backing:
            raise DiskError(f"overlay {path} belongs to another snapshot (its backing is {backing or 'none'}); "
                            "give a new --overlay file")
        return False
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        raise DiskError(f"overlay directory does not exist: {d}")
    p = run_qemu_img(["create", "-q", "-f", "qcow2", "-u", "-b", backing_uri, "-F", "raw", "--",
                      path, str(snapshot.disk_size)], f"cannot create overlay {path}")
    if p.returncode != 0:
        raise DiskError(f"cannot create overlay {path}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return True


# ---------------------------------------------------------------------------- the server
def _wait_pidfile(proc: subprocess.Popen, pidfile: str, what: str, errpath: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(pidfile, encoding="ascii") as f:
                if f.read().strip():
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise ServeError(f"{what} did not start: {_error_text(errpath, proc.returncode)}")
        if time.monotonic() > deadline:
            raise ServeError(f"{what} did not start within {timeout:.0f} s")
        time.sleep(0.02)


def _error_text(errpath: str, rc: int | None) -> str:
    try:
        with open(errpath, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        if ERROR_MARK in line:
            return line.split(ERROR_MARK, 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()] or lines
    tail = useful[-1] if useful else f"exit status {rc}"
    for prefix in ("nbdkit: ", "qemu-storage-daemon: "):
        if tail.startswith(prefix):
            tail = tail[len(prefix):]
    return tail


def _stop_proc(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Server:
    """One running export. ``start()`` returns once clients can connect; ``run(stop)``
    supervises until ``stop`` is set or a server process dies; ``close()`` stops
    everything (qemu-storage-daemon first, so the overlay is flushed and closed)."""

    def __init__(self, repo: Repository, snapshot: Manifest, password: str | None, *, socket: str | None = None,
                 tcp: str | None = None, allow_remote: bool = False, writable: bool = False,
                 overlay: str | None = None, qmp: str | None = None, cache_bytes: int = 256 << 20,
                 threads: int = 8, workdir: str | None = None) -> None:
        if (socket is None) == (tcp is None):
            raise VmbakError("give exactly one of --socket PATH and --tcp [HOST:]PORT")
        if writable and not overlay:
            raise VmbakError("--writable needs --overlay FILE.qcow2 (writes go there, never into the repository)")
        if overlay and not writable:
            raise VmbakError("--overlay goes with --writable")
        if cache_bytes < 0:
            raise VmbakError("the cache size must not be negative")
        self.repo = repo
        self.snapshot = snapshot
        self.password = password
        self.socket = os.path.abspath(socket) if socket else None
        self.tcp: tuple[str, int] | None = None
        if tcp is not None:
            self.tcp = parse_tcp(tcp)
            if not is_loopback(self.tcp[0]) and not allow_remote:
                raise VmbakError(f"--tcp {tcp} is not a loopback address; the export has no authentication "
                                 "(add --allow-remote to serve it anyway)")
        self.writable = writable
        self.overlay = os.path.abspath(overlay) if overlay else None
        self.cache_bytes = cache_bytes
        self.threads = max(1, threads)
        self.qmp: str | None = None
        if writable:
            self.qmp = os.path.abspath(qmp) if qmp else (qmp_path_for(self.socket) if self.socket else None)
        elif qmp:
            raise VmbakError("--qmp goes with --writable")
        self.dir = ""
        self.workdir = os.path.abspath(workdir) if workdir else None  # private files here (created, removed)
        self.nbdkit: subprocess.Popen | None = None
        self.qsd: subprocess.Popen | None = None
        self.stats: dict = {}
        self.overlay_created = False
        self.failure: str | None = None

    # -------------------------------------------------------------- start
    def _check_endpoints(self) -> None:
        for path, what in ((self.socket, "socket"), (self.qmp, "QMP socket")):
            if path is None:
                continue
            d = os.path.dirname(path)
            if not os.path.isdir(d):
                raise VmbakError(f"{what} directory does not exist: {d}")
            _check_socket_path(path, what)
        if self.tcp is not None:
            import socket as so

            fam = so.AF_INET6 if ":" in self.tcp[0] else so.AF_INET
            s = so.socket(fam, so.SOCK_STREAM)
            s.setsockopt(so.SOL_SOCKET, so.SO_REUSEADDR, 1)
            try:
                s.bind(self.tcp)
            except OSError as e:
                raise VmbakError(f"cannot listen on TCP {self.tcp[0]}:{self.tcp[1]}: {e.strerror}") from None
            finally:
                s.close()

    def start(self) -> dict:
        if not shutil.which("nbdkit") and not os.path.exists("/usr/sbin/nbdkit"):
            raise ServeError("nbdkit is not installed (Debian packages nbdkit and nbdkit-plugin-python)")
        self._check_endpoints()
        if self.workdir is not None:
            os.mkdir(self.workdir, 0o700)
            self.dir = self.workdir
        else:
            self.dir = _private_dir("vmbak-serve-")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self.info()

    def _start(self) -> None:
        m = self.snapshot
        inner = os.path.join(self.dir, "ro.sock") if self.writable else None
        if self.writable:
            assert self.overlay is not None and inner is not None
            root = getattr(self.repo.backend, "root", None)
            self.overlay_created = prepare_overlay(self.overlay, m, nbd_uri(inner, None, EXPORT_PREFIX + m.id), root)
            if self.qmp is None:
                self.qmp = os.path.join(self.dir, "qmp.sock")
        exe = shutil.which("nbdkit") or "/usr/sbin/nbdkit"
        pidfile = os.path.join(self.dir, "nbdkit.pid")
        errpath = os.path.join(self.dir, "nbdkit.log")
        cmd = [exe, "--foreground", "--exit-with-parent", "--log=stderr", "--readonly",
               "--threads", str(self.threads), "--pidfile", pidfile]
        if inner is not None:
            cmd += ["--unix", inner]
        elif self.socket is not None:
            cmd += ["--unix", self.socket]
        else:
            assert self.tcp is not None
            cmd += ["--ipaddr", self.tcp[0], "--port", str(self.tcp[1])]
        cmd += ["python", PLUGIN, f"repo={self.repo.location}", f"snapshot={m.id}",
                f"cache={self.cache_bytes}", f"stats={os.path.join(self.dir, 'stats.json')}"]
        env = dict(os.environ, VMBAK_SERVE_PYPATH=_python_path(), PYTHONDONTWRITEBYTECODE="1")
        env.pop("VMBAK_PASSWORD", None)
        if self.password is not None:
            env["VMBAK_SERVE_PASSWORD"] = self.password
        with open(errpath, "wb") as errf:
            self.nbdkit = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, env=env,
                                           start_new_session=True, close_fds=True)
        _wait_pidfile(self.nbdkit, pidfile, "the NBD server (nbdkit)", errpath, START_TIMEOUT)
        if self.writable:
            self._start_qsd(inner)

    def _start_qsd(self, inner: str | None) -> None:
        m = self.snapshot
        assert self.overlay is not None and self.qmp is not None and inner is not None
        base = {"driver": "nbd", "node-name": "base", "read-only": True,
                "server": {"type": "unix", "path": inner}, "export": EXPORT_PREFIX + m.id}
        ofile = {"driver": "file", "node-name": "ovlfile", "filename": self.overlay}
        ovl = {"driver": "qcow2", "node-name": OVERLAY_NODE, "file": "ovlfile", "backing": "base"}
        if self.socket is not None:
            addr = f"addr.type=unix,addr.path={self.socket}"
        else:
            assert self.tcp is not None
            addr = f"addr.type=inet,addr.host={self.tcp[0]},addr.port={self.tcp[1]}"
        pidfile = os.path.join(self.dir, "qsd.pid")
        errpath = os.path.join(self.dir, "qsd.log")
        cmd = [_tool("qemu-storage-daemon"),
               "--blockdev", json.dumps(base), "--blockdev", json.dumps(ofile), "--blockdev", json.dumps(ovl),
               "--nbd-server", addr,
               "--export", f"type=nbd,id=exp0,node-name={OVERLAY_NODE},name=,writable=on",
               "--chardev", f"socket,id=qmp0,path={self.qmp},server=on,wait=off",
               "--monitor", "chardev=qmp0", "--pidfile", pidfile]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
        with open(errpath, "wb") as errf:
            self.qsd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                        start_new_session=True, close_fds=True)
        _wait_pidfile(self.qsd, pidfile, "the copy-on-write server (qemu-storage-daemon)", errpath, START_TIMEOUT)

    def info(self) -> dict:
        m = self.snapshot
        return {"uri": nbd_uri(self.socket, self.tcp), "socket": self.socket,
                "tcp": f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp else None,
                "snapshot": m.id, "short_id": m.short_id, "name": m.name, "time": m.time,
                "disk_size": m.disk_size, "writable": self.writable, "overlay": self.overlay,
                "overlay_created": self.overlay_created, "qmp": self.qmp, "pid": os.getpid()}

    # -------------------------------------------------------------- run and stop
    def run(self, stop: threading.Event, poll: float = 0.25) -> None:
        """Supervise until ``stop`` is set; raise ServeError if a server process dies."""
        while not stop.wait(poll):
            for proc, what, log in ((self.nbdkit, "nbdkit", "nbdkit.log"), (self.qsd, "qemu-storage-daemon",
                                                                               "qsd.log")):
                if proc is not None and proc.poll() is not None:
                    msg = _error_text(os.path.join(self.dir, log), proc.returncode)
                    self.failure = f"{what} exited unexpectedly (status {proc.returncode}): {msg}"
                    raise ServeError(self.failure)

    def close(self) -> dict:
        """Stop the servers (the overlay first), remove sockets and the private directory."""
        rc_qsd = _stop_proc(self.qsd)
        _stop_proc(self.nbdkit)
        self.qsd = self.nbdkit = None
        if self.dir:
            try:
                with open(os.path.join(self.dir, "stats.json"), encoding="utf-8") as f:
                    self.stats = json.load(f)
            except (OSError, ValueError):
                pass
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""
        for path in (self.socket, self.qmp):
            if path:
                try:
                    _check_socket_path(path, "socket")  # removes a socket nobody listens on
                except VmbakError:
                    pass
        if rc_qsd not in (None, 0) and self.failure is None:
            self.failure = f"qemu-storage-daemon exited with status {rc_qsd}"
        return self.stats


def serve_forever(server: Server, on_ready: Callable[[dict], None]) -> dict:
    """Start ``server``, call ``on_ready(info)``, run until SIGTERM/SIGINT/SIGHUP, stop cleanly."""
    stop = threading.Event()
    old = {}

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        old[sig] = signal.signal(sig, handler)
    try:
        info = server.start()
        on_ready(info)
        server.run(stop)
    finally:
        stats = server.close()
        for sig, h in old.items():
            signal.signal(sig, h)
    return stats


# ---------------------------------------------------------------------------- make permanent
def make_permanent(endpoint: str, target: str, *, progress: Callable[[int, int], None] | None = None,
                   timeout: float = 24 * 3600) -> dict:
    """Copy a running copy-on-write export (snapshot + overlay) to ``target`` while clients
    keep writing, then switch the export over to ``target``.

    ``endpoint`` is the export's unix socket (its QMP socket is ``SOCKET.qmp``) or the QMP
    socket itself. QEMU's mirror job in write-blocking mode copies every block and, from the
    start, also writes each new guest write to both sides, so the copy converges; at
    completion the export's node is replaced by ``target`` and the repository and overlay
    are no longer used.
    """
    from vmbak.changes.qemu import QmpClient, QmpError

    qmp = endpoint
    if not endpoint.endswith(".qmp") and os.path.exists(qmp_path_for(endpoint)):
        qmp = qmp_path_for(endpoint)
    if not os.path.exists(qmp):
        raise VmbakError(f"no copy-on-write export at {endpoint} (no QMP socket {qmp}; serve with --writable)")
    target = os.path.abspath(target)
    if os.path.exists(target):
        raise DiskError(f"target exists: {target} (give a new file)")
    if not os.path.isdir(os.path.dirname(target)):
        raise DiskError(f"target directory does not exist: {os.path.dirname(target)}")
    t0 = time.monotonic()
    with QmpClient(qmp, timeout=60) as q:
        nodes = {n["node-name"]: n for n in q.execute("query-named-block-nodes", flat=True)}
        if OVERLAY_NODE not in nodes:
            raise VmbakError(f"{qmp} is not the QMP socket of a vmbak copy-on-write export "
                             "(or it was already made permanent)")
        size = int(nodes[OVERLAY_NODE]["image"]["virtual-size"])
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        ok = False
        try:
            q.execute("blockdev-add", {"driver": "file", "node-name": TARGET_NODE, "filename": target})
            q.execute("blockdev-mirror", {"job-id": JOB_ID, "device": OVERLAY_NODE, "target": TARGET_NODE,
                                          "sync": "full", "copy-mode": "write-blocking", "auto-dismiss": False})
            deadline = time.monotonic() + timeout
            completing = False
            while True:
                jobs = {j["id"]: j for j in q.execute("query-jobs")}
                job = jobs.get(JOB_ID)
                if job is None:
                    raise VmbakError("the mirror job disappeared")
                if progress is not None:
                    progress(int(job.get("current-progress", 0)), int(job.get("total-progress", 0)))
                if job["status"] == "ready" and not completing:
                    q.execute("job-complete", id=JOB_ID)
                    completing = True
                if job["status"] == "concluded":
                    err = job.get("error")
                    q.execute("job-dismiss", id=JOB_ID)
                    if err:
                        raise VmbakError(f"copying the export to {target} failed: {err}")
                    break
                if time.monotonic() > deadline:
                    raise VmbakError(f"copying the export to {target} did not finish in time")
                time.sleep(0.05)
            ok = True
        except BaseException:
            try:
                if any(j["id"] == JOB_ID for j in q.execute("query-jobs")):
                    q.execute("job-cancel", id=JOB_ID, force=True)
                    for _ in range(200):
                        jobs = {j["id"]: j for j in q.execute("query-jobs")}
                        if JOB_ID not in jobs or jobs[JOB_ID]["status"] == "concluded":
                            break
                        time.sleep(0.05)
                    if JOB_ID in {j["id"] for j in q.execute("query-jobs")}:
                        q.execute("job-dismiss", id=JOB_ID)
                q.execute("blockdev-del", {"node-name": TARGET_NODE})
            except (QmpError, VmbakError, OSError):
                pass
            if not ok:
                try:
                    os.unlink(target)
                except OSError:
                    pass
            raise
        # The export now writes to the target; let go of the overlay and the snapshot.
        not_released = []
        for node in (OVERLAY_NODE, "ovlfile", "base"):
            for attempt in range(50):
                try:
                    q.execute("blockdev-del", {"node-name": node})
                    break
                except QmpError as e:
                    if attempt == 49:
                        not_released.append(f"{node}: {e.desc}")
                    time.sleep(0.05)
    return {"target": target, "disk_size": size, "duration_s": round(time.monotonic() - t0, 3),
            "switched": True, "released_backup": not not_released, "not_released": not_released, "qmp": qmp}

