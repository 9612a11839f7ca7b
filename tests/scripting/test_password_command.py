"""--password-command / $VMBAK_PASSWORD_COMMAND (and copy's --from-password-command), as restic has them."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest


def _say(text: str) -> str:
    """A command line that prints ``text`` (and a second line, which is not part of the password)."""
    return shlex.join([sys.executable, "-c", f"print({text!r}); print('second line')"])


@pytest.fixture
def enc(make_repo):  # noqa: ANN001, ANN201
    return make_repo("aes-256-gcm", name="enc", password="s3cret pass")


def test_password_command_opens_the_repository(enc, run_vmbak) -> None:  # noqa: ANN001
    out = run_vmbak("-r", enc.path, "snapshots", "--json", "--password-command", _say("s3cret pass"))
    assert out.stdout.strip() == "[]"
    # the environment variable does the same, and the option wins over a wrong $VMBAK_PASSWORD
    run_vmbak("-r", enc.path, "snapshots", env={"VMBAK_PASSWORD_COMMAND": _say("s3cret pass")})
    run_vmbak("-r", enc.path, "--password-command", _say("s3cret pass"), "snapshots",
              env={"VMBAK_PASSWORD": "wrong"})


def test_init_with_a_password_command(tmp_path: Path, run_vmbak) -> None:  # noqa: ANN001
    run_vmbak("-r", tmp_path / "r", "init", "--password-command", _say("pw from command"))
    run_vmbak("-r", tmp_path / "r", "check", env={"VMBAK_PASSWORD": "pw from command"})


def test_failing_command_is_one_line_naming_it(enc, run_vmbak, assert_cli_error) -> None:  # noqa: ANN001
    cmd = shlex.join([sys.executable, "-c", "import sys; print('s3c' + 'ret pass'); "
                      "sys.stderr.write('vault: sealed\\n'); sys.exit(3)"])
    p = run_vmbak("-r", enc.path, "snapshots", "--password-command", cmd, check=False)
    line = assert_cli_error(p, "--password-command", "exited with status 3", "vault: sealed")
    assert "s3cret" not in line  # the command is named; what it printed never is
    p = run_vmbak("-r", enc.path, "snapshots", check=False,
                  env={"VMBAK_PASSWORD_COMMAND": "/nonexistent/pass-tool show repo"})
    assert_cli_error(p, "$VMBAK_PASSWORD_COMMAND", "/nonexistent/pass-tool", "cannot be run")
    p = run_vmbak("-r", enc.path, "snapshots", "--password-command", "true", check=False)
    assert_cli_error(p, "printed no password")
    p = run_vmbak("-r", enc.path, "snapshots", "--password-command", "'unclosed", check=False)
    assert_cli_error(p, "cannot be parsed")
    p = run_vmbak("-r", enc.path, "snapshots", "--password-command", _say("not it"), check=False)
    assert_cli_error(p, "wrong password")


def test_slow_command_times_out(enc, run_vmbak, assert_cli_error) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    p = run_vmbak("-r", enc.path, "snapshots", "--password-command", "sleep 30", check=False,
                  env={"VMBAK_TOOL_TIMEOUT": "1"})
    assert time.monotonic() - t0 < 20
    assert_cli_error(p, "'sleep 30'", "did not finish within 1 s")


def test_file_and_command_are_exclusive(enc, tmp_path: Path, run_vmbak, assert_cli_error) -> None:  # noqa: ANN001
    pf = tmp_path / "pw"
    pf.write_text("s3cret pass\n")
    p = run_vmbak("-r", enc.path, "snapshots", "--password-file", pf, "--password-command", _say("x"), check=False)
    assert_cli_error(p, "cannot both be given")
    p = run_vmbak("-r", enc.path, "snapshots", check=False,
                  env={"VMBAK_PASSWORD_FILE": str(pf), "VMBAK_PASSWORD_COMMAND": _say("x")})
    assert_cli_error(p, "both set")
    # an option on the command line wins over the environment's file or command
    run_vmbak("-r", enc.path, "snapshots", "--password-file", pf, env={"VMBAK_PASSWORD_COMMAND": "false"})
    run_vmbak("-r", enc.path, "snapshots", "--password-command", _say("s3cret pass"),
              env={"VMBAK_PASSWORD_FILE": "/nonexistent"})


def test_copy_from_password_command(enc, make_repo, make_disk, run_vmbak) -> None:  # noqa: ANN001
    disk = make_disk("d.raw", 1 << 20)
    enc.backup(disk, "web")
    dst = make_repo("none", name="dst")
    out = run_vmbak("copy", "--from-repo", enc.path, "--to-repo", dst.path, "--json",
                    "--from-password-command", _say("s3cret pass"))
    assert '"copied"' in out.stdout
    assert len(dst.snapshots()) == 1
    p = run_vmbak("copy", "--from-repo", enc.path, "--to-repo", dst.path, check=False,
                  env={"VMBAK_FROM_PASSWORD_COMMAND": "false"})
    assert "$VMBAK_FROM_PASSWORD_COMMAND 'false' exited with status 1" in p.stderr


def test_background_server_runs_the_command_once(enc, make_disk, run_vmbak, tmp_path: Path) -> None:  # noqa: ANN001
    """serve --background: the command runs in the starting process; the detached server gets its
    answer (it has no terminal to prompt on) and does not run it again."""
    import json
    import os
    import signal

    enc.backup(make_disk("bg.raw", 1 << 20), "bg")
    count = tmp_path / "runs"
    cmd = shlex.join([sys.executable, "-c", f"import os; open({str(count)!r}, 'a').write(f'{{os.getppid()}} '); "
                      "print('s3cret pass')"])
    sock = tmp_path / "bg.sock"
    for how in (["--password-command", cmd], [f"--password-c={cmd}"]):
        count.write_text("")
        out = run_vmbak("-r", enc.path, "serve", "bg:latest", "--socket", sock, "--background", "--json", *how,
                        env={"VMBAK_PASSWORD": None})
        info = json.loads(out.stdout)
        try:
            runs = count.read_text().split()
            assert sock.exists() and len(runs) == 1, runs
            assert int(runs[0]) != info["pid"]  # run by the starting process, not by the server
        finally:
            os.kill(info["pid"], signal.SIGTERM)
            end = time.monotonic() + 20
            while os.path.exists(f"/proc/{info['pid']}") and time.monotonic() < end:
                time.sleep(0.1)
