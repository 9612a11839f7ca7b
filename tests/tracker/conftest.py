"""Fixtures for the tracker's tests: real nbdkit trackers on short Unix socket paths.

* ``track_disk(name, size=16 MiB, fill="random", **start_options)`` -> ``trackutil.Tracked``;
  every tracker a test started is killed (by its pid) at the end of the test.
* ``storm(tracked, seed, *args)`` -> Popen of ``storm_writer.py``; killed at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from trackutil import MiB, Tracked, stop_proc, storm


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vt-", dir="/tmp"))  # short: Unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def track_disk(tmp_path: Path, sockdir: Path) -> Iterator[Callable[..., Tracked]]:
    made: list[Tracked] = []
    ddir = tmp_path / "disks"
    ddir.mkdir(exist_ok=True)

    def _make(name: str = "disk.raw", size: int = 16 * MiB, fill: str = "random", seed: int = 1,
              start: bool = True, **opts: object) -> Tracked:
        path = ddir / name
        if fill == "random":
            path.write_bytes(np.random.default_rng(seed).bytes(size))
        elif fill == "sparse":
            with open(path, "wb") as f:
                f.truncate(size)
        else:
            path.write_bytes(bytes(size))
        t = Tracked(path, str(sockdir / f"{name}.sock"), dict(opts))
        made.append(t)
        if start:
            t.start()
        return t

    yield _make
    for t in made:
        t.cleanup()


@pytest.fixture(name="storm")
def _storm_fixture() -> Iterator[Callable[..., subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def _start(t: Tracked, seed: int, *extra: str) -> subprocess.Popen:
        p = storm(t, seed, *extra)
        procs.append(p)
        return p

    yield _start
    for p in procs:
        stop_proc(p)
