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


# ---------------------------------------------------------------------------- files across snapshots
def find(repo: Repository, patterns: list[str], snapshots: list[Manifest | str] | None = None, *,
         ignore_case: bool = False) -> dict:
    """Entries whose path matches any of ``patterns`` (restic-style, as ``vmbak find``) in
    ``snapshots`` (default: all). Returns {"matches": [as ``find --json``], "errors":
    [{"snapshot", "path", "error"}]} for the paths that could not be read."""
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles
    from vmbak.serve.find import Pattern, WalkCache, find_in

    pats = [Pattern(p, ignore_case) for p in patterns]
    ms = repo.manifests() if snapshots is None else [repo.find(s) if isinstance(s, str) else s for s in snapshots]
    cache = WalkCache(repo)
    out: dict = {"matches": [], "errors": []}
    for m in ms:
        files = SnapshotFiles(SnapshotView(repo, m))
        for match in find_in(files, pats, cache):
            out["matches"].append({"snapshot": m.id, "short_id": m.short_id, "snapshot_name": m.name,
                                   "snapshot_time": m.time, **match.to_json()})
        out["errors"] += [{"snapshot": m.id, "path": p, "error": why} for p, why in files.problems]
    return out


def dump(repo: Repository, snapshot: str | Manifest, path: str, out) -> dict:  # noqa: ANN001 - a binary file
    """Write ``path`` of ``snapshot`` to the binary file ``out`` as ``vmbak dump`` does (a
    file's bytes, a directory as a tar stream); returns counts and "errors"."""
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles
    from vmbak.serve.find import dump as _dump

    m = repo.find(snapshot) if isinstance(snapshot, str) else snapshot
    files = SnapshotFiles(SnapshotView(repo, m))
    r = _dump(files, path, out)
    r["errors"] = [{"path": p, "error": why} for p, why in files.problems]
    return r


def diff_files(repo: Repository, a: str | Manifest, b: str | Manifest, *, metadata: bool = False) -> dict:
    """The file-level differences between two snapshots of one disk, as ``vmbak diff
    --files --json`` prints them ("changes", counts), with "errors" for unreadable paths."""
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles
    from vmbak.serve.treediff import FileDiff, changed_blocks, check_same_disk

    ma = repo.find(a) if isinstance(a, str) else a
    mb = repo.find(b) if isinstance(b, str) else b
    check_same_disk(ma, mb)
    fa, fb = SnapshotFiles(SnapshotView(repo, ma)), SnapshotFiles(SnapshotView(repo, mb))
    fd = FileDiff(fa, fb, changed_blocks(repo, ma, mb), ma.block_size, metadata=metadata)
    changes = [c.to_json() for c in fd.changes()]
    errors = [{"snapshot": m.id, "path": p, "error": why} for m, f in ((ma, fa), (mb, fb)) for p, why in f.problems]
    return {"a": ma.id, "b": mb.id, "changes": changes, **fd.stats, "errors": errors}
