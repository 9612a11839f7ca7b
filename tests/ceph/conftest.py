"""A real single-node Ceph cluster for the RBD tests, started once per session.

The cluster comes from scripts/ceph-rgw.sh (Debian's ceph-mon, ceph-mgr, ceph-osd on memstore,
radosgw), in a private directory with free loopback ports, so it never meets another run's
cluster; it is stopped when the session ends. When ``VMBAK_TEST_CEPH_CONF`` is set (``make
test-ceph`` starts one cluster for the S3 and the RBD tests), that cluster is used instead.

Fixtures:

* ``ceph`` (session): ``CephCluster`` (``.conf``, ``.pool``, ``.rbd()`` -> (ioctx, rbd module),
  ``.new_image(size)`` -> a new image name, ``.write(image, offset, data)``, ``.read(image)``)
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POOL = "vmbak-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CephCluster:
    conf: str
    pool: str = POOL
    _handles: dict = field(default_factory=dict)

    def rbd(self):  # noqa: ANN201 - (rados.Ioctx, rbd module)
        import rados
        import rbd

        if "ioctx" not in self._handles:
            c = rados.Rados(conffile=self.conf)
            c.connect(timeout=30)
            if self.pool not in c.list_pools():
                c.create_pool(self.pool)
                io = c.open_ioctx(self.pool)
                rbd.RBD().pool_init(io, True)
                io.close()
            self._handles["cluster"] = c
            self._handles["ioctx"] = c.open_ioctx(self.pool)
        return self._handles["ioctx"], rbd

    def new_image(self, size: int, order: int = 22, features: int | None = None) -> str:
        """A new image (4 MiB objects; librbd's default features: object map and fast-diff on)."""
        io, rbd = self.rbd()
        name = f"img-{uuid.uuid4().hex[:8]}"
        rbd.RBD().create(io, name, size, order=order, old_format=False, features=features)
        return name

    def image(self, name: str, snapshot: str | None = None):  # noqa: ANN201 - rbd.Image
        io, rbd = self.rbd()
        return rbd.Image(io, name, snapshot=snapshot)

    def write(self, name: str, offset: int, data: bytes) -> None:
        with self.image(name) as img:
            img.write(data, offset)

    def read(self, name: str, snapshot: str | None = None) -> bytes:
        with self.image(name, snapshot) as img:
            return img.read(0, img.size())

    def snaps(self, name: str) -> list[str]:
        with self.image(name) as img:
            return [s["name"] for s in img.list_snaps()]

    def close(self) -> None:
        if "ioctx" in self._handles:
            self._handles.pop("ioctx").close()
            self._handles.pop("cluster").shutdown()


SCRIPT = str(ROOT / "scripts" / "ceph-rgw.sh")


def cluster_env(d: str) -> dict[str, str]:
    """The environment for scripts/ceph-rgw.sh to run a cluster in directory ``d`` on free
    loopback ports, beside any other."""
    return {**os.environ, "VMBAK_CEPH_DIR": d, "VMBAK_CEPH_RGW_PORT": str(_free_port()),
            "VMBAK_CEPH_MON_PORT": str(_free_port())}


@pytest.fixture
def ceph_script() -> tuple[str, Callable[[str], dict[str, str]]]:
    """(path of scripts/ceph-rgw.sh, cluster_env) for a test that starts its own cluster."""
    return SCRIPT, cluster_env


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    given = os.environ.get("VMBAK_TEST_CEPH_CONF")
    if given:
        c = CephCluster(conf=given)
        yield c
        c.close()
        return
    d = tempfile.mkdtemp(prefix="vmbak-ceph-", dir="/tmp")
    env = cluster_env(d)
    p = subprocess.run(["bash", SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, timeout=120)
        raise RuntimeError(f"the Ceph cluster did not start:\n{p.stdout}\n{p.stderr}")
    c = CephCluster(conf=f"{d}/ceph.conf")
    try:
        yield c
    finally:
        c.close()
        subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, timeout=120)
