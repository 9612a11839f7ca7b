"""How a local repository is written (issue 18, items 8 and 13): private modes whatever
the umask, new data/XX directories made durable before a pack lands in them, and a full
disk named in one line with the repository left valid."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .strace_util import strace_calls

MiB = 1 << 20


def _tree_modes(root: Path) -> tuple[set[int], set[int]]:
    files, dirs = set(), {stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files).add(stat.S_IMODE(p.lstat().st_mode))
    return files, dirs


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_repository_is_private_whatever_the_umask(tmp_path, make_disk, run_vmbak, encryption):
    disk = make_disk("u.raw", 2 * MiB, seed=3)
    env = {"VMBAK_REPOSITORY": tmp_path / "repo", "VMBAK_PASSWORD": "pw" if encryption != "none" else None}
    old = os.umask(0o002)  # the most permissive umask in common use
    try:
        run_vmbak("init", "--encryption", encryption, env=env)
        run_vmbak("backup", disk.path, "--name", "u", env=env)
        disk.write_random(0, 70_000, seed=4)
        run_vmbak("backup", disk.path, "--name", "u", env=env)
        run_vmbak("prune", "--grace", "0", env=env)
    finally:
        os.umask(old)
    files, dirs = _tree_modes(tmp_path / "repo")
    assert files == {0o600}, sorted(oct(m) for m in files)
    assert dirs == {0o700}, sorted(oct(m) for m in dirs)


def test_new_data_directory_is_fsynced_before_a_pack_lands(tmp_path, make_repo, make_disk):
    """strace shows: a new data/XX directory is made, then data/ itself is fsynced, and
    only then does any pack land in data/XX, whichever of the pack writers (threads)
    moves it there."""
    repo = make_repo("none", pack_size=256 * 1024)  # several packs, so several data/XX
    disk = make_disk("f.raw", 3 * MiB, seed=5)
    log = tmp_path / "strace.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env["VMBAK_REPOSITORY"] = os.fspath(repo.path)
    subprocess.run(["strace", "-f", "-qq", "-o", log, "-e", "trace=mkdir,mkdirat,openat,fsync,close,rename,renameat,"
                    "renameat2", sys.executable, "-m", "vmbak.cli.main", "backup", disk.path, "--name", "f"],
                   env=env, check=True, capture_output=True, timeout=300)
    data = os.fspath(repo.path / "data")
    # In the log's order (a call that another thread interrupted counts when it ended): a
    # thread's fsync of data/ makes durable every data/XX made before it ended.
    fds_of_data: dict[str, set[str]] = {}  # thread: its open descriptors of data/
    synced: dict[str, bool] = {}  # data/XX made: fsynced into data/ since
    made = 0
    for pid, c in strace_calls(log):
        fds = fds_of_data.setdefault(pid, set())
        m = re.match(r'mkdir(?:at)?\((?:AT_FDCWD, )?"([^"]+)".*= 0', c)
        if m and os.path.dirname(m.group(1)) == data:
            synced[m.group(1)] = False
            made += 1
        m = re.match(rf'openat\(AT_FDCWD, "{re.escape(data)}", O_RDONLY[^)]*O_DIRECTORY.*= (\d+)', c)
        if m:
            fds.add(m.group(1))
        m = re.match(r"fsync\((\d+)\)\s*= 0", c)
        if m and m.group(1) in fds:
            for d in synced:
                synced[d] = True
        m = re.match(r"close\((\d+)\)", c)
        if m:
            fds.discard(m.group(1))
        m = re.match(r'rename(?:at2?)?\(.*"([^"]+)"', c)
        if m and os.path.dirname(m.group(1)) in synced:
            assert synced[os.path.dirname(m.group(1))], f"{m.group(1)} landed before data/ was fsynced"
    assert made >= 2, "the backup made too few data/XX directories to tell"


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


def test_full_disk_is_named_and_leaves_the_repository_valid(small_fs, make_disk, run_vmbak, assert_cli_error):
    env = {"VMBAK_REPOSITORY": small_fs / "repo"}
    run_vmbak("init", "--encryption", "none", env=env)
    small = make_disk("s.raw", MiB // 2, seed=7)
    run_vmbak("backup", small.path, "--name", "s", env=env)
    big = make_disk("b.raw", 8 * MiB, seed=8)  # random: does not compress, does not fit
    p = run_vmbak("-q", "backup", big.path, "--name", "b", env=env, check=False)
    line = assert_cli_error(p, "No space left on device")
    assert os.fspath(small_fs / "repo") in line, line
    snaps = run_vmbak("snapshots", "--json", env=env)
    assert '"b"' not in snaps.stdout and '"s"' in snaps.stdout
    run_vmbak("check", "--read-data", env=env)
    leftovers = [p for p in (small_fs / "repo" / "tmp").iterdir()]
    assert leftovers == [], leftovers


def test_restore_onto_a_full_disk_is_named_and_leaves_nothing(small_fs, repo, make_disk, run_vmbak,
                                                              assert_cli_error):
    """The restored data is written with direct I/O from reused buffers: a full target
    filesystem still gives one line naming it, and the partial file is removed."""
    disk = make_disk("r.raw", 8 * MiB, seed=9)  # random: 8 MiB to write into 3 MiB
    repo.backup(disk, "r")
    p = repo.run("-q", "restore", "r:latest", small_fs / "out.raw", check=False)
    assert_cli_error(p, f"cannot write the restore target {small_fs / 'out.raw'} (at byte ", "No space left on device")
    assert list(small_fs.iterdir()) == []
