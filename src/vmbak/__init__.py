"""vmbak: block-level backup for virtual-machine disks.

Embedding example::

    import vmbak
    repo = vmbak.Repository.init("/backups/repo", password="secret")   # or Repository.open(...)
    snap = vmbak.backup(repo, "/var/lib/images/web.raw", name="web")  # full, then incremental
    vmbak.restore(repo, "web:latest", "/tmp/web-restored.raw")
    assert vmbak.check(repo, read_data=True).ok

docs/api.md has an example of every function (change maps, diff, forget, prune, stats,
check, ls, cat, extract, verify_boot).

The names below are imported on first use, so that ``vmbak.cli.main`` starts (and
installs its signal handling) before numpy and the rest of the library are loaded.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported: this package must load in no time (see cli/main.py)
__version__ = "0.1.0"
__all__ = ["Repository", "Manifest", "VmbakError", "backup", "restore", "check", "open_disk", "__version__",
           "ChangeMap", "Policy", "change_map", "diff", "forget", "prune", "stats", "ls", "cat", "extract",
           "verify_boot", "tag"]

_WHERE = {"backup": "vmbak.api", "check": "vmbak.api", "open_disk": "vmbak.api", "restore": "vmbak.api",
          "VmbakError": "vmbak.errors", "Manifest": "vmbak.repo.manifest", "Repository": "vmbak.repo.repository"}
_WHERE.update(dict.fromkeys(("change_map", "diff", "forget", "prune", "stats", "ls", "cat", "extract",
                              "verify_boot", "tag"), "vmbak.api"))
_WHERE.update(ChangeMap="vmbak.changes.base", Policy="vmbak.engine.retention")

if TYPE_CHECKING:
    from typing import Any

    from vmbak.api import (
        backup,
        cat,
        change_map,
        check,
        diff,
        extract,
        forget,
        ls,
        open_disk,
        prune,
        restore,
        stats,
        tag,
        verify_boot,
    )
    from vmbak.changes.base import ChangeMap
    from vmbak.engine.retention import Policy
    from vmbak.errors import VmbakError
    from vmbak.repo.manifest import Manifest
    from vmbak.repo.repository import Repository


# Variables the command line puts into its own environment (cli/main.py). The user's
# scripts it runs (hooks, password commands) get the environment without them.
OWN_ENVIRONMENT: dict[str, str] = {}


def user_environment() -> dict[str, str]:
    """This process's environment without the variables the command line set for itself."""
    import os

    return {k: v for k, v in os.environ.items() if OWN_ENVIRONMENT.get(k) != v}


def __getattr__(name: str) -> Any:  # noqa: ANN401
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'vmbak' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
