"""Issue 16: a command imports only what it uses (fixed start-up cost).

``vmbak.cli.main.COMMAND_GROUPS`` lets a command line build only its own group's parser;
these tests keep that table true to the groups and check that the cheap commands do not
pull in the heavy modules.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

from vmbak.cli import main as cli_main


def _registered(group: str) -> set[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    mod = importlib.import_module(f"vmbak.cli.{group}")
    if len(inspect.signature(mod.register).parameters) >= 2:
        mod.register(sub, argparse.ArgumentParser(add_help=False))
    else:
        mod.register(sub)
    return set(sub.choices)


def test_command_table_matches_the_groups() -> None:
    table: dict[str, set[str]] = {}
    for cmd, group in cli_main.COMMAND_GROUPS.items():
        table.setdefault(group, set()).add(cmd)
    for group in cli_main.GROUPS + cli_main.OPTIONAL_GROUPS:
        assert _registered(group) == table.get(group, set()), group
    # every command of the full parser is in the table
    full = cli_main.build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli_main.COMMAND_GROUPS)


@pytest.mark.parametrize(("argv", "group"), [
    (["snapshots"], "snapshots"),
    (["-r", "/x", "--json", "restore", "a", "b"], "restore"),
    (["--repo=/x", "-q", "backup", "d"], "backup"),
    (["-r/x", "check", "--read-data"], "repository"),
    (["--password-file", "f", "--s3-endpoint", "http://h", "key", "list"], "keys"),
    ([], None),
    (["--help"], None),
    (["--version"], None),
    (["--rep", "backup", "snapshots"], None),  # an abbreviation: not certain, build everything
    (["nosuchcommand"], None),
    (["-r", "backup", "snapshots"], "snapshots"),  # a repository named like a command
])
def test_command_group(argv: list[str], group: str | None) -> None:
    assert cli_main.command_group(argv) == group


def test_parser_of_one_group_parses_like_the_full_one() -> None:
    argv = ["-r", "/x", "forget", "web:latest", "--keep-last", "1", "3f2a9c1e", "-n"]
    one, full = cli_main.build_parser(argv).parse_args(argv), cli_main.build_parser().parse_args(argv)
    assert {k: v for k, v in vars(one).items() if k != "func"} == {k: v for k, v in vars(full).items() if k != "func"}
    assert one.func.__qualname__ == full.func.__qualname__


def test_snapshots_imports_no_pipeline(tmp_path) -> None:
    """``vmbak snapshots`` on a repository runs without importing the backup, check or prune
    engines, the filesystem parsers or the HTTP server; an unknown command still lists
    every command."""
    repo = tmp_path / "repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    code = ("import sys, json\nfrom vmbak.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('vmbak', 'http', 'urllib.request')))))\n"
            "sys.exit(rc)")
    init = subprocess.run([sys.executable, "-c", code, "-r", str(repo), "init", "--encryption", "none"],
                          env=env, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    r = subprocess.run([sys.executable, "-c", code, "-r", str(repo), "--json", "snapshots"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[0]) == []
    mods = set(json.loads(lines[-1]))
    assert "vmbak.repo.repository" in mods
    heavy = {"vmbak.engine.backup", "vmbak.engine.check", "vmbak.engine.prune", "vmbak.usage",
             "vmbak.server", "vmbak.guest.agent", "http.client", "urllib.request"}
    assert not mods & heavy, sorted(mods & heavy)
    bad = subprocess.run([sys.executable, "-c", code, "nosuchcommand"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "snapshots" in bad.stderr and "backup" in bad.stderr, bad.stderr
