"""scripts/ceph-rgw.sh starts its cluster on a nearly full disk.

A CI run's `make test-ceph` stopped at once with exit code 28: ceph-mon refuses to start
(ENOSPC) when the file system holding its data has under 5% free, and that machine's shared
disk was that full. The cluster keeps its objects in RAM (memstore), so the script switches
the check off. Here the cluster's directory sits on a 400 MiB tmpfs with 4% free.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path


def test_the_cluster_starts_with_four_percent_free_on_its_disk(
        tmp_path: Path, ceph_script: tuple[str, Callable[[str], dict[str, str]]]) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400M", "tmpfs", str(mnt)], check=True)
    script, cluster_env = ceph_script
    env = cluster_env(str(mnt / "ceph"))
    try:
        subprocess.run(["fallocate", "-l", "384M", str(mnt / "fill")], check=True)
        usage = shutil.disk_usage(mnt)
        assert usage.free / usage.total < 0.05
        p = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"exit {p.returncode}:\n{p.stderr[-2000:]}"
        s = subprocess.run(["ceph", "-c", str(mnt / "ceph" / "ceph.conf"), "osd", "stat"],
                           capture_output=True, text=True, timeout=120)
        assert "1 up" in s.stdout
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # lazy: a daemon slow to exit cannot keep it busy
