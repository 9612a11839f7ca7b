"""vmbak extract writes each file under a temporary name and renames it into place once
whole: an interrupted extract (SIGINT, SIGTERM, kill -9) or a full target never leaves a
partial file under the real name, a stale temporary file is removed by the next run, and a
file that exists but differs is replaced (an identical one is left as it is)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import build_fs, run

MiB = 1 << 20
BIG = 40 * MiB + 4321
PARTIAL = ".big.bin.vmbak-partial"


@pytest.fixture(scope="module")
def big_backup(tmp_path_factory, init_repo):
    d = tmp_path_factory.mktemp("atomic")
    repo = init_repo(d / "repo")
    files = {"big.bin": np.random.default_rng(5).bytes(BIG), "small.txt": b"small\n"}
    img = build_fs("ext4", d / "big.img", 56 * MiB, files)
    sid = repo.backup(img, "big")["id"]
    return repo, sid, files


def _stop_midway(p: subprocess.Popen[str], partial: Path, final: Path) -> None:
    """Wait until the extract has written part of the file, then SIGSTOP it there."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if partial.stat().st_size > 0:
                p.send_signal(signal.SIGSTOP)
                size = partial.stat().st_size
                assert 0 < size < BIG, "the extract should be caught mid-way"
                assert not final.exists(), "the file appeared under its name before it was whole"
                return
        except FileNotFoundError:
            pass
        assert p.poll() is None, f"the extract ended before it could be interrupted: {p.communicate()}"
        time.sleep(0.001)
    raise AssertionError("no partial file appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_extract_leaves_no_partial_file(big_backup, popen_vmbak, tmp_path, sig):
    repo, sid, files = big_backup
    target = tmp_path / "out"
    target.mkdir()
    p = popen_vmbak("extract", sid, "/disk/big.bin", "--target", target, env=repo.env())
    _stop_midway(p, target / PARTIAL, target / "big.bin")
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, (out, err)  # as vmbak.interrupts reports every signal
    want = "vmbak: error: interrupted" + ("" if sig == signal.SIGINT else f" ({signal.Signals(sig).name})")
    assert err.strip() == want and "Traceback" not in err
    assert os.listdir(target) == [], "an interrupted extract left a file behind"


def test_killed_extract_is_completed_by_the_next_run(big_backup, popen_vmbak, tmp_path):
    repo, sid, files = big_backup
    target = tmp_path / "out"
    target.mkdir()
    p = popen_vmbak("extract", sid, "/disk/big.bin", "--target", target, env=repo.env())
    _stop_midway(p, target / PARTIAL, target / "big.bin")
    p.kill()
    p.communicate(timeout=30)
    assert os.listdir(target) == [PARTIAL]  # kill -9 cannot clean up; the real name is untouched
    r = repo.json("extract", sid, "/disk/big.bin", "--target", target)
    assert r["files"] == 1 and r["skipped"] == [] and r["errors"] == []
    assert os.listdir(target) == ["big.bin"], "the stale partial file was not removed"
    assert (target / "big.bin").read_bytes() == files["big.bin"]


def test_existing_truncated_file_is_replaced_not_skipped(big_backup, tmp_path):
    """What the old extract left after a Ctrl-C: a truncated file under the real name. The
    next run must not call it done."""
    repo, sid, files = big_backup
    target = tmp_path / "out"
    target.mkdir()
    (target / "big.bin").write_bytes(files["big.bin"][:BIG // 3])
    (target / "small.txt").write_bytes(b"small\n")
    r = repo.json("extract", sid, "/disk/big.bin", "/disk/small.txt", "--target", target)
    assert r["skipped"] == [] and r["updated"] == 1 and r["unchanged"] == 1 and r["files"] == 1
    assert (target / "big.bin").read_bytes() == files["big.bin"]
    # same size, one byte different in the middle: replaced too
    data = bytearray(files["big.bin"])
    data[BIG // 2] ^= 1
    (target / "big.bin").write_bytes(bytes(data))
    r = repo.json("extract", sid, "/disk/big.bin", "--target", target)
    assert r["updated"] == 1 and r["unchanged"] == 0
    assert (target / "big.bin").read_bytes() == files["big.bin"]
    text = repo.run("extract", sid, "/disk/big.bin", "--target", target).stdout
    assert "1 unchanged" in text and "skipped" not in text
    assert sorted(os.listdir(target)) == ["big.bin", "small.txt"]


def test_extract_into_a_full_filesystem(big_backup, tmp_path, assert_cli_error):
    repo, sid, files = big_backup
    target = tmp_path / "tiny"
    target.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", target)
    try:
        p = repo.run("extract", sid, "/disk/big.bin", "--target", target, check=False)
        assert_cli_error(p, "big.bin", "no space left on device")
        assert os.listdir(target) == [], "a partial file was left on the full filesystem"
        # an older copy under the real name survives a failed update untouched
        (target / "big.bin").write_bytes(b"older copy\n")
        p = repo.run("extract", sid, "/disk/big.bin", "--target", target, check=False)
        assert_cli_error(p, "big.bin", "no space left on device")
        assert (target / "big.bin").read_bytes() == b"older copy\n"
        # a whole directory: the error stops the extract, nothing partial anywhere
        p = repo.run("extract", sid, "/disk", "--target", target, check=False)
        assert_cli_error(p, "/disk/big.bin", "no space left on device")
        assert not (target / "disk" / "big.bin").exists()
        assert not any(n.endswith(".vmbak-partial") for _d, _s, names in os.walk(target) for n in names)
    finally:
        run("umount", target)
