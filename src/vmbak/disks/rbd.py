"""Ceph RBD images through librbd's Python bindings (Debian ``python3-rbd``, ``python3-rados``).

``rbd:POOL/IMAGE`` names an image. ``connect`` opens the cluster with a ceph.conf and a
client id (its keyring comes from the conf, as for the ``rbd`` command). ``RbdDisk`` reads
an image at one of its snapshots (a consistent, point-in-time view); ``RbdRestoreTarget``
writes a new image, sparsely, under a hidden name and renames it into place once complete.

What vmbak leaves on the cluster while it works names its owner, this host and the process:
a partial restore image in its name (``.IMAGE.vmbak-partial.HOST.PID.RANDOM``, HOST a
hash of ``host_id``), a backup's new snapshot in an owner record in the image's metadata
(``owner_record``, written before the snapshot). A later vmbak on the same host removes
what a killed one left (``owner_dead``); it never touches what a live process, another
host or the user owns.

The bindings belong to Debian's ``/usr/bin/python3``; vmbak's venv is made by that Python
with ``--system-site-packages`` (scripts/setup.sh), so ``import rbd`` finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vmbak.engine.restore import RestoreTarget
from vmbak.errors import DiskError, VmbakError, printable
from vmbak.repo.backend import host_id, pid_alive

PREFIX = "rbd:"
# What librados may take to reach the monitors before it gives up (seconds).
CONNECT_TIMEOUT = int(os.environ.get("VMBAK_CEPH_TIMEOUT", "20"))
_NAME = re.compile(r"[^/@\s]+")


@dataclass(frozen=True)
class RbdSpec:
    pool: str
    image: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.pool}/{self.image}"


def is_rbd(text: str | None) -> bool:
    return bool(text) and str(text).startswith(PREFIX)


def parse_rbd(text: str) -> RbdSpec:
    """``rbd:POOL/IMAGE``; a one-line VmbakError for anything else."""
    rest = text[len(PREFIX):] if text.startswith(PREFIX) else text
    pool, sep, image = rest.partition("/")
    if not sep or not _NAME.fullmatch(pool) or not _NAME.fullmatch(image):
        raise VmbakError(f"bad RBD image {printable(text)!r}: use rbd:POOL/IMAGE, e.g. rbd:vms/db")
    return RbdSpec(pool, image)


def _modules():  # noqa: ANN202 - (rados, rbd)
    try:
        import rados
        import rbd
    except ImportError:
        raise DiskError("RBD needs librbd's Python bindings (Debian packages python3-rados and python3-rbd; "
                        "scripts/setup.sh installs them)") from None
    return rados, rbd


def _why(e: BaseException) -> str:
    """librados' message without its '[errno N]' decoration."""
    return re.sub(r"^\[errno \d+\]\s*", "", str(e)).strip() or type(e).__name__


class Cluster:
    """A connection to a Ceph cluster and the I/O contexts of its pools."""

    def __init__(self, conf: str | None = None, client_id: str | None = None) -> None:
        rados, _ = _modules()
        self.conf = conf
        self.client_id = client_id
        who = f"client.{client_id or 'admin'}"
        if conf is not None and not os.path.isfile(conf):
            raise DiskError(f"Ceph configuration {conf} does not exist")
        try:
            self.rados = rados.Rados(rados_id=client_id or None)
        except rados.Error as e:
            raise DiskError(f"cannot start librados: {_why(e)}") from None
        try:
            # librados prints its own complaints (a missing keyring, ...) on standard error
            # unless told not to: vmbak reports one line of its own.
            for k, v in (("log_to_stderr", "false"), ("err_to_stderr", "false"),
                         ("client_mount_timeout", str(CONNECT_TIMEOUT)),
                         ("rados_mon_op_timeout", str(CONNECT_TIMEOUT))):
                self.rados.conf_set(k, v)
            if conf is not None:
                self.rados.conf_read_file(conf)
            else:
                self.rados.conf_read_file()
            for k, v in (("log_to_stderr", "false"), ("err_to_stderr", "false")):
                self.rados.conf_set(k, v)
        except rados.Error as e:
            self.rados.shutdown()
            where = conf or os.environ.get("CEPH_CONF") or "/etc/ceph/ceph.conf"
            raise DiskError(f"cannot read the Ceph configuration {where}: {_why(e)}") from None
        try:
            self.rados.connect(timeout=CONNECT_TIMEOUT)
        except rados.Error as e:
            self.rados.shutdown()
            hint = ("check --ceph-id and its keyring" if isinstance(e, (rados.PermissionError,
                                                                         rados.ObjectNotFound))
                    else "is the cluster up? check --ceph-conf")
            raise DiskError(f"cannot connect to the Ceph cluster as {who}: {_why(e)} ({hint})") from None

    def ioctx(self, pool: str):  # noqa: ANN201 - rados.Ioctx
        rados, _ = _modules()
        try:
            return self.rados.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise DiskError(f"Ceph pool {printable(pool)!r} does not exist") from None
        except rados.Error as e:
            raise DiskError(f"cannot open Ceph pool {printable(pool)!r}: {_why(e)}") from None

    def close(self) -> None:
        r, self.rados = self.rados, None
        if r is not None:
            r.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(ioctx, spec: RbdSpec, snapshot: str | None = None, read_only: bool = False):  # noqa: ANN001, ANN201
    """An ``rbd.Image``; a one-line DiskError when it does not exist or cannot be opened."""
    _, rbd = _modules()
    try:
        return rbd.Image(ioctx, spec.image, snapshot=snapshot, read_only=read_only)
    except rbd.ImageNotFound:
        if snapshot is not None:
            raise DiskError(f"RBD snapshot {spec}@{printable(snapshot)} does not exist") from None
        raise DiskError(f"RBD image {spec} does not exist") from None
    except rbd.Error as e:
        raise DiskError(f"cannot open RBD image {spec}: {_why(e)}") from None


def allocated_extents(image, start: int, end: int, from_snapshot: str | None = None,  # noqa: ANN001
                      whole_object: bool = True) -> list[tuple[int, int]]:
    """The extents of ``image`` (at its open snapshot) in [start, end) that changed since
    ``from_snapshot`` (None: that hold data), merged and in order. librbd reports whole
    objects when ``whole_object`` (fast-diff: the object map, no object is looked at)."""
    out: list[tuple[int, int]] = []

    def cb(off: int, ln: int, exists: bool) -> int:
        # an extent that exists holds (maybe) data; one that does not was discarded or
        # never written: with from_snapshot both are changes, without it only data counts
        if exists or from_snapshot is not None:
            out.append((off, ln))
        return 0

    if end > start:
        image.diff_iterate(start, end - start, from_snapshot, cb, include_parent=True, whole_object=whole_object)
    out.sort()
    merged: list[tuple[int, int]] = []
    for off, ln in out:
        off, stop = max(off, start), min(off + ln, end)
        if stop <= off:
            continue
        if merged and off <= merged[-1][0] + merged[-1][1]:
            a, b = merged[-1]
            merged[-1] = (a, max(a + b, stop) - a)
        else:
            merged.append((off, stop - off))
    return merged


class RbdDisk:
    """A DiskReader of an RBD image at a snapshot. librbd's image handle is safe to read
    from several threads at once (the bindings release the GIL while librbd works)."""

    def __init__(self, cluster: Cluster, spec: RbdSpec, snapshot: str, whole_object: bool = True) -> None:
        self.cluster = cluster
        self.spec = spec
        self.snapshot = snapshot
        self.whole_object = whole_object
        self.ioctx = cluster.ioctx(spec.pool)
        try:
            self.image = open_image(self.ioctx, spec, snapshot=snapshot, read_only=True)
        except BaseException:
            self.ioctx.close()
            raise
        self.size = int(self.image.size())
        self.description = f"{spec}@{snapshot}"
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes:
        _, rbd = _modules()
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        try:
            data = self.image.read(offset, length)
        except rbd.Error as e:
            raise DiskError(f"{self.description}: read of {length} bytes at {offset} failed: {_why(e)}") from None
        if len(data) != length:
            raise DiskError(f"{self.description}: short read at {offset}")
        return bytes(data)

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.size if end is None else min(end, self.size)
        yield from allocated_extents(self.image, start, end, None, self.whole_object)

    def close(self) -> None:
        with self._lock:
            img, self.image = self.image, None
            if img is not None:
                img.close()
                self.ioctx.close()


PARTIAL = ".vmbak-partial."
_PARTIAL_OWNER = re.compile(r"\.vmbak-partial\.([0-9a-f]{8})\.(\d+)\.[0-9a-f]+$")


def _host_tag() -> str:
    return hashlib.sha256(host_id().encode()).hexdigest()[:8]


def owner_record(**extra: object) -> str:
    """The metadata value that names this process as the owner of something on the cluster."""
    return json.dumps({"host": host_id(), "pid": os.getpid(), **extra}, sort_keys=True)


def parse_owner(value: str | None) -> dict:
    try:
        rec = json.loads(value or "")
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def owner_dead(rec: dict) -> bool:
    """Whether an owner record names a process of this host that no longer runs (never
    true for another host's, whose pids mean nothing here)."""
    pid = rec.get("pid")
    return rec.get("host") == host_id() and isinstance(pid, int) and not isinstance(pid, bool) and \
        pid != os.getpid() and not pid_alive(pid)


class RbdRestoreTarget(RestoreTarget):
    """A restore target that is a new RBD image.

    The image is created under ``.IMAGE.vmbak-partial.HOST.PID.RANDOM`` in the same pool, written
    sparsely (blocks of zeros are never written: a new image reads as zeros), and renamed
    to IMAGE by ``commit``; ``discard`` (or ``close`` before commit) removes it."""

    ZERO_GRAIN = 64 << 10  # written runs are cut where a whole 64 KiB of zeros lies

    def __init__(self, spec: RbdSpec, size: int, conf: str | None = None,  # noqa: PLW0231 - no file
                 client_id: str | None = None) -> None:
        _, rbd = _modules()
        self.fd = -1
        self.lock = None
        self._token = None
        self.spec = spec
        self.size = size
        self.final_path = str(spec)
        self.is_file = False
        self.created = False
        self.image = None
        self.reaped: list[str] = []  # partial images of killed restores, removed on the way
        self.cluster = Cluster(conf, client_id)
        try:
            self.ioctx = self.cluster.ioctx(spec.pool)
        except BaseException:
            self.cluster.close()
            raise
        try:
            names = self._names()
            if spec.image in names:
                raise DiskError(f"RBD image {spec} exists (vmbak restores into a new image only)")
            self.reaped = self._reap_partials(names)
            # the owner (this host, this process) is in the name: a kill leaves nothing unnamed
            self.partial = f".{spec.image}{PARTIAL}{_host_tag()}.{os.getpid()}.{os.urandom(4).hex()}"
            self.path = f"{PREFIX}{spec.pool}/{self.partial}"
            try:
                rbd.RBD().create(self.ioctx, self.partial, size)
            except rbd.Error as e:
                raise DiskError(f"cannot create RBD image {spec}: {_why(e)}") from None
            self.created = True
            self.image = open_image(self.ioctx, RbdSpec(spec.pool, self.partial))
        except BaseException:
            self.discard()
            self.close()
            raise

    def _names(self) -> list[str]:
        _, rbd = _modules()
        try:
            return list(rbd.RBD().list(self.ioctx))
        except rbd.Error as e:
            raise DiskError(f"cannot list the images of pool {self.spec.pool}: {_why(e)}") from None

    def _reap_partials(self, names: list[str]) -> list[str]:
        """Remove the partial images of restores into this pool that were killed on this
        host (their owner process is gone); return their names."""
        _, rbd = _modules()
        reaped = []
        for name in names:
            m = _PARTIAL_OWNER.search(name) if name.startswith(".") else None
            if m is None or not owner_dead({"host": host_id() if m.group(1) == _host_tag() else None,
                                             "pid": int(m.group(2))}):
                continue
            try:
                rbd.RBD().remove(self.ioctx, name)
            except rbd.Error:
                continue  # gone meanwhile, or in use: not ours to judge now
            reaped.append(name)
        return reaped

    def write(self, offset: int, data: bytes | memoryview) -> None:
        _, rbd = _modules()
        mv = memoryview(data).cast("B")
        g = self.ZERO_GRAIN
        n = len(mv) // g
        # non-zero grains (and the tail) are written; runs of zero grains are skipped
        nz = np.ones(n + (1 if len(mv) % g else 0), bool)
        if n:
            nz[:n] = np.frombuffer(mv[:n * g], np.uint64).reshape(n, g // 8).any(axis=1)
        if len(mv) % g:
            nz[n] = any(mv[n * g:])
        edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
        for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
            piece = bytes(mv[a * g:min(b * g, len(mv))])
            try:
                self.image.write(piece, offset + a * g)
            except rbd.Error as e:
                raise DiskError(f"{self.final_path}: write at {offset + a * g} failed: {_why(e)}") from None

    def write_zeros(self, offset: int, length: int) -> None:
        return  # a new image reads as zeros

    def needs_zero_writes(self) -> bool:
        return False

    def read(self, length: int, offset: int) -> bytes:
        return bytes(self.image.read(offset, length))

    def commit(self, sync: bool = False) -> None:
        _, rbd = _modules()
        try:
            if sync:
                self.image.flush()
            self.image.close()
            self.image = None
            rbd.RBD().rename(self.ioctx, self.partial, self.spec.image)
        except rbd.ImageExists:
            raise DiskError(f"RBD image {self.spec} appeared while the restore ran; the restored image is "
                            f"left as {self.path}") from None
        except rbd.Error as e:
            raise DiskError(f"cannot rename the restored image to {self.spec}: {_why(e)}") from None
        self.created = False
        self.path = self.final_path

    def discard(self) -> None:
        _, rbd = _modules()
        if not self.created:
            return
        if self.image is not None:
            self.image.close()
            self.image = None
        try:
            rbd.RBD().remove(self.ioctx, self.partial)
        except rbd.Error:
            pass
        self.created = False

    def close(self) -> None:
        if self.created:
            self.discard()
        if self.image is not None:
            self.image.close()
            self.image = None
        ioctx = getattr(self, "ioctx", None)
        if ioctx is not None:
            ioctx.close()
            self.ioctx = None
        self.cluster.close()
