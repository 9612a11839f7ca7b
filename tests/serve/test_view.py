"""The random-access snapshot view: any snapshot of a chain reads as the disk did at that
point, byte for byte, fetching only the chunks a read needs, with a bounded cache."""

from __future__ import annotations

import concurrent.futures as cf
import os

import numpy as np
import pytest

import vmbak
from vmbak.engine.view import SnapshotView

BLOCK = 64 * 1024
MiB = 1 << 20


@pytest.fixture(scope="module")
def chain(tmp_path_factory, new_disk):
    """A full, three incrementals, a differential and an incremental on it; returns
    (repo, [(manifest, content)])."""
    d = tmp_path_factory.mktemp("view")
    repo = vmbak.Repository.init(os.fspath(d / "repo"), None, encryption="none")
    size = 9 * MiB + 3 * 4096 + 100  # partial last block
    disk = new_disk(d, "chain.raw", size, seed=41)
    disk.write_zeros(20 * BLOCK, 6 * BLOCK)
    disk.punch_hole(50 * BLOCK, 4 * BLOCK)
    out = []

    def snap(mode: str = "auto") -> None:
        out.append((vmbak.backup(repo, disk.path, name="v", mode=mode), disk.read()))

    snap()
    for k, (a, b) in enumerate([(2, 30), (10, 40), (25, 60)]):
        for blk in range(a, b, 3):
            disk.write_random(blk * BLOCK + 11, BLOCK - 11, seed=1000 * k + blk)
        disk.write_zeros((a + 1) * BLOCK, 2 * BLOCK)
        disk.write_random(size - 50, 50, seed=77 + k)
        snap()
    disk.write_random(45 * BLOCK, 10 * BLOCK, seed=4242)
    snap("differential")
    disk.write_zeros(46 * BLOCK, 2 * BLOCK)
    disk.punch_hole(100 * BLOCK, 8 * BLOCK)
    snap()
    assert [m.kind for m, _ in out] == ["full", "incremental", "incremental", "incremental",
                                       "differential", "incremental"]
    assert len(repo.chain(out[3][0])) == 4
    return repo, out


def test_every_snapshot_reads_back_exactly(chain):
    repo, versions = chain
    rng = np.random.default_rng(5)
    for m, content in versions:
        view = SnapshotView(repo, m)
        assert view.size == len(content)
        assert view.pread(len(content) + 999, 0) == content
        for _ in range(200):
            off = int(rng.integers(0, len(content)))
            ln = int(rng.integers(0, 3 * BLOCK))
            assert view.pread(ln, off) == content[off:off + ln], (m.kind, off, ln)
        assert view.pread(10, len(content)) == b""
        f = view.open()
        f.seek(-100, os.SEEK_END)
        assert f.read() == content[-100:]
        f.seek(5 * BLOCK + 3)
        assert f.read(7) == content[5 * BLOCK + 3:5 * BLOCK + 10] and f.tell() == 5 * BLOCK + 10


def test_allocation_map_holes_read_as_zeros_and_data_is_covered(chain):
    repo, versions = chain
    for m, content in versions:
        view = SnapshotView(repo, m)
        ext = view.extents(0, view.size)
        assert ext[0][0] == 0 and sum(n for _, n, _ in ext) == view.size
        pos = 0
        for o, n, data in ext:
            assert o == pos
            pos += n
            if not data:
                assert content[o:o + n] == bytes(n), f"a hole at {o} holds data"
        covered = np.zeros(len(content), bool)
        for o, n in view.data_extents():
            covered[o:o + n] = True
        arr = np.frombuffer(content, np.uint8)
        assert not (arr.astype(bool) & ~covered).any(), "non-zero bytes outside the data extents"
        assert any(not d for _, _, d in ext), "the zero blocks and holes must show as holes"
        # a sub-range query is the clipped full map
        sub = view.extents(3 * BLOCK + 5, 40 * BLOCK)
        assert sub[0][0] == 3 * BLOCK + 5 and sum(n for _, n, _ in sub) == 40 * BLOCK


def test_reads_fetch_only_the_needed_chunks_and_the_cache_is_bounded(chain):
    repo, versions = chain
    m, content = versions[3]
    view = SnapshotView(repo, m, cache_bytes=2 * MiB)
    assert view.pread(100, 5 * MiB + 7) == content[5 * MiB + 7:5 * MiB + 107]
    st = view.stats()
    assert st["fetched_chunks"] <= 2 and st["cache_misses"] == st["fetched_chunks"]
    view.pread(100, 5 * MiB + 7)
    assert view.stats()["fetched_chunks"] == st["fetched_chunks"] and view.stats()["cache_hits"] >= 1
    assert view.pread(view.size, 0) == content
    st = view.stats()
    assert st["cached_bytes"] <= 2 * MiB
    assert st["fetched_chunks"] > 4
    # no cache at all still reads correctly
    view0 = SnapshotView(repo, m, cache_bytes=0)
    assert view0.pread(3 * MiB, 2 * MiB) == content[2 * MiB:5 * MiB]
    assert view0.stats()["cached_bytes"] == 0


def test_concurrent_readers_all_get_correct_data(chain):
    repo, versions = chain
    m, content = versions[-1]
    view = SnapshotView(repo, m, cache_bytes=3 * MiB)

    def reader(seed: int) -> int:
        rng = np.random.default_rng(seed)
        bad = 0
        for _ in range(150):
            off = int(rng.integers(0, len(content)))
            ln = int(rng.integers(1, 2 * MiB))
            if view.pread(ln, off) != content[off:off + ln]:
                bad += 1
        return bad

    with cf.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(reader, range(8))) == 0
    assert view.stats()["cached_bytes"] <= 3 * MiB


def test_view_matches_restore_for_unused_blocks(make_ext4, debugfs, tmp_path):
    """Blocks an ext4 filesystem frees between backups (newly unused) read as zeros, just
    as the restore writes them."""
    repo = vmbak.Repository.init(os.fspath(tmp_path / "r"), None, encryption="none")
    img, _ = make_ext4("u.img", 24 * MiB)
    vmbak.backup(repo, img.path, name="u")
    debugfs(img.path, "rm /data/random-1.bin", write=True)
    m = vmbak.backup(repo, img.path, name="u")
    assert m.kind == "incremental" and m.newly_unused is not None and m.newly_unused.any()
    out = tmp_path / "u.raw"
    vmbak.restore(repo, m, os.fspath(out))
    view = SnapshotView(repo, m)
    assert view.pread(view.size, 0) == out.read_bytes()
