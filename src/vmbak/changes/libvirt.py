"""Back up every disk of a running libvirt domain with checkpoints and a pull-mode backup.

``begin_backup(domain, since, block_size)`` asks libvirt (``virDomainBackupBegin``) for a
pull-mode backup job and, at the same instant, a new checkpoint named
``vmbak-YYYYmmddTHHMMSS-TOKEN`` (this backup's change ID). libvirt then exports a
point-in-time view of each disk over NBD on a unix socket in a private directory, with
copy-before-write into scratch qcow2 files there. For an incremental (``since`` names
the previous backup's checkpoint), each qcow2 disk's export also carries the dirty
bitmap of the changes since that checkpoint, read through NBD block status.

``commit`` ends the job and deletes the older checkpoint; ``abort`` ends the job and
deletes the new one (libvirt keeps the older checkpoint's bitmap recording, so nothing
is lost). Either way, one vmbak checkpoint is left per domain.

A checkpoint that is missing, or whose bitmap QEMU lost or marked inconsistent
(QEMU was killed), makes ``begin_backup`` remove it and raise ChangeTrackingError.
The caller then begins again with ``since=None``: a full view and a fresh checkpoint.
A vmbak that died during a backup leaves a job whose socket names a dead process;
the next ``begin_backup`` ends that job first.

The domain's XML (inactive definition) is kept in ``domain_xml``, so a restore can
define the domain again (``vmbak.domain.xml.rewrite_for_restore``, ``define_domain``).

Runs as root (or as the user QEMU runs as): the private directory is handed to the
QEMU process's user so that QEMU can create the socket and the scratch files.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

from vmbak.disks.nbd import STATE_DIRTY, NbdDisk
from vmbak.errors import ChangeTrackingError, DiskError

TYPE_CHECKING = False
if TYPE_CHECKING:  # numpy is imported when a change map is made: libvirt_early begins a job before it loads
    from vmbak.changes.base import ChangeMap

SOURCE = "libvirt-checkpoint"
PREFIX = "vmbak-"
DEFAULT_URI = "qemu:///system"
_DIR = re.compile(r"vmbak-libvirt-(\d+)-([0-9a-f]{8})")


def _libvirt():  # noqa: ANN202
    try:
        import libvirt
    except ImportError:
        raise DiskError("the libvirt Python bindings are missing (Debian package python3-libvirt)") from None
    libvirt.registerErrorHandler(lambda *a: None, None)  # errors come back as exceptions only
    return libvirt


def _msg(e: Exception) -> str:
    s = e.get_error_message() if hasattr(e, "get_error_message") else str(e)
    return " ".join(str(s).split())


class _Borrowed:
    """A process-wide libvirt connection lent to one user: ``close`` gives it back open.

    Opening a connection costs several round trips to libvirtd, and one backup asks for
    one several times (the disks, the guest agent, the job, its end)."""

    def __init__(self, conn) -> None:  # noqa: ANN001
        self._conn = conn

    def close(self) -> int:
        return 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._conn, name)


_CONNS: dict[str, object] = {}
_CONNS_LOCK = threading.Lock()


def connect(uri: str = DEFAULT_URI):  # noqa: ANN201 - a libvirt.virConnect (shared; close() keeps it open)
    lv = _libvirt()
    with _CONNS_LOCK:
        conn = _CONNS.get(uri)
        try:
            # one cheap round trip: a libvirtd restarted since is noticed here, not by the caller
            if conn is not None and conn.isAlive() == 1 and conn.getLibVersion():  # type: ignore[attr-defined]
                return _Borrowed(conn)
        except lv.libvirtError:
            pass
        try:
            conn = lv.open(uri)
        except lv.libvirtError as e:
            raise DiskError(f"cannot connect to libvirt at {uri}: {_msg(e)}") from None
        _CONNS[uri] = conn
        return _Borrowed(conn)


def lookup(conn, name: str):  # noqa: ANN001, ANN201
    lv = _libvirt()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            names = sorted(d.name() for d in conn.listAllDomains())
            raise DiskError(f"no libvirt domain named {name!r}"
                            + (f" (domains: {', '.join(names)})" if names else "")) from None
        raise DiskError(f"libvirt domain {name!r}: {_msg(e)}") from None


@dataclass
class DomainDisk:
    target: str  # vda, sdb, ...
    source: str  # the file or device path
    format: str  # qcow2, raw, ...


def domain_disks(xml: str) -> list[DomainDisk]:
    """The disks (device='disk', not read-only) of a domain XML."""
    out = []
    for d in ET.fromstring(xml).findall("./devices/disk"):
        if d.get("device", "disk") != "disk" or d.find("readonly") is not None:
            continue
        tgt = d.find("target")
        src = d.find("source")
        drv = d.find("driver")
        if tgt is None:
            continue
        path = ""
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("name") or ""
        out.append(DomainDisk(tgt.get("dev", ""), path, (drv.get("type") if drv is not None else None) or "raw"))
    return out


@dataclass
class LibvirtDiskView:
    target: str
    source: str
    format: str
    reader: NbdDisk
    change_map: ChangeMap | None
    bitmap_context: str | None = None  # the NBD meta context of the dirty bitmap since ``since``
    dirty_extents: list[tuple[int, int]] | None = None  # (offset, length) the bitmap marks, when read already


@dataclass
class LibvirtBackup:
    """One pull-mode backup of every disk of a domain."""

    domain: str
    uri: str
    since: str | None
    change_id: str  # the new checkpoint's name
    block_size: int
    domain_xml: str
    disks: dict[str, LibvirtDiskView]
    notes: list[str] = field(default_factory=list)
    # (state items, work directory, notes): the domain's state files, captured right after the
    # checkpoint by whoever began the job early (vmbak.domain.state.capture); the taker owns it
    state: tuple | None = None
    _dir: str = ""
    _done: bool = False
    _ending: threading.Thread | None = None
    _ended: list = field(default_factory=list)  # what ending the job raised, if anything
    _ended_dom: object = None  # the domain whose job end_reads ended (a libvirt.virDomain)

    def _end_job(self, dom) -> None:  # noqa: ANN001
        for v in self.disks.values():
            v.reader.close()
        _abort_job(dom)

    def end_reads(self) -> None:
        """Every disk is read: begin ending the job (its NBD exports, scratch files) in a
        thread, while the caller goes on (e.g. with the state files); ``commit`` and
        ``abort`` wait for it."""
        if self._ending is not None or self._done:
            return

        def run() -> None:
            try:
                conn = connect(self.uri)
                try:
                    dom = lookup(conn, self.domain)
                    self._end_job(dom)
                    self._ended_dom = dom  # for commit/abort: the job is gone, no need to ask again
                finally:
                    conn.close()
            except BaseException as e:  # noqa: BLE001 - raised by commit/abort, which end it again
                self._ended.append(e)

        self._ending = threading.Thread(target=run, name="vmbak-libvirt-end", daemon=True)
        self._ending.start()

    def _finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._ending is not None:
            self._ending.join()
        try:
            conn = connect(self.uri) if self._ended_dom is None else None
            try:
                # The job that end_reads ended a moment ago is not asked about again: the
                # connection probe, lookup and job query took 3 round trips (3-20 ms at load
                # 10 on 2 CPUs) between the last manifest and the exit.
                dom = self._ended_dom if conn is None else lookup(conn, self.domain)
                if conn is not None:
                    self._end_job(dom)
                if ok:
                    if self.since is not None:
                        _delete_checkpoint(dom, self.since)
                else:
                    _delete_checkpoint(dom, self.change_id)
            finally:
                if conn is not None:
                    conn.close()
        finally:
            for v in self.disks.values():
                v.reader.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def commit(self) -> None:
        """Every disk's backup is durable: end the job, drop the older checkpoint."""
        self._finish(True)

    def abort(self) -> None:
        """The backup failed: end the job, drop the new checkpoint (the older one
        still records every change since it)."""
        self._finish(False)

    def __enter__(self) -> LibvirtBackup:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


def _abort_job(dom) -> None:  # noqa: ANN001
    lv = _libvirt()
    try:
        dom.backupGetXMLDesc()
    except lv.libvirtError:
        return  # no backup job
    try:
        dom.abortJob()
    except lv.libvirtError:
        pass
    deadline = time.monotonic() + 30
    pause = 0.002  # the job usually ends within milliseconds: poll fast, then back off
    while time.monotonic() < deadline:
        try:
            dom.backupGetXMLDesc()
        except lv.libvirtError:
            return
        time.sleep(pause)
        pause = min(0.05, pause * 2)
    raise DiskError(f"libvirt did not end the backup job of {dom.name()}")


def _delete_checkpoint(dom, name: str) -> None:  # noqa: ANN001
    lv = _libvirt()
    try:
        cp = dom.checkpointLookupByName(name)
    except lv.libvirtError:
        return
    try:
        cp.delete()
    except lv.libvirtError:
        # the bitmap is gone or broken: drop libvirt's record, then the bitmap itself
        try:
            cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except lv.libvirtError:
            pass
        _remove_bitmap_everywhere(dom, name)


def _remove_bitmap_everywhere(dom, name: str) -> None:  # noqa: ANN001
    """Remove a dirty bitmap of that name from every node of the domain's QEMU."""
    try:
        import json

        import libvirt_qemu
    except ImportError:
        return
    try:
        nodes = json.loads(libvirt_qemu.qemuMonitorCommand(
            dom, json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}}), 0))["return"]
        for n in nodes:
            if any(b.get("name") == name for b in n.get("dirty-bitmaps") or []):
                libvirt_qemu.qemuMonitorCommand(dom, json.dumps({
                    "execute": "block-dirty-bitmap-remove",
                    "arguments": {"node": n["node-name"], "name": name}}), 0)
    except Exception:  # noqa: BLE001, S110 - best effort: a domain that is gone has no bitmaps
        pass


def _checkpoints(dom) -> list[str]:  # noqa: ANN001
    return [c.getName() for c in dom.listAllCheckpoints()]


def _qemu_owner(dom) -> tuple[int, int] | None:  # noqa: ANN001
    """uid and gid of the domain's QEMU process."""
    for path in (f"/run/libvirt/qemu/{dom.name()}.pid", f"/var/run/libvirt/qemu/{dom.name()}.pid"):
        try:
            with open(path) as f:
                pid = int(f.read().strip())
            st = os.stat(f"/proc/{pid}")
            return st.st_uid, st.st_gid
        except (OSError, ValueError):
            continue
    return None


def _clear_old_job(dom, tmpdir: str | None, notes: list[str]) -> None:  # noqa: ANN001
    """End the backup job a vmbak that no longer runs left behind; refuse to touch
    any other running job."""
    lv = _libvirt()
    try:
        xml = dom.backupGetXMLDesc()
    except lv.libvirtError:
        return  # no backup job
    m = _DIR.search(xml)
    if not m:
        raise DiskError(f"libvirt domain {dom.name()!r} already has a backup job that is not vmbak's")
    pid = int(m.group(1))
    alive = True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        alive = False
    except PermissionError:
        pass
    if alive and pid != os.getpid():
        raise DiskError(f"another vmbak (pid {pid}) is backing up libvirt domain {dom.name()!r}")
    _abort_job(dom)
    shutil.rmtree(os.path.join(tmpdir or tempfile.gettempdir(), m.group(0)), ignore_errors=True)
    notes.append(f"libvirt: ended the backup job of an interrupted vmbak ({m.group(0)})")


def begin_backup(domain: str, since: str | None, block_size: int, *, uri: str = DEFAULT_URI,
                 tmpdir: str | None = None, log: Callable[[str], None] | None = None,
                 quiesce: Callable[[], contextlib.AbstractContextManager] | None = None,
                 full_disks: frozenset[str] = frozenset(), change_maps: bool = True, dom=None,  # noqa: ANN001
                 live_xml: str | None = None, checkpoints: list[str] | None = None) -> LibvirtBackup:
    """Start a pull-mode backup of every disk of the running ``domain``; see the module
    documentation. Raises ChangeTrackingError (after cleaning up) when ``since`` cannot
    be used, DiskError for a domain that does not exist or does not run. ``quiesce``
    (e.g. ``Quiescer.frozen``) is entered just before the checkpoint is made and left as
    soon as it exists. The disks named in ``full_disks`` (added since ``since``) are
    exported without a bitmap: the checkpoint ``since`` does not cover them. Without
    ``change_maps``, the views' change maps are left for the caller (``change_map``).

    A caller that has just asked libvirt passes what it got, and those round trips are
    not made again before the freeze: ``dom`` (the domain, found running), ``live_xml``
    (its live XML) and ``checkpoints`` (the names of all its checkpoints)."""
    lv = _libvirt()
    log = log or (lambda s: None)
    if since is not None and not since.startswith(PREFIX):
        raise ChangeTrackingError(f"change ID {since!r} is not a vmbak checkpoint name")
    conn = connect(uri) if dom is None else None
    notes: list[str] = []
    try:
        if dom is None:
            dom = lookup(conn, domain)
            if not dom.isActive():
                raise DiskError(f"libvirt domain {domain!r} is not running (back up its image files instead)")
        _clear_old_job(dom, tmpdir, notes)
        disks = domain_disks(live_xml if live_xml is not None else dom.XMLDesc(0))
        if not disks:
            raise DiskError(f"libvirt domain {domain!r} has no disks to back up")
        ours = [c for c in (checkpoints if checkpoints is not None else _checkpoints(dom)) if c.startswith(PREFIX)]
        if since is not None and since not in ours:
            for c in ours:
                _delete_checkpoint(dom, c)
            raise ChangeTrackingError(f"checkpoint {since!r} of libvirt domain {domain!r} is missing, so the "
                                      "changes since the last backup are unknown")
        for c in ours:
            if c != since:
                _delete_checkpoint(dom, c)
                notes.append(f"libvirt: removed checkpoint {c}")
        tok = secrets.token_hex(4)
        key = f"vmbak-libvirt-{os.getpid()}-{tok}"
        d = os.path.join(tmpdir or tempfile.gettempdir(), key)
        os.mkdir(d, 0o700)
        try:
            owner = _qemu_owner(dom)
            if owner and os.geteuid() == 0:
                os.chown(d, *owner)
            sock = os.path.join(d, "nbd.sock")
            new = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{tok}"
            tracked = {k.target for k in disks if k.format == "qcow2"}
            bx = ET.Element("domainbackup", mode="pull")
            if since is not None:
                ET.SubElement(bx, "incremental").text = since
            ET.SubElement(bx, "server", transport="unix", socket=sock)
            bdisks = ET.SubElement(bx, "disks")
            cx = ET.Element("domaincheckpoint")
            ET.SubElement(cx, "name").text = new
            cdisks = ET.SubElement(cx, "disks")
            for k in disks:
                attrs = {"name": k.target, "backup": "yes", "type": "file"}
                if since is not None and (k.target not in tracked or k.target in full_disks):
                    attrs["backupmode"] = "full"
                bd = ET.SubElement(bdisks, "disk", attrs)
                ET.SubElement(bd, "scratch", file=os.path.join(d, f"scratch-{k.target}.qcow2"))
                ET.SubElement(cdisks, "disk", name=k.target,
                              checkpoint="bitmap" if k.target in tracked else "no")
                if k.target not in tracked:
                    notes.append(f"libvirt: disk {k.target} is {k.format}, which cannot hold a checkpoint "
                                 "bitmap: it is read whole (scan) every time")
            started = False
            prep: threading.Thread | None = None
            box: dict = {"views": {}}
            try:
                # the guest is frozen (if at all) only around the checkpoint's creation
                with quiesce() if quiesce is not None else contextlib.nullcontext():
                    try:
                        dom.backupBegin(ET.tostring(bx, encoding="unicode"), ET.tostring(cx, encoding="unicode"))
                    except lv.libvirtError as e:
                        if since is not None and ("bitmap" in _msg(e) or "checkpoint" in _msg(e)):
                            _delete_checkpoint(dom, since)
                            raise ChangeTrackingError(f"checkpoint {since!r} of libvirt domain {domain!r} cannot "
                                                      f"be used ({_msg(e)}); it was removed") from None
                        raise DiskError(f"libvirt cannot start a backup of {domain!r}: {_msg(e)}") from None
                    started = True
                    # The checkpoint and the export exist: the export is described, connected
                    # to and its dirty bitmaps read while the guest thaws (the thaw took
                    # 20-90 ms of the critical path of an incremental of a running TCG guest,
                    # at load 9-11 on 2 CPUs; libvirt's connection serves both threads).
                    prep = threading.Thread(target=_prepare_views, name="vmbak-libvirt-views", daemon=True,
                                            args=(dom, sock, disks, domain, since, new, block_size, change_maps, box))
                    prep.start()
            except BaseException:
                if prep is not None:
                    prep.join()
                    for v in box["views"].values():
                        v.reader.close()
                if started:  # the thaw failed, or a signal came while frozen: no backup
                    _abort_job(dom)
                    _delete_checkpoint(dom, new)
                raise
            assert prep is not None
            prep.join()
            views: dict[str, LibvirtDiskView] = box["views"]
            if "error" in box:
                for v in views.values():
                    v.reader.close()
                _abort_job(dom)
                _delete_checkpoint(dom, new)
                raise box["error"]
            for n in notes:
                log(n)
            return LibvirtBackup(domain=domain, uri=uri, since=since, change_id=new, block_size=block_size,
                                 domain_xml=box["xml"], disks=views, notes=notes, _dir=d)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
    finally:
        if conn is not None:
            conn.close()


def _prepare_views(dom, sock: str, disks: list[DomainDisk], domain: str, since: str | None, new: str,  # noqa: ANN001
                   block_size: int, change_maps: bool, box: dict) -> None:
    """Connect to each disk's export of the backup job just begun (a thread of
    ``begin_backup``): its views go to ``box["views"]``, what failed to ``box["error"]``.
    The dirty bitmap is read here too: as a change map with ``change_maps``, else as the raw
    extents ``change_map`` takes later (no second connection and round trip then)."""
    views: dict[str, LibvirtDiskView] = box["views"]
    try:
        # the inactive definition to keep with the backup: asked here, not before the freeze
        box["xml"] = dom.XMLDesc(_libvirt().VIR_DOMAIN_XML_INACTIVE)
        desc = ET.fromstring(dom.backupGetXMLDesc())
        for bd in desc.findall("./disks/disk"):
            if bd.get("backup") != "yes":
                continue
            tgt = bd.get("name", "")
            k = next(x for x in disks if x.target == tgt)
            bitmap = bd.get("exportbitmap")
            contexts = [f"qemu:dirty-bitmap:{bitmap}"] if bitmap else []
            r = NbdDisk(sock, bd.get("exportname") or tgt, meta_contexts=contexts,
                        description=f"libvirt:{domain}:{tgt}")
            ctx = contexts[0] if bitmap and since is not None else None
            views[tgt] = v = LibvirtDiskView(tgt, k.source, k.format, r, None, ctx)
            if ctx is not None and change_maps:
                v.change_map = change_map(r, ctx, block_size, since, new, tgt)  # type: ignore[arg-type]
            elif ctx is not None and ctx in r.contexts:
                v.dirty_extents = [(off, ln) for off, ln, fl in r.extents(ctx, 0, r.size) if fl & STATE_DIRTY]
    except BaseException as e:  # noqa: BLE001 - begin_backup ends the job and raises it
        box["error"] = e
    finally:
        for v in views.values():
            v.reader.hand_over()


def change_map(r: NbdDisk, context: str, bs: int, since: str, new: str, tgt: str,
               dirty: list[tuple[int, int]] | None = None) -> ChangeMap:
    """The blocks the dirty bitmap ``context`` of export ``r`` marks, as a change map."""
    import numpy as np

    from vmbak.changes.base import ChangeMap

    if context not in r.contexts:
        raise ChangeTrackingError(f"libvirt does not export the dirty bitmap of disk {tgt}")
    n = (r.size + bs - 1) // bs
    bitmap = np.zeros(n, bool)
    if dirty is None:  # ``dirty``: the dirty extents, read when the job began (_prepare_views)
        dirty = [(off, ln) for off, ln, fl in r.extents(context, 0, r.size) if fl & STATE_DIRTY]
    for off, ln in dirty:
        bitmap[off // bs:(off + ln + bs - 1) // bs] = True
    k = int(np.count_nonzero(bitmap))
    return ChangeMap(bitmap=bitmap, block_size=bs, source=SOURCE, reference=since, new_reference=new,
                     notes=[f"libvirt: disk {tgt}: checkpoint {since} marks {k} of {n} blocks"])


# ---------------------------------------------------------------------------- restore
def define_domain(xml: str, uri: str = DEFAULT_URI) -> str:
    """Define (persistently, not started) a domain from XML; return its name."""
    lv = _libvirt()
    conn = connect(uri)
    try:
        return conn.defineXML(xml).name()
    except lv.libvirtError as e:
        raise DiskError(f"libvirt cannot define the domain: {_msg(e)}") from None
    finally:
        conn.close()
