"""The embeddable Python API. See docs/api.md (an example of every function) and README.md.

Every function is a thin call into the engine that the command line uses too, so the
library and ``vmbak COMMAND`` behave alike; errors are ``vmbak.VmbakError`` (subclasses in
``vmbak.errors``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmbak.changes.base import ChangeMap
from vmbak.disks.base import DiskReader
from vmbak.engine import sources
from vmbak.engine.backup import DEFAULT_BLOCK_SIZE, BackupOptions, check_tags
from vmbak.engine.backup import backup as _backup
from vmbak.engine.check import CheckReport
from vmbak.engine.check import check as _check
from vmbak.engine.info import diff as _diff
from vmbak.engine.info import repo_stats as _repo_stats
from vmbak.engine.info import snapshot_stats as _snapshot_stats
from vmbak.engine.overwrite import check_overwrite
from vmbak.engine.progress import Progress
from vmbak.engine.prune import DEFAULT_GRACE_S, DEFAULT_REPACK_THRESHOLD, PruneOptions, PruneReport
from vmbak.engine.prune import prune as _prune
from vmbak.engine.restore import RestoreTarget
from vmbak.engine.restore import restore as _restore
from vmbak.engine.retention import ForgetResult, Policy
from vmbak.engine.retention import forget as _forget
from vmbak.engine.tagging import TagResult
from vmbak.engine.tagging import tag as _tag
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository

if TYPE_CHECKING:
    from vmbak.serve.files import SnapshotFiles


def open_disk(path: str | os.PathLike[str], fmt: str | None = None) -> DiskReader:
    """Open a disk for reading the way ``vmbak backup`` and ``vmbak usage`` do: a raw file or
    block device directly, an image file (qcow2 with its backing chain, vhdx, vpc, vmdk, ...)
    as its virtual disk. ``fmt`` skips probing the format."""
    return sources.open_disk(os.fspath(path), fmt)


def backup(repo: Repository, disk: str | os.PathLike[str] | DiskReader, name: str, *, mode: str = "auto",
           changes: str = "auto", block_size: int = DEFAULT_BLOCK_SIZE, workers: int = 2,
           progress: Progress | None = None, log: Callable[[str], None] | None = None, fmt: str | None = None,
           change_map: ChangeMap | None = None, verify_changes: bool = False,
           skip_unused: bool = True, tags: list[str] | None = None, ceph_conf: str | None = None,
           ceph_id: str | None = None) -> Manifest:
    """Back up a disk under ``name``; the first backup of a name is full, later ones incremental.

    ``mode`` is "auto", "full", "incremental" or "differential". A path is opened exactly as
    ``vmbak backup DISK`` opens it (an image file is backed up as its virtual disk; ``fmt``
    skips probing), with ``changes`` "auto", "scan", "full" or "overlay". ``tags`` are
    stored in the snapshot (rules as ``vmbak backup --tag``). Returns the committed manifest.

    ``change_map`` is the caller's own changed-block tracking (a ``vmbak.ChangeMap``): only
    its blocks are read when its ``reference`` equals the parent snapshot's ``change_id``
    (otherwise the disk is scanned, and a note says why); its ``new_reference`` becomes this
    snapshot's ``change_id``, for the next one. ``verify_changes`` also scans everything and
    notes blocks the map missed. ``skip_unused=False`` stores blocks that no filesystem uses
    too (``--no-skip-unused``), so that a restore gives back every byte, not just every used one.

    ``disk`` "rbd:POOL/IMAGE" is a Ceph RBD image (``ceph_conf``, ``ceph_id`` as ``--ceph-conf``,
    ``--ceph-id``): a new snapshot of it is read, and with ``changes`` "auto" only what librbd's
    diff reports changed since the previous backup's snapshot (docs/rbd.md).
    """
    tags = check_tags(tags)
    from vmbak.disks.rbd import is_rbd

    if isinstance(disk, str) and is_rbd(disk):
        if change_map is not None:
            raise VmbakError("an RBD image brings its own change map; give no change_map")
        sources.check_name(name)
        lg = log or (lambda s: None)
        spec = sources.parse_changes(changes)
        with sources.open_source(repo, name=name, mode=mode, changes=spec, disk=disk, fmt=None,
                                 block_size=block_size, log=lg, ceph_conf=ceph_conf, ceph_id=ceph_id) as src:
            opts = BackupOptions(name=name, mode=mode, changes=spec.engine_changes, block_size=block_size,
                                 workers=workers, progress=progress, log=log, verify_changes=verify_changes,
                                 skip_unused=skip_unused, tags=tags)
            return sources.run_backup(repo, src, opts, log=lg)
    if change_map is not None and changes != "auto":
        raise VmbakError("give either change_map or changes, not both")
    if isinstance(disk, DiskReader):
        opts = BackupOptions(name=name, mode=mode, changes=changes, block_size=block_size, workers=workers,
                             progress=progress, log=log, source=disk.description, change_map=change_map,
                             change_id=change_map.new_reference if change_map is not None else None,
                             verify_changes=verify_changes, skip_unused=skip_unused, tags=tags)
        return _backup(repo, disk, opts)
    spec = sources.parse_changes(changes)
    if not spec.reads_disk_file:
        raise VmbakError(f"changes={changes!r} reads no disk file; give changes auto, scan, full or overlay")
    sources.check_name(name)
    lg = log or (lambda s: None)
    with sources.open_file_source(os.fspath(disk), fmt, spec, block_size, lg) as src:
        if change_map is not None:
            src.change_map, src.change_id = change_map, change_map.new_reference
        opts = BackupOptions(name=name, mode=mode, changes=spec.engine_changes, block_size=block_size,
                             workers=workers, progress=progress, log=log, verify_changes=verify_changes,
                             skip_unused=skip_unused, tags=tags)
        return sources.run_backup(repo, src, opts, log=lg)


def restore(repo: Repository, snapshot: str | Manifest, target: str | os.PathLike[str] | RestoreTarget, *,
            overwrite: bool = False, verify: bool = True, workers: int = 4,
            progress: Progress | None = None, sync: bool = False, readback: bool = False,
            ceph_conf: str | None = None, ceph_id: str | None = None) -> dict:
    """Restore a snapshot (a Manifest, an id prefix, ``NAME:latest`` or ``NAME@TIME``) to a raw file or device.

    An existing file or block device is written over only with ``overwrite``. A target
    "rbd:POOL/IMAGE" is a new Ceph RBD image, written sparsely (``ceph_conf``, ``ceph_id``).

    ``verify`` checks every block against the snapshot's block hashes as it is written;
    ``readback`` instead reads the whole target back after writing and checks that.
    """
    m = repo.find(snapshot) if isinstance(snapshot, str) else snapshot
    from vmbak.disks.rbd import RbdRestoreTarget, is_rbd, parse_rbd

    if isinstance(target, str) and is_rbd(target):
        if overwrite:
            raise VmbakError("vmbak restores into a new RBD image only; overwrite does not go with rbd:")
        rt = RbdRestoreTarget(parse_rbd(target), m.disk_size, conf=ceph_conf, client_id=ceph_id)
        try:
            return _restore(repo, m, rt, verify=verify, workers=workers, progress=progress, sync=sync,
                            readback=readback)
        finally:
            rt.close()
    if not isinstance(target, RestoreTarget):
        check_overwrite(target, overwrite)  # a block device needs overwrite=True, like a file
    tgt = target if isinstance(target, RestoreTarget) else os.fspath(target)
    return _restore(repo, m, tgt, overwrite=overwrite, verify=verify, workers=workers, progress=progress,
                    sync=sync, readback=readback)


def check(repo: Repository, read_data: bool = False) -> CheckReport:
    """Verify the repository: every pack the index names exists and agrees with it, and every
    chunk a snapshot names is present; with ``read_data``, every stored byte is read and
    authenticated too (``vmbak check [--read-data]``). ``report.ok`` says whether all is well;
    ``report.errors`` name the damaged snapshots and block ranges."""
    return _check(repo, read_data=read_data)


def verify_boot(repo: Repository, snapshot: str | Manifest, *, password: str | None = None,
                timeout: float = 300.0, expect_serial: str | None = None, expect_port: int | None = None,
                exec_command: str | None = None, expect_agent: bool = False, kernel: str | None = None,
                initrd: str | None = None, append: str | None = None, memory_mib: int | None = None,
                cpus: int | None = None, firmware: str | None = None, accel: str = "auto",
                output_dir: str | os.PathLike[str] | None = None, screenshot: bool = True,
                log: Callable[[str], None] | None = None) -> dict:
    """Boot ``snapshot`` in an isolated QEMU and report its signs of life, as ``vmbak verify
    SNAP --boot`` does (docs/verify.md): the result dict of one snapshot (``ok``, ``reason``,
    ``checks``, ``timings``, ``screenshot``, ``serial_log``, ...), one element of the
    command's ``results``. A guest that fails is ``ok`` False, not an exception; a
    verification that cannot run raises VmbakError. ``password`` is the repository's (the
    export opens the repository in a helper process); None for an unencrypted one. The
    keyword arguments are the command's options (``memory_mib`` in MiB). The repository is
    locked (shared) for the run and nothing else is written to it."""
    from vmbak.guest.boot import BootOptions, default_output_dir
    from vmbak.guest.boot import verify_boot as _verify_boot

    m = repo.find(snapshot) if isinstance(snapshot, str) else snapshot
    opts = BootOptions(timeout=timeout, expect_serial=expect_serial, expect_port=expect_port,
                       exec_command=exec_command, expect_agent=expect_agent, kernel=kernel, initrd=initrd,
                       append=append, memory_mib=memory_mib, cpus=cpus, firmware=firmware, accel=accel,
                       output_dir=os.fspath(output_dir) if output_dir is not None else default_output_dir(),
                       screenshot=screenshot)
    opts.validate()
    with repo.lock(purpose="verify"):
        return _verify_boot(repo, m, password if repo.encryption != "none" else None, opts, log=log)


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


# ---------------------------------------------------------------------------- change maps
def change_map(repo: Repository, name: str, changes: str, disk: str | os.PathLike[str] | None = None, *,
               mode: str = "auto", block_size: int = DEFAULT_BLOCK_SIZE, fmt: str | None = None,
               log: Callable[[str], None] | None = None) -> ChangeMap | None:
    """What the change source ``changes`` reports as changed for the next backup of ``name``,
    without backing anything up: "overlay" (the clusters of ``disk``'s top qcow2 layer),
    "track:SOCKET" (a ``vmbak track`` tracker) or "qemu:QMP_SOCKET:NODE" (a QEMU dirty bitmap).

    The source is left as it was: a tracker's checkpoint or QEMU's bitmap is aborted, so the
    next backup still gets every change. Returns None when the source has nothing to offer
    (no earlier snapshot to be relative to, or an overlay that cannot be read): a backup then
    reads the whole disk. ``ChangeMap.bitmap`` has one bool per ``block_size`` block.
    """
    spec = sources.parse_changes(changes)
    if spec.kind not in ("overlay", "track", "qemu"):
        raise VmbakError(f"changes={changes!r} is not a change source with a map: give overlay, "
                         "track:SOCKET or qemu:QMP_SOCKET:NODE")
    sources.check_name(name)
    with sources.open_source(repo, name=name, mode=mode, changes=spec,
                             disk=os.fspath(disk) if disk is not None else None, fmt=fmt,
                             block_size=block_size, log=log) as src:
        src.abort()
        return src.change_map


def diff(repo: Repository, a: str | Manifest, b: str | Manifest) -> dict:
    """The blocks whose content differs between snapshots ``a`` and ``b`` of one disk, found by
    their block hashes (no data is read), as ``vmbak diff A B --json`` prints them: a dict with
    ``changed_blocks``, ``changed_bytes``, ``block_size``, ``extent_count`` and ``extents``
    (a list of ``{"offset", "length"}`` in bytes)."""
    ma = repo.find(a) if isinstance(a, str) else a
    mb = repo.find(b) if isinstance(b, str) else b
    return _diff(repo, ma, mb)


# ---------------------------------------------------------------------------- retention and space
def forget(repo: Repository, snapshots: list[str] | None = None, *, name: str | None = None,
           keep_last: int = 0, keep_hourly: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
           keep_monthly: int = 0, keep_yearly: int = 0, policy: Policy | None = None,
           keep_dependencies: bool = False, dry_run: bool = False,
           log: Callable[[str], None] | None = None) -> ForgetResult:
    """Forget ``snapshots`` (ids, ``NAME:latest``, ``NAME@TIME``) and the snapshots no keep rule
    keeps, per disk name (or of ``name`` only), as ``vmbak forget`` does. ``keep_*`` counts
    (-1: all) or a ``Policy`` give the rules. Incrementals that stay but depend on forgotten
    snapshots are merged with them (new ids), or with ``keep_dependencies`` their parents
    stay. ``result.to_json()`` is what ``vmbak forget --json`` prints. Space is freed by prune.
    """
    if policy is None:
        policy = Policy(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                        monthly=keep_monthly, yearly=keep_yearly)
    return _forget(repo, policy, name=name, snapshots=list(snapshots or []), keep_dependencies=keep_dependencies,
                   dry_run=dry_run, log=log)


def tag(repo: Repository, snapshots: list[str | Manifest], *, add: list[str] | None = None,
        remove: list[str] | None = None, replace: list[str] | None = None, dry_run: bool = False) -> TagResult:
    """Add ``add`` and remove ``remove`` tags of ``snapshots`` (or give them exactly
    ``replace``), as ``vmbak tag`` does. A changed snapshot, and the later snapshots of its
    chain, get new ids (the old ones keep naming them; ``result.changed`` has
    ``id``/``new_id``); nothing else changes. ``result.to_json()`` is what ``vmbak tag
    --json`` prints."""
    specs = [s.id if isinstance(s, Manifest) else s for s in snapshots]
    return _tag(repo, snapshots=specs, add=add, remove=remove, replace=replace, dry_run=dry_run)


def prune(repo: Repository, *, grace_s: float = DEFAULT_GRACE_S, repack_threshold: float = DEFAULT_REPACK_THRESHOLD,
          dry_run: bool = False, log: Callable[[str], None] | None = None) -> PruneReport:
    """Free the space of data no snapshot references, as ``vmbak prune`` does: a run marks
    garbage packs (and repacks packs that are at least ``repack_threshold`` garbage); packs
    are deleted by a run after ``grace_s`` seconds once every operation that was running at
    marking time has finished (``grace_s=0``: at once, when nothing else is running)."""
    return _prune(repo, PruneOptions(grace_s=grace_s, repack_threshold=repack_threshold, dry_run=dry_run), log=log)


def stats(repo: Repository, snapshot: str | Manifest | None = None) -> dict:
    """Space statistics, as ``vmbak stats [SNAP] --json`` prints them: without ``snapshot`` the
    repository's totals (``snapshots``, ``chunks``, ``pack_bytes``, ``dedup_ratio``,
    ``compression_ratio``, ...); with one, ``{"snapshot": summary, "stats": {...}}`` with what
    that backup read, found new and stored."""
    if snapshot is None:
        return _repo_stats(repo)
    return _snapshot_stats(repo, repo.find(snapshot) if isinstance(snapshot, str) else snapshot)


# ---------------------------------------------------------------------------- browsing
DEFAULT_BROWSE_CACHE = 256 << 20


def _files(repo: Repository, snapshot: str | Manifest, cache_bytes: int,
           on_problem: Callable[[str, str], None] | None) -> SnapshotFiles:
    from vmbak.engine.view import SnapshotView
    from vmbak.serve.files import SnapshotFiles

    m = repo.find(snapshot) if isinstance(snapshot, str) else snapshot
    files = SnapshotFiles(SnapshotView(repo, m, cache_bytes))
    files.on_problem = on_problem
    return files


def ls(repo: Repository, snapshot: str | Manifest, path: str = "/", *, recursive: bool = False,
       cache_bytes: int = DEFAULT_BROWSE_CACHE, on_problem: Callable[[str, str], None] | None = None) -> list[dict]:
    """The entries of a directory inside a snapshot (or the one entry at ``path``), as
    ``vmbak ls --json`` prints them: dicts with ``name``, ``path``, ``type`` ("file", "dir",
    "symlink", "other"), ``size``, ``mode`` (octal text), ``mtime`` (ISO 8601) and ``target``.
    The top level holds the volumes (``/p1``, ``/p2``, ``/vg0/root``; ``/disk`` without a
    partition table). With ``recursive``, everything below ``path``. Entries that cannot be
    read are passed to ``on_problem(path, why)`` and left out; the rest is listed."""
    files = _files(repo, snapshot, cache_bytes, on_problem)
    try:
        node, entries = files.listdir(path)
        if recursive and node.kind == "dir":
            fs, _vol, n, norm = files.resolve(path)
            if fs is None:  # above the filesystems: walk each volume below
                top, entries = entries, []
                for p, e in top:
                    try:
                        sub_fs, _v, sn, snorm = files.resolve(p)
                    except VmbakError as err:  # a volume that cannot be read: the others still are
                        entries.append((p, e))
                        files.problem(p, str(err).removeprefix(f"{files.label}:{p}: "))
                        continue
                    if sub_fs is None:
                        entries.append((p, e))
                    else:
                        entries.extend(files.walk(sub_fs, sn, snorm))
            else:
                walked = files.walk(fs, n, norm)
                next(walked)  # the directory itself
                entries = list(walked)
        return [e.to_json(p) for p, e in entries]
    finally:
        files.view.close()


def cat(repo: Repository, snapshot: str | Manifest, path: str, *,
        cache_bytes: int = DEFAULT_BROWSE_CACHE) -> bytes:
    """The content of the regular file at ``path`` inside a snapshot (``vmbak cat``); only the
    chunks holding it are fetched. For a large file, ``extract`` streams it to disk instead."""
    files = _files(repo, snapshot, cache_bytes, None)
    try:
        fs, _vol, node, norm = files.resolve(path)
        if fs is None or node.kind == "dir":
            raise VmbakError(f"{files.label}: is a directory: {norm}")
        if node.kind != "file":
            raise VmbakError(f"{files.label}: not a regular file ({node.kind}): {norm}")
        parts: list[bytes] = []
        files.copy_out(fs, node, norm, parts.append)
        return b"".join(parts)
    finally:
        files.view.close()


def extract(repo: Repository, snapshot: str | Manifest, paths: list[str], target: str | os.PathLike[str], *,
            cache_bytes: int = DEFAULT_BROWSE_CACHE, on_problem: Callable[[str, str], None] | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Copy files, directories and symlinks at ``paths`` inside a snapshot into the directory
    ``target`` (created if missing), keeping mode and modification time, as ``vmbak extract``
    does: nothing is written outside ``target``, and each file appears under its name only once
    it is whole. Returns the report ``vmbak extract --json`` prints (``files``, ``dirs``,
    ``symlinks``, ``bytes``, ``updated``, ``unchanged``, ``skipped``, ``errors``, ``target``);
    entries that cannot be read are in ``errors`` (and passed to ``on_problem``)."""
    files = _files(repo, snapshot, cache_bytes, on_problem)
    try:
        return files.extract(list(paths), os.fspath(target), log=log)
    finally:
        files.view.close()
