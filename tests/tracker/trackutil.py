"""Helpers for the tracker's tests (imported as ``trackutil``; fixtures are in conftest.py).

* ``track_disk(name, size=16 MiB, fill="random", **start_options)`` -> ``Tracked``: a disk
  image and the means to start, stop, kill -9 and query its tracker. Every tracker a test
  started is killed (by its pid) at the end of the test.
* ``Tracked.disk_bytes()``, ``changed_blocks(a, b)``: the ground truth tests compare with.
* ``storm(tracked, seed)`` -> Popen of ``storm_writer.py`` (random writes, trims, zeroes,
  flushes through libnbd until the server goes away).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vmbak.tracker import daemon
from vmbak.tracker.client import TrackerClient

HERE = Path(__file__).parent
MiB = 1 << 20
BS = 64 << 10


def changed_blocks(a: bytes, b: bytes, bs: int = BS) -> np.ndarray:
    """Bool per ``bs`` block: where two equally long images differ."""
    assert len(a) == len(b)
    n = (len(a) + bs - 1) // bs
    pad = n * bs - len(a)
    x = np.frombuffer(a + bytes(pad), np.uint8).reshape(n, bs)
    y = np.frombuffer(b + bytes(pad), np.uint8).reshape(n, bs)
    return (x != y).any(axis=1)


@dataclass
class Tracked:
    disk: Path
    sock: str
    options: dict
    pids: list[int] = field(default_factory=list)
    last_status: dict | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self) -> int:
        assert self.last_status is not None
        return int(self.last_status["pid"])

    def start(self, **overrides: object) -> dict:
        opts = {**self.options, **overrides}
        st = daemon.start(str(self.disk), self.sock, **opts)
        self.pids.append(int(st["pid"]))
        self.last_status = st
        return st

    def client(self) -> TrackerClient:
        return TrackerClient(self.sock)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def stop(self) -> None:
        daemon.stop(self.sock)

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert daemon.wait_gone(self.pid, 10), "the killed tracker did not go away"

    def disk_bytes(self) -> bytes:
        return self.disk.read_bytes()

    def state(self, ext: str) -> Path:
        d = Path(self.options.get("state_dir") or self.disk.parent)
        return d / f"{self.disk.name}.vmbak.{ext}"

    def cleanup(self) -> None:
        for pid in self.pids:
            if daemon.pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                daemon.wait_gone(pid, 5)


def storm(t: Tracked, seed: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "storm_writer.py"), t.sock, str(seed),
                             str(os.path.getsize(t.disk)), *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_proc(p: subprocess.Popen, timeout: float = 10) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout)


def wait_for(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
