"""Where the tracker keeps its files, and the names of its sockets."""

from __future__ import annotations

import os
from dataclasses import dataclass

SUFFIX = ".vmbak"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL


@dataclass(frozen=True)
class StatePaths:
    rct: str
    mrt: str
    log: str
    err: str
    state_dir: str

    @property
    def base(self) -> str:
        return self.rct[: -len(".rct")]


def state_paths(disk: str, state_dir: str | None = None) -> StatePaths:
    """``DISK.vmbak.rct``, ``.mrt``, ``.log`` (and ``.err``, the server's diagnostics) next to
    the disk, or in ``state_dir``."""
    disk = os.path.realpath(disk)
    d = os.path.realpath(state_dir) if state_dir else os.path.dirname(disk)
    base = os.path.join(d, os.path.basename(disk) + SUFFIX)
    return StatePaths(base + ".rct", base + ".mrt", base + ".log", base + ".err", d)


def ctl_path(socket_path: str) -> str:
    """The control socket that belongs to an NBD socket."""
    return socket_path + ".ctl"


FROZEN_PREFIX = "vmbak-frozen:"
