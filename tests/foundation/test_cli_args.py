"""Issue 13: the command line's arguments and what it says.

* positional arguments may follow options, in every command;
* restore writes over a block device only with --overwrite, and says what is on it;
* deduplication is 1.0x when nothing is duplicated; copy names the source's password
  settings; a too short id prefix says that 4 digits are the minimum; the progress rate's
  unit is the one it divides by; one size parser for every size option; -n is --dry-run only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vmbak.cli.main import build_parser

MiB = 1 << 20


@contextlib.contextmanager
def loop_device(path: os.PathLike[str]) -> Iterator[str]:
    dev = subprocess.run(["losetup", "-f", "--show", os.fspath(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


# ---------------------------------------------------------------------------- defect 3
def test_positionals_after_options(repo, make_repo, make_ext4, tmp_path, assert_same_file) -> None:
    disk, _files = make_ext4("p.img", 8 * MiB, seed=3)
    snap = repo.backup(disk, "p", "--no-skip-unused")  # restores byte for byte
    r = repo.json("restore", "p:latest", "--no-verify", tmp_path / "r.img")  # was "unrecognized arguments"
    assert r["format"] == "raw"
    assert_same_file(tmp_path / "r.img", disk.path)
    assert repo.json("diff", "p:latest", "--json", snap["id"])["changed_blocks"] == 0
    assert repo.json("ls", "p:latest", "--json", "/disk"), "ls listed nothing"
    other = make_repo(name="other")
    rep = repo.json("copy", "--from-repo", repo.path, "p:latest", "--to-repo", other.path)
    assert [c["source"] for c in rep["copied"]] == [snap["id"]]
    args = build_parser().parse_args(["forget", "web:latest", "--keep-last", "1", "3f2a9c1e", "-n"])
    assert args.snapshots == ["web:latest", "3f2a9c1e"] and args.dry_run


# ---------------------------------------------------------------------------- defect 4
def test_restore_over_a_device_needs_overwrite(repo, make_disk, tmp_path, assert_cli_error) -> None:
    """A loop device holding a GPT disk with ext4: refused without --overwrite (saying its
    size and what is on it), written with it."""
    dev_file = tmp_path / "dev.img"
    with open(dev_file, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["sfdisk", "-q", dev_file], input="label: gpt\nstart=2048, size=24576\n", text=True,
                   check=True)
    fs = tmp_path / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(12 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "precious", fs], check=True)
    with open(dev_file, "r+b") as f:
        f.seek(MiB)
        f.write(fs.read_bytes())
    before = dev_file.read_bytes()
    disk = make_disk("d.raw", 4 * MiB, seed=4)
    repo.backup(disk, "d")
    with loop_device(dev_file) as dev:
        line = assert_cli_error(repo.run("restore", "d:latest", dev, check=False),
                                "block device", "--overwrite", "16.0 MiB", "gpt", "ext4", '"precious"')
        assert dev in line
        assert dev_file.read_bytes() == before, "the device was written without --overwrite"
        assert_cli_error(repo.run("restore", "d:latest", dev, "--format", "qcow2", check=False),
                         "only be restored to a file")
        r = repo.json("restore", "d:latest", dev, "--overwrite")
        assert r["verified"]
    assert dev_file.read_bytes()[:4 * MiB] == disk.read()


def test_api_restore_over_a_device_needs_overwrite(repo, make_disk, tmp_path) -> None:
    import vmbak
    from vmbak.errors import DiskError

    dev_file = tmp_path / "dev.img"
    dev_file.write_bytes(b"\xaa" * 4 * MiB)
    disk = make_disk("d.raw", 4 * MiB, seed=5)
    repo.backup(disk, "d")
    r = repo.open()
    with loop_device(dev_file) as dev:
        with pytest.raises(DiskError, match="block device.*4.0 MiB.*overwrite"):
            vmbak.restore(r, "d:latest", dev)
        assert dev_file.read_bytes() == b"\xaa" * 4 * MiB
        vmbak.restore(r, "d:latest", dev, overwrite=True)
    assert dev_file.read_bytes() == disk.read()


# ---------------------------------------------------------------------------- defect 9
@pytest.mark.parametrize("size", [64 * MiB, 64 * MiB + 1000])
def test_deduplication_is_one_without_duplicates(repo, make_disk, size: int) -> None:
    """A mostly empty disk: its block hash table (16 bytes for every block) is not data."""
    disk = make_disk("u.raw", size, seed=6, fill="sparse")
    disk.write_random(8 * MiB, MiB, seed=6)
    disk.write_random(size - 1000, 1000, seed=7)
    repo.backup(disk, "u")
    assert repo.stats()["dedup_ratio"] == 1.0
    assert repo.stats("u:latest")["stats"]["dedup_ratio"] == 1.0
    assert re.search(r"deduplication:\s+1\.0x", repo.run("stats").stdout)
    repo.backup(disk, "v")  # the same data again, under another name: stored once
    assert repo.stats()["dedup_ratio"] == 2.0


def test_copy_names_the_source_password(make_repo, make_disk, assert_cli_error) -> None:
    src = make_repo("aes-256-gcm", name="src", password="source-pw")
    dst = make_repo("aes-256-gcm", name="dst", password="dest-pw")
    src.backup(make_disk("c.raw", MiB, seed=7), "c")
    p = dst.run("copy", "--from-repo", src.path, check=False)  # VMBAK_PASSWORD is the destination's
    line = assert_cli_error(p, "source", "VMBAK_FROM_PASSWORD", "--from-password-file")
    assert not re.search(r"\bVMBAK_PASSWORD\b", line), line
    rep = dst.json("copy", "--from-repo", src.path, env={"VMBAK_FROM_PASSWORD": "source-pw"})
    assert len(rep["copied"]) == 1


def test_copy_names_each_snapshot_once(make_repo, make_disk) -> None:
    """Each snapshot copied is named once, as it lands (it was named again in the summary)."""
    src = make_repo(name="src")
    disk = make_disk("c.raw", MiB, seed=7)
    ids = [src.backup(disk, "c")["id"], src.backup(disk, "c")["id"]]
    dst = make_repo(name="dst")
    p = dst.run("copy", "--from-repo", src.path)
    both = p.stdout + p.stderr
    for sid in ids:
        assert both.count(sid[:8]) == 1, both
    assert "2 snapshots copied, 0 already present" in p.stdout, p.stdout
    p = dst.run("copy", "--from-repo", src.path)
    assert all(f"already present: {sid[:8]}" in p.stdout for sid in ids), p.stdout
    assert "0 snapshots copied, 2 already present" in p.stdout, p.stdout


def test_short_id_prefix_says_four_digits(repo, make_disk, tmp_path, assert_cli_error) -> None:
    m = repo.backup(make_disk("s.raw", MiB, seed=8), "s")
    for n in (2, 3):
        assert_cli_error(repo.run("restore", m["id"][:n], tmp_path / "x.raw", check=False),
                         "no snapshot matches", "at least 4 hex digits")
    line = assert_cli_error(repo.run("restore", "zz", tmp_path / "x.raw", check=False), "no snapshot matches")
    assert "digits" not in line  # not an id prefix at all
    assert repo.json("restore", m["id"][:4], tmp_path / "x.raw")["snapshot"] == m["id"]


def test_progress_rate_unit_matches_its_divisor() -> None:
    """The bar divides by 1024 and says MiB/s (vmbak prints binary units everywhere)."""
    code = r"""
import os, pty, sys, time, fcntl, termios, struct
master, slave = pty.openpty()
fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
sys.stderr = os.fdopen(slave, "w")
from vmbak.engine.progress import BarProgress
b = BarProgress()
b.start(8 << 20, "backup")
for i in range(4):
    time.sleep(0.12)
    b.advance(2 << 20)
sys.stderr.flush()
os.set_blocking(master, False)
out = b""
while True:
    try:
        out += os.read(master, 65536)
    except BlockingIOError:
        break
b.close()
print(out.decode())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "6.0 MiB/8.0 MiB" in out, out
    rates = [float(x) for x in re.findall(r" ([0-9.]+) MiB/s", out)]
    # 2 MiB per >= 0.12 s: at most 16.7 MiB/s (the same rate in MB/s would be 17.5)
    assert rates and all(0.5 < r <= 16.7 for r in rates), out
    assert "MB/s" not in out and "kB" not in out, out


def test_one_size_parser(repo, make_disk, run_vmbak) -> None:
    disk = make_disk("b.raw", 2 * MiB, seed=9)
    m = repo.backup(disk, "b", "--block-size", "64K")  # track start took 64K, backup did not
    assert m["block_size"] == 65536
    m = repo.backup(disk, "b2", "--block-size", "128KiB")
    assert m["block_size"] == 131072
    assert json.loads(run_vmbak("usage", disk.path, "--block-size", "64K", "--json").stdout)["size"] == 2 * MiB


def test_n_means_dry_run_only(repo, assert_cli_error) -> None:
    parser = build_parser()
    for argv in (["forget", "--keep-last", "1", "-n"], ["prune", "-n"], ["merge", "web", "--into-full", "-n"],
                 ["copy", "-n"]):
        assert parser.parse_args(argv).dry_run, argv
    assert parser.parse_args(["track", "log", "sock", "--last", "3"]).last == 3
    p = repo.run("track", "log", "sock", "-n", "3", check=False)
    assert_cli_error(p, "unrecognized arguments: -n", "--help")
    assert p.returncode == 2


def test_usage_errors_are_one_line(run_vmbak, assert_cli_error) -> None:
    assert_cli_error(run_vmbak("restore", check=False), "restore", "required: SNAP", "vmbak restore --help")
    assert_cli_error(run_vmbak("restore", "a", "b", "c", check=False), "unrecognized arguments: c")
    assert_cli_error(run_vmbak("backup", "--mode", "sideways", "x", check=False), "invalid choice")
    assert_cli_error(run_vmbak("nosuchcommand", check=False), "invalid choice", "vmbak --help")


# ---------------------------------------------------------------------------- issue 12: start-up
def test_a_command_builds_only_its_own_group() -> None:
    """`vmbak backup ...` registers (and imports) only the backup group; help, version, an
    unknown or a less common command build the whole parser; both parse alike."""
    from vmbak.cli.main import command_group

    assert command_group(["backup", "--libvirt", "db"]) == "backup"
    assert command_group(["-r", "/backups/repo", "--json", "backup", "x.raw"]) == "backup"
    assert command_group(["--password-file", "snapshots", "restore"]) == "restore"  # a value, then the command
    assert command_group(["--repo=/r", "snapshots"]) == "snapshots"
    for argv in (["--help", "backup"], ["-h"], ["--version"], [], ["-r"], ["nosuch"], ["key", "list"], ["--", "backup"]):
        assert command_group(argv) is None, argv
    # an abbreviated or unknown option before the command: the whole parser reads the line
    # (argparse takes --rep as --repo, so 'backup' is its value and 'snapshots' the command)
    for argv in (["--rep", "backup", "snapshots"], ["--pass", "f", "backup"], ["--jso", "backup"]):
        assert command_group(argv) is None, argv
    assert build_parser().parse_args(["--rep", "backup", "snapshots"]).repo == "backup"
    only = build_parser("backup")
    names = set(only._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == {"backup"}
    argv = ["-r", "/r", "backup", "--libvirt", "db", "--mode", "full", "--freeze", "always", "--json"]
    assert vars(only.parse_args(argv)).keys() == vars(build_parser().parse_args(argv)).keys()
    assert {k: v for k, v in vars(only.parse_args(argv)).items() if k != "func"} == \
        {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "func"}
    # what a backup never needs is not imported by it
    code = ("import sys; from vmbak.cli.main import build_parser, command_group; "
            "build_parser(command_group(['backup', 'x.raw'])); "
            "print(sorted(m for m in ('vmbak.engine.prune', 'vmbak.engine.merge', 'vmbak.engine.check', "
            "'vmbak.engine.copy', 'vmbak.cli.service') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]", out


_THREADS = """
import sys
sys.argv = ["vmbak"]
import vmbak.cli.main
import numpy, os
print(os.environ.get("OPENBLAS_NUM_THREADS"), len(os.listdir("/proc/self/task")))
"""


@pytest.mark.parametrize(("given", "want"), [(None, "1 1"), ("2", "2 2")])
def test_the_command_line_starts_no_openblas_threads(given: str | None, want: str) -> None:
    """vmbak never uses BLAS, and OpenBLAS's threads, started when numpy is imported, cost
    every command about 0.05 s of CPU: the command line keeps them from starting, unless
    the user set OPENBLAS_NUM_THREADS."""
    from tests.conftest import _base_env

    assert (os.cpu_count() or 1) >= 2  # else OpenBLAS starts no thread anyway
    proc = subprocess.run([sys.executable, "-c", _THREADS], env=_base_env({"OPENBLAS_NUM_THREADS": given}),
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.split() == want.split()


@pytest.mark.parametrize(("given", "want"), [(None, "unset"), ("3", "3")])
def test_the_users_scripts_get_the_users_openblas_setting(make_repo, make_disk, run_vmbak, tmp_path,  # noqa: ANN001
                                                          given: str | None, want: str) -> None:
    """OPENBLAS_NUM_THREADS=1 is the command line's own setting: a hook and a password
    command see the variable as the user left it (unset, or the user's value)."""
    repo = make_repo("aes-256-gcm", password="pw")
    disk = make_disk("d.raw", 1 << 20)
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "${{OPENBLAS_NUM_THREADS:-unset}}" > {tmp_path}/hook.out\n')
    hook.chmod(0o755)
    pwcmd = f"sh -c 'echo \"${{OPENBLAS_NUM_THREADS:-unset}}\" > {tmp_path}/pw.out; echo pw'"
    run_vmbak("-r", repo.path, "--password-command", pwcmd, "backup", disk.path, "--name", "d", "--hook-pre", hook,
              env={"OPENBLAS_NUM_THREADS": given})
    assert (tmp_path / "hook.out").read_text().strip() == want
    assert (tmp_path / "pw.out").read_text().strip() == want
