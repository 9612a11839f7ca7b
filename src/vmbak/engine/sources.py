"""Where a backup reads from and what tells it which blocks changed.

The command line names a source in one of these ways:

* ``DISK``: a raw file or block device, or an image file of any format ``qemu-img`` reads
  (qcow2 with its backing chain, vhdx, vpc, vmdk, ...). Changes come from a scan against the
  parent (``--changes auto|scan``), from nothing (``full``), or from the clusters allocated
  in an overlay's top layer (``overlay``). An image file's backup records the file's
  identity as its change ID, so that an overlay made on top of it later can refer to it.
* ``--changes track:SOCKET``: a disk behind ``vmbak track``; the backup reads a frozen
  checkpoint of it and the tracker's changes since the parent's change ID.
* ``--changes qemu:QMP_SOCKET:NODE``: a node of a running QEMU or qemu-storage-daemon;
  a point-in-time view (fleecing) and the persistent dirty bitmap since the parent's.
* ``--libvirt DOMAIN``: every disk of a running libvirt domain, with one checkpoint.

Each is opened as a ``BackupSource``: a reader, a change map (or None: scan), the change ID
the backup captures, notes, and a transaction: ``commit`` once the manifest is durable,
``abort`` on any failure. When a change source cannot prove that it saw every change since
the parent (unknown change ID, lost or inconsistent bitmap, invalid tracking), the source
says so in a note and falls back to a consistent full view, which the engine then scans
against the parent. Whether a change map fits the parent at all (its reference must be the
parent's change ID) is the engine's check (``engine.backup``).

The second half restores a libvirt backup: its disks, plus the saved domain XML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from vmbak.changes.base import ChangeMap
from vmbak.disks.base import DiskReader
from vmbak.engine.backup import BackupOptions, backup
from vmbak.errors import ChangeTrackingError, DiskError, RepositoryError, SnapshotNotFound, VmbakError
from vmbak.interrupts import deferred, register_cleanup, unregister_cleanup
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository, _parse_iso, parse_time_limit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmbak.changes.libvirt import LibvirtBackup

Log = Callable[[str], None]
Quiesce = Callable[[], contextlib.AbstractContextManager]  # freeze/thaw around a point in time

# The change source of a state file's snapshot when the file's stat equals the parent's
# record (vmbak.domain.state): nothing is read, nothing changed.
UNCHANGED_FILE = "file-unchanged"
CHANGES_HELP = "auto, scan, full, overlay, track:SOCKET or qemu:QMP_SOCKET:NODE"
LIBVIRT_KEY = "libvirt"  # manifest.extra key of a libvirt disk backup
# File name extensions of restored images, by qemu format name.
EXTENSIONS = {"raw": "raw", "qcow2": "qcow2", "vhdx": "vhdx", "vpc": "vhd", "vmdk": "vmdk"}
# Target file extensions that choose a restore format when none is given.
FORMAT_BY_EXTENSION = {".qcow2": "qcow2", ".vhdx": "vhdx", ".vhd": "vpc", ".vmdk": "vmdk"}


# ---------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ChangeSpec:
    """A parsed ``--changes`` value."""

    kind: str  # auto, scan, full, overlay, track, qemu
    socket: str = ""
    node: str = ""

    @property
    def reads_disk_file(self) -> bool:
        """True when the backup reads a DISK named on the command line."""
        return self.kind in ("auto", "scan", "full", "overlay")

    @property
    def engine_changes(self) -> str:
        return "full" if self.kind == "full" else "auto"

    def __str__(self) -> str:
        if self.kind == "track":
            return f"track:{self.socket}"
        if self.kind == "qemu":
            return f"qemu:{self.socket}:{self.node}"
        return self.kind


def parse_changes(text: str) -> ChangeSpec:
    """Parse ``auto``, ``scan``, ``full``, ``overlay``, ``track:SOCKET`` or
    ``qemu:QMP_SOCKET:NODE``; a VmbakError (one line) for anything else."""
    t = (text or "").strip()
    if t in ("auto", "scan", "full", "overlay"):
        return ChangeSpec(t)
    if t.startswith("track:"):
        sock = t[len("track:"):]
        if not sock:
            raise VmbakError("bad change source 'track:': give the tracker's socket, e.g. "
                             "--changes track:/run/vmbak/web.sock")
        return ChangeSpec("track", socket=sock)
    if t.startswith("qemu:"):
        sock, sep, node = t[len("qemu:"):].rpartition(":")
        if not sep or not sock or not node or "/" in node:
            raise VmbakError(f"bad change source {text!r}: use qemu:QMP_SOCKET:NODE, e.g. "
                             "--changes qemu:/run/qemu/db.qmp:drive0")
        return ChangeSpec("qemu", socket=sock, node=node)
    raise VmbakError(f"unknown change source {text!r} (use {CHANGES_HELP})")


def check_name(name: str | None) -> str:
    """A backup name as the engine accepts it (``engine.backup.check_name``); a one-line
    error otherwise (checked before a change source opens anything)."""
    from vmbak.engine.backup import check_name as engine_check_name

    if not name:
        raise VmbakError("give the backup a name with --name NAME")
    return engine_check_name(name)


def check_image_format(fmt: str | None, *, write: bool) -> str | None:
    """Normalise a format name given by the user (``vhd`` is ``vpc``); a one-line error for
    a format vmbak cannot read (or, with ``write``, write)."""
    from vmbak.disks.qemu import READ_FORMATS, WRITE_FORMATS, normalize_format

    f = normalize_format(fmt)
    if f is None:
        return None
    allowed = WRITE_FORMATS if write else ("raw", *READ_FORMATS)
    if f not in allowed:
        what = "restore to" if write else "read"
        raise VmbakError(f"unknown image format {fmt!r} (vmbak can {what} "
                         f"{', '.join(a + ' (vhd)' if a == 'vpc' else a for a in allowed)})")
    return f


# ---------------------------------------------------------------------------- sources
@dataclass
class BackupSource:
    """One disk view to back up, what changed in it, and the transaction around it."""

    reader: DiskReader
    description: str
    change_map: ChangeMap | None = None
    change_id: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    name: str = ""  # the backup name, when the source decides it (libvirt disks)
    options: dict = field(default_factory=dict)  # BackupOptions this source sets itself (libvirt: mode, skip_unused)
    _commit: Callable[[], None] | None = None
    _abort: Callable[[], None] | None = None
    _close: Callable[[], None] | None = None
    _state: str = "open"

    def commit(self) -> None:
        """The backup is durable: let the change source forget what it covered."""
        if self._state != "open":
            return
        self._state = "committed"
        if self._commit is not None:
            self._commit()

    def abort(self) -> None:
        """The backup failed: the change source keeps every change for the next backup."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._abort is not None:
            self._abort()

    def close(self) -> None:
        if self._state == "open":
            self.abort()
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def __enter__(self) -> BackupSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def previous_snapshot(repo: Repository, name: str, mode: str) -> Manifest | None:
    """The snapshot the next backup of ``name`` will most likely build on (the engine
    decides for sure, under the repository lock, and checks the change map against it)."""
    if mode == "full":
        return None
    return repo.latest(name, full_only=(mode == "differential"))


def open_disk(path: str, fmt: str | None = None) -> DiskReader:
    """A raw file or device as a RawDisk; any image format through QEMU (``qemu-img info``
    detects it unless ``fmt`` is given). Block devices and ``*.raw`` files are never probed:
    a guest could have written an image header onto its own raw disk."""
    from vmbak.disks.qemu import open_image
    from vmbak.disks.raw import RawDisk, check_disk_path

    st = check_disk_path(path)  # a FIFO, socket, directory or character device: refused unopened
    if fmt is None:
        if stat.S_ISBLK(st.st_mode) or path.lower().endswith(".raw") or shutil.which("qemu-img") is None:
            return RawDisk(path)
    return open_image(path, fmt)


def _image_identity(path: str, fmt: str | None) -> str | None:
    from vmbak.changes.overlay import image_identity

    try:
        return image_identity(path, fmt)
    except DiskError:
        return None


def open_file_source(path: str, fmt: str | None, changes: ChangeSpec, block_size: int,
                     log: Log) -> BackupSource:
    """A disk or image file; with ``overlay``, the top layer's clusters are the changes."""
    from vmbak.changes.overlay import overlay_change_map
    from vmbak.disks.raw import check_disk_path

    check_disk_path(path)  # before qemu-img looks at it: a FIFO would block it
    notes: list[str] = []
    cm = None
    fmt = check_image_format(fmt, write=False)
    if changes.kind == "overlay":
        try:
            cm = overlay_change_map(path, block_size, fmt)
        except ChangeTrackingError as e:
            notes.append(f"overlay: {e}; scanning instead")
            log(notes[-1])
    # The file's identity before it is read: any later write changes it, so a later
    # overlay's map is used only when this backup read exactly its backing file.
    change_id = cm.new_reference if cm is not None else _image_identity(path, fmt)
    reader = open_disk(path, fmt)
    fmt_found = getattr(reader, "format", "raw")
    return BackupSource(reader=reader, description=reader.description, change_map=cm, change_id=change_id,
                        notes=notes, extra={"image": {"format": fmt_found}}, _close=reader.close)


def open_track_source(sock: str, since: str | None, parent: Manifest | None, block_size: int,
                      log: Log, quiesce: Quiesce | None = None) -> BackupSource:
    """A checkpoint of a disk behind ``vmbak track``; ``quiesce`` is entered around the
    checkpoint's creation."""
    from vmbak.tracker.client import TrackerClient, TrackerUnavailable

    notes: list[str] = []
    client = TrackerClient(sock)
    try:
        if since is None and parent is not None:
            notes.append(f"tracker: snapshot {parent.short_id} has no change ID; reading the whole "
                         "checkpoint (scan)")
            log(notes[-1])
        try:
            with quiesce() if quiesce is not None else contextlib.nullcontext():
                cp = client.checkpoint(since, block_size)
        except TrackerUnavailable:
            raise
        except ChangeTrackingError as e:
            if since is None:
                raise
            notes.append(f"tracker: {e}; reading the whole checkpoint (scan)")
            log(notes[-1])
            with quiesce() if quiesce is not None else contextlib.nullcontext():
                cp = client.checkpoint(None, block_size)
    except BaseException:
        client.close()
        raise

    def commit() -> None:
        try:
            cp.commit()
        finally:
            client.close()

    def abort() -> None:
        try:
            cp.abort()
        finally:
            client.close()

    return BackupSource(reader=cp.reader, description=f"track:{sock}", change_map=cp.change_map,
                        change_id=cp.change_id, notes=notes, _commit=commit, _abort=abort,
                        _close=cp.reader.close)


def open_qemu_source(sock: str, node: str, since: str | None, block_size: int, nbd_server: str | None,
                     log: Log, quiesce: Quiesce | None = None) -> BackupSource:
    """A point-in-time view of a node of a running QEMU, with its dirty bitmap; ``quiesce``
    is entered around the QMP transaction that makes the view."""
    from vmbak.changes.qemu import open_session

    notes: list[str] = []
    try:
        s = open_session(sock, node, since, block_size, nbd_server=nbd_server, log=log, quiesce=quiesce)
    except ChangeTrackingError as e:
        if since is None:
            raise
        notes.append(f"qemu: {e}; reading the whole disk (scan) and starting a new bitmap")
        log(notes[-1])
        s = open_session(sock, node, None, block_size, nbd_server=nbd_server, log=log, quiesce=quiesce)
    notes.extend(s.notes)
    if s.change_map is not None:  # the session's notes are recorded once, here
        s.change_map.notes = [n for n in s.change_map.notes if n not in s.notes]
    return BackupSource(reader=s.reader, description=f"qemu:{sock}:{node}", change_map=s.change_map,
                        change_id=s.change_id, notes=notes, _commit=s.commit, _abort=s.abort)


def open_rbd_source(spec: str, since: str | None, changes: ChangeSpec, mode: str, block_size: int, *,
                    ceph_conf: str | None = None, ceph_id: str | None = None, log: Log | None = None,
                    quiesce: Quiesce | None = None, chain: str | None = None) -> BackupSource:
    """A new snapshot of an RBD image (``rbd:POOL/IMAGE``) and librbd's diff since the
    snapshot ``since`` names (changes/rbd.py); ``quiesce`` is entered around the snapshot.
    ``chain`` (``REPOSITORY-ID:NAME``) owns the snapshot (see changes/rbd.py)."""
    from vmbak.changes.rbd import open_session
    from vmbak.disks.rbd import parse_rbd

    log = log or (lambda s: None)
    if changes.kind not in ("auto", "scan", "full"):
        raise VmbakError(f"an RBD image brings its own change source (rbd diff); --changes {changes} "
                         "does not go with it (use auto, scan or full)")
    rs = parse_rbd(spec)
    s = open_session(rs, since, block_size, conf=ceph_conf, client_id=ceph_id,
                     keep_older=mode == "differential" and since is not None, log=log,
                     quiesce=quiesce, chain=chain)
    if changes.kind != "auto":
        s.change_map = None  # scan or full: read every used block of the new snapshot
    return BackupSource(reader=s.reader, description=str(rs), change_map=s.change_map, change_id=s.change_id,
                        notes=list(s.notes), extra={"rbd": {"pool": rs.pool, "image": rs.image,
                                                            "snapshot": s.snapshot}},
                        _commit=s.commit, _abort=s.abort)


def open_source(repo: Repository, *, name: str, mode: str, changes: ChangeSpec, disk: str | None,
                fmt: str | None, block_size: int, nbd_server: str | None = None,
                log: Log | None = None, quiesce: Quiesce | None = None, ceph_conf: str | None = None,
                ceph_id: str | None = None) -> BackupSource:
    """Open what ``vmbak backup`` reads for one disk. ``quiesce`` (``Quiescer.frozen``) is
    entered around the creation of a point-in-time view (``track:``, ``qemu:`` and ``rbd:``)."""
    from vmbak.disks.rbd import is_rbd

    log = log or (lambda s: None)
    if is_rbd(disk):
        assert disk is not None
        parent = previous_snapshot(repo, name, mode)
        since = parent.change_id if parent is not None else None
        return open_rbd_source(disk, since, changes, mode, block_size, ceph_conf=ceph_conf, ceph_id=ceph_id,
                               log=log, quiesce=quiesce, chain=f"{repo.id}:{name}")
    if ceph_conf is not None or ceph_id is not None:
        raise VmbakError("--ceph-conf and --ceph-id go with an RBD image (rbd:POOL/IMAGE)")
    if changes.kind in ("track", "qemu"):
        parent = previous_snapshot(repo, name, mode)
        since = parent.change_id if parent is not None else None
        if changes.kind == "track":
            return open_track_source(changes.socket, since, parent, block_size, log, quiesce)
        return open_qemu_source(changes.socket, changes.node, since, block_size, nbd_server, log, quiesce)
    if disk is None:
        raise VmbakError("no disk given")
    return open_file_source(disk, fmt, changes, block_size, log)


def run_backup(repo: Repository, src: BackupSource, opts: BackupOptions, log: Log | None = None) -> Manifest:
    """Back up one source: commit the change source once the manifest is durable, abort it
    on any failure (an interrupt included)."""
    log = log or (lambda s: None)
    opts = dataclasses.replace(opts, change_map=src.change_map, change_id=src.change_id,
                               notes=[*opts.notes, *src.notes], extra={**opts.extra, **src.extra},
                               source=opts.source or src.description)
    try:
        m = backup(repo, src.reader, opts)
    except BaseException:
        try:
            src.abort()
        except Exception as e:  # noqa: BLE001 - the backup's own error matters more
            log(f"warning: could not abort the change source: {e}")
        raise
    try:
        src.commit()
    except VmbakError as e:
        log(f"warning: snapshot {m.short_id} is saved, but the change source did not commit ({e}); "
            "the next backup reads everything again")
    return m


# ---------------------------------------------------------------------------- libvirt
@dataclass
class LibvirtJob:
    """One pull-mode backup of every disk of a domain, and of the files it needs besides
    them (NVRAM, TPM state, kernel, ...: ``vmbak.domain.state``)."""

    domain: str
    checkpoint: str
    sources: list[BackupSource]
    notes: list[str]
    offline: bool = False  # the domain was shut off: started paused for the backup, stopped after it
    _lv: object = None  # the LibvirtBackup
    _cleanup: list[Callable[[], None]] = field(default_factory=list)

    def _end(self, ok: bool) -> None:
        try:
            if ok:
                self._lv.commit()  # type: ignore[attr-defined]
            else:
                self._lv.abort()  # type: ignore[attr-defined]
        finally:
            for fn in reversed(self._cleanup):
                try:
                    fn()
                except Exception:  # noqa: BLE001, S110 - cleanup after the job: best effort
                    pass
            self._cleanup.clear()

    @property
    def last_disk(self) -> BackupSource | None:
        """The last source read through the job (the others are state files)."""
        disks = [s for s in self.sources if not (s.extra.get(LIBVIRT_KEY) or {}).get("state_role")]
        return disks[-1] if disks else None

    def commit(self) -> None:
        self._end(True)

    def abort(self) -> None:
        self._end(False)


def _lv_info(m: Manifest) -> dict | None:
    lv = m.extra.get(LIBVIRT_KEY) if isinstance(m.extra, dict) else None
    return lv if isinstance(lv, dict) else None


def state_role(m: Manifest) -> str | None:
    """The role (``nvram``, ``tpm``, ``kernel``, ...) of a libvirt state file's snapshot, or
    None for a disk's snapshot."""
    lv = _lv_info(m)
    role = lv.get("state_role") if lv is not None else None
    return role if isinstance(role, str) else None


def _member_key(lv: dict) -> str:
    """A disk's target (``vda``), or ``state:ROLE`` for a state file's snapshot."""
    role = lv.get("state_role")
    return f"state:{role}" if role else str(lv.get("target"))


def _stored_roles(lv: dict) -> list[str]:
    return [r.get("role") for r in lv.get("state") or [] if isinstance(r, dict) and r.get("stored")]


def libvirt_groups(repo: Repository, name: str | None = None) -> list[list[Manifest]]:
    """Complete libvirt backups (one snapshot of every disk the domain had, and of every
    state file stored with it), oldest first; in each, the disks by target, then the state
    snapshots. ``name`` matches the domain or the name prefix given at backup time."""
    groups: dict[str, dict[str, Manifest]] = {}
    for m in repo.manifests():
        lv = _lv_info(m)
        if lv is None or (name is not None and name not in (lv.get("domain"), lv.get("prefix"))):
            continue
        groups.setdefault(str(lv.get("checkpoint")), {})[_member_key(lv)] = m
    out = []
    for g in groups.values():
        first = _lv_info(next(iter(g.values())))
        assert first is not None
        want = set(first.get("disks") or []) | {f"state:{r}" for r in _stored_roles(first)}
        if first.get("disks") and want <= set(g):
            out.append(sorted(g.values(), key=lambda m: (_member_key(_lv_info(m)).startswith("state:"),  # type: ignore[arg-type]
                                                         _member_key(_lv_info(m)))))  # type: ignore[arg-type]
    out.sort(key=lambda g: max(m.time for m in g))
    return out


def _previous_state(repo: Repository, prefix: str, group: list[Manifest]) -> dict[str, dict]:
    """The state records (role -> record) of the backup ``group`` whose files a new backup may
    take as unchanged: those whose snapshot in the group is the newest of its name (the
    parent the new snapshot of that role will have)."""
    lv = _lv_info(group[0])
    records = {r["role"]: r for r in (lv or {}).get("state") or [] if isinstance(r, dict) and isinstance(r.get("role"), str)}
    out = {}
    for m in group:
        role = state_role(m)
        if role in records and records[role].get("stored") is True:
            latest = repo.latest(f"{prefix}-{role}")
            if latest is not None and latest.id == m.id:
                out[role] = records[role]
    for role, rec in records.items():  # recorded, not stored (packaged firmware): no snapshot
        if rec.get("stored") is False:
            out[role] = rec
    return out


def _open_unchanged(it) -> object:  # noqa: ANN001 - a StateItem; a RawDisk or None
    """The file of an unchanged state item, opened; None when it is no longer the file
    recorded (replaced or written since its stat was compared)."""
    from vmbak.disks.raw import RawDisk
    from vmbak.domain.state import STAT_KEYS

    try:
        r = RawDisk(it.path)
    except DiskError:
        return None
    state = r.source_state()
    if state is None or state != tuple(it.stat[k] for k in STAT_KEYS):
        r.close()
        return None
    return r


def _start_paused(conn, dom, domain: str) -> None:  # noqa: ANN001
    """Start a shut-off domain paused, tied to ``conn`` (libvirt destroys it when the
    connection closes, so a vmbak that dies leaves it shut off again)."""
    from vmbak.changes.libvirt import _libvirt, _msg

    lv = _libvirt()
    if not dom.isPersistent():
        raise DiskError(f"libvirt domain {domain!r} is not running and not persistent")
    try:
        dom.createWithFlags(lv.VIR_DOMAIN_START_PAUSED | lv.VIR_DOMAIN_START_AUTODESTROY)
    except lv.libvirtError as e:
        raise DiskError(f"libvirt domain {domain!r} is shut off, and starting it paused for the backup "
                        f"failed: {_msg(e)}") from None


def _stop_started(dom) -> None:  # noqa: ANN001
    from vmbak.changes.libvirt import _libvirt

    lv = _libvirt()
    try:
        dom.destroyFlags(lv.VIR_DOMAIN_DESTROY_GRACEFUL)  # QEMU saves the persistent bitmaps as it ends
    except lv.libvirtError:
        try:
            dom.destroy()
        except lv.libvirtError:
            pass


def _remove_dead_workdirs(tmpdir: str | None) -> None:
    """Remove the private directories (``vmbak-state-PID-*``: copies of state files, a TPM's
    secrets among them; ``vmbak-libvirt-PID-*``: a backup job's socket and scratch files)
    that vmbak processes which no longer run left behind (killed with ``kill -9``)."""
    import re

    base = tmpdir or tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for n in names:
        m = re.fullmatch(r"vmbak-(?:state|libvirt)-(\d+)-[0-9a-z_]+", n)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running (or another user's process with that pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(base, n), ignore_errors=True)


def open_libvirt(repo: Repository, domain: str, *, prefix: str, mode: str, changes: ChangeSpec,
                 block_size: int, uri: str, log: Log | None = None, quiesce: Quiesce | None = None,
                 tmpdir: str | None = None, early: LibvirtBackup | None = None) -> LibvirtJob:
    """Start a pull-mode backup of every disk of ``domain``, and capture the files it needs
    besides them. Each disk's backup is named ``PREFIX-TARGET`` (``db-vda``), each state
    file's ``PREFIX-ROLE`` (``db-nvram``); the checkpoint of the newest complete backup of
    the domain is the reference for the changes. A disk added since then (or whose image
    file changed) starts its own full; a disk removed since then is reported. A shut-off
    domain is started paused (no guest code runs) for the backup and stopped after it;
    ``quiesce`` is then not used (the disks are at rest). ``early`` is a job that
    ``vmbak.changes.libvirt_early`` began already (with ``quiesce`` done); it is used (or
    ended) here."""
    import numpy as np

    from vmbak.changes.libvirt import begin_backup, change_map, connect, domain_disks, lookup
    from vmbak.disks.raw import RawDisk
    from vmbak.domain.state import capture, state_items
    from vmbak.domain.xml import check_disks

    log = log or (lambda s: None)
    if changes.kind not in ("auto", "scan", "full"):
        raise VmbakError(f"--libvirt reads the domain's disks through libvirt; --changes {changes} "
                         "cannot be used with it (use auto, scan or full)")
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    _remove_dead_workdirs(tmpdir)
    cleanup: list[Callable[[], None]] = [early.abort] if early is not None else []  # a no-op once committed
    try:
        conn = connect(uri)
    except BaseException:
        if early is not None:
            early.abort()
        raise
    cleanup.append(conn.close)

    def undo() -> None:
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 - cleanup on the way out of a failure
                pass

    try:
        dom = lookup(conn, domain)
        xml_now = dom.XMLDesc(0)
        check_disks(xml_now, domain)
        current = {d.target: d.source for d in domain_disks(xml_now)}
        since = None
        previous: dict[str, dict] = {}
        previous_state: dict[str, dict] = {}  # role -> the state record an unchanged file is checked against
        if mode != "full" and changes.kind == "auto":
            groups = [g for g in libvirt_groups(repo, prefix) if _lv_info(g[0]).get("domain") == domain]  # type: ignore[union-attr]
            if groups:
                since = groups[-1][0].change_id
                previous = {lv["target"]: {"source": lv.get("source"), "id": m.short_id}
                            for m in groups[-1] if (lv := _lv_info(m)) is not None and not lv.get("state_role")}
                if mode in ("auto", "incremental"):
                    previous_state = _previous_state(repo, prefix, groups[-1])
        full_disks = set()
        for tgt, src in sorted(current.items()):
            if since is None or not previous:
                continue
            if tgt not in previous:
                full_disks.add(tgt)
                note(f"libvirt: disk {tgt} ({src}) is new since the last backup: a full backup of it")
            elif previous[tgt]["source"] != src:
                full_disks.add(tgt)
                note(f"libvirt: disk {tgt} is now {src} (was {previous[tgt]['source']}): a full backup of it")
        for tgt in sorted(set(previous) - set(current)):
            note(f"libvirt: disk {tgt} ({previous[tgt]['source']}) was removed from the domain; its snapshots "
                 f"stay in the repository (the last: {previous[tgt]['id']})")
        offline = not dom.isActive()
        if offline and early is not None:  # it stopped meanwhile: its job is gone with it
            early.abort()
            early = None
        if offline:
            _start_paused(conn, dom, domain)
            cleanup.append(lambda: _stop_started(dom))
            note(f"libvirt: domain {domain} is shut off: started it paused (its CPUs do not run) to read its "
                 "disks through a checkpoint; it is stopped again after the backup")
            quiesce = None
        if early is not None:
            b = early
            if b.since != since:
                # The job's reference is libvirt's vmbak checkpoint, not the repository's:
                # its view is a point in time all the same, read whole (scan). Committed, it
                # drops that checkpoint, as a job begun here without one drops the others.
                if since is not None:
                    note(f"libvirt: checkpoint {since!r} of libvirt domain {domain!r} is missing, so the changes "
                         "since the last backup are unknown; reading every disk whole (scan) with a new checkpoint")
                full_disks = set()
            else:
                for tgt, v in b.disks.items():
                    if since is not None and v.bitmap_context is not None and tgt not in full_disks:
                        v.change_map = change_map(v.reader, v.bitmap_context, block_size, since, b.change_id, tgt,
                                                  v.dirty_extents)
        else:
            try:
                b = begin_backup(domain, since, block_size, uri=uri, log=log, quiesce=quiesce,
                                 full_disks=frozenset(full_disks), tmpdir=tmpdir)
            except ChangeTrackingError as e:
                if since is None:
                    raise
                note(f"libvirt: {e}; reading every disk whole (scan) with a new checkpoint")
                full_disks = set()
                b = begin_backup(domain, None, block_size, uri=uri, log=log, quiesce=quiesce, tmpdir=tmpdir)
            cleanup.append(b.abort)  # a no-op once the job is committed
        notes.extend(b.notes)
        if early is not None and b.state is not None:  # captured right after the early checkpoint
            items, work, state_notes = b.state
            cleanup.append(lambda: shutil.rmtree(work, ignore_errors=True))
        else:
            work = tempfile.mkdtemp(prefix=f"vmbak-state-{os.getpid()}-", dir=tmpdir)
            cleanup.append(lambda: shutil.rmtree(work, ignore_errors=True))
            items = state_items(b.domain_xml, uri)
            try:
                state_notes = capture(items, work, previous_state)
            except DiskError as e:
                raise DiskError(f"libvirt domain {domain!r}: {e}; no backup taken") from None
        for n in state_notes:
            note(n)
        records = [it.record() for it in items]
        stored = [it for it in items if it.stored]
        targets = sorted(b.disks)
        base = {"domain": domain, "uri": uri, "prefix": prefix, "checkpoint": b.change_id, "disks": targets,
                "state": records}
        if offline:
            base["offline"] = True
        srcs = []
        for tgt in targets:
            v = b.disks[tgt]
            info = {**base, "target": tgt, "format": v.format, "source": v.source, "domain_xml": b.domain_xml}
            srcs.append(BackupSource(reader=v.reader, description=f"libvirt:{domain}:{tgt} ({v.source})",
                                     change_map=v.change_map, change_id=b.change_id, notes=list(notes),
                                     extra={LIBVIRT_KEY: info}, name=f"{prefix}-{tgt}",
                                     options={"mode": "full"} if tgt in full_disks and tgt in previous else {}))
        for it in stored:
            cm = None
            if it.unchanged:
                # not read: the file itself, not a copy, so that nothing is read from it; an
                # empty change map since the parent's snapshot of it (the one recorded)
                r = _open_unchanged(it)
                if r is None:  # it changed after all (just now): read it now
                    for n in capture([it], work):
                        note(n)
                else:
                    cm = ChangeMap(np.zeros((it.size + block_size - 1) // block_size, bool), block_size, UNCHANGED_FILE,
                                   reference=since, new_reference=b.change_id)
            if cm is None:
                r = RawDisk(it.copy)
            cleanup.append(r.close)
            info = {**base, "state_role": it.role, "path": it.path}
            srcs.append(BackupSource(reader=r, description=f"libvirt:{domain}:{it.role} ({it.path})",
                                     change_map=cm, change_id=b.change_id, notes=list(notes),
                                     extra={LIBVIRT_KEY: info}, name=f"{prefix}-{it.role}",
                                     options={"skip_unused": False}))
    except BaseException:
        undo()
        raise
    return LibvirtJob(domain=domain, checkpoint=b.change_id, sources=srcs, notes=notes, offline=offline, _lv=b,
                      _cleanup=cleanup)


def is_domain_pattern(text: str) -> bool:
    """Whether ``--libvirt TEXT`` is a shell-style pattern (``*``, ``?``, ``[``)."""
    return any(c in text for c in "*?[")


def libvirt_domains_matching(pattern: str, uri: str) -> list[str]:
    """The names of the domains (running or not) that match a shell-style pattern, sorted;
    a one-line error when none does."""
    import fnmatch

    from vmbak.changes.libvirt import connect

    conn = connect(uri)
    try:
        names = sorted(d.name() for d in conn.listAllDomains())
    finally:
        conn.close()
    found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        raise DiskError(f"no libvirt domain matches {pattern!r}" + (f" (domains: {', '.join(names)})" if names else ""))
    return found


def preload_libvirt() -> None:
    """Import what a libvirt backup will need (e.g. while the repository opens in a thread)."""
    import vmbak.changes.libvirt
    import vmbak.disks.nbd
    import vmbak.usage
    import vmbak.usage.ext  # noqa: F401 - the most common guest filesystem


def libvirt_disk_targets(domain: str, uri: str) -> list[str]:
    """The targets (vda, ...) ``--libvirt DOMAIN`` would back up, for the hooks' environment."""
    from vmbak.changes.libvirt import connect, domain_disks, lookup

    conn = connect(uri)
    try:
        return sorted(d.target for d in domain_disks(lookup(conn, domain).XMLDesc(0)))
    finally:
        conn.close()


def run_libvirt_backup(repo: Repository, job: LibvirtJob, opts: BackupOptions,
                       on_disk: Callable[[Manifest], None] | None = None, log: Log | None = None) -> list[Manifest]:
    """Back up every disk of the job; commit the checkpoint once all manifests are durable,
    abort it on any failure."""
    log = log or (lambda s: None)
    out: list[Manifest] = []
    try:
        with repo.lock(purpose="backup"):  # one lock for every snapshot of the job (each backup's is this one)
            for src in job.sources:
                o = dataclasses.replace(opts, name=src.name, change_map=src.change_map, change_id=src.change_id,
                                        notes=[*opts.notes, *src.notes], extra={**opts.extra, **src.extra},
                                        source=src.description, **src.options)
                m = backup(repo, src.reader, o)
                out.append(m)
                if on_disk is not None:
                    on_disk(m)
                if src is job.last_disk:  # the state files are copies: the job can end meanwhile
                    job._lv.end_reads()  # type: ignore[attr-defined]
    except BaseException:
        try:
            job.abort()
        except Exception as e:  # noqa: BLE001 - the backup's own error matters more
            log(f"warning: could not abort the libvirt backup job: {e}")
        raise
    try:
        job.commit()
    except VmbakError as e:
        log(f"warning: the snapshots are saved, but libvirt did not commit checkpoint {job.checkpoint} "
            f"({e}); the next backup reads everything again")
    return out


# ---------------------------------------------------------------------------- libvirt restore
def find_libvirt_backup(repo: Repository, spec: str) -> list[Manifest]:
    """The snapshots (one per disk) of the libvirt backup ``spec`` names: ``DOMAIN:latest``,
    ``DOMAIN``, ``DOMAIN@TIME``, or the id (prefix) of any of its disks' snapshots."""
    import re

    m = None
    if re.fullmatch(r"[0-9a-f]{4,64}", spec):
        try:
            m = repo.find(spec)
        except SnapshotNotFound:
            m = None
    if m is None:
        if ":" in spec and not spec.endswith(":latest"):
            raise SnapshotNotFound(f"bad snapshot specification {spec!r} (use DOMAIN:latest, DOMAIN@TIME or an id)")
        name, _, ts = spec.removesuffix(":latest").partition("@")
        groups = libvirt_groups(repo, name)
        if ts:
            limit = parse_time_limit(ts)
            groups = [g for g in groups if max(_parse_iso(m.time) for m in g) <= limit]
        if not groups:
            raise SnapshotNotFound(f"no complete libvirt backup of {name!r}" + (f" at or before {ts}" if ts else ""))
        return groups[-1]
    lv = _lv_info(m)
    if lv is None:
        raise SnapshotNotFound(f"snapshot {m.short_id} ({m.name}) is not part of a libvirt backup "
                               "(restore it without --libvirt)")
    for g in libvirt_groups(repo):
        if any(x.id == m.id for x in g):
            return g
    raise SnapshotNotFound(f"the libvirt backup of snapshot {m.short_id} is incomplete (a disk's backup "
                           "failed); choose another one")


def _domain_exists(name: str, uri: str) -> bool:
    from vmbak.changes.libvirt import _libvirt, connect

    lv = _libvirt()
    conn = connect(uri)
    try:
        conn.lookupByName(name)
        return True
    except lv.libvirtError:
        return False
    finally:
        conn.close()


def _plain_name(value: object) -> bool:
    """Whether ``value`` can name a file inside a directory and nothing else."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\0" not in value
            and len(value.encode("utf-8", "surrogateescape")) <= 200)


def _lv_name(m: Manifest, lv: dict, key: str) -> str:
    """A name from a libvirt backup's record that goes into a file name: a plain name only,
    so that repository data never chooses where a restore writes."""
    value = lv.get(key)
    if not _plain_name(value):
        raise RepositoryError(f"snapshot {m.short_id}: the libvirt {key} name {value!r} recorded with the backup "
                              "is not a plain name; refusing to build a file name from it")
    return value  # type: ignore[return-value]


def _lv_source_dir(m: Manifest, lv: dict) -> str:
    """The directory a disk had (the default restore directory): an absolute, normalized
    path, or the current directory when none was recorded."""
    source = lv.get("source") or ""
    if not isinstance(source, str) or "\0" in source:
        raise RepositoryError(f"snapshot {m.short_id}: the libvirt disk source {source!r} is not a path")
    if not source:
        return "."
    if not os.path.isabs(source) or os.path.normpath(source) != source:
        raise RepositoryError(f"snapshot {m.short_id}: the libvirt disk source {source!r} is not an absolute, "
                              "normalized path; give the directory to restore to")
    return os.path.dirname(source) or "/"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def restore_libvirt(repo: Repository, spec: str, *, directory: str | None, new_name: str | None,
                    define: bool, fmt: str | None, uri: str, overwrite: bool = False, verify: bool = True,
                    workers: int = 2, progress: Callable[[], object] | None = None,
                    log: Log | None = None) -> dict:
    """Restore every disk of a libvirt backup, the files stored with it, and the domain XML.

    Disks go to ``directory`` (default: the directory each disk had) as
    ``NAME-TARGET.EXT``, in ``fmt`` (default: each disk's own format). The NVRAM, kernel,
    initrd, device tree and stored firmware go beside the XML as ``NAME-BASENAME``, the
    TPM state into swtpm's directory of the new UUID. The domain XML gets NAME, a new
    UUID, new MAC addresses and every path rewritten (``vmbak.domain.xml``), and goes to
    ``NAME.xml``; with ``define`` it is defined in libvirt as NAME (not started). NAME is
    ``new_name``, or DOMAIN-restored. A failure removes everything this restore created.
    """
    import uuid as uuidlib

    from vmbak.changes.libvirt import define_domain
    from vmbak.disks.qemu import ImageRestoreTarget
    from vmbak.domain.state import check_record, file_sha256, place_tpm, tpm_state_dir
    from vmbak.domain.xml import rewrite_for_restore
    from vmbak.engine.restore import partial_name, restore

    log = log or (lambda s: None)
    group = find_libvirt_backup(repo, spec)
    disk_ms = [m for m in group if not _lv_info(m).get("state_role")]  # type: ignore[union-attr]
    state_ms = {_lv_info(m)["state_role"]: m for m in group if _lv_info(m).get("state_role")}  # type: ignore[index,union-attr]
    first = _lv_info(disk_ms[0])
    assert first is not None
    if new_name is not None:
        if not _plain_name(new_name):
            raise VmbakError(f"--define {new_name!r}: the name also names the restored files, so it must be a "
                             "plain file name (no '/', not '.' or '..')")
        name = new_name
    else:
        name = f"{_lv_name(disk_ms[0], first, 'domain')}-restored"
    fmt = check_image_format(fmt, write=True)
    if define and _domain_exists(name, uri):
        raise VmbakError(f"libvirt already has a domain named {name!r} (choose another name with --define)")
    if directory is not None and not os.path.isdir(directory):
        raise DiskError(f"restore directory does not exist: {directory}")
    plan = []
    for m in disk_ms:
        lv = _lv_info(m)
        assert lv is not None
        f = fmt or check_image_format(lv.get("format") or "raw", write=True)
        d = os.path.abspath(directory or _lv_source_dir(m, lv))
        tgt = _lv_name(m, lv, "target")
        path = os.path.join(d, f"{name}-{tgt}.{EXTENSIONS[f]}")
        assert os.path.dirname(path) == d, path  # confined by _plain_name
        plan.append((m, tgt, path, f))
    xml_dir = os.path.abspath(directory or os.path.dirname(plan[0][2]))
    xml_path = os.path.join(xml_dir, f"{name}.xml")
    records = [check_record(r, f"snapshot {disk_ms[0].short_id}") for r in first.get("state") or []]
    new_uuid = str(uuidlib.uuid4())
    state_plan = []  # (record, snapshot, restored path)
    for rec in records:
        if not rec["stored"]:
            continue
        m = state_ms.get(rec["role"])
        if m is None:
            raise RepositoryError(f"the libvirt backup of snapshot {disk_ms[0].short_id} has no snapshot of its "
                                  f"{rec['role']}")
        if rec["role"] == "tpm":
            dest = tpm_state_dir(new_uuid, uri)
            if dest is None:
                raise VmbakError(f"the backup holds TPM state, and vmbak does not know where libvirt at {uri} "
                                 "keeps it (it knows qemu:///system)")
            path = os.path.join(xml_dir, f".{name}-tpm.tar")
        else:
            base = os.path.basename(rec["path"]) or rec["role"]
            if not _plain_name(base):
                raise RepositoryError(f"snapshot {m.short_id}: the recorded path {rec['path']!r} has no plain file name")
            path = os.path.join(xml_dir, f"{name}_VARS.fd" if rec["role"] == "nvram" else f"{name}-{base}")
        state_plan.append((rec, m, path))
    for p in [xml_path] + [p for r, _, p in state_plan if r["role"] != "tpm"]:
        if os.path.exists(p) and not overwrite:
            raise DiskError(f"restore target exists: {p} (use --overwrite to replace it)")
    created: list[str] = []
    created_dirs: list[str] = []
    results = []
    files: dict[str, str] = {}
    state_out = []
    warnings = []
    ok = False

    def restore_one(m: Manifest, path: str, f: str) -> dict:
        existed = os.path.exists(path)
        target = ImageRestoreTarget(path, m.disk_size, f, overwrite=overwrite)
        try:
            r = restore(repo, m, target, verify=verify, workers=workers,
                        progress=progress() if progress else None)  # type: ignore[arg-type]
        except BaseException:
            target.discard()
            raise
        finally:
            target.close()
        if not existed:
            created.append(path)
        return r

    try:
        for m, tgt, path, f in plan:
            r = restore_one(m, path, f)
            results.append({**r, "target_disk": tgt, "format": f, "name": m.name})
            log(f"restored disk {tgt} (snapshot {m.short_id}) to {path} ({f})")
        for rec, m, path in state_plan:
            restore_one(m, path, "raw")
            if file_sha256(path) != rec.get("sha256"):
                raise RepositoryError(f"the restored {rec['role']} (snapshot {m.short_id}) does not match the "
                                      "sha256 recorded with the backup")
            if rec["role"] == "tpm":
                dest = tpm_state_dir(new_uuid, uri)
                assert dest is not None
                place_tpm(path, dest, rec)
                created_dirs.append(dest)
                _unlink(path)
                created.remove(path)
                out = dest
            else:
                files[rec["role"]] = path
                out = path
            state_out.append({"role": rec["role"], "from": rec["path"], "target": out, "snapshot": m.id,
                              "sha256": rec.get("sha256")})
            log(f"restored {rec['role']} (snapshot {m.short_id}) to {out}")
        for rec in records:
            if rec["stored"]:
                continue
            now = file_sha256(rec["path"])
            if now is None:
                warnings.append(f"{rec['role']} {rec['path']} is not stored in the backup and does not exist here")
            elif rec.get("sha256") and now != rec["sha256"]:
                warnings.append(f"{rec['role']} {rec['path']} differs from the file the backup recorded "
                                f"(sha256 {rec['sha256'][:16]}...; now {now[:16]}...)")
            state_out.append({"role": rec["role"], "from": rec["path"], "target": rec["path"], "snapshot": None,
                              "sha256": rec.get("sha256")})
        for w in warnings:
            log(f"warning: {w}")
        xml = rewrite_for_restore(first["domain_xml"], name, new_uuid, {tgt: (path, f) for _, tgt, path, f in plan},
                                  files, xml_dir)
        with deferred():
            tmp = partial_name(xml_path)
            token = register_cleanup(lambda: _unlink(tmp))
        try:
            with open(tmp, "x", encoding="utf-8") as fh:
                fh.write(xml + "\n")
            with deferred():
                os.replace(tmp, xml_path)
                created.append(xml_path)
        finally:
            with deferred():
                _unlink(tmp)
                unregister_cleanup(token)
        defined = define_domain(xml, uri) if define else None
        ok = True
    finally:
        if not ok:
            for p in created:
                _unlink(p)
            for d in created_dirs:
                shutil.rmtree(d, ignore_errors=True)
    return {"domain": first["domain"], "checkpoint": first.get("checkpoint"), "name": name, "uuid": new_uuid,
            "defined": defined, "xml": xml_path, "disks": results, "state": state_out, "warnings": warnings}
