"""Changes of a Ceph RBD image from librbd's snapshot diff (``rbd diff``).

Every backup of ``rbd:POOL/IMAGE`` takes a snapshot ``vmbak.<UTC time>.<random>`` of the
image and reads from it, so the backup is one point in time. Its change ID is
``rbd:<image id>:<snapshot id>:<snapshot name>``. The next backup takes a new snapshot and
asks librbd for the extents that differ between the previous one (the parent's change ID)
and the new one: ``diff_iterate`` with ``whole_object`` (fast-diff: the object maps only,
no object is read) when the image has the object-map and fast-diff features and neither
map is flagged invalid, else the exact per-object diff. The older snapshot is removed only
after the new manifest is durable (``commit``); a failed backup removes the new one
(``abort``) and keeps the older.

When the diff cannot be trusted, the source says so and hands over no change map, and the
engine reads every used block of the new snapshot and compares it with the parent (scan):

* the parent's change ID names no snapshot of this image (deleted by hand; the image was
  removed and made again; the parent came from another source);
* the object map is flagged invalid (``rbd object-map check`` reports it; ``rebuild``
  repairs it).

Each snapshot vmbak takes has an owner record in the image's metadata, under
``vmbak.snap.<snapshot name>``: the backup chain (repository id and disk name), and while
the backup runs this host's id and the process id. A backup removes, once its manifest is
durable, the snapshots its chain no longer needs (the previous reference; with ``--mode
full`` every earlier one), and at its start the snapshots of its chain that a killed backup
left (their process is gone). Snapshots of other chains, of other hosts' running backups
and the user's own are never touched.

After ``rbd snap rollback``, librbd's fast-diff reports every object of the image as
changed (it cannot tell which objects the rollback rewrote); that over-report is safe, and
the backup notes it ("every object changed ... a rollback?") because it reads the whole
image, like a scan.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vmbak.changes.base import ChangeMap
from vmbak.disks.rbd import (
    Cluster,
    RbdDisk,
    RbdSpec,
    _modules,
    _why,
    allocated_extents,
    open_image,
    owner_dead,
    owner_record,
    parse_owner,
)
from vmbak.errors import DiskError

SNAP_PREFIX = "vmbak."
OWNER_PREFIX = "vmbak.snap."  # image metadata: OWNER_PREFIX + snapshot name -> owner record
_CHANGE_ID = re.compile(r"rbd:([^:]+):(\d+):(.+)")

Log = Callable[[str], None]


def change_id(image_id: str, snap_id: int, snap_name: str) -> str:
    return f"rbd:{image_id}:{snap_id}:{snap_name}"


def parse_change_id(cid: str | None) -> tuple[str, int, str] | None:
    m = _CHANGE_ID.fullmatch(cid or "")
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


@dataclass
class RbdSession:
    """One backup's view of an image: a new snapshot, its reader and the changes since the
    reference snapshot (None: read every used block)."""

    spec: RbdSpec
    cluster: Cluster
    reader: RbdDisk
    change_map: ChangeMap | None
    change_id: str
    snapshot: str
    older: str | None  # the reference snapshot, removed by commit
    notes: list[str] = field(default_factory=list)
    keep_older: bool = False  # a differential: the full's snapshot stays the reference
    chain: str | None = None  # whose snapshots these are (owner records)

    def _edit(self, action: Callable[[object], None], what: str) -> None:
        _, rbd = _modules()
        ioctx = self.cluster.ioctx(self.spec.pool)
        try:
            img = open_image(ioctx, self.spec)
            try:
                action(img)
            finally:
                img.close()
        except rbd.Error as e:
            raise DiskError(f"cannot {what} of {self.spec}: {_why(e)}") from None
        finally:
            ioctx.close()

    def _remove(self, name: str) -> None:
        self._edit(lambda img: _remove_snap(img, name), f"remove snapshot {name}")

    def commit(self) -> None:
        """The manifest is durable: the older snapshot is no longer the reference (nor,
        after a full or an incremental, any other snapshot of the chain)."""
        try:
            self.reader.close()
            if self.keep_older:
                self._remove(self.snapshot)  # the next differential diffs from the full's snapshot
            else:
                def settle(img: object) -> None:
                    img.metadata_set(OWNER_PREFIX + self.snapshot,  # type: ignore[attr-defined]
                                     json.dumps({"chain": self.chain}, sort_keys=True))
                    if self.chain is not None:
                        _reap(img, self.chain, keep={self.snapshot}, kept_too=True)
                    if self.older is not None:
                        _remove_snap(img, self.older)
                self._edit(settle, "settle the snapshots")
        finally:
            self.cluster.close()

    def abort(self) -> None:
        """The backup failed: drop the new snapshot, keep the reference."""
        try:
            self.reader.close()
            self._remove(self.snapshot)
        finally:
            self.cluster.close()


def _remove_snap(image, name: str) -> None:  # noqa: ANN001
    """Remove snapshot ``name`` and its owner record (either may be gone already)."""
    _, rbd = _modules()
    try:
        image.remove_snap(name)
    except rbd.ImageNotFound:
        pass
    try:
        image.metadata_remove(OWNER_PREFIX + name)
    except (KeyError, rbd.ImageNotFound):
        pass


def _reap(image, chain: str, keep: set[str], kept_too: bool = False) -> list[str]:  # noqa: ANN001
    """Remove the snapshots of ``chain`` that a killed backup left (its process is gone);
    with ``kept_too`` also the references the chain has moved past. ``keep``: never these.
    Return the names removed."""
    _, rbd = _modules()
    out = []
    for key, value in list(image.metadata_list()):
        name = key[len(OWNER_PREFIX):] if key.startswith(OWNER_PREFIX) else None
        if name is None or name in keep:
            continue
        rec = parse_owner(value)
        if rec.get("chain") != chain:
            continue
        if not (owner_dead(rec) if "pid" in rec else kept_too):
            continue
        try:
            _remove_snap(image, name)
        except rbd.Error:
            continue  # busy (a clone's parent, protected): left as it is
        out.append(name)
    return out


def _settled(image, chain: str) -> list[str]:  # noqa: ANN001
    """The snapshots of ``chain`` whose backups' manifests were saved (by their records)."""
    out = []
    for key, value in image.metadata_list():
        if key.startswith(OWNER_PREFIX):
            rec = parse_owner(value)
            if rec.get("chain") == chain and "pid" not in rec:
                out.append(key[len(OWNER_PREFIX):])
    return out


def _flags_invalid(image) -> str | None:  # noqa: ANN001
    _, rbd = _modules()
    f = int(image.flags())
    if f & rbd.RBD_FLAG_OBJECT_MAP_INVALID:
        return "object map"
    if f & rbd.RBD_FLAG_FAST_DIFF_INVALID:
        return "fast-diff map"
    return None


def open_session(spec: RbdSpec, since: str | None, block_size: int, *, conf: str | None = None,
                 client_id: str | None = None, keep_older: bool = False, log: Log | None = None,
                 quiesce: Callable[[], contextlib.AbstractContextManager] | None = None,
                 chain: str | None = None) -> RbdSession:
    """Snapshot ``spec`` and work out what changed since the snapshot ``since`` names;
    ``quiesce`` (a guest freeze) is entered around the snapshot's creation only. ``chain``
    (repository id and disk name) owns the snapshot: the chain's snapshots that killed
    backups left are removed here, those it has moved past by ``commit``."""
    _, rbd = _modules()
    log = log or (lambda s: None)
    cluster = Cluster(conf, client_id)
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    try:
        ioctx = cluster.ioctx(spec.pool)
        try:
            head = open_image(ioctx, spec)
            try:
                image_id = head.id()
                name = f"{SNAP_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{os.urandom(3).hex()}"
                ref = parse_change_id(since)
                if chain is not None:
                    for gone in _reap(head, chain, keep={ref[2]} if ref else set()):
                        note(f"rbd: removed snapshot {spec}@{gone}, left by a killed backup")
                snaps = {s["name"]: int(s["id"]) for s in head.list_snaps()}
                settled = _settled(head, chain) if chain is not None else []
                try:
                    # the owner record first: a kill right after the snapshot leaves it reapable
                    head.metadata_set(OWNER_PREFIX + name, owner_record(chain=chain))
                    with quiesce() if quiesce is not None else contextlib.nullcontext():
                        head.create_snap(name)
                except rbd.Error as e:
                    _remove_snap(head, name)
                    raise DiskError(f"cannot snapshot RBD image {spec}: {_why(e)}") from None
                snap_id = {s["name"]: int(s["id"]) for s in head.list_snaps()}[name]
                features = int(head.features())
            finally:
                head.close()
        finally:
            ioctx.close()
        fast = bool(features & rbd.RBD_FEATURE_OBJECT_MAP) and bool(features & rbd.RBD_FEATURE_FAST_DIFF)
        try:
            reader = RbdDisk(cluster, spec, name, whole_object=fast)
        except BaseException:
            _drop(cluster, spec, name)
            raise
    except BaseException:
        cluster.close()
        raise
    sess = RbdSession(spec=spec, cluster=cluster, reader=reader, change_map=None,
                      change_id=change_id(image_id, snap_id, name), snapshot=name, older=None, notes=notes,
                      keep_older=keep_older, chain=chain)
    try:
        if since is None:
            return sess
        if ref is None or ref[0] != image_id:
            note(f"rbd: the previous backup's change ID {since!r} is not a snapshot of {spec} (image id "
                 f"{image_id}); reading every used block (scan)")
            return sess
        _, ref_id, ref_name = ref
        if snaps.get(ref_name) != ref_id:
            # an older snapshot this chain kept (a full's, kept for differentials) still
            # serves: every block written since the parent's snapshot was written since it
            older = [n for n in settled if n in snaps and snaps[n] < ref_id]
            if not older:
                note(f"rbd: reference snapshot {spec}@{ref_name} is gone; reading every used block (scan)")
                return sess
            base = max(older, key=lambda n: snaps[n])
            note(f"rbd: reference snapshot {spec}@{ref_name} is gone; reading what changed since the "
                 f"chain's older snapshot {base}")
            ref_name = base
        sess.older = ref_name
        bad = _flags_invalid(reader.image) if fast else None
        if bad is None and fast:
            ioctx = cluster.ioctx(spec.pool)
            try:
                old = open_image(ioctx, spec, snapshot=ref_name, read_only=True)
                try:
                    bad = _flags_invalid(old)
                finally:
                    old.close()
            finally:
                ioctx.close()
        if bad is not None:
            note(f"rbd: the {bad} of {spec} is flagged invalid ('rbd object-map rebuild' repairs it); "
                 "reading every used block (scan)")
            return sess
        try:
            extents = allocated_extents(reader.image, 0, reader.size, ref_name, whole_object=fast)
        except rbd.Error as e:
            note(f"rbd: the diff of {spec} since {ref_name} failed ({_why(e)}); reading every used block (scan)")
            return sess
        nblocks = (reader.size + block_size - 1) // block_size
        bitmap = np.zeros(nblocks, bool)
        for off, ln in extents:
            bitmap[off // block_size:(off + ln + block_size - 1) // block_size] = True
        cm_notes = []
        alloc = np.zeros(nblocks, bool)
        for off, ln in allocated_extents(reader.image, 0, reader.size, None, whole_object=fast):
            alloc[off // block_size:(off + ln + block_size - 1) // block_size] = True
        if alloc.any() and not (alloc & ~bitmap).any():
            cm_notes.append(f"rbd: every object of {spec} changed since {ref_name} (a rollback?); "
                            "reading every used block")
            log(cm_notes[-1])
        sess.change_map = ChangeMap(bitmap=bitmap, block_size=block_size,
                                    source="rbd-fast-diff" if fast else "rbd-diff", reference=since,
                                    new_reference=sess.change_id, notes=cm_notes)
        return sess
    except BaseException:
        sess.abort()
        raise


def _drop(cluster: Cluster, spec: RbdSpec, name: str) -> None:
    _, rbd = _modules()
    try:
        ioctx = cluster.ioctx(spec.pool)
        try:
            img = open_image(ioctx, spec)
            try:
                _remove_snap(img, name)
            finally:
                img.close()
        finally:
            ioctx.close()
    except (rbd.Error, DiskError):
        pass
