"""The embeddable Python API (``import vmbak``), as the README documents it."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

import vmbak
from vmbak.disks.base import DiskReader
from vmbak.errors import DiskError, SnapshotNotFound, WrongPassword

MiB = 1 << 20
B = 64 * 1024


class MemoryDisk:
    """Another program's own disk view: a DiskReader over bytes in memory."""

    def __init__(self, data: bytes, description: str = "memory disk") -> None:
        self.data = data
        self.size = len(data)
        self.description = description
        self.reads = 0
        self.closed = False
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            self.reads += length
        return self.data[offset:offset + length]

    def data_extents(self, start: int = 0, end: int | None = None):  # noqa: ANN201
        end = self.size if end is None else min(end, self.size)
        if end > start:
            yield (start, end - start)

    def close(self) -> None:
        self.closed = True


def test_readme_example_end_to_end(tmp_path, make_disk, run_vmbak, assert_same_file):
    path = os.fspath(tmp_path / "api-repo")
    repo = vmbak.Repository.init(path, password="secret")
    disk = make_disk("web.raw", 6 * MiB + 1234, seed=101)
    disk.save("v0")
    snap = vmbak.backup(repo, disk.path, name="web")
    assert isinstance(snap, vmbak.Manifest)
    assert snap.kind == "full" and len(snap.id) == 64 and snap.short_id == snap.id[:8]
    assert snap.stats["new_stored_bytes"] >= disk.size

    disk.write_random(2 * MiB, 3 * B, seed=102)
    disk.save("v1")
    inc = vmbak.backup(repo, os.fspath(disk.path), name="web")
    assert inc.kind == "incremental" and inc.parent == snap.id
    assert inc.stats["changed_bytes"] == 3 * B

    disk.write_zeros(0, B)
    disk.save("v2")
    diff = vmbak.backup(repo, disk.path, name="web", mode="differential")
    assert diff.kind == "differential" and diff.parent == snap.id

    r = vmbak.restore(repo, "web:latest", tmp_path / "web-restored.raw")
    assert isinstance(r, dict) and r["verified"] is True and r["chain_length"] == 2
    assert_same_file(tmp_path / "web-restored.raw", disk.version("v2"))
    vmbak.restore(repo, inc, os.fspath(tmp_path / "inc.raw"))  # a Manifest works too
    assert_same_file(tmp_path / "inc.raw", disk.version("v1"))
    vmbak.restore(repo, snap.id[:10], tmp_path / "full.raw")
    assert_same_file(tmp_path / "full.raw", disk.version("v0"))

    report = vmbak.check(repo, read_data=True)
    assert report.ok, report.errors
    assert report.snapshots == 3 and report.bytes_read > 0

    ms = repo.manifests()
    assert [m.id for m in ms] == [snap.id, inc.id, diff.id]  # oldest first
    assert all(m.name == "web" and m.time for m in ms)
    assert [m.kind for m in ms] == ["full", "incremental", "differential"]

    # Another process (the CLI) sees the same repository.
    again = vmbak.Repository.open(path, "secret")
    assert [m.id for m in again.manifests()] == [m.id for m in ms]
    p = run_vmbak("-r", path, "snapshots", "--json", env={"VMBAK_PASSWORD": "secret"})
    assert [s["id"] for s in json.loads(p.stdout)] == [m.id for m in ms]


def test_api_errors_are_vmbak_errors(tmp_path, make_disk):
    path = os.fspath(tmp_path / "e-repo")
    repo = vmbak.Repository.init(path, password="pw")
    disk = make_disk("e.raw", MiB, seed=103)
    vmbak.backup(repo, disk.path, name="e")
    with pytest.raises(WrongPassword):
        vmbak.Repository.open(path, "not-pw")
    with pytest.raises(vmbak.VmbakError):
        vmbak.Repository.open(path, None)
    with pytest.raises(vmbak.VmbakError):
        vmbak.Repository.open(os.fspath(tmp_path / "nothing-here"), "pw")
    with pytest.raises(vmbak.VmbakError):
        vmbak.Repository.init(path, password="pw")  # exists
    with pytest.raises(SnapshotNotFound):
        vmbak.restore(repo, "nobody:latest", tmp_path / "x.raw")
    with pytest.raises(DiskError):
        vmbak.backup(repo, tmp_path / "missing.raw", name="e")
    (tmp_path / "exists.raw").write_bytes(b"x" * (2 * MiB))
    with pytest.raises(DiskError):
        vmbak.restore(repo, "e:latest", tmp_path / "exists.raw")  # overwrite=False
    assert (tmp_path / "exists.raw").read_bytes() == b"x" * (2 * MiB)
    vmbak.restore(repo, "e:latest", tmp_path / "exists.raw", overwrite=True)
    assert (tmp_path / "exists.raw").read_bytes()[:MiB] == disk.read()
    with pytest.raises(vmbak.VmbakError):
        vmbak.backup(repo, disk.path, name="e", mode="sideways")
    assert issubclass(WrongPassword, vmbak.VmbakError) and issubclass(DiskError, vmbak.VmbakError)


def test_custom_disk_reader(tmp_path):
    repo = vmbak.Repository.init(os.fspath(tmp_path / "m-repo"), None, encryption="none")
    data = bytearray(np.random.default_rng(104).bytes(3 * MiB + 100))
    data[B:3 * B] = bytes(2 * B)
    d0 = MemoryDisk(bytes(data), "vm 'db' drive 0")
    assert isinstance(d0, DiskReader)
    m0 = vmbak.backup(repo, d0, name="db")
    assert not d0.closed, "a reader passed in stays open: its owner closes it"
    assert m0.kind == "full" and m0.source == "vm 'db' drive 0"
    # every byte once, plus the few KiB the usage analysis reads to look for partitions and filesystems
    assert m0.stats["zero_bytes"] == 2 * B and len(data) <= d0.reads <= len(data) + 4 * 64 * 1024
    data[MiB:MiB + 10] = b"0123456789"
    m1 = vmbak.backup(repo, MemoryDisk(bytes(data)), name="db")
    assert m1.kind == "incremental" and m1.stats["changed_bytes"] == B
    out = tmp_path / "db.raw"
    vmbak.restore(repo, m1, out)
    assert out.read_bytes() == bytes(data)
    # open_disk gives the same reader the CLI uses.
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(data))
    reader = vmbak.open_disk(src)
    try:
        assert reader.size == len(data) and reader.pread(10, MiB) == b"0123456789"
        m2 = vmbak.backup(repo, reader, name="db")
    finally:
        reader.close()
    assert m2.stats["changed_bytes"] == 0 and m2.stats["new_stored_bytes"] == 0


def test_api_snapshot_specs(tmp_path, make_disk):
    repo = vmbak.Repository.init(os.fspath(tmp_path / "s-repo"), None, encryption="none")
    disk = make_disk("s.raw", MiB, seed=105)
    m0 = vmbak.backup(repo, disk.path, name="s")
    disk.write_random(0, 1, seed=106)
    m1 = vmbak.backup(repo, disk.path, name="s")
    assert repo.find("s:latest").id == m1.id
    assert repo.find(m0.id[:8]).id == m0.id
    assert repo.find(f"s@{m1.time[:19]}").id == m1.id
    assert repo.latest("s").id == m1.id and repo.latest("s", full_only=True).id == m0.id
    with pytest.raises(SnapshotNotFound):
        repo.find("s@2001-01-01")


def test_restore_verification_modes(tmp_path, make_disk, assert_same_file):
    """Inline verification (default) and read-back verification both pass on a good chain and both
    restore the same bytes; read-back also covers an existing target written over."""
    repo = vmbak.Repository.init(os.fspath(tmp_path / "v-repo"), None, encryption="none")
    d = make_disk("v.raw", 6 * MiB + 4096, seed=77)
    vmbak.backup(repo, d.path, name="v")
    d.write_random(MiB, 2 * MiB, seed=78)
    d.write_zeros(4 * MiB, MiB)
    vmbak.backup(repo, d.path, name="v")
    a = vmbak.restore(repo, "v:latest", tmp_path / "inline.raw")
    b = vmbak.restore(repo, "v:latest", tmp_path / "readback.raw", readback=True)
    assert a["verified"] and b["verified"]
    assert_same_file(tmp_path / "inline.raw", d.path)
    assert_same_file(tmp_path / "readback.raw", d.path)
    (tmp_path / "over.raw").write_bytes(np.random.default_rng(1).bytes(7 * MiB))
    c = vmbak.restore(repo, "v:latest", tmp_path / "over.raw", overwrite=True, readback=True)
    assert c["verified"]
    with open(tmp_path / "over.raw", "rb") as f:
        assert f.read(d.size) == open(d.path, "rb").read()
