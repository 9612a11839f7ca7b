"""Helpers for the hypervisor tests: qemu-img, qemu-io, a qemu-storage-daemon under test.

Nothing here imitates QEMU: images are made by qemu-img and written by qemu-io or
through a real qemu-storage-daemon's NBD export.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import nbd
import numpy as np

MiB = 1 << 20
KiB = 1 << 10
B = 64 * KiB
FORMATS = ("qcow2", "vhdx", "vpc", "vmdk")
CREATE_OPTS = {"qcow2": [], "vhdx": [], "vpc": ["-o", "force_size=on"], "vmdk": []}


def run(*cmd: object, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([os.fspath(c) if isinstance(c, os.PathLike) else str(c) for c in cmd],
                       capture_output=True, text=True, input=None if input is None else input.decode())
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def qemu_img(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args, check=check)


def create(path: Path, fmt: str, size: int, *extra: str) -> Path:
    qemu_img("create", "-q", "-f", fmt, *CREATE_OPTS[fmt], *extra, path, size)
    return path


def qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    """Run qemu-io commands on an image (e.g. "write -P 0x11 0 64k", "write -z 1M 64k")."""
    args: list[object] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def write_random(path: Path, fmt: str, offset: int, length: int, seed: int, workdir: Path) -> bytes:
    """Write random bytes at ``offset`` through qemu-io (a file of the data is loaded
    with qemu-io's ``write -s``)."""
    data = np.random.default_rng(seed).bytes(length)
    src = workdir / f".rand-{seed}-{offset}"
    src.write_bytes(data)
    qemu_io(path, fmt, f"write -s {src} {offset} {length}")
    src.unlink()
    return data


def to_raw(path: Path, dest: Path) -> Path:
    qemu_img("convert", "-O", "raw", path, dest)
    return dest


def compare(a: Path, b: Path) -> None:
    """qemu-img compare, and the virtual sizes must be equal too; fail with its message."""
    sa, sb = info(a)["virtual-size"], info(b)["virtual-size"]
    assert sa == sb, f"{a} has {sa} bytes, {b} has {sb}"
    p = qemu_img("compare", a, b, check=False)
    assert p.returncode == 0, f"qemu-img compare {a} {b}: {p.stdout.strip()} {p.stderr.strip()}"


def info(path: Path) -> dict:
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)


def vmbak_daemons() -> set[int]:
    """Pids of qemu-storage-daemon processes vmbak started (their socket dirs say so)."""
    out = set()
    mine = os.path.join(tempfile.gettempdir(), "vmbak-qsd-").encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmd and mine in cmd and state != "Z":
            out.add(int(d))
    return out


def vmbak_tmpdirs() -> set[str]:
    base = tempfile.gettempdir()
    return {n for n in os.listdir(base) if n.startswith(("vmbak-qsd-", "vmbak-qemu-", "vmbak-libvirt-"))}


def listening(path: str) -> bool:
    """A server accepts connections on the unix socket (its file exists from bind() on)."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Qsd:
    """A qemu-storage-daemon serving one image as node ``disk0``, with a QMP socket and
    (``nbd=True``) a writable NBD export ``disk0`` on ``w.sock`` for the test's writes."""

    def __init__(self, image: Path, sockdir: Path, fmt: str = "qcow2", nbd: bool = True,
                 node: str = "disk0") -> None:
        self.image = image
        self.fmt = fmt
        self.node = node
        self.qmp = os.fspath(sockdir / "qmp.sock")
        self.nbd_sock = os.fspath(sockdir / "w.sock") if nbd else None
        self.sockdir = sockdir
        self.proc: subprocess.Popen | None = None
        self._h = None

    def start(self) -> Qsd:
        for s in (self.qmp, self.nbd_sock):
            if s and os.path.exists(s):
                os.unlink(s)
        node = {"driver": self.fmt, "node-name": self.node,
                "file": {"driver": "file", "filename": os.fspath(self.image)}}
        cmd = ["qemu-storage-daemon", "--blockdev", json.dumps(node),
               "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
               "--monitor", "chardev=qmp0"]
        if self.nbd_sock:
            cmd += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
                    "--export", f"type=nbd,id=w,node-name={self.node},name=disk0,writable=on"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (listening(self.qmp) and (not self.nbd_sock or listening(self.nbd_sock))):
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon failed: {self.proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.005)
        return self

    # -- writes through the NBD export
    def handle(self):  # noqa: ANN201
        if self._h is None:
            assert self.nbd_sock, "this daemon has no NBD export"
            h = nbd.NBD()
            h.set_export_name("disk0")
            h.connect_unix(self.nbd_sock)
            self._h = h
        return self._h

    def write(self, offset: int, data: bytes) -> None:
        h = self.handle()
        h.pwrite(data, offset)
        h.flush()

    def zero(self, offset: int, length: int) -> None:
        h = self.handle()
        h.zero(length, offset)
        h.flush()

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.handle().pread(length, offset))

    def dump(self, dest: Path, size: int) -> Path:
        """The current content of the disk as a raw file (read through the export)."""
        h = self.handle()
        with open(dest, "wb") as f:
            for off in range(0, size, 4 * MiB):
                f.write(h.pread(min(4 * MiB, size - off), off))
        return dest

    # -- QMP inspection
    def qmp_cmd(self, cmd: str, **args: object) -> object:
        from vmbak.changes.qemu import QmpClient

        with QmpClient(self.qmp) as q:
            return q.execute(cmd, **args)

    def bitmaps(self) -> dict[str, dict]:
        for n in self.qmp_cmd("query-named-block-nodes", flat=True):  # type: ignore[union-attr]
            if n["node-name"] == self.node:
                return {b["name"]: b for b in n.get("dirty-bitmaps") or [] if "name" in b}
        raise AssertionError(f"node {self.node} is gone")

    def leftovers(self) -> dict[str, list]:
        """vmbak's exports, jobs and nodes still in the daemon."""
        ex = [e["id"] for e in self.qmp_cmd("query-block-exports") if e["id"].startswith("vmbak")]  # type: ignore
        jobs = [j["id"] for j in self.qmp_cmd("query-jobs")]  # type: ignore[union-attr]
        nodes = [n["node-name"] for n in self.qmp_cmd("query-named-block-nodes", flat=True)  # type: ignore
                 if n["node-name"].startswith("vmbak")]
        return {k: v for k, v in {"exports": ex, "jobs": jobs, "nodes": nodes}.items() if v}

    # -- life cycle
    def _drop_handle(self) -> None:
        if self._h is not None:
            try:
                self._h.shutdown()
            except nbd.Error:
                pass
            self._h = None

    def stop(self) -> None:
        """Clean stop (SIGTERM): persistent bitmaps are written to the image."""
        self._drop_handle()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
            self.proc = None

    def kill9(self) -> None:
        self._drop_handle()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(20)
            self.proc = None

    def restart(self) -> Qsd:
        self.stop()
        return self.start()


def tool_ok(name: str) -> bool:
    return shutil.which(name) is not None
