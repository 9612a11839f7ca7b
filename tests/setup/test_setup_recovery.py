"""`make setup` recovers from an interrupted run (issue 13, defect 5): a venv left without
pip, or with pip but without the project, is made whole by the next run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path):
    dest = tmp_path / "vmbak"
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "Makefile"):
        shutil.copy2(ROOT / name, dest / name)
    for d in ("src", "scripts"):
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _setup(project: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy's venv must find its own src
    return subprocess.run(["make", "-s", "setup"], cwd=project, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL, env=env)


def _works(project: Path) -> None:
    py = project / ".venv" / "bin" / "python"
    subprocess.run([py, "-m", "pip", "--version"], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([py, "-c", "import vmbak, pytest; print(vmbak.__file__)"], check=True,
                         capture_output=True, text=True, env=env).stdout
    assert str(project / "src") in out, out


@pytest.mark.slow
def test_venv_without_pip_is_made_again(project):
    # What Ctrl-C during `python -m venv` (before ensurepip installed pip) leaves behind.
    # Without the system site-packages, so that no pip of Debian's can stand in for it.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", project / ".venv"], check=True)
    p = _setup(project)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "incomplete" in p.stdout
    _works(project)
    # Ctrl-C during the pip install step: pip works, the project is not installed yet.
    (project / ".venv" / ".vmbak-installed").unlink()
    subprocess.run([project / ".venv/bin/python", "-m", "pip", "uninstall", "-q", "-y", "vmbak"], check=True)
    p = _setup(project)
    assert p.returncode == 0, p.stdout + p.stderr
    _works(project)
