"""--json on every reporting command, an example in every command's --help, progress bars
only on a terminal, and the NAME@TIME forms a user copies from vmbak's own output."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

import pytest

MiB = 1 << 20
COMMANDS = ["init", "backup", "restore", "snapshots", "diff", "check", "stats"]


def test_json_output_of_every_reporting_command(run_vmbak, make_disk, tmp_path, json_result):
    path = tmp_path / "jrepo"
    env = {"VMBAK_PASSWORD": "pw"}

    def j(*args):
        return json_result(run_vmbak("-r", path, *args, "--json", env=env).stdout)

    init = j("init")
    assert init["encryption"] == "aes-256-gcm" and len(init["id"]) == 64
    assert os.path.samefile(init["repository"], path)
    disk = make_disk("j.raw", 2 * MiB, seed=91)
    b1 = j("backup", disk.path, "--name", "j")
    assert b1["type"] == "full" and b1["name"] == "j" and b1["disk_size"] == 2 * MiB
    for key in ("logical_bytes", "read_bytes", "changed_bytes", "new_stored_bytes", "zero_bytes",
                "dedup_bytes", "duration_s"):
        assert key in b1["stats"], key
    disk.write_random(0, 10, seed=1)
    b2 = j("backup", disk.path, "--name", "j")
    snaps = j("snapshots")
    assert [s["id"] for s in snaps] == [b1["id"], b2["id"]]
    assert j("snapshots", "--name", "nobody") == []
    d = j("diff", b1["short_id"], b2["short_id"])
    assert d["extents"] == [{"offset": 0, "length": 65536}]
    r = j("restore", "j:latest", tmp_path / "j.out")
    assert r["verified"] is True and r["chain_length"] == 2 and r["disk_size"] == 2 * MiB
    assert os.path.samefile(r["target"], tmp_path / "j.out")
    c = j("check", "--read-data")
    assert c["ok"] is True and c["snapshots"] == 2 and c["errors"] == []
    st = j("stats")
    assert st["snapshots"] == 2 and st["names"] == ["j"]
    ss = j("stats", b2["short_id"])
    assert ss["snapshot"]["id"] == b2["id"] and "new_stored_bytes" in ss["stats"]
    # The text table keeps its columns aligned whatever the names and types.
    b3 = j("backup", disk.path, "--name", "a-much-longer-disk-name", "--mode", "full")
    lines = run_vmbak("-r", path, "snapshots", env=env).stdout.splitlines()
    assert len(lines) == 5 and lines[-1] == "3 snapshots"
    assert len({ln.index(b["short_id"]) for ln, b in zip(lines[1:4], (b1, b2, b3), strict=True)}) == 1
    types = {ln.index(t) for ln, t in zip(lines[1:4], ("full", "incremental", "full"), strict=True)}
    assert types == {lines[0].index("TYPE")}, lines
    # --json also works before the command (a global option).
    p = run_vmbak("--json", "-r", path, "snapshots", env=env)
    assert len(json.loads(p.stdout)) == 3


def test_failed_check_still_prints_json(repo, make_disk):
    disk = make_disk("fj.raw", MiB, seed=92)
    repo.backup(disk, "fj")
    for pack in repo.pack_files():
        pack.unlink()
    p = repo.run("check", "--json", check=False)
    assert p.returncode == 1
    rep = json.loads(p.stdout.splitlines()[-1])
    assert rep["ok"] is False and rep["errors"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(run_vmbak, command):
    p = run_vmbak(command, "--help")
    assert p.returncode == 0
    assert "example" in p.stdout.lower(), p.stdout
    assert f"vmbak {command}" in p.stdout or (command == "init" and " init" in p.stdout), p.stdout


def test_top_level_help_and_version(run_vmbak):
    p = run_vmbak("--help")
    assert "example" in p.stdout.lower()
    for c in COMMANDS:
        assert c in p.stdout
    assert run_vmbak("--version").stdout.startswith("vmbak ")


def run_tty(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    master, slave = pty.openpty()
    # A real terminal has a size (tqdm draws nothing on a 0-column one).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                           timeout=120)
    finally:
        os.close(slave)
    t.join(5)
    os.close(master)
    return p.returncode, p.stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(repo, make_disk, tmp_path):
    disk = make_disk("p.raw", 32 * MiB, seed=93)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env["VMBAK_REPOSITORY"] = str(repo.path)
    base = [sys.executable, "-m", "vmbak.cli.main"]
    # Not a terminal: no progress output at all.
    p = repo.run("backup", disk.path, "--name", "p")
    assert "\r" not in p.stderr and "B/s" not in p.stderr, repr(p.stderr)
    # A terminal: backup, restore and check draw bars (tqdm writes "label: ...%|").
    disk.write_random(0, 16 * MiB, seed=94)
    for args, label in ((["backup", str(disk.path), "--name", "p"], "backup"),
                        (["restore", "p:latest", str(tmp_path / "p.out")], "restore"),
                        (["check", "--read-data"], "check")):
        rc, out, tty = run_tty(base + args, env)
        assert rc == 0, out + tty
        assert label in tty and "%" in tty, f"no {label} progress bar on the terminal: {tty!r}"
        assert "%|" not in out, "progress goes to stderr, never stdout"
    # --json and -q never draw bars, even on a terminal.
    rc, out, tty = run_tty(base + ["check", "--read-data", "--json"], env)
    assert rc == 0 and json.loads(out.splitlines()[-1])["ok"] and "B/s" not in tty and "%|" not in tty, repr(tty)
    rc, out, tty = run_tty(base + ["-q", "restore", "p:latest", str(tmp_path / "q.out")], env)
    assert rc == 0 and out == "" and "B/s" not in tty and "%|" not in tty, repr(out + tty)


def test_restore_by_time_copied_from_json_listing(repo, make_disk, tmp_path, assert_same_file):
    """`snapshots --json` prints times like 2026-11-22T10:00:05.123456Z; NAME@ that time
    selects that snapshot."""
    disk = make_disk("t.raw", MiB, seed=95)
    s = repo.backup(disk, "t")
    p = repo.run("restore", f"t@{s['time']}", tmp_path / "t.out", check=False)
    assert p.returncode == 0, p.stderr
    assert_same_file(tmp_path / "t.out", disk.path)


def test_restore_by_date_and_minute(repo, make_disk, tmp_path, assert_same_file):
    disk = make_disk("u.raw", MiB, seed=96)
    s = repo.backup(disk, "u")
    for spec in (f"u@{s['time'][:10]}", f"u@{s['time'][:16]}", f"u@{s['time'][:19]}Z",
                 f"u@{s['time'][:10]} {s['time'][11:19]}"):
        out = tmp_path / "u.out"
        repo.restore(spec, out)
        assert_same_file(out, disk.path)
        out.unlink()


def test_counts_take_the_noun_in_their_number(make_repo, make_disk) -> None:
    """One snapshot, one pack, one key: "1 snapshot", not "1 snapshots"."""
    repo = make_repo("aes-256-gcm")
    disk = make_disk("one.raw", 64 * 1024, seed=4)
    repo.backup(disk, "one")
    assert repo.run("snapshots").stdout.splitlines()[-1] == "1 snapshot"
    first = repo.run("check", "--read-data").stdout.splitlines()
    assert re.fullmatch(r"1 snapshot, 1 pack, \d+ chunks", first[0]), first
    assert first[1].startswith("read and verified 1 pack, ") and "; 0 packs not read" in first[1], first
    assert repo.run("key", "list").stdout.splitlines()[-1].startswith("1 key (")
    stats = repo.run("stats").stdout.splitlines()
    assert re.fullmatch(r"stored: +[\d.]+ \w+ in 1 pack", stats[3]), stats
    repo.backup(disk, "one")
    assert repo.run("snapshots").stdout.splitlines()[-1] == "2 snapshots"


def test_no_snapshots_is_one_line(make_repo, make_disk) -> None:
    """No table header over no rows: an empty repository, or a filter that matches none."""
    repo = make_repo("none")
    assert repo.run("snapshots").stdout == "0 snapshots\n"
    repo.backup(make_disk("a.raw", 64 * 1024, seed=6), "a")
    assert repo.run("snapshots", "--name", "other").stdout == "0 snapshots\n"
    assert repo.run("snapshots").stdout.splitlines()[0].startswith("ID ")


def test_stats_of_nothing_stored_has_no_ratios(make_repo, make_disk) -> None:
    """An empty repository, an empty disk: "-" where a ratio has nothing to divide, no "-x",
    no empty list of names."""
    repo = make_repo("none")
    lines = repo.run("stats").stdout.splitlines()
    assert lines[0] == "snapshots:        0", lines
    assert lines[1:] == ["logical size:     0 B (sum of all snapshots' disks)", "unique data:      0 B in 0 chunks",
                         "stored:           0 B in 0 packs", "compression:      -", "deduplication:    -",
                         "logical / stored: -"], lines
    repo.backup(make_disk("empty.raw", 0, seed=5), "empty")
    assert "  compression:    -" in repo.run("stats", "empty:latest").stdout.splitlines()
