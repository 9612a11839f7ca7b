"""A restore writes the restored data with direct I/O (O_DIRECT): each block is written
once and never read again, so it does not go through the page cache. Only the disk's
last partial page is written buffered. ``VMBAK_RESTORE_BUFFERED=1`` writes everything
through the page cache, with the same result."""

from __future__ import annotations

import os
import subprocess

import pytest

MiB = 1 << 20
PAGE = 4096


def resident_bytes(path: os.PathLike[str]) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", os.fspath(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def direct_io_works(directory: os.PathLike[str]) -> bool:
    probe = os.path.join(directory, "direct-probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        import mmap
        buf = mmap.mmap(-1, PAGE)
        return os.pwrite(fd, buf, 0) == PAGE
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_restore_bypasses_the_page_cache(make_repo, make_disk, tmp_path, assert_same_file, encryption):
    assert direct_io_works(tmp_path), "the test directory's filesystem must accept O_DIRECT"
    repo = make_repo(encryption)
    size = 24 * MiB + 3 * PAGE + 100  # a partial last block and a partial last page
    disk = make_disk("d.raw", size, seed=5)
    disk.write_zeros(4 * MiB, 2 * MiB)
    repo.backup(disk, "d")
    disk.write_random(9 * MiB + 12345, 70000, seed=6)
    disk.write_random(size - 50, 50, seed=7)
    repo.backup(disk, "d")
    out = tmp_path / "out.raw"
    r = repo.restore("d:latest", out)
    assert r["verified"] and r["written_bytes"] == size - 2 * MiB
    # Written directly: nothing of it is cached but the last partial page (and, at most,
    # one page more). Through the page cache all 22 MiB would be (the old code).
    assert resident_bytes(out) <= 2 * PAGE, resident_bytes(out)
    assert_same_file(out, disk.path)

    # Over an existing file, also directly; the zero range is punched or written once.
    with open(out, "r+b") as f:
        f.write(os.urandom(8 * MiB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident_bytes(out) == 0
    repo.restore("d:latest", out, "--overwrite")
    assert resident_bytes(out) <= 2 * PAGE, resident_bytes(out)
    assert_same_file(out, disk.path)


def test_buffered_restore_is_the_same(repo, make_disk, tmp_path, assert_same_file):
    size = 8 * MiB + 100
    disk = make_disk("d.raw", size, seed=8)
    repo.backup(disk, "d")
    out = tmp_path / "out.raw"
    r = repo.json("restore", "d:latest", out, env={"VMBAK_RESTORE_BUFFERED": "1"})
    assert r["verified"]
    assert resident_bytes(out) >= size - PAGE  # through the page cache
    assert_same_file(out, disk.path)
