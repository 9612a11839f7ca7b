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
