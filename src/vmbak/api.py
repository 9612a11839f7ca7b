"""The embeddable Python API. See README.md ("Python API")."""

from __future__ import annotations

import os

from vmbak.disks.base import DiskReader
from vmbak.engine import sources
from vmbak.engine.backup import DEFAULT_BLOCK_SIZE, BackupOptions, check_tags
from vmbak.engine.backup import backup as _backup
from vmbak.engine.check import CheckReport
from vmbak.engine.check import check as _check
from vmbak.engine.overwrite import check_overwrite
from vmbak.engine.progress import Progress
from vmbak.engine.restore import RestoreTarget
from vmbak.engine.restore import restore as _restore
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository


def open_disk(path: str | os.PathLike[str], fmt: str | None = None) -> DiskReader:
    """Open a disk for reading the way ``vmbak backup`` and ``vmbak usage`` do: a raw file or
    block device directly, an image file (qcow2 with its backing chain, vhdx, vpc, vmdk, ...)
    as its virtual disk. ``fmt`` skips probing the format."""
    return sources.open_disk(os.fspath(path), fmt)


def backup(repo: Repository, disk: str | os.PathLike[str] | DiskReader, name: str, *, mode: str = "auto",
           changes: str = "auto", block_size: int = DEFAULT_BLOCK_SIZE, workers: int = 2,
           progress: Progress | None = None, log=None, fmt: str | None = None,  # noqa: ANN001
           tags: list[str] | None = None) -> Manifest:
    """Back up a disk under ``name``; the first backup of a name is full, later ones incremental.

    ``mode`` is "auto", "full", "incremental" or "differential". A path is opened exactly as
    ``vmbak backup DISK`` opens it (an image file is backed up as its virtual disk; ``fmt``
    skips probing), with ``changes`` "auto", "scan", "full" or "overlay". ``tags`` are
    stored in the snapshot (rules as ``vmbak backup --tag``). Returns the committed manifest.
    """
    tags = check_tags(tags)
    if isinstance(disk, DiskReader):
        opts = BackupOptions(name=name, mode=mode, changes=changes, block_size=block_size, workers=workers,
                             progress=progress, log=log, source=disk.description, tags=tags)
        return _backup(repo, disk, opts)
    spec = sources.parse_changes(changes)
    if not spec.reads_disk_file:
        raise VmbakError(f"changes={changes!r} reads no disk file; give changes auto, scan, full or overlay")
    sources.check_name(name)
    lg = log or (lambda s: None)
    with sources.open_file_source(os.fspath(disk), fmt, spec, block_size, lg) as src:
        opts = BackupOptions(name=name, mode=mode, changes=spec.engine_changes, block_size=block_size,
                             workers=workers, progress=progress, log=log, tags=tags)
        return sources.run_backup(repo, src, opts, log=lg)


def restore(repo: Repository, snapshot: str | Manifest, target: str | os.PathLike[str] | RestoreTarget, *,
            overwrite: bool = False, verify: bool = True, workers: int = 4,
            progress: Progress | None = None, sync: bool = False, readback: bool = False) -> dict:
    """Restore a snapshot (a Manifest, an id prefix, ``NAME:latest`` or ``NAME@TIME``) to a raw file or device.

    An existing file or block device is written over only with ``overwrite``.

    ``verify`` checks every block against the snapshot's block hashes as it is written;
    ``readback`` instead reads the whole target back after writing and checks that.
    """
    m = repo.find(snapshot) if isinstance(snapshot, str) else snapshot
    if not isinstance(target, RestoreTarget):
        check_overwrite(target, overwrite)  # a block device needs overwrite=True, like a file
    tgt = target if isinstance(target, RestoreTarget) else os.fspath(target)
    return _restore(repo, m, tgt, overwrite=overwrite, verify=verify, workers=workers, progress=progress,
                    sync=sync, readback=readback)


def check(repo: Repository, read_data: bool = False) -> CheckReport:
    """Check the repository's structure and, with ``read_data``, every stored byte."""
    return _check(repo, read_data=read_data)
