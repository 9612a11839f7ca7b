"""A repository that may only be read: on a read-only file system (a real read-only bind
mount), or read with ``--no-lock``.

Restore, check and copy's source read such a repository: on a read-only file system they
go on without a lock and say so once on stderr; ``check`` says once that it cannot record
the packs it verified. Commands that write to it (backup, prune, forget) stop with one
line that names the read-only file system. ``--no-lock`` reads without writing or
consulting a lock (a restore goes on beside another host's exclusive lock), and never
lets a writing command go without one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbak.repo.backend import host_id

MiB = 1 << 20


@pytest.fixture
def ro_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a writable directory, a read-only bind mount of it)."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    subprocess.run(["mount", "--bind", rw, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
        yield rw, ro
    finally:
        subprocess.run(["umount", ro], check=True)


def _foreign_exclusive_lock(repo_dir: Path) -> Path:
    """A live exclusive lock (this test's own process) as a prune elsewhere would hold."""
    lock = repo_dir / "locks" / ("ab" * 16)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": "2026-12-05T00:00:00Z",
                                "exclusive": True, "purpose": "prune", "hostid": host_id()}))
    return lock


def test_a_repository_on_a_read_only_file_system_restores_checks_and_copies(
        ro_mount, init_repo, make_disk, run_vmbak, assert_cli_error, assert_same_file, json_result, tmp_path):
    rw, ro = ro_mount
    made = init_repo(rw / "repo", "aes-256-gcm", pack_size=MiB)
    disk = make_disk("d.raw", 6 * MiB, seed=41)
    made.backup(disk, "d")
    disk.write_random(MiB, MiB, seed=42)
    made.backup(disk, "d")
    env = {**made.env(), "VMBAK_REPOSITORY": str(ro / "repo")}
    before = sorted(p.relative_to(rw) for p in rw.rglob("*"))

    out = tmp_path / "restored.raw"
    p = run_vmbak("restore", "d:latest", out, env=env)
    assert p.stderr.strip() == f"vmbak: {ro / 'repo'} is on a read-only file system: reading it without a lock"
    assert_same_file(out, disk.path)

    rep = json_result(run_vmbak("check", "--read-data", "--json", env=env).stdout)
    assert rep["errors"] == [] and rep["packs_read"] >= 2, rep
    # one warning however many records the check would have written (one per pack here)
    assert [w for w in rep["warnings"] if "not recorded" in w] == [
        "the packs this check verified are not recorded: the repository is on a read-only file system "
        "(a later check --older-than or --resume does not count them)"], rep["warnings"]
    p = run_vmbak("check", "--read-data", env={**env, "VMBAK_VERIFY_RECORD_PACKS": "1"})
    assert (p.stdout + p.stderr).count("not recorded") == 1, p.stdout + p.stderr

    dst = init_repo(tmp_path / "copy", "none")
    p = run_vmbak("copy", "--from-repo", ro / "repo", env={**dst.env(), "VMBAK_FROM_PASSWORD": made.password})
    assert "read-only file system: reading it without a lock" in p.stderr
    assert len(dst.snapshots()) == 2
    out2 = tmp_path / "from-copy.raw"
    dst.restore("d:latest", out2)
    assert_same_file(out2, disk.path)

    for args, purpose in ((["backup", disk.path, "--name", "d"], "backup"), (["prune"], "prune"),
                          (["forget", "--keep-last", "1"], "forget")):
        assert_cli_error(run_vmbak(*args, env=env, check=False),
                         f"cannot lock the repository for {purpose}: {ro / 'repo'} is on a read-only file system")
    assert sorted(p.relative_to(rw) for p in rw.rglob("*")) == before


def test_no_lock_reads_beside_an_exclusive_lock_and_never_frees_a_writer(
        make_repo, make_disk, run_vmbak, assert_cli_error, assert_same_file, tmp_path):
    repo = make_repo("aes-256-gcm")
    disk = make_disk("d.raw", 4 * MiB, seed=43)
    repo.backup(disk, "d")
    lock = _foreign_exclusive_lock(repo.path)

    out = tmp_path / "r.raw"
    assert_cli_error(repo.run("restore", "d:latest", out, check=False), "repository is locked by pid")
    assert not out.exists()
    p = repo.run("--no-lock", "restore", "d:latest", out)
    assert p.stderr == ""
    assert_same_file(out, disk.path)
    assert repo.json("check", "--read-data", "--no-lock")["errors"] == []
    assert sorted(x.name for x in (repo.path / "locks").iterdir()) == [lock.name]  # nothing written, none removed

    # commands that write lock the repository whatever --no-lock says
    assert_cli_error(repo.run("--no-lock", "backup", disk.path, "--name", "d", check=False),
                     "repository is locked by pid")
    assert_cli_error(repo.run("--no-lock", "prune", check=False), "repository is locked by pid")
    lock.unlink()
    assert len(repo.snapshots()) == 1
