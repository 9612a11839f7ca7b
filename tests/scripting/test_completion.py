"""vmbak completion bash|zsh|fish and vmbak man: generated from the parser, checked in the real shells
and by groff and man."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

# A bash (or zsh) session that sources the script, completes the words given as arguments
# (the last one is under the cursor) and prints the candidates, one per line.
COMPLETE = """
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMPREPLY=()
_vmbak
printf '%s\\n' "${COMPREPLY[@]}"
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    (d / "disk.raw").write_bytes(b"")
    (d / "repodir").mkdir()
    return d


def _script(run_vmbak, tmp_path: Path, shell: str) -> Path:  # noqa: ANN001
    path = tmp_path / f"vmbak.{shell}"
    path.write_text(run_vmbak("completion", shell).stdout)
    return path


def _complete(shell: str, script: Path, cwd: Path, *words: str) -> list[str]:
    argv = ["bash", "--norc", "--noprofile", "-c", COMPLETE, "bash"] if shell == "bash" else \
        ["zsh", "-f", "-c", COMPLETE, "zsh"]
    p = subprocess.run([*argv, str(script), "vmbak", *words], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and not p.stderr, p.stderr
    cands = [c for c in p.stdout.splitlines() if c]
    if shell == "zsh":  # zsh's bashcompinit leaves filtering by the typed prefix to zsh itself
        cands = [c for c in cands if c.startswith(words[-1])]
    return cands


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_bash_and_zsh_complete_commands_options_and_paths(shell, run_vmbak, tmp_path, workdir) -> None:  # noqa: ANN001
    script = _script(run_vmbak, tmp_path, shell)
    check = ["bash", "-n"] if shell == "bash" else ["zsh", "-n"]
    subprocess.run([*check, str(script)], check=True, timeout=60)
    if shell == "bash":
        p = subprocess.run(["bash", "--norc", "-c", f"source {script}; complete -p vmbak"], capture_output=True,
                           text=True, check=True, timeout=60)
        assert p.stdout.strip() == "complete -F _vmbak vmbak"

    def c(*words: str) -> list[str]:
        return _complete(shell, script, workdir, *words)

    assert c("res") == ["restore"]
    assert c("restore", "--fo") == ["--format"]
    assert sorted(c("init", "--encryption", "")) == ["aes-256-gcm", "none"]
    assert sorted(c("key", "")) == ["add", "list", "passwd", "remove"]
    assert c("key", "add", "--new-p") == ["--new-password-file"]
    assert c("-r", "rep") == ["repodir"]                       # a repository is a directory
    assert c("--repo", "repodir", "backup", "--name", "web", "di") == ["disk.raw"]
    assert c("restore", "web:latest", "di") == ["disk.raw"]    # the target, not the snapshot
    assert c("restore", "") == []                              # a snapshot: no file names
    assert c("ls", "web:latest", "") == []                     # a path inside the snapshot
    assert c("extract", "web:latest", "/p1", "--target", "re") == ["repodir"]
    assert sorted(c("completion", "")) == ["bash", "fish", "zsh"]
    assert "--password-command" in c("snapshots", "--pass")   # global options follow the command too


# An interactive zsh on a pseudo-terminal (zsh's own zpty module): it sources the script, gets a
# line typed with TAB at the end, and the test waits until the completed text shows on its screen.
ZPTY = """
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "PS1='READY> '; source ${(q)1}"
zpty -r z junk '*READY> *'
zpty -w -n z "$2"$'\\t'
zpty -r z out "*$3*" && print -r -- FOUND
zpty -d z
"""


@pytest.mark.parametrize(("typed", "shown"), [("vmbak res", "vmbak restore"),
                                              ("vmbak restore --fo", "vmbak restore --format"),
                                              ("vmbak -r rep", "vmbak -r repodir")])
def test_zsh_completes_interactively(typed, shown, run_vmbak, tmp_path, workdir) -> None:  # noqa: ANN001
    script = _script(run_vmbak, tmp_path, "zsh")
    p = subprocess.run(["timeout", "60", "zsh", "-f", "-c", ZPTY, "zsh", str(script), typed, shown], cwd=workdir,
                       capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})
    assert "FOUND" in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_fish_completes(run_vmbak, tmp_path, workdir) -> None:  # noqa: ANN001
    script = _script(run_vmbak, tmp_path, "fish")
    subprocess.run(["fish", "-n", str(script)], check=True, timeout=60)

    def c(line: str) -> list[str]:
        p = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C {line!r}"], cwd=workdir,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
        assert p.returncode == 0 and not p.stderr, p.stderr
        return [ln.split("\t")[0] for ln in p.stdout.splitlines()]

    assert c("vmbak res") == ["restore"]
    assert c("vmbak restore --fo") == ["--format"]
    assert sorted(c("vmbak init --encryption ")) == ["aes-256-gcm", "none"]
    assert c("vmbak key a") == ["add"]
    assert c("vmbak backup di") == ["disk.raw"]
    assert c("vmbak -r rep") == ["repodir/"]
    assert c("vmbak ls web:latest ") == []
    assert sorted(c("vmbak completion ")) == ["bash", "fish", "zsh"]


def test_completion_usage_errors(run_vmbak, assert_cli_error) -> None:  # noqa: ANN001
    assert_cli_error(run_vmbak("completion", "tcsh", check=False), "invalid choice")
    assert "vmbak completion bash" in run_vmbak("completion", "--help").stdout
    assert "vmbak man > vmbak.1" in run_vmbak("man", "--help").stdout


def test_man_page_renders_cleanly_and_names_every_command(run_vmbak, tmp_path) -> None:  # noqa: ANN001
    page = tmp_path / "vmbak.1"
    page.write_text(run_vmbak("man").stdout)
    g = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                       timeout=60)
    assert g.returncode == 0 and g.stderr == "", g.stderr
    m = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"})
    assert m.returncode == 0 and m.stderr == "", m.stderr
    text = m.stdout
    top = run_vmbak("--help").stdout
    section = top.split("  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    commands = re.findall(r"^    (\S+)", section, re.M)  # every command --help lists
    assert len(commands) > 15
    for cmd in commands:
        assert f"vmbak {cmd}\n" in text or f"vmbak {cmd} " in text, cmd
    for sub in ("vmbak key add", "vmbak repair index", "vmbak track start"):
        assert sub in text
    for word in ("--password-command", "VMBAK_PASSWORD_FILE", "VMBAK_FROM_PASSWORD_COMMAND", "EXIT STATUS"):
        assert word in text
    # every command's examples are in the page as --help prints them
    assert "vmbak forget --keep-daily 7 --prune" in text
