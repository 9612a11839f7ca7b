"""The chain restore writes every block exactly once (newest manifest first, with an
"unrestored" bitmap). A RestoreTarget subclass counts the writes per block."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import vmbak
from vmbak.engine.restore import RestoreTarget

BLOCK = 64 * 1024
MiB = 1 << 20


class CountingTarget(RestoreTarget):
    """The real restore target, counting the data writes and zero writes of every block."""

    def __init__(self, path: str, size: int, overwrite: bool = False) -> None:
        super().__init__(path, size, overwrite)
        n = (size + BLOCK - 1) // BLOCK
        self.data_writes = np.zeros(n, np.int64)
        self.zero_writes = np.zeros(n, np.int64)
        self.misaligned: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def _count(self, counts: np.ndarray, kind: str, offset: int, length: int) -> None:
        end = offset + length
        if offset % BLOCK or (end % BLOCK and end != self.size) or length <= 0 or end > self.size:
            self.misaligned.append((kind, offset, length))
        with self._lock:
            counts[offset // BLOCK:(end + BLOCK - 1) // BLOCK] += 1

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._count(self.data_writes, "write", offset, len(data))
        super().write(offset, data)

    def write_zeros(self, offset: int, length: int) -> None:
        self._count(self.zero_writes, "write_zeros", offset, length)
        super().write_zeros(offset, length)


def _nonzero_blocks(content: bytes) -> np.ndarray:
    n = (len(content) + BLOCK - 1) // BLOCK
    return np.array([content[i * BLOCK:(i + 1) * BLOCK].count(0) != len(content[i * BLOCK:(i + 1) * BLOCK])
                     for i in range(n)], bool)


@pytest.fixture
def chain(tmp_path, make_disk):
    """A full, four incrementals with overlapping changes, a differential and one more
    incremental on top of it; returns (repo, disk size, [(manifest, content)])."""
    repo = vmbak.Repository.init(os.fspath(tmp_path / "lib-repo"), None, encryption="none")
    size = 6 * MiB + 3 * 4096 + 100  # partial last block
    disk = make_disk("chain.raw", size, seed=31)
    disk.write_zeros(20 * BLOCK, 6 * BLOCK)
    disk.punch_hole(50 * BLOCK, 4 * BLOCK)
    rng = np.random.default_rng(2024)
    versions = []

    def snap(mode: str = "auto") -> None:
        m = vmbak.backup(repo, disk.path, name="chain", mode=mode)
        versions.append((m, disk.read()))

    snap()
    nblocks = (size + BLOCK - 1) // BLOCK
    # Each incremental rewrites an overlapping window of blocks, zeroes some, refills others.
    windows = [(2, 30), (10, 40), (25, 60), (0, 12)]
    for k, (a, b) in enumerate(windows):
        for blk in range(a, b, 3):
            disk.write_random(blk * BLOCK, BLOCK, seed=1000 * k + blk)
        disk.write_zeros((a + 1) * BLOCK, 2 * BLOCK)
        disk.write_random(size - 50, 50, seed=77 + k)  # the partial last block, every time
        blk = int(rng.integers(60, nblocks - 1))
        disk.write_random(blk * BLOCK + 17, 33, seed=500 + k)
        snap()
    disk.write_random(45 * BLOCK, 10 * BLOCK, seed=4242)
    snap("differential")
    disk.write_zeros(46 * BLOCK, 2 * BLOCK)
    disk.write_random(3 * BLOCK, 2 * BLOCK, seed=4343)
    snap()
    kinds = [m.kind for m, _ in versions]
    assert kinds == ["full"] + ["incremental"] * 4 + ["differential", "incremental"]
    assert len(repo.chain(versions[4][0])) == 5 and len(repo.chain(versions[6][0])) == 3
    return repo, size, versions


def test_chain_restore_into_new_file_writes_each_data_block_once(chain, tmp_path):
    repo, size, versions = chain
    for i, (m, content) in enumerate(versions):
        path = os.fspath(tmp_path / f"new-{i}.raw")
        tgt = CountingTarget(path, size)
        try:
            r = vmbak.restore(repo, m, tgt)
        finally:
            tgt.close()
        assert r["verified"] is True
        assert not tgt.misaligned, tgt.misaligned
        data = _nonzero_blocks(content)
        assert tgt.data_writes.max() <= 1, f"snapshot {i}: blocks written twice: " \
            f"{np.flatnonzero(tgt.data_writes > 1).tolist()}"
        assert (tgt.data_writes[data] == 1).all(), f"snapshot {i}: data blocks not written: " \
            f"{np.flatnonzero(data & (tgt.data_writes != 1)).tolist()}"
        assert (tgt.data_writes[~data] == 0).all(), "zero blocks of a new file stay holes"
        assert tgt.zero_writes.sum() == 0
        with open(path, "rb") as f:
            assert f.read() == content, f"snapshot {i} ({m.kind}) restored wrongly"
        assert not os.path.exists(os.path.join(tmp_path, f".new-{i}.raw.vmbak-partial"))


def test_chain_restore_over_existing_file_writes_every_block_once(chain, tmp_path, random_bytes):
    repo, size, versions = chain
    for i, (m, content) in enumerate(versions):
        path = os.fspath(tmp_path / f"old-{i}.raw")
        with open(path, "wb") as f:
            f.write(random_bytes(size, 900 + i))  # garbage everywhere, zeros must be written
        tgt = CountingTarget(path, size, overwrite=True)
        try:
            r = vmbak.restore(repo, m, tgt, overwrite=True)
        finally:
            tgt.close()
        assert r["verified"] is True
        assert not tgt.misaligned, tgt.misaligned
        data = _nonzero_blocks(content)
        total = tgt.data_writes + tgt.zero_writes
        assert (total == 1).all(), f"snapshot {i}: blocks not written exactly once: " \
            f"{np.flatnonzero(total != 1).tolist()}"
        assert (tgt.data_writes[data] == 1).all()
        assert (tgt.zero_writes[~data] == 1).all()
        with open(path, "rb") as f:
            assert f.read() == content, f"snapshot {i} ({m.kind}) restored wrongly"
