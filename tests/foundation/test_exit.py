"""A backup command and ``snapshots`` end their process without the interpreter's teardown
(vmbak.cli.main ``_leave_now``), and lose nothing by it: the output is complete, the exit
status is the command's, atexit handlers run, the snapshot is saved. Any other command, and
a backup that leaves a thread Python would wait for, exits the usual way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import MiB, run_vmbak

# Run as the program (main() with argv None, as ``python -m vmbak.cli.main`` and the vmbak
# script call it). TEARDOWN is printed by a __del__ that only the interpreter's teardown
# runs (a module global of __main__); ATEXIT by an atexit handler.
SCRIPT = """
import atexit, sys, threading
class Witness:
    def __del__(self):
        sys.stdout.write("TEARDOWN\\n")
        sys.stdout.flush()
witness = Witness()
atexit.register(lambda: print("ATEXIT"))
if sys.argv[1] == "thread":  # a non-daemon thread still running when the command ends
    threading.Thread(target=__import__("time").sleep, args=(1.0,)).start()
sys.argv = ["vmbak", *sys.argv[2:]]
from vmbak.cli import main as m
sys.exit(m.main())
"""


def _run(*args: str, env: dict[str, str | None], thread: bool = False) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    e.update({k: v for k, v in env.items() if v is not None})
    e["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", SCRIPT, "thread" if thread else "-", *args], capture_output=True,
                          text=True, timeout=120, env=e)


def test_backup_skips_the_teardown_and_loses_nothing(make_repo, make_disk) -> None:
    repo = make_repo("aes-256-gcm")
    disk = make_disk("d.raw", 4 * MiB, seed=3)
    p = _run("backup", str(disk.path), "--name", "d", "--json", env=repo.env())
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1] == "ATEXIT", p.stdout  # the handlers ran, after the command's output
    assert "TEARDOWN" not in p.stdout  # no teardown
    summary = json.loads([x for x in lines if x.startswith("{")][-1])  # the last line of the command's output
    assert summary["message_type"] == "summary" and summary["name"] == "d", summary
    snaps = json.loads(run_vmbak("snapshots", "--json", env=repo.env()).stdout)
    assert [s["name"] for s in snaps] == ["d"]


def test_a_failed_backup_keeps_its_one_line_error_and_status(make_repo, tmp_path) -> None:
    repo = make_repo("none")
    p = _run("backup", str(tmp_path / "missing.raw"), "--name", "d", env=repo.env())
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert p.stderr.startswith("vmbak: error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "TEARDOWN" not in p.stdout and p.stdout.strip() == "ATEXIT", p.stdout


def test_snapshots_skips_the_teardown_and_lists_everything(make_repo, make_disk) -> None:
    repo = make_repo("aes-256-gcm")
    for k in range(3):
        disk = make_disk(f"s{k}.raw", 1 * MiB, seed=10 + k)
        repo.backup(disk, f"s{k}")
    for extra, check in (([], lambda out: all(f"s{k}" in out for k in range(3)) and "3 snapshots" in out),
                         (["--json"], lambda out: [s["name"] for s in json.loads(out)] == ["s0", "s1", "s2"])):
        p = _run("snapshots", *extra, env=repo.env())
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[-1] == "ATEXIT" and "TEARDOWN" not in p.stdout, p.stdout
        assert check("\n".join(lines[:-1])), p.stdout


def test_other_commands_and_live_threads_exit_the_usual_way(make_repo, make_disk) -> None:
    repo = make_repo("none")
    disk = make_disk("d.raw", 1 * MiB, seed=4)
    repo.backup(disk, "d")
    p = _run("stats", env=repo.env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-2:] == ["ATEXIT", "TEARDOWN"], p.stdout
    p = _run("backup", str(disk.path), "--name", "d", "-q", env=repo.env(), thread=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-2:] == ["ATEXIT", "TEARDOWN"], p.stdout  # waited for the thread
