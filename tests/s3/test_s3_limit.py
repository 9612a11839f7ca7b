"""Bandwidth limits on S3 ($VMBAK_S3_LIMIT_UPLOAD / _DOWNLOAD, KiB/s; the server's
repositories.NAME.s3_limit_upload / s3_limit_download): a backup's upload and a restore's
download take at least bytes / limit, and the result is still exact."""

from __future__ import annotations

import threading
import time

from vmbak.repo.s3 import Throttle

MiB = 1 << 20


def test_throttle_caps_the_rate_over_threads() -> None:
    t = Throttle(4 * MiB)  # 4 MiB/s shared by 4 threads sending 8 × 256 KiB each: 8 MiB, >= 2 s
    start = time.monotonic()

    def send() -> None:
        for _ in range(8):
            t.take(256 * 1024)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 6.0, elapsed
    assert Throttle(0).take(10 * MiB) == 0.0  # 0: no limit


def test_upload_and_download_limits(make_s3_repo, make_disk, tmp_path, assert_same_file) -> None:
    repo = make_s3_repo(pack_size=1 * MiB)
    disk = make_disk("web.raw", 3 * MiB, seed=21)  # random: incompressible, ~3 MiB to upload
    limit_kib = 512  # 0.5 MiB/s: ~3 MiB take 6 s or more
    other = make_disk("db.raw", 3 * MiB, seed=22)
    t0 = time.monotonic()
    repo.backup(other, "db")  # no limit: the same amount goes up well under that
    free = time.monotonic() - t0
    t0 = time.monotonic()
    snap = repo.backup(disk, "web", env={"VMBAK_S3_LIMIT_UPLOAD": str(limit_kib)})
    took = time.monotonic() - t0
    stored = snap["stats"]["new_stored_bytes"]
    assert stored >= 3 * MiB
    assert took >= stored / (limit_kib * 1024) > free, (took, stored, free)
    # a restore with a download limit: at least the stored bytes at that rate, and exact
    out = tmp_path / "out.raw"
    t0 = time.monotonic()
    repo.restore("web:latest", out, env={"VMBAK_S3_LIMIT_DOWNLOAD": str(limit_kib)})
    took = time.monotonic() - t0
    assert took >= 3 * MiB / (limit_kib * 1024), took
    assert_same_file(out, disk.path)
    bad = repo.run("snapshots", env={"VMBAK_S3_LIMIT_UPLOAD": "fast"}, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "VMBAK_S3_LIMIT_UPLOAD must be a number" in bad.stderr, bad.stderr
