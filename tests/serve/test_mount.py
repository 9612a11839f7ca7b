"""vmbak mount: a snapshot's disk as a read-only file on a real FUSE mount."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import vmbak

from .conftest import run

MiB = 1 << 20


def _env(repo) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update({k: v for k, v in repo.env().items() if v is not None})
    return env


def _wait_unmounted(mp: str, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not os.path.ismount(mp):
            return True
        time.sleep(0.05)
    return False


def test_mount_shows_the_disk_and_unmounts_cleanly(repo, make_disk, tmp_path, assert_cli_error):
    disk = make_disk("m.raw", 24 * MiB + 4096, seed=11)
    disk.punch_hole(4 * MiB, 8 * MiB)
    lib = repo.open()
    vmbak.backup(lib, disk.path, name="vm")
    disk.write_random(MiB, 3 * MiB, seed=12)
    m2 = vmbak.backup(lib, disk.path, name="vm")
    assert m2.kind == "incremental"
    want = disk.read()
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "vmbak.cli.main", "mount", "vm:latest", mp, "--json"],
                         env=_env(repo), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        info = json.loads(p.stdout.readline())
        assert info["mountpoint"] == str(mp) and os.path.ismount(mp)
        assert sorted(os.listdir(mp)) == ["files", "vm.raw"]
        # random bytes hold no filesystem: the volume is listed, reading into it is EIO
        assert os.listdir(mp / "files") == ["disk"]
        try:
            os.listdir(mp / "files" / "disk")
            raise AssertionError("a disk without a filesystem has no file tree")
        except OSError as e:
            assert e.errno == errno.EIO
        f = mp / "vm.raw"
        st = f.stat()
        assert st.st_size == len(want) and st.st_mode & 0o777 == 0o444
        assert st.st_blocks * 512 < len(want)  # the hole is not counted as data
        run("cmp", f, disk.path)

        def reader(seed: int) -> bool:
            import numpy as np

            rng = np.random.default_rng(seed)
            with open(f, "rb", buffering=0) as fh:
                for _ in range(40):
                    off = int(rng.integers(0, len(want)))
                    n = int(rng.integers(1, 300_000))
                    fh.seek(off)
                    if fh.read(n) != want[off:off + n]:
                        return False
            return True

        with cf.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(reader, range(4)))
        try:
            open(f, "r+b").close()  # noqa: SIM115
            raise AssertionError("the mount must be read-only")
        except OSError:
            pass
        # mounting twice is refused in one line
        assert_cli_error(repo.run("mount", "vm:latest", mp, check=False), "already mounted")
        run("fusermount3", "-u", mp)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0 and "Traceback" not in err, err
        assert "vmbak: error:" in err and "/disk" in err, err  # the EIO above, named
        assert not os.path.ismount(mp)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", mp])

    # background mode, stopped by SIGTERM: unmounts by itself
    info = repo.json("mount", "vm:latest", mp, "--background")
    try:
        assert os.path.ismount(mp)
        assert hashlib.sha256((mp / "vm.raw").read_bytes()).digest() == hashlib.sha256(want).digest()
        os.kill(info["pid"], signal.SIGTERM)
        assert _wait_unmounted(str(mp)), "SIGTERM did not unmount"
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{info['pid']}") and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{info['pid']}"), "the mount process did not exit"
    finally:
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", mp])
    assert_cli_error(repo.run("mount", "vm:latest", tmp_path / "nodir", check=False), "not a directory")
