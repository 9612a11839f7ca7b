"""Starting and stopping the tracking server (nbdkit with vmbak's python plugin)."""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

from vmbak.errors import DiskError, VmbakError
from vmbak.tracker import changelog
from vmbak.tracker.client import TrackerClient, TrackerUnavailable
from vmbak.tracker.core import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_HISTORY,
    DEFAULT_LEASE,
    DEFAULT_RCT_INTERVAL,
    DEFAULT_REGION_SIZE,
)
from vmbak.tracker.identity import DEFAULT_HASH_LIMIT
from vmbak.tracker.paths import MAX_UNIX_PATH, StatePaths, ctl_path, state_paths

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
ERROR_MARK = "vmbak-tracker-error: "


class TrackerStartFailed(VmbakError):
    """The tracking server did not start."""


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_tcp(spec: str) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (``[v6]:PORT``); the host defaults to 127.0.0.1."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", spec
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise VmbakError(f"bad --tcp {spec!r}: use PORT or HOST:PORT") from None
    return host, p


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _python_path() -> str:
    """What nbdkit's embedded interpreter needs to import vmbak and numpy."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    keep = [pkg_parent]
    for p in sys.path:
        if p and os.path.isdir(p) and p.rstrip("/").endswith(("site-packages", "dist-packages")):
            keep.append(p)
    return os.pathsep.join(dict.fromkeys(keep))


def _check_socket_path(path: str, what: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise VmbakError(f"{what} path is too long for a Unix socket ({len(path)} bytes, at most "
                         f"{MAX_UNIX_PATH}): {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VmbakError(f"{path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)  # a stale socket from a server that died
        return
    finally:
        s.close()
    raise VmbakError(f"a server is already listening on {path}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return False
    if data.rpartition(")")[2].split()[:1] != ["Z"]:
        return True
    # a zombie leader: its other threads (and so the open files) may still be going away
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def nbdkit_command(disk: str, sock: str, *, tcp: str | None, block_size: int, mrt_region: int,
                   rct_interval: float, state_dir: str | None, mrt_sync: bool, history: int,
                   foreground: bool = False, identity_hash_limit: int = DEFAULT_HASH_LIMIT,
                   crash_lease: float = DEFAULT_LEASE) -> list[str]:
    exe = shutil.which("nbdkit") or "/usr/sbin/nbdkit"
    # nbdkit forks into the background itself: its own process then has no parent-death signal
    # (this nbdkit sets one on the process that a caller starts, even without --exit-with-parent).
    cmd = [exe, *(["--foreground"] if foreground else []), "--log=stderr", "--unix", sock, "--threads", "16",
           "python", PLUGIN,
           f"disk={disk}", f"ctl={ctl_path(sock)}", f"socket={sock}", f"blocksize={block_size}",
           f"region={mrt_region}", f"rctinterval={rct_interval}", f"history={history}",
           f"mrtsync={1 if mrt_sync else 0}", f"hashlimit={identity_hash_limit}",
           f"lease={crash_lease}"]
    if state_dir:
        cmd.append(f"statedir={state_dir}")
    if tcp:
        cmd.append(f"tcp={tcp}")
    return cmd


def _startup_error(paths: StatePaths, rc: int | None) -> str:
    try:
        with open(paths.err, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        if ERROR_MARK in line:
            return line.split(ERROR_MARK, 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower()] or lines
    tail = useful[-1] if useful else f"exit status {rc}"
    if tail.startswith("nbdkit: "):
        tail = tail[len("nbdkit: "):]
    return f"{tail} (see {paths.err})"


def start(disk: str, sock: str, *, tcp: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
          mrt_region: int = DEFAULT_REGION_SIZE, rct_interval: float = DEFAULT_RCT_INTERVAL,
          state_dir: str | None = None, foreground: bool = False, mrt_sync: bool = True,
          history: int = DEFAULT_HISTORY, identity_hash_limit: int = DEFAULT_HASH_LIMIT,
          crash_lease: float = DEFAULT_LEASE, timeout: float = 60.0) -> dict:
    """Start tracking ``disk`` behind the NBD socket ``sock``. Returns the tracker's status once
    both sockets accept connections (daemonised), or never returns (``foreground``)."""
    disk = os.path.abspath(disk)
    sock = os.path.abspath(sock)
    try:
        st = os.stat(disk)
    except FileNotFoundError:
        raise DiskError(f"disk not found: {disk}") from None
    except OSError as e:
        raise DiskError(f"cannot use disk {disk}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DiskError(f"not a regular file: {disk} (vmbak track serves raw disk image files)")
    if not os.access(disk, os.R_OK | os.W_OK):
        raise DiskError(f"disk {disk} is not readable and writable")
    if not _pow2(block_size) or not 4096 <= block_size <= (16 << 20):
        raise VmbakError("--block-size must be a power of two between 4096 and 16 MiB")
    if not _pow2(mrt_region) or mrt_region < 4096:
        raise VmbakError("--mrt-region must be a power of two of at least 4096")
    if not rct_interval > 0:
        raise VmbakError("--rct-interval must be positive")
    if identity_hash_limit < 0:
        raise VmbakError("--identity-hash-limit must not be negative")
    if not crash_lease >= 0.5:
        raise VmbakError("--crash-lease must be at least 0.5 seconds")
    if state_dir:
        state_dir = os.path.abspath(state_dir)
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as e:
            raise VmbakError(f"cannot create state directory {state_dir}: {e.strerror}") from None
    paths = state_paths(disk, state_dir)
    if not os.path.isdir(os.path.dirname(sock)):
        raise VmbakError(f"socket directory does not exist: {os.path.dirname(sock)}")
    _check_socket_path(sock, "socket")
    _check_socket_path(ctl_path(sock), "control socket")
    tcp_spec = None
    if tcp:
        host, port = parse_tcp(tcp)
        tcp_spec = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not shutil.which("nbdkit") and not os.path.exists("/usr/sbin/nbdkit"):
        raise TrackerStartFailed("nbdkit is not installed (Debian packages nbdkit and nbdkit-plugin-python)")
    cmd = nbdkit_command(disk, sock, tcp=tcp_spec, block_size=block_size, mrt_region=mrt_region,
                         rct_interval=rct_interval, state_dir=state_dir, mrt_sync=mrt_sync, history=history,
                         foreground=foreground, identity_hash_limit=identity_hash_limit,
                         crash_lease=crash_lease)
    env = dict(os.environ, VMBAK_TRACKER_PYPATH=_python_path(), PYTHONDONTWRITEBYTECODE="1")
    if foreground:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(cmd[0], cmd, env)
    try:
        errf = open(paths.err, "wb")  # noqa: SIM115 - handed to the child
    except OSError as e:
        raise VmbakError(f"cannot write {paths.err}: {e.strerror}") from None
    with errf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, env=env,
                                start_new_session=True, close_fds=True)
    try:
        # configuration, recovery and binding happen before nbdkit forks; then the parent exits
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TrackerStartFailed(f"the tracker did not start within {timeout:.0f} s (see {paths.err})") from None
    if rc != 0:
        raise TrackerStartFailed(f"the tracker did not start: {_startup_error(paths, rc)}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = TrackerClient(sock, timeout=5)
        except TrackerUnavailable:
            client = None
        if client is not None:
            try:
                # nbdkit binds the NBD socket before the plugin's threads start: the control
                # socket answering means the NBD socket listens (no probe: it would log an error)
                if stat.S_ISSOCK(os.lstat(sock).st_mode):
                    return client.status()
            except OSError:
                pass
            finally:
                client.close()
        if time.monotonic() > deadline:
            raise TrackerStartFailed(f"the tracker did not answer within {timeout:.0f} s "
                                     f"({_startup_error(paths, None)})")
        time.sleep(0.02)


def stop(sock: str, timeout: float = 60.0) -> dict:
    """Stop the tracker cleanly (final .rct with the clean flag) and wait for it to exit."""
    try:
        client = TrackerClient(sock, timeout=timeout)
    except TrackerUnavailable as e:
        raise VmbakError(str(e)) from None
    try:
        st = client.status()
        client.stop()
    finally:
        client.close()
    pid = int(st["pid"])
    if not wait_gone(pid, timeout):
        try:
            os.kill(pid, signal.SIGTERM)  # the state is already saved; make nbdkit let go
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
        if not wait_gone(pid, 10):
            raise VmbakError(f"the tracker (pid {pid}) saved its state but did not exit")
    for path in (sock, ctl_path(sock)):
        try:
            _check_socket_path(path, "socket")  # removes the socket file nbdkit leaves behind
        except VmbakError:
            pass
    return {"stopped": True, "pid": pid, "disk": st["disk"], "socket": st.get("socket"),
            "dirty_blocks": st["dirty_blocks"], "committed_change_id": st["committed_change_id"]}


def log_path(target: str, state_dir: str | None = None) -> str:
    """The change log of a running tracker's socket, or of a disk."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise VmbakError(f"no such socket or disk: {target}") from None
    if stat.S_ISSOCK(mode):
        try:
            with TrackerClient(target, timeout=30) as c:
                return str(c.status()["log"])
        except TrackerUnavailable as e:
            raise VmbakError(f"{e} (give the disk instead to read its log)") from None
    if stat.S_ISREG(mode):
        return state_paths(target, state_dir).log
    raise VmbakError(f"{target} is neither a tracker socket nor a disk image")


def read_log(target: str, state_dir: str | None = None) -> tuple[str, list[dict]]:
    path = log_path(target, state_dir)
    try:
        return path, changelog.read(path)
    except FileNotFoundError:
        raise VmbakError(f"no change log at {path} (the disk was never tracked here)") from None
    except OSError as e:
        raise VmbakError(f"cannot read {path}: {e.strerror}") from None
