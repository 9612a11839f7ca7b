"""Fixtures for the hypervisor tests: real images (qemu-img, qemu-io), real
qemu-storage-daemons, real repositories.

* ``sockdir``: a short private directory for unix sockets.
* ``qsd(image, fmt="qcow2", nbd=True)`` -> ``hvutil.Qsd`` started; stopped at the end.
* ``vrepo()`` -> an unencrypted ``vmbak.Repository`` in the test's directory.
* every test checks that it left no qemu-storage-daemon of vmbak's and no private
  temporary directory behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hvutil import Qsd, vmbak_daemons, vmbak_tmpdirs


def _owner_alive_elsewhere(name: str) -> bool:
    m = re.match(r"vmbak-(?:qemu|libvirt)-(\d+)-", name)
    if m is None or int(m.group(1)) == os.getpid():
        return False
    try:
        with open(f"/proc/{m.group(1)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    before_p, before_d = vmbak_daemons(), vmbak_tmpdirs()
    yield
    import gc

    gc.collect()
    left_p = vmbak_daemons() - before_p
    # another xdist worker's command may be using its directory right now: a directory named
    # after a live process other than this one is that process's, not a leftover of this test
    left_d = {n for n in vmbak_tmpdirs() - before_d if not _owner_alive_elsewhere(n)}
    assert not left_p, f"qemu-storage-daemon processes left running: {sorted(left_p)}"
    assert not left_d, f"private directories left in /tmp: {sorted(left_d)}"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qsd(sockdir: Path) -> Iterator[Callable[..., Qsd]]:
    started: list[Qsd] = []

    def _start(image: Path, fmt: str = "qcow2", nbd: bool = True, name: str = "") -> Qsd:
        d = sockdir / (name or f"d{len(started)}")
        d.mkdir()
        q = Qsd(image, d, fmt=fmt, nbd=nbd).start()
        started.append(q)
        return q

    yield _start
    for q in started:
        q.kill9()


@pytest.fixture
def vrepo(tmp_path: Path) -> Callable[..., object]:
    from vmbak.repo.crypto import ENC_NONE
    from vmbak.repo.repository import Repository

    def _make(name: str = "repo") -> Repository:
        return Repository.init(str(tmp_path / name), None, encryption=ENC_NONE)

    return _make
