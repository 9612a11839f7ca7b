"""The scripting interface (issue 13, docs/json.md): JSON lines from long-running
commands (status, then one summary or one error), errors as JSON, exit statuses by
class, and one overall progress bar on a terminal.

Everything runs the real command line; the lock, the damaged filesystem, the wrong
password and the signals are real.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

MiB = 1 << 20
STATUS_FIELDS = {"message_type": str, "command": str, "phase": str, "percent_done": (int, float),
                 "bytes_done": int, "total_bytes": int, "bytes_per_second": int,
                 "seconds_elapsed": (int, float), "seconds_remaining": (int, float, type(None))}
ERROR_FIELDS = {"message_type": str, "code": int, "exit_class": str, "message": str}


def lines_of(stdout: str) -> list[dict]:
    """Every line of a long-running command's --json output, each one JSON object."""
    out = []
    for line in stdout.splitlines():
        msg = json.loads(line)
        assert isinstance(msg, dict) and "message_type" in msg, line
        out.append(msg)
    return out


def assert_status(msg: dict, command: str) -> None:
    for k, t in STATUS_FIELDS.items():
        assert k in msg and isinstance(msg[k], t), f"status field {k}: {msg}"
    assert msg["message_type"] == "status" and msg["command"] == command
    assert 0 <= msg["percent_done"] <= 1 and 0 <= msg["bytes_done"]
    assert msg["total_bytes"] == 0 or msg["bytes_done"] <= msg["total_bytes"]
    assert msg["seconds_remaining"] is None or msg["seconds_remaining"] >= 0


def assert_stream(stdout: str, command: str, last: str = "summary") -> tuple[list[dict], dict]:
    """status lines (at least the first one), then exactly one ``last`` line."""
    msgs = lines_of(stdout)
    assert len(msgs) >= 2, stdout
    *status, final = msgs
    for s in status:
        assert_status(s, command)
    assert status[0]["phase"] == "open"
    assert final["message_type"] == last, final
    return status, final


def assert_error(p: subprocess.CompletedProcess[str], code: int, exit_class: str, *fragments: str,
                 assert_cli_error) -> dict:  # noqa: ANN001
    """The exit status, the one stderr line, and the error message as the last stdout line."""
    line = assert_cli_error(p, *fragments)
    assert p.returncode == code, f"exit {p.returncode}, expected {code}: {p.stderr}"
    msgs = lines_of(p.stdout)
    assert msgs, "no JSON error on standard output"
    err = msgs[-1]
    for k, t in ERROR_FIELDS.items():
        assert isinstance(err.get(k), t), f"error field {k}: {err}"
    assert err["message_type"] == "error" and err["code"] == code and err["exit_class"] == exit_class, err
    assert line == f"vmbak: error: {err['message']}", (line, err)
    assert all(m["message_type"] == "status" for m in msgs[:-1]), msgs
    return err


# ------------------------------------------------------------------------- status and summary
def test_backup_streams_status_lines_then_a_summary(repo, make_disk):
    disk = make_disk("s.raw", 48 * MiB, seed=1301)
    p = repo.run("backup", disk.path, "--name", "s", "--json", env={"VMBAK_PROGRESS_INTERVAL": "0.05"})
    status, summary = assert_stream(p.stdout, "backup")
    # the result is the snapshot, as before JSON lines; jq paths are unchanged
    assert summary["type"] == "full" and summary["name"] == "s" and summary["disk_size"] == 48 * MiB
    assert summary["stats"]["read_bytes"] == 48 * MiB
    phases = [s["phase"] for s in status]
    order = ["open", "analyze", "read", "upload"]
    assert [ph for ph in order if ph in phases] == sorted(set(phases), key=order.index), phases
    assert "read" in phases and "upload" in phases, phases  # one status at each change of phase
    reads = [s for s in status if s["phase"] in ("read", "upload")]
    assert all(s["total_bytes"] == 48 * MiB for s in reads), reads
    assert all("upload_bytes_done" in s and "upload_bytes_total" in s for s in reads)
    done = [s["bytes_done"] for s in status]
    assert done == sorted(done), "bytes_done never goes back"
    pct = [s["percent_done"] for s in status]
    assert pct == sorted(pct), "one overall percentage that never goes back"
    up = [s for s in status if s["phase"] == "upload"]
    assert up[0]["bytes_done"] == 48 * MiB and up[0]["upload_bytes_total"] >= up[0]["upload_bytes_done"]
    # seconds_elapsed grows; lines are at least the interval apart (except phase changes)
    el = [s["seconds_elapsed"] for s in status]
    assert el == sorted(el)


def test_status_lines_arrive_while_the_command_runs(repo, make_disk, popen_vmbak):
    """Flushed at once: the first status line is there before the backup ends."""
    disk = make_disk("f.raw", 64 * MiB, seed=1302)
    p = popen_vmbak("backup", disk.path, "--name", "f", "--json", env=repo.env())
    first = json.loads(p.stdout.readline())
    running = p.poll() is None
    rest, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert first["message_type"] == "status" and first["phase"] == "open"
    assert running, "the first status line came only after the backup ended"
    assert json.loads(rest.splitlines()[-1])["message_type"] == "summary"


def test_status_lines_are_at_most_one_an_interval(repo, make_disk):
    disk = make_disk("i.raw", 64 * MiB, seed=1303)
    p = repo.run("backup", disk.path, "--name", "i", "--json", env={"VMBAK_PROGRESS_INTERVAL": "0.5"})
    status, _ = assert_stream(p.stdout, "backup")
    # one at the start, one per change of phase (at most 4 phases), one per interval between
    elapsed = status[-1]["seconds_elapsed"]
    assert len(status) <= 4 + elapsed / 0.5 + 1, [(s["phase"], s["seconds_elapsed"]) for s in status]


@pytest.mark.parametrize("command", ["restore", "check", "copy", "prune", "forget", "merge", "repair index",
                                     "extract"])
def test_every_long_command_ends_with_a_summary(command, make_repo, make_disk, make_ext4, tmp_path, run_vmbak):
    repo = make_repo()
    if command == "extract":
        disk, _files = make_ext4("x.img", 16 * MiB, seed=1304)
    else:
        disk = make_disk("x.raw", 4 * MiB, seed=1304)
    first = repo.backup(disk, "x")
    if command != "extract":  # (keep the filesystem browsable)
        disk.write_random(0, MiB, seed=1305)
    repo.backup(disk, "x")
    args = {"restore": ["restore", "x:latest", tmp_path / "x.out"],
            "check": ["check", "--read-data"],
            "copy": ["copy", "--from-repo", repo.path, "--to-repo", make_repo(name="dst").path],
            "prune": ["prune", "--grace", "0"],
            "forget": ["forget", first["id"]],
            "merge": ["merge", "x", "--into-full"],
            "repair index": ["repair", "index"],
            "extract": ["extract", "x:latest", "/disk/etc", "--target", tmp_path / "out"]}[command]
    p = repo.run(*args, "--json")
    _status, summary = assert_stream(p.stdout, command)
    key = {"restore": "written_bytes", "check": "ok", "copy": "copied", "prune": "packs_after",
           "forget": "deleted", "merge": "new_snapshot", "repair index": "new_index", "extract": "files"}[command]
    assert key in summary, summary


def test_reporting_commands_keep_one_document(repo, make_disk):
    disk = make_disk("r.raw", MiB, seed=1306)
    repo.backup(disk, "r")
    for args in (["snapshots"], ["stats"], ["unlock"]):
        p = repo.run(*args, "--json")
        doc = json.loads(p.stdout)  # one (indented) document, no message_type
        assert "message_type" not in (doc[0] if isinstance(doc, list) else doc)


# ------------------------------------------------------------------------- errors and exit codes
def test_exit_1_failure_as_json(repo, tmp_path, assert_cli_error):
    p = repo.run("restore", "nobody:latest", tmp_path / "o.raw", "--json", check=False)
    assert_error(p, 1, "failure", "no snapshot named", assert_cli_error=assert_cli_error)
    # a reporting command's error is JSON too
    p = repo.run("stats", "nobody:latest", "--json", check=False)
    assert_error(p, 1, "failure", "no snapshot named", assert_cli_error=assert_cli_error)


def test_exit_2_usage_as_json(repo, assert_cli_error):
    p = repo.run("backup", "--no-such-option", "--json", check=False)
    assert_error(p, 2, "usage", "unrecognized arguments", assert_cli_error=assert_cli_error)
    p = repo.run("backup", "--no-such-option", check=False)  # without --json: stderr only
    assert assert_cli_error(p) and p.returncode == 2 and p.stdout == ""


def test_exit_3_partial(repo, make_ext4, debugfs, tmp_path, assert_cli_error):
    """A file whose extent header is gone: everything else is extracted; exit 3."""
    disk, files = make_ext4("p.img", 16 * MiB, seed=1307)
    debugfs(disk.path, "sif /home/user/deep/nested/dir/note.txt block[0] 0", write=True)
    repo.backup(disk, "p")
    p = repo.run("extract", "p:latest", "/disk", "--target", tmp_path / "out", "--json", check=False)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "vmbak: warning:" in p.stderr
    _status, summary = assert_stream(p.stdout, "extract")
    assert [e["path"] for e in summary["errors"]] == ["/disk/home/user/deep/nested/dir/note.txt"], summary
    assert (tmp_path / "out" / "disk" / "etc" / "hostname").read_bytes() == files["etc/hostname"]


def test_exit_10_no_repository(run_vmbak, tmp_path, assert_cli_error):
    p = run_vmbak("-r", tmp_path / "nothing-here", "snapshots", "--json", check=False)
    assert_error(p, 10, "no_repository", "does not exist", assert_cli_error=assert_cli_error)
    (tmp_path / "empty").mkdir()
    p = run_vmbak("-r", tmp_path / "empty", "snapshots", "--json", check=False)
    err = assert_error(p, 10, "no_repository", "not a vmbak repository", assert_cli_error=assert_cli_error)
    assert err["message"].endswith("(no config): " + os.fspath(tmp_path / "empty"))
    p = run_vmbak("-r", tmp_path / "nothing-here", "check", check=False)  # without --json too
    assert p.returncode == 10 and p.stdout == ""


def test_exit_11_locked(repo, make_disk, assert_cli_error):
    """A real exclusive lock, held through the library by this process."""
    disk = make_disk("l.raw", MiB, seed=1308)
    repo.backup(disk, "l")
    lib = repo.open()
    with lib.lock(exclusive=True, purpose="forget"):
        p = repo.run("backup", disk.path, "--name", "l", "--json", check=False)
        assert_error(p, 11, "locked", "locked by pid", assert_cli_error=assert_cli_error)
        p = repo.run("check", check=False)
        assert p.returncode == 11
    with lib.lock(purpose="backup"):  # a shared lock blocks forget, not another backup
        p = repo.run("forget", "l:latest", "--json", check=False)
        assert_error(p, 11, "locked", f"pid {os.getpid()}", assert_cli_error=assert_cli_error)
        repo.run("backup", disk.path, "--name", "l")


def test_a_shared_lock_taken_again_by_its_thread_is_the_same_lock(repo, make_disk, assert_cli_error):
    """Nested shared locks of one thread (a libvirt job's snapshots inside one lock) write one
    lock file; another thread's shared lock is its own; the outer lock still blocks forget
    after an inner one ends."""
    import threading

    disk = make_disk("n.raw", MiB, seed=1309)
    repo.backup(disk, "n")
    lib = repo.open()
    locks = repo.path / "locks"
    with lib.lock(purpose="backup"):
        assert len(list(locks.iterdir())) == 1
        with lib.lock(purpose="backup"):
            assert len(list(locks.iterdir())) == 1
        seen = []

        def other() -> None:
            with lib.lock(purpose="backup"):
                seen.append(len(list(locks.iterdir())))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen == [2]
        p = repo.run("forget", "n:latest", "--json", check=False)
        assert_error(p, 11, "locked", f"pid {os.getpid()}", assert_cli_error=assert_cli_error)
    assert list(locks.iterdir()) == []


def test_exit_12_wrong_or_missing_password(encrypted_repo, assert_cli_error):
    p = encrypted_repo.run("snapshots", "--json", env={"VMBAK_PASSWORD": "not the password"}, check=False)
    assert_error(p, 12, "wrong_password", "wrong password", assert_cli_error=assert_cli_error)
    p = encrypted_repo.run("check", "--json", env={"VMBAK_PASSWORD": None}, check=False)
    assert_error(p, 12, "wrong_password", "password is required", assert_cli_error=assert_cli_error)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job (test_signals.py)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_exit_130_interrupted_as_json(sig, repo, make_disk, popen_vmbak, assert_cli_error):
    disk = make_disk("k.raw", 96 * MiB, seed=1309)
    p = popen_vmbak("backup", disk.path, "--name", "k", "--json", env=repo.env(),
                    preexec_fn=_ignore_sigint)
    first = p.stdout.readline()  # the command is running (its handlers are in place)
    p.send_signal(signal.SIGSTOP)  # held still, so the backup cannot finish before the signal lands
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    rest, err = p.communicate(timeout=120)
    assert p.returncode != 0, "the backup finished although it was interrupted"
    proc = subprocess.CompletedProcess(p.args, p.returncode, first + rest, err)
    name = signal.Signals(sig).name
    e = assert_error(proc, 128 + sig, "interrupted", "interrupted", assert_cli_error=assert_cli_error)
    assert e["signal"] == name
    assert os.listdir(repo.path / "locks") == []


# ------------------------------------------------------------------------- the progress bar on a terminal
def _run_on_pty(cmd: list[str], env: dict[str, str]) -> tuple[int, str, list[tuple[float, bytes]], float]:
    """Run ``cmd`` with standard error on a pseudo-terminal; return its exit status, its
    standard output, what reached the terminal (with arrival times from the start), and
    the start time."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    got: list[tuple[float, bytes]] = []
    t0 = time.monotonic()

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            got.append((time.monotonic() - t0, data))

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                           timeout=300)
    finally:
        os.close(slave)
    t.join(5)
    os.close(master)
    return p.returncode, p.stdout.decode(), got, t0


@pytest.fixture
def slow_disk(make_disk, tmp_path):
    """A 32 MiB disk image that reads at a bounded rate, so a backup of it lasts about a
    second however fast the machine is (the bar's ETA needs 0.2 s of work; a 96 MiB
    file read from the page cache was backed up in less on a quiet machine): nbdkit's
    rate filter over the file, mounted as a file by nbdfuse."""
    disk = make_disk("b.raw", 32 * MiB, seed=1310)
    mnt = tmp_path / "slow"
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(mnt / "b.raw"), "[", "nbdkit", "--filter=rate", "file",
                             str(disk.path), "rate=80M", "]"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "b.raw").exists():
            assert fuse.poll() is None and time.monotonic() < deadline, fuse.stderr.read().decode()  # type: ignore[union-attr]
            time.sleep(0.05)
        yield mnt / "b.raw"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            fuse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


def test_one_overall_bar_with_eta_on_a_terminal(repo, slow_disk):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env["VMBAK_REPOSITORY"] = str(repo.path)
    base = [sys.executable, "-m", "vmbak.cli.main"]
    # what starting the interpreter and importing vmbak costs on this machine right now
    t = time.monotonic()
    subprocess.run([*base, "--version"], env=env, check=True, capture_output=True)
    startup = time.monotonic() - t
    rc, out, got, _ = _run_on_pty([*base, "backup", str(slow_disk), "--name", "b"], env)
    assert rc == 0, out
    tty = b"".join(d for _, d in got).decode(errors="replace")
    assert got, "nothing on the terminal"
    first_bar = next(at for at, d in got if b"backup" in d)
    assert first_bar <= startup + 0.5, f"the bar appeared after {first_bar:.2f} s (start-up {startup:.2f} s)"
    frames = [f for f in tty.replace("\x1b[K", "").split("\r") if f.startswith("backup ")]
    phases = [f.split(":")[0].split()[1] for f in frames]
    assert phases[0] == "open" and "read" in phases and "upload" in phases, phases
    assert all("ETA " in f for f in frames), frames
    assert any("ETA -:--" not in f for f in frames if " read:" in f or " upload:" in f), frames
    pct = [int(f.split(":", 1)[1].split("%")[0]) for f in frames]
    assert pct == sorted(pct), f"one bar over all phases never goes back: {pct}"
    assert tty.rstrip().endswith("\x1b[K") or "snapshot" not in tty  # erased before the result
    assert "snapshot" in out and "\r" not in out  # the result on stdout, the bar on the terminal only


def test_the_bar_names_a_phase_only_where_it_differs_from_the_command(repo, make_disk, tmp_path):
    """`check:  53% |...`, not `check check:` (restore and copy alike); `check open:` before."""
    repo.backup(make_disk("p.raw", 4 << 20, seed=3), "p")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env["VMBAK_REPOSITORY"] = str(repo.path)
    base = [sys.executable, "-m", "vmbak.cli.main"]
    for cmd, word in ((["check", "--read-data"], "check"), (["restore", "p:latest", str(tmp_path / "o.raw")],
                                                            "restore")):
        rc, out, got, _ = _run_on_pty([*base, *cmd], env)
        assert rc == 0, out
        frames = [f for f in b"".join(d for _, d in got).decode(errors="replace").replace("\x1b[K", "").split("\r")
                  if f.startswith(word)]
        heads = {f.split("%")[0].rsplit(":", 1)[0] for f in frames}
        assert heads == {f"{word} open", word}, frames
