"""QEMU persistent dirty bitmaps as a change source, through QMP.

A backup of a node of a running QEMU (or qemu-storage-daemon) is a *session*:

``open_session`` connects to the QMP socket and, in one QMP transaction,

* adds a new persistent dirty bitmap (this backup's change ID; it records every write
  from now on, for the next backup),
* freezes the bitmap of the previous backup (``since``): it then holds exactly the
  blocks written between the previous backup and now,
* starts a ``blockdev-backup sync=none`` job from the node into a temporary qcow2
  overlay whose backing file is the node itself (fleecing): before the guest
  overwrites a block, QEMU copies the old content into the overlay, so the overlay
  reads as the disk at the moment of the transaction.

The overlay is exported read-only over NBD together with the frozen bitmap; the
session's ``reader`` reads the point-in-time view and its ``change_map`` comes from NBD
block status on ``qemu:dirty-bitmap:SINCE``.

``commit`` (the backup is durable) tears the fleecing down and removes the old bitmap;
``abort`` (the backup failed) tears it down and merges the new bitmap back into the
old one, re-enabled, so the next backup against the old change ID misses nothing.
Either way exactly one bitmap per node is left, and no job, node or export.

Broken bitmaps are detected when a session opens: missing (QEMU restarted without
saving it), inconsistent (QEMU was killed while it was in use: the qcow2 still has
its in-use flag), disabled (a session died between its transaction and its commit or
abort; repaired by merging the newer bitmap when there is one) or busy. Missing,
inconsistent and unrepairable bitmaps are removed and ``ChangeTrackingError`` is
raised; the caller then opens a session with ``since=None`` (a consistent full view
and a fresh bitmap) and backs up by scan or in full.

Objects a session creates in QEMU are named ``vmbak-PID-TOKEN-*``. A later session
finds those of processes that are gone and removes them first, so a killed vmbak
leaves nothing behind for long. Bitmaps whose names start with the bitmap prefix
(``vmbak-`` by default) belong to vmbak: keep one backup chain per prefix and node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmbak.changes.base import ChangeMap
from vmbak.disks.base import DiskReader
from vmbak.disks.nbd import STATE_DIRTY, NbdDisk
from vmbak.disks.qemu import run_qemu_img
from vmbak.errors import ChangeTrackingError, DiskError, VmbakError
from vmbak.repo.backend import pid_alive

SOURCE = "qemu-dirty-bitmap"
DEFAULT_BITMAP_PREFIX = "vmbak-"
_OBJ = re.compile(r"^vmbak-(\d+)-([0-9a-f]{8})-(xs|x|j|f)$")
_open_tokens: set[str] = set()  # sessions of this process that are still open
_tokens_lock = threading.Lock()


class QmpError(VmbakError):
    """A QMP command failed; ``error_class`` and ``desc`` are QEMU's."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


# ---------------------------------------------------------------------------- QMP client
class _EarlyClose(Exception):
    """The QMP server closed the connection before sending its greeting."""


class _Busy(Exception):
    """connect() found the QMP server's listen backlog full (EAGAIN)."""


class QmpClient:
    """A minimal synchronous QMP client over a unix socket (JSON lines)."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.events: list[dict] = []
        self._id = 0
        # QEMU's monitor serves one client at a time and tears a closed connection down
        # asynchronously: a client that connects just as the previous one leaves can be
        # dropped before the greeting, and its listen backlog (one slot) may still be full, so
        # that connect() fails with EAGAIN. Both are retried for a few seconds.
        for attempt in range(10):
            try:
                self._connect(path, timeout)
                return
            except (_EarlyClose, _Busy) as e:
                if attempt == 9:
                    what = "closed the QMP connection before greeting" if isinstance(e, _EarlyClose) \
                        else "kept its QMP socket busy (its one connection slot stayed taken)"
                    raise DiskError(f"QEMU {what}: {path}") from None
                time.sleep(0.05 * (attempt + 1))

    def _connect(self, path: str, timeout: float) -> None:
        self._buf = b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise DiskError(f"QMP socket not found: {path} (is QEMU running with -qmp unix:{path},server=on?)") \
                from None
        except ConnectionRefusedError:
            sock.close()
            raise DiskError(f"nothing listens on QMP socket {path} (QEMU is not running?)") from None
        except BlockingIOError:
            sock.close()
            raise _Busy() from None
        except OSError as e:
            sock.close()
            raise DiskError(f"cannot connect to QMP socket {path}: {e.strerror or e}") from None
        self.sock = sock
        try:
            try:
                greeting = self._read()
            except TimeoutError:
                raise DiskError(f"QMP socket {path} does not answer (another client is connected?)") from None
            except DiskError:
                if not self._buf:
                    raise _EarlyClose() from None
                raise
            if "QMP" not in greeting:
                raise DiskError(f"{path} is not a QMP socket")
            self.version = greeting["QMP"].get("version", {}).get("qemu", {})
            sock.settimeout(timeout)
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as e:
                raise DiskError(f"QMP connection {self.path} failed: {e.strerror or e}") from None
            if not chunk:
                raise DiskError(f"QEMU closed the QMP connection {self.path}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise DiskError(f"{self.path}: not a QMP reply: {line[:80]!r}") from None

    def execute(self, command: str, arguments: dict | None = None, **kw: Any) -> Any:
        """Run one command; return its ``return`` value or raise QmpError."""
        args = dict(arguments or {}, **kw)
        self._id += 1
        msg: dict = {"execute": command, "id": self._id}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise DiskError(f"QMP connection {self.path} failed: {e.strerror or e}") from None
        while True:
            try:
                r = self._read()
            except TimeoutError:
                raise DiskError(f"QEMU did not answer {command} on {self.path}") from None
            if "event" in r:
                self.events.append(r)
                del self.events[:-200]
                continue
            if r.get("id") != self._id:
                continue
            if "error" in r:
                err = r["error"]
                raise QmpError(command, err.get("class", "GenericError"), err.get("desc", "unknown error"))
            return r.get("return")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- helpers
def _nodes(q: QmpClient) -> list[dict]:
    return q.execute("query-named-block-nodes", flat=True)


def resolve_node(q: QmpClient, node: str) -> dict:
    """The query-named-block-nodes entry of a node name, or of a drive's (device's)
    top node. Raises DiskError naming what exists."""
    nodes = _nodes(q)
    for n in nodes:
        if n.get("node-name") == node:
            return n
    try:
        blocks = q.execute("query-block")
    except QmpError:
        blocks = []
    for b in blocks or []:
        if node in (b.get("device"), b.get("qdev")) and b.get("inserted"):
            nn = b["inserted"].get("node-name")
            for n in nodes:
                if n.get("node-name") == nn:
                    return n
    known = sorted({n["node-name"] for n in nodes if not n["node-name"].startswith(("#", "vmbak-"))
                    and n.get("drv") != "file"} | {b["device"] for b in blocks or [] if b.get("device")})
    raise DiskError(f"QEMU at {q.path} has no block node or drive named {node!r}"
                    + (f" (it has: {', '.join(known)})" if known else ""))


def _bitmaps(node_info: dict) -> dict[str, dict]:
    return {b["name"]: b for b in node_info.get("dirty-bitmaps") or [] if b.get("name")}


def _wait(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise DiskError(f"QEMU: timed out waiting for {what}")
        time.sleep(0.01)


def _tmp_base(tmpdir: str | None) -> str:
    base = tmpdir or tempfile.gettempdir()
    if tmpdir is None and len(base) > 60:  # unix socket paths are limited to 107 bytes
        base = "/tmp"
    return base


def _drop_export(q: QmpClient, eid: str) -> None:
    try:
        q.execute("block-export-del", id=eid, mode="hard")
    except QmpError:
        pass
    _wait(lambda: all(e.get("id") != eid for e in q.execute("query-block-exports")), f"export {eid} to go")


def _drop_job(q: QmpClient, jid: str) -> None:
    def gone() -> bool:
        jobs = {j["id"]: j for j in q.execute("query-jobs")}
        j = jobs.get(jid)
        if j is None:
            return True
        if j.get("status") == "concluded":
            try:
                q.execute("job-dismiss", id=jid)
            except QmpError:
                pass
        return False

    try:
        q.execute("block-job-cancel", device=jid, force=True)
    except QmpError:
        pass
    _wait(gone, f"job {jid} to end")


def _drop_node(q: QmpClient, name: str) -> None:
    try:
        q.execute("blockdev-del", **{"node-name": name})
    except QmpError:
        if any(n.get("node-name") == name for n in _nodes(q)):
            raise


def _clean_stale(q: QmpClient, tmpdir: str | None) -> list[str]:
    """Remove the exports, jobs and nodes of vmbak sessions whose process is gone."""
    objs: dict[str, dict[str, str]] = {}

    def add(oid: str) -> None:
        m = _OBJ.match(oid or "")
        if m:
            objs.setdefault(f"{m.group(1)}-{m.group(2)}", {})[m.group(3)] = oid

    for e in q.execute("query-block-exports"):
        add(e.get("id", ""))
    for j in q.execute("query-jobs"):
        add(j.get("id", ""))
    for n in _nodes(q):
        add(n.get("node-name", ""))
    cleaned = []
    for key, kinds in objs.items():
        pid, tok = key.split("-")
        with _tokens_lock:
            mine = tok in _open_tokens
        if mine or (int(pid) != os.getpid() and pid_alive(int(pid))):
            continue
        for kind in ("xs", "x"):
            if kind in kinds:
                _drop_export(q, kinds[kind])
        if "xs" in kinds:
            try:
                q.execute("nbd-server-stop")
            except QmpError:
                pass
        if "j" in kinds:
            _drop_job(q, kinds["j"])
        if "f" in kinds:
            _drop_node(q, kinds["f"])
        shutil.rmtree(os.path.join(_tmp_base(tmpdir), f"vmbak-qemu-{key}"), ignore_errors=True)
        cleaned.append(key)
    return cleaned


def _remove_bitmaps(q: QmpClient, node: str, names: list[str]) -> None:
    for name in names:
        try:
            q.execute("block-dirty-bitmap-remove", node=node, name=name)
        except QmpError:
            pass


def _bitmap_action(kind: str, **data: Any) -> dict:
    return {"type": kind, "data": data}


# ---------------------------------------------------------------------------- session
@dataclass
class QemuSession:
    """One backup of one QEMU block node: a point-in-time reader, the changes since
    the previous backup's bitmap, and the new bitmap's name (the change ID)."""

    qmp_socket: str
    node: str  # the resolved node name
    since: str | None
    block_size: int
    change_id: str
    reader: DiskReader
    change_map: ChangeMap | None
    notes: list[str] = field(default_factory=list)
    _token: str = ""
    _names: dict[str, str] = field(default_factory=dict)
    _owns_server: bool = False
    _dir: str = ""
    _done: bool = False

    @property
    def size(self) -> int:
        return self.reader.size

    def _teardown(self, q: QmpClient) -> None:
        try:
            self.reader.close()
        except Exception:  # noqa: BLE001, S110 - the connections may already be gone
            pass
        _drop_export(q, self._names["export"])
        if self._owns_server:
            try:
                q.execute("nbd-server-stop")
            except QmpError:
                pass
        _drop_job(q, self._names["job"])
        _drop_node(q, self._names["fleece"])

    def _finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        try:
            with QmpClient(self.qmp_socket) as q:
                self._teardown(q)
                if ok:
                    if self.since is not None:
                        _remove_bitmaps(q, self.node, [self.since])
                elif self.since is not None:
                    try:
                        q.execute("transaction", actions=[
                            _bitmap_action("block-dirty-bitmap-enable", node=self.node, name=self.since),
                            _bitmap_action("block-dirty-bitmap-merge", node=self.node, target=self.since,
                                           bitmaps=[self.change_id]),
                            _bitmap_action("block-dirty-bitmap-remove", node=self.node, name=self.change_id),
                        ])
                    except QmpError:
                        # The old bitmap stays disabled: the next session sees it cannot
                        # prove completeness and falls back to a full read.
                        _remove_bitmaps(q, self.node, [self.change_id])
                        raise
                else:
                    _remove_bitmaps(q, self.node, [self.change_id])
        finally:
            try:
                self.reader.close()
            except Exception:  # noqa: BLE001, S110
                pass
            shutil.rmtree(self._dir, ignore_errors=True)
            with _tokens_lock:
                _open_tokens.discard(self._token)

    def commit(self) -> None:
        """The backup is durable: keep the new bitmap, drop the old one, tear down."""
        self._finish(True)

    def abort(self) -> None:
        """The backup failed: fold the new bitmap back into the old one, tear down."""
        self._finish(False)

    def __enter__(self) -> QemuSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._done:
            self.abort()


def _check_since(q: QmpClient, node: str, since: str, bitmaps: dict[str, dict], prefix: str,
                 notes: list[str]) -> None:
    b = bitmaps.get(since)
    stale = [n for n in bitmaps if n.startswith(prefix) and n != since and not bitmaps[n].get("busy")]
    where = f"dirty bitmap {since!r} on node {node!r}"
    if b is None:
        _remove_bitmaps(q, node, stale)
        raise ChangeTrackingError(f"{where} is missing (QEMU was restarted or killed before it saved "
                                  "the bitmap), so the changes since the last backup are unknown")
    if b.get("inconsistent"):
        _remove_bitmaps(q, node, [since, *stale])
        raise ChangeTrackingError(f"{where} is inconsistent (QEMU was killed or crashed while it was in "
                                  "use), so changes may be missing; the bitmap was removed")
    if b.get("busy"):
        raise ChangeTrackingError(f"{where} is in use by another operation (another backup running?)")
    if not b.get("recording"):
        newer = [n for n in stale if bitmaps[n].get("recording") and not bitmaps[n].get("inconsistent")]
        if not newer:
            _remove_bitmaps(q, node, [since, *stale])
            raise ChangeTrackingError(f"{where} is disabled and no newer bitmap covers the time since, "
                                      "so changes may be missing; the bitmap was removed")
        # A backup from `since` died after its transaction: `since` froze when the newer
        # bitmap started, so together they cover every write since `since`.
        usable = [n for n in stale if not bitmaps[n].get("inconsistent")]
        q.execute("transaction", actions=[
            _bitmap_action("block-dirty-bitmap-enable", node=node, name=since),
            _bitmap_action("block-dirty-bitmap-merge", node=node, target=since, bitmaps=usable),
            *[_bitmap_action("block-dirty-bitmap-remove", node=node, name=n) for n in usable],
        ])
        _remove_bitmaps(q, node, [n for n in stale if n not in usable])
        notes.append(f"qemu: bitmap {since} was left disabled by an interrupted backup; merged "
                     f"{', '.join(usable)} back into it")
        return
    if stale:
        _remove_bitmaps(q, node, stale)
        notes.append(f"qemu: removed leftover bitmaps {', '.join(stale)}")


def open_session(qmp_socket: str, node: str, since: str | None, block_size: int, *,
                 nbd_server: str | None = None, bitmap_prefix: str = DEFAULT_BITMAP_PREFIX,
                 tmpdir: str | None = None, log: Callable[[str], None] | None = None,
                 quiesce: Callable[[], contextlib.AbstractContextManager] | None = None) -> QemuSession:
    """Start a backup of ``node`` (a node name, or a drive/device name) of the QEMU at
    ``qmp_socket``; see the module documentation.

    ``since``: the change ID (bitmap name) of the previous backup, or None for a full
    backup. ``nbd_server``: the address of an NBD server QEMU already runs (a unix
    socket path or an ``nbd://host:port`` URI); by default the session starts one on
    a private unix socket and stops it again. ``tmpdir``: where the fleecing overlay
    goes (it grows by what the guest writes during the backup).

    Raises ChangeTrackingError (after cleaning up) when ``since`` cannot be trusted;
    DiskError for a missing socket, an unknown node or other QEMU trouble, leaving
    nothing behind in QEMU.
    """
    log = log or (lambda s: None)
    if block_size < 512 or block_size & (block_size - 1):
        raise DiskError("block size must be a power of two")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,40}", bitmap_prefix):
        raise DiskError(f"invalid bitmap prefix {bitmap_prefix!r}")
    if since is not None and not since.startswith(bitmap_prefix):
        raise ChangeTrackingError(f"change ID {since!r} is not a vmbak dirty bitmap name (prefix {bitmap_prefix})")
    tok = secrets.token_hex(4)
    key = f"{os.getpid()}-{tok}"
    names = {"fleece": f"vmbak-{key}-f", "job": f"vmbak-{key}-j",
             "export": f"vmbak-{key}-{'x' if nbd_server else 'xs'}"}
    notes: list[str] = []
    with QmpClient(qmp_socket) as q:
        for k in _clean_stale(q, tmpdir):
            notes.append(f"qemu: removed the leftovers of an interrupted vmbak session ({k})")
        info = resolve_node(q, node)
        nn = info["node-name"]
        size = int((info.get("image") or {}).get("virtual-size") or 0)
        if size <= 0:
            raise DiskError(f"QEMU node {nn!r} reports no size")
        bitmaps = _bitmaps(info)
        if since is not None:
            _check_since(q, nn, since, bitmaps, bitmap_prefix, notes)
        else:
            ours = [n for n in bitmaps if n.startswith(bitmap_prefix)]
            busy = [n for n in ours if bitmaps[n].get("busy")]
            if busy:
                raise DiskError(f"node {nn!r} has vmbak bitmaps in use ({', '.join(busy)}): is another "
                                "backup of it running?")
            _remove_bitmaps(q, nn, ours)
            if ours:
                notes.append(f"qemu: removed earlier bitmaps {', '.join(ours)} (full backup)")
        new = f"{bitmap_prefix}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{tok}"
        with _tokens_lock:
            _open_tokens.add(tok)
        d = os.path.join(_tmp_base(tmpdir), f"vmbak-qemu-{key}")
        undo: list[Callable[[], None]] = [lambda: shutil.rmtree(d, ignore_errors=True)]
        reader: NbdDisk | None = None
        try:
            os.mkdir(d, 0o700)
            fleece = os.path.join(d, "fleece.qcow2")
            p = run_qemu_img(["create", "-q", "-f", "qcow2", "--", fleece, str(size)],
                             f"cannot create the fleecing overlay in {d}")
            if p.returncode:
                raise DiskError(f"cannot create the fleecing overlay in {d}: {p.stderr.strip()}")
            q.execute("blockdev-add", {"driver": "qcow2", "node-name": names["fleece"], "backing": nn,
                                       "file": {"driver": "file", "filename": fleece}})
            undo.append(lambda: _drop_node(q, names["fleece"]))
            # Only qcow2 stores bitmaps; on other formats the bitmap lives as long as QEMU runs
            # (a restart then shows it missing, and the next backup reads everything).
            persistent = info.get("drv") == "qcow2"
            if not persistent:
                notes.append(f"qemu: node {nn!r} is {info.get('drv')}, which cannot store bitmaps: the new "
                             "bitmap lasts only as long as this QEMU process")
            actions = [_bitmap_action("block-dirty-bitmap-add", node=nn, name=new, persistent=persistent,
                                      granularity=block_size)]
            if since is not None:
                actions.append(_bitmap_action("block-dirty-bitmap-disable", node=nn, name=since))
            actions.append(_bitmap_action("blockdev-backup", device=nn, target=names["fleece"], sync="none",
                                          **{"job-id": names["job"]}))

            def undo_bitmaps() -> None:
                if since is not None:
                    q.execute("transaction", actions=[
                        _bitmap_action("block-dirty-bitmap-enable", node=nn, name=since),
                        _bitmap_action("block-dirty-bitmap-merge", node=nn, target=since, bitmaps=[new]),
                        _bitmap_action("block-dirty-bitmap-remove", node=nn, name=new)])
                else:
                    _remove_bitmaps(q, nn, [new])

            started = False
            try:
                # the guest is frozen (if at all) only around the transaction that makes the view
                with quiesce() if quiesce is not None else contextlib.nullcontext():
                    q.execute("transaction", actions=actions)
                    started = True
            finally:
                if started:  # also when the thaw failed or a signal came while frozen
                    undo.append(undo_bitmaps)
                    undo.append(lambda: _drop_job(q, names["job"]))
            owns = nbd_server is None
            if owns:
                sock = os.path.join(d, "nbd.sock")
                try:
                    q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
                except QmpError as e:
                    if "already running" in e.desc:
                        raise DiskError("QEMU already runs an NBD server: give its address (a unix socket "
                                        "path or nbd://host:port) so the backup can export through it") from None
                    raise

                def stop_server() -> None:
                    try:
                        q.execute("nbd-server-stop")
                    except QmpError:
                        pass

                undo.append(stop_server)
                address = sock
            else:
                address = nbd_server  # type: ignore[assignment]
            export: dict[str, Any] = {"type": "nbd", "id": names["export"], "node-name": names["fleece"],
                                      "name": names["export"], "writable": False}
            if since is not None:
                export["bitmaps"] = [since]
            q.execute("block-export-add", export)
            undo.append(lambda: _drop_export(q, names["export"]))
            contexts = [f"qemu:dirty-bitmap:{since}"] if since is not None else []
            if "://" in address:
                address = address.rstrip("/") + "/" + names["export"]
            reader = NbdDisk(address, names["export"], meta_contexts=contexts,
                             description=f"qemu:{qmp_socket}:{node}")
            undo.append(reader.close)
            if reader.size != size:
                raise DiskError(f"the point-in-time export of {nn!r} has {reader.size} bytes, expected {size}")
            cm = None
            if since is not None:
                cm = _change_map(reader, contexts[0], size, block_size, since, new)
                cm.notes[:0] = notes
            session = QemuSession(qmp_socket=qmp_socket, node=nn, since=since, block_size=block_size,
                                  change_id=new, reader=reader, change_map=cm, notes=notes, _token=tok,
                                  _names=names, _owns_server=owns, _dir=d)
        except BaseException:
            for fn in reversed(undo):
                try:
                    fn()
                except Exception:  # noqa: BLE001, S110 - undo as much as possible
                    pass
            with _tokens_lock:
                _open_tokens.discard(tok)
            raise
    for n in notes:
        log(n)
    return session


def _change_map(reader: NbdDisk, context: str, size: int, bs: int, since: str, new: str) -> ChangeMap:
    if context not in reader.contexts:
        raise ChangeTrackingError(f"QEMU does not export dirty bitmap {since!r} over NBD")
    nblocks = (size + bs - 1) // bs
    bitmap = np.zeros(nblocks, bool)
    dirty = 0
    for off, ln, fl in reader.extents(context, 0, size):
        if fl & STATE_DIRTY:
            bitmap[off // bs:(off + ln + bs - 1) // bs] = True
            dirty += ln
    n = int(np.count_nonzero(bitmap))
    return ChangeMap(bitmap=bitmap, block_size=bs, source=SOURCE, reference=since, new_reference=new,
                     notes=[f"qemu: dirty bitmap {since} marks {n} of {nblocks} blocks ({dirty} bytes)"])
