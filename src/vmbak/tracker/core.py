"""The tracking engine that runs inside the NBD server process.

It owns the disk file and the three bitmap layers:

* in memory: one bool per block (``block_size``, 64 KiB by default) for the blocks changed
  since the last committed change ID, plus, while a checkpoint is open, the next epoch's bitmap;
* ``.rct``: the same bitmaps and the change-ID history, written back every few seconds and
  at a clean stop (atomic replace);
* ``.mrt``: one bit per region (1 MiB by default), written through: before a write touches
  a region whose bit is not yet on stable storage, the bit is written and fdatasync'ed.

Every modifying request (write, trim, zero) passes a gate. A checkpoint closes the gate,
waits for the requests in flight, switches later writes to a new bitmap and turns on
copy-before-write, so the frozen view is the disk exactly as it was when the gate closed.

Only the standard library and numpy are used: this runs in nbdkit's embedded Python.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from vmbak.tracker import changelog, identity
from vmbak.tracker.formats import (
    MRT_PAGE_BITS,
    PAGE,
    DiskIdentity,
    RctState,
    StateFileError,
    encode_mrt_header,
    encode_mrt_page,
    encode_rct,
    mrt_page_offset,
    mrt_pages,
    nblocks,
    pack,
    read_mrt,
    read_rct,
    resample,
    runs,
    write_atomic,
)
from vmbak.tracker.paths import StatePaths, state_paths

DEFAULT_BLOCK_SIZE = 64 << 10
DEFAULT_REGION_SIZE = 1 << 20
DEFAULT_RCT_INTERVAL = 5.0
DEFAULT_HISTORY = 8
DEFAULT_LEASE = 60.0

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZEROS = bytes(1 << 20)

# COW states per block while a checkpoint is open
_COW_NONE, _COW_COPIED, _COW_ZERO = 0, 1, 2


class TrackerError(Exception):
    """An error to report to a control client; ``kind`` tells the client which exception to raise."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # "tracking" (fall back to a scan), "busy", "state", "error"


class TrackerStartError(Exception):
    """The tracker cannot start (the message is one line for the user)."""


def _libc_fallocate() -> Callable[[int, int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if fn(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    return fallocate


_fallocate = _libc_fallocate()


def _iso(ns: int) -> str:
    t = ns / 1e9
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view, offset = view[n:], offset + n


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n <= 0:  # beyond the end of the file: zeros
            buf[:] = bytes(len(buf))
            return
        buf, offset = buf[n:], offset + n


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) ranges of [start, end) that may hold data (SEEK_DATA/SEEK_HOLE)."""
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            yield pos, end - pos
            return
        if d >= end:
            return
        try:
            h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        except OSError:
            h = end
        yield d, h - d
        pos = h


# ---------------------------------------------------------------------------- the gate
class Gate:
    """Many modifying requests at once, or one exclusive holder (a checkpoint, commit or stop)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active = 0
        self._closed = False

    def enter(self) -> None:
        with self._cv:
            while self._closed:
                self._cv.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cv:
            self._active -= 1
            if self._active == 0 and self._closed:
                self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            while self._closed:
                self._cv.wait()
            self._closed = True
            while self._active:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._closed = False
                self._cv.notify_all()


# ---------------------------------------------------------------------------- MRT writer
class Mrt:
    """The modified-region table, written through with group commit."""

    def __init__(self, path: str, ident: DiskIdentity, region_size: int, sync: bool,
                 lease: float = DEFAULT_LEASE) -> None:
        self.path = path
        self.ident = ident
        self.region = region_size
        self.n = nblocks(ident.size, region_size)
        self.npages = mrt_pages(self.n)
        self.sync = sync
        self.bits = np.zeros(self.n, bool)
        self.durable = np.zeros(self.n, bool)
        self.fd = -1
        self.generation = 0
        self.header: dict = {}
        self._fields: dict = {}
        # The lease: the tracker writes the disk only before ``lease_until`` (wall clock, s), a
        # time that a header on stable storage names. After a crash, a disk changed later than
        # the lease was changed by something else.
        self.lease = lease
        self.lease_until = 0.0
        self._io = threading.Lock()
        self._plock = threading.Lock()
        self._pending: set[int] = set()
        self.syncs = 0

    def _hdr(self, fields: dict, lease_until: float) -> bytes:
        self.generation += 1
        self._fields = fields
        self.header = {**self.ident.header(), **fields, "region_size": self.region, "nregions": self.n,
                       "generation": self.generation, "lease_until_ns": int(lease_until * 1e9)}
        return encode_mrt_header(self.header)

    def create(self, bits: np.ndarray, fields: dict, generation: int) -> None:
        """Write a whole new table atomically (temporary file and rename) and open it."""
        self.generation = generation
        self.bits = bits.copy()
        lease = time.time() + self.lease
        hdr = self._hdr(fields, lease)
        parts = [hdr, hdr]
        for i in range(self.npages):
            parts.append(encode_mrt_page(i, self.bits[i * MRT_PAGE_BITS:(i + 1) * MRT_PAGE_BITS]))
        write_atomic(self.path, b"".join(parts))
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.durable = self.bits.copy()
        self.lease_until = lease

    def _write_pages(self, pages: set[int]) -> None:
        for i in sorted(pages):
            page = encode_mrt_page(i, self.bits[i * MRT_PAGE_BITS:(i + 1) * MRT_PAGE_BITS])
            _pwrite_all(self.fd, page, mrt_page_offset(i))

    def ensure(self, r0: int, r1: int) -> None:
        """Return once regions [r0, r1) are marked on stable storage (write-through)."""
        with self._plock:
            self._pending.update(range(r0, r1))
        if not self.sync:
            return  # written later, with the .rct (benchmark only)
        with self._io:
            if self.durable[r0:r1].all():
                return  # another writer's sync carried our bits
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._plock:
            pend, self._pending = self._pending, set()
        if not pend:
            return
        idx = np.fromiter(pend, np.int64, len(pend))
        self.bits[idx] = True
        self._write_pages(set((idx // MRT_PAGE_BITS).tolist()))
        os.fdatasync(self.fd)
        self.syncs += 1
        self.durable[idx] = True

    def flush_pending(self) -> None:
        with self._io:
            self._flush_locked()

    def rewrite(self, bits: np.ndarray, fields: dict) -> None:
        """At commit: header first (naming the new change ID), then the cleared pages."""
        with self._io:
            with self._plock:
                pend, self._pending = self._pending, set()
            new = bits.copy()
            if pend:
                new[np.fromiter(pend, np.int64, len(pend))] = True
            lease = time.time() + self.lease
            hdr = self._hdr(fields, lease)
            changed = np.flatnonzero(new != self.bits)
            try:
                _pwrite_all(self.fd, hdr, PAGE * (self.generation % 2))
                os.fdatasync(self.fd)
                self.lease_until = max(self.lease_until, lease)
                self.bits = new
                self._write_pages(set((changed // MRT_PAGE_BITS).tolist()))
                os.fdatasync(self.fd)
            except OSError:
                # the pages on disk are unknown now: make every later write mark its region again
                self.bits = self.bits | new
                self.durable[:] = False
                raise
            self.syncs += 2
            self.durable = new.copy()

    def renew_lease(self, ahead: float) -> None:
        """Return once the lease on stable storage runs at least ``ahead`` seconds more."""
        with self._io:
            if time.time() < self.lease_until - ahead:
                return  # another writer renewed it
            lease = time.time() + self.lease
            hdr = self._hdr(self._fields, lease)
            _pwrite_all(self.fd, hdr, PAGE * (self.generation % 2))
            os.fdatasync(self.fd)
            self.syncs += 1
            self.lease_until = lease

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class Pending:
    change_id: str
    since: str | None
    token: str
    started: float
    started_iso: str
    owner: str
    cow_fd: int
    cow: np.ndarray  # uint8 state per block
    copied_blocks: int = 0
    zero_blocks: int = 0


@dataclass
class Config:
    disk: str
    state_dir: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    region_size: int = DEFAULT_REGION_SIZE
    rct_interval: float = DEFAULT_RCT_INTERVAL
    mrt_sync: bool = True
    history: int = DEFAULT_HISTORY
    hash_limit: int = identity.DEFAULT_HASH_LIMIT
    lease: float = DEFAULT_LEASE
    socket: str | None = None
    tcp: str | None = None
    extra: dict = field(default_factory=dict)


class Tracker:
    """The state of one tracked disk inside the server process."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.paths: StatePaths = state_paths(cfg.disk, cfg.state_dir)
        self.bs = cfg.block_size
        self.closed = False
        self.started = time.time()
        self.notes: list[str] = []
        try:
            self.fd = os.open(cfg.disk, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TrackerStartError(f"cannot open disk {cfg.disk}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise TrackerStartError(f"disk {cfg.disk} is already tracked by another vmbak tracker") from None
        self.ident = DiskIdentity.of(cfg.disk, self.fd)
        self.size = self.ident.size
        self.nb = nblocks(self.size, self.bs)
        self.gate = Gate()
        self._ctl = threading.RLock()  # serialises checkpoint / commit / abort / stop
        self._state = threading.Lock()  # state snapshot and .rct writes
        self._cow_lock = threading.Lock()
        self.mrt = Mrt(self.paths.mrt, self.ident, cfg.region_size, cfg.mrt_sync, cfg.lease)
        self._lease_ahead = min(5.0, cfg.lease / 4)
        self.pending: Pending | None = None
        self._next: np.ndarray | None = None
        self._stale = True
        self.rct_generation = 0
        self.rct_written_at: float | None = None
        self.rct_error: str | None = None
        self.writes = 0
        self.bytes_written = 0
        self.trims = 0
        self.zeroes = 0
        self.last_abort: dict | None = None
        self._recover()
        self._epoch_map = self._dirty
        self._stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ recovery
    def _log(self, event: str, **fields: object) -> None:
        try:
            changelog.append(self.paths.log, event, **fields)
        except OSError:
            pass

    def _new_id(self, epoch: int) -> str:
        return f"{self.tracker_id[:8]}-{epoch}-{secrets.token_hex(3)}"

    def _recover(self) -> None:
        p, bs, size = self.paths, self.bs, self.size
        rct: RctState | None = None
        rct_err = mrt_err = None
        try:
            rct = read_rct(p.rct, self.ident)
        except StateFileError as e:
            rct_err = e
        try:
            mrt = read_mrt(p.mrt, self.ident)
        except StateFileError as e:
            mrt, mrt_err = None, e
        if rct is not None and mrt is not None and mrt.header.get("tracker_id") != rct.tracker_id:
            mrt, mrt_err = None, StateFileError("foreign", "belongs to another tracker "
                                                f"(id {mrt.header.get('tracker_id')})")
        self.valid = True
        self.invalid_reason: str | None = None
        self.history: list[dict] = []
        self.committed_id: str | None = None
        self.epoch = 0
        self.recovery = "new"
        notes = self.notes
        rct_name, mrt_name = os.path.basename(p.rct), os.path.basename(p.mrt)

        def invalidate(reason: str) -> None:
            self.valid = False
            self.invalid_reason = reason
            self.committed_id = None
            self.history = []

        self.identity_check: dict | None = None

        def check_stop_identity(rec: object, where: str) -> None:
            v = identity.verify(rec, self.fd)
            self.identity_check = {"proven": v.proven, "reason": v.reason, "from": where}
            if v.proven:
                notes.append(f"{v.reason} ({where}): tracking continues")
            elif self.valid:
                invalidate(v.reason)
            else:
                notes.append(v.reason)

        def check_crash_lease(hdr: dict, where: str) -> None:
            # After a crash nothing records when the tracker died; its lease bounds when it
            # could have written. A change of the disk after the lease was someone else's.
            lease = hdr.get("lease_until_ns")
            ctime = os.fstat(self.fd).st_ctime_ns
            if not isinstance(lease, int):
                reason = (f"{identity.UNPROVEN}: the tracker did not stop cleanly, and {where} was written by "
                          "an older vmbak that records no lease to compare the disk's change time with")
                proven = False
            elif ctime > lease:
                reason = (f"{identity.WRITTEN}: the tracker did not stop cleanly, and the disk changed at "
                          f"{_iso(ctime)}, after the crashed tracker's lease ran out at {_iso(lease)} (a write, "
                          "or a chmod, chown or xattr change)")
                proven = False
            else:
                reason = (f"the disk last changed at {_iso(ctime)}, before the crashed tracker's lease ran out at "
                          f"{_iso(lease)}; a write by anything else before then could not be told apart")
                proven = True
            self.identity_check = {"proven": proven, "reason": reason, "from": where}
            if proven:
                notes.append(f"crash recovery: {reason}")
            elif self.valid:
                invalidate(reason)
            else:
                notes.append(reason)

        mrt_generation = 0
        if mrt is not None:
            mrt_generation = int(mrt.header.get("generation", 0))
            if mrt.bad_pages:
                notes.append(f"{mrt_name}: {len(mrt.bad_pages)} page(s) failed their checksum; every region "
                             "they cover counts as changed")
        if rct is not None:
            self.tracker_id = rct.tracker_id
            self.committed_id = rct.committed_id
            self.epoch = rct.epoch
            self.rct_generation = rct.generation
            dirty = rct.dirty
            hist = rct.history
            if rct.block_size != bs:
                notes.append(f"block size changed from {rct.block_size} to {bs}: bitmaps converted")
                dirty = resample(dirty, rct.block_size, bs, size)
                hist = [{**h, "bitmap": resample(h["bitmap"], rct.block_size, bs, size)} for h in hist]
            self.history = hist
            self._dirty = dirty.copy()
            if not rct.valid:
                invalidate(rct.invalid_reason or "tracking was invalid before the restart")
            if rct.clean:
                self.recovery = "clean"
                check_stop_identity(rct.stop_identity, rct_name)
                if mrt_err is not None and mrt_err.kind != "missing":
                    notes.append(f"{mrt_name} {mrt_err}; rebuilt from the clean {rct_name}")
            else:
                self.recovery = "unclean"
                notes.append("the tracker did not stop cleanly: the .rct bits and every block of every "
                             "marked .mrt region count as changed")
                if rct.pending_id:
                    notes.append(f"checkpoint {rct.pending_id} was open at the crash: aborted, its changes "
                                 "merged back")
                if mrt is None:
                    invalidate(f"unclean stop and {mrt_name} {mrt_err}: changes since the last checkpoint "
                               "cannot be proven complete")
                else:
                    mid = mrt.header.get("committed_id")
                    older = {h["from"] for h in self.history}
                    if mid is None or mid == self.committed_id or mid in older:
                        self._dirty |= resample(mrt.bits, int(mrt.header["region_size"]), bs, size)
                    else:
                        invalidate(f"{mrt_name} refers to change ID {mid}, which {rct_name} does not know")
                    if not mrt.header.get("valid", True):
                        invalidate(mrt.header.get("invalid_reason") or "tracking was invalid")
                    if mrt.header.get("clean"):
                        check_stop_identity(mrt.header.get("stop_identity"), mrt_name)
                    else:
                        check_crash_lease(mrt.header, mrt_name)
        elif mrt is not None:
            self.recovery = "mrt-only"
            self.tracker_id = str(mrt.header.get("tracker_id") or secrets.token_hex(16))
            self.committed_id = mrt.header.get("committed_id")
            self.epoch = int(mrt.header.get("epoch", 0))
            self._dirty = resample(mrt.bits, int(mrt.header["region_size"]), bs, size)
            notes.append(f"{rct_name} {rct_err}; recovered from {mrt_name}: every block of every marked "
                         "region counts as changed (over-reporting)")
            if not mrt.header.get("valid", True):
                invalidate(mrt.header.get("invalid_reason") or "tracking was invalid")
            if mrt.header.get("clean"):
                check_stop_identity(mrt.header.get("stop_identity"), mrt_name)
            elif "clean" not in mrt.header:
                # written by a vmbak that did not record clean stops in the .mrt: a clean stop
                # followed by untracked writes cannot be told from a crash
                invalidate(f"{identity.UNPROVEN}: {mrt_name} was written by an older vmbak that does not "
                           "record whether the tracker stopped cleanly, nor the disk's identity")
            else:
                notes.append(f"{mrt_name}: the tracker did not stop cleanly (crash recovery)")
                check_crash_lease(mrt.header, mrt_name)
        else:
            self.tracker_id = secrets.token_hex(16)
            self._dirty = np.zeros(self.nb, bool)
            assert rct_err is not None and mrt_err is not None
            if rct_err.kind == "missing" and mrt_err.kind == "missing":
                self.recovery = "new"
            else:
                self.recovery = "lost"
                invalidate(f"{rct_name} {rct_err} and {mrt_name} {mrt_err}")
        if not self.valid:
            notes.append(f"change tracking is invalid: {self.invalid_reason}; the next backup must scan")
        # Persist the starting point: a fresh MRT first (it covers every dirty block), then the .rct,
        # marked unclean until the next clean stop.
        try:
            self.mrt.create(self._region_bits(self._dirty), self._mrt_fields(), mrt_generation)
            self._write_rct(clean=False)
        except OSError as e:
            raise TrackerStartError(f"cannot write the tracker's state files in {p.state_dir}: "
                                    f"{e.strerror}") from None
        self._log("start", recovery=self.recovery, tracking="valid" if self.valid else "invalid",
                  committed_id=self.committed_id, dirty_blocks=int(np.count_nonzero(self._dirty)),
                  block_size=bs, region_size=self.cfg.region_size, notes=list(notes),
                  invalid_reason=self.invalid_reason, identity_check=self.identity_check, pid=os.getpid())

    def _region_bits(self, dirty: np.ndarray) -> np.ndarray:
        return resample(dirty, self.bs, self.mrt.region, self.size)

    def _mrt_fields(self) -> dict:
        return {"tracker_id": self.tracker_id, "committed_id": self.committed_id, "epoch": self.epoch,
                "valid": self.valid, "invalid_reason": self.invalid_reason, "clean": False}

    # ------------------------------------------------------------------ .rct
    def _write_rct(self, clean: bool, stop_identity: dict | None = None) -> None:
        """Snapshot and write the .rct (the caller may hold the gate, never _state)."""
        with self._state:
            self._stale = False
            dirty = self._dirty if self._next is None else (self._dirty | self._next)
            mtime = None
            if clean:
                os.fdatasync(self.fd)
                mtime = os.fstat(self.fd).st_mtime_ns
            st = RctState(tracker_id=self.tracker_id, block_size=self.bs, generation=self.rct_generation + 1,
                          clean=clean, committed_id=self.committed_id, epoch=self.epoch, dirty=dirty,
                          history=self.history, valid=self.valid, invalid_reason=self.invalid_reason,
                          pending_id=self.pending.change_id if self.pending else None, disk_mtime_ns=mtime,
                          stop_identity=stop_identity, extra={"region_size": self.mrt.region})
            data = encode_rct(self.ident, st)
            try:
                write_atomic(self.paths.rct, data)
            except OSError as e:
                self._stale = True
                self.rct_error = f"cannot write {self.paths.rct}: {e.strerror}"
                raise
            self.rct_error = None
            self.rct_generation += 1
            self.rct_written_at = time.time()

    def flush_rct(self, force: bool = False) -> bool:
        if not force and not self._stale:
            return False
        if not self.cfg.mrt_sync:
            self.mrt.flush_pending()
        self._write_rct(clean=False)
        return True

    def start_background(self) -> None:
        t = threading.Thread(target=self._flusher, name="vmbak-rct", daemon=True)
        t.start()
        self._threads.append(t)

    def _flusher(self) -> None:
        while not self._stop_event.wait(self.cfg.rct_interval):
            if self.closed:
                return
            try:
                self.flush_rct()
            except OSError:
                pass  # reported in status; the MRT still guarantees completeness

    # ------------------------------------------------------------------ I/O paths
    def _modify(self, offset: int, length: int, op: Callable[[], None]) -> None:
        if length <= 0:
            return
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "request beyond the end of the disk")
        b0, b1 = offset // self.bs, (offset + length - 1) // self.bs + 1
        region = self.mrt.region
        r0, r1 = offset // region, (offset + length - 1) // region + 1
        self.gate.enter()
        try:
            if self.closed:
                raise OSError(errno.ESHUTDOWN, "the tracker is stopping")
            # 1. the in-memory bit, 2. the MRT bit (and the lease) on stable storage, 3. copy-before-write,
            # 4. the data
            self._epoch_map[b0:b1] = True
            self._stale = True
            if not self.mrt.durable[r0:r1].all():
                self.mrt.ensure(r0, r1)
            if time.time() >= self.mrt.lease_until - self._lease_ahead:
                self.mrt.renew_lease(self._lease_ahead)
            if self.pending is not None:
                self._copy_before_write(b0, b1)
            op()
        finally:
            self.gate.leave()

    def write(self, buf: memoryview | bytes, offset: int) -> None:
        self._modify(offset, len(buf), lambda: _pwrite_all(self.fd, buf, offset))
        self.writes += 1
        self.bytes_written += len(buf)

    def _zero_bytes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            _pwrite_all(self.fd, memoryview(_ZEROS)[:n], offset)
            offset += n

    def _punch(self, offset: int, length: int) -> bool:
        if _fallocate is None:
            return False
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _zero_op(self, offset: int, length: int, may_trim: bool) -> None:
        if may_trim and self._punch(offset, length):
            return
        if _fallocate is not None:
            try:
                _fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        self._zero_bytes(offset, length)

    def trim(self, length: int, offset: int) -> None:
        self._modify(offset, length, lambda: self._punch(offset, length) or self._zero_bytes(offset, length))
        self.trims += 1

    def zero(self, length: int, offset: int, may_trim: bool) -> None:
        self._modify(offset, length, lambda: self._zero_op(offset, length, may_trim))
        self.zeroes += 1

    def read(self, buf: memoryview, offset: int) -> None:
        _pread_into(self.fd, buf, offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) covering [offset, offset + length) of the live disk."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        for d, n in data_ranges(self.fd, offset, end):
            if d > pos:
                out.append((pos, d - pos, False))
            out.append((d, n, True))
            pos = d + n
        if pos < end:
            out.append((pos, end - pos, False))
        return out

    # ------------------------------------------------------------------ copy-before-write
    def _copy_before_write(self, b0: int, b1: int) -> None:
        cp = self.pending
        if cp is None:
            return
        with self._cow_lock:
            if cp is not self.pending:
                return
            st = cp.cow[b0:b1]
            if st.all():
                return
            starts, lens = runs(st == _COW_NONE)
            bs = self.bs
            for s, n in zip(starts.tolist(), lens.tolist(), strict=True):
                first = b0 + s
                while n:
                    k = min(n, 64)  # copy in pieces of up to 4 MiB at 64 KiB blocks
                    off = first * bs
                    ln = min(k * bs, self.size - off)
                    buf = bytearray(ln)
                    _pread_into(self.fd, memoryview(buf), off)
                    for j in range(k):
                        piece = buf[j * bs:(j + 1) * bs]
                        if piece == bytes(len(piece)):
                            cp.cow[first + j] = _COW_ZERO
                            cp.zero_blocks += 1
                        else:
                            _pwrite_all(cp.cow_fd, piece, off + j * bs)
                            cp.cow[first + j] = _COW_COPIED
                            cp.copied_blocks += 1
                    first += k
                    n -= k

    def _frozen(self, token: str) -> Pending:
        cp = self.pending
        if cp is None or not secrets.compare_digest(cp.token, token):
            raise OSError(errno.ESTALE, "the checkpoint has ended")
        return cp

    def frozen_read(self, token: str, buf: memoryview, offset: int) -> None:
        """Read the disk as it was when the open checkpoint was taken."""
        length = len(buf)
        if length == 0:
            return
        bs = self.bs
        with self._cow_lock:
            cp = self._frozen(token)
            b0, b1 = offset // bs, (offset + length - 1) // bs + 1
            st = cp.cow[b0:b1]
            if not st.any():
                _pread_into(self.fd, buf, offset)
                return
            edges = np.flatnonzero(np.diff(st)) + 1
            bounds = [0, *edges.tolist(), len(st)]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                lo = max(offset, (b0 + a) * bs)
                hi = min(offset + length, (b0 + b) * bs)
                view = buf[lo - offset:hi - offset]
                kind = int(st[a])
                if kind == _COW_NONE:
                    _pread_into(self.fd, view, lo)
                elif kind == _COW_COPIED:
                    _pread_into(cp.cow_fd, view, lo)
                else:
                    view[:] = bytes(len(view))

    def frozen_data_blocks(self, token: str, start: int, end: int) -> np.ndarray:
        """Bool per block of [start, end) (block-aligned) that may hold data in the frozen view."""
        bs = self.bs
        b0, b1 = start // bs, (end + bs - 1) // bs
        with self._cow_lock:
            cp = self._frozen(token)
            has = np.zeros(b1 - b0, bool)
            for d, n in data_ranges(self.fd, b0 * bs, min(b1 * bs, self.size)):
                has[d // bs - b0:(d + n + bs - 1) // bs - b0] = True
            st = cp.cow[b0:b1]
            return (has & (st == _COW_NONE)) | (st == _COW_COPIED)

    def frozen_extents(self, token: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        bs = self.bs
        end = offset + length
        start = offset // bs * bs
        data = self.frozen_data_blocks(token, start, end)
        out: list[tuple[int, int, bool]] = []
        edges = np.flatnonzero(np.diff(data.astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), len(data)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            lo, hi = max(offset, start + a * bs), min(end, start + b * bs)
            if hi > lo:
                out.append((lo, hi - lo, bool(data[a])))
        return out

    # ------------------------------------------------------------------ change IDs
    def _parse_epoch(self, cid: str) -> int | None:
        parts = cid.split("-")
        if len(parts) != 3 or parts[0] != self.tracker_id[:8]:
            return None
        try:
            return int(parts[1])
        except ValueError:
            return None

    def changes_since(self, since: str) -> np.ndarray:
        """Blocks changed since ``since`` up to now (call with the gate closed)."""
        if not self.valid:
            raise TrackerError(f"change tracking is invalid ({self.invalid_reason}); the backup must scan",
                               "tracking")
        if since == self.committed_id:
            return self._dirty.copy()
        for i, h in enumerate(self.history):
            if h["from"] == since:
                out = self._dirty.copy()
                for later in self.history[i:]:
                    out |= later["bitmap"]
                return out
        ep = self._parse_epoch(since)
        if ep is None:
            why = "it was not issued by this tracker"
        elif self.committed_id is None:
            why = "this tracker has no committed change ID yet"
        else:
            last = self._parse_epoch(self.committed_id) or 0
            oldest = self._parse_epoch(self.history[0]["from"]) if self.history else last
            if oldest is not None and ep < oldest:
                why = f"it is stale: older than the {len(self.history) + 1} change IDs this tracker keeps"
            else:
                why = "it was never committed (its backup was aborted or did not finish)"
        raise TrackerError(f"unknown change ID {since}: {why}; the backup must scan", "tracking")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, since: str | None, owner: str) -> dict:
        with self._ctl:
            if self.closed:
                raise TrackerError("the tracker is stopping", "state")
            if self.pending is not None:
                cp = self.pending
                raise TrackerError(f"checkpoint {cp.change_id} is already open (by {cp.owner}, since "
                                   f"{cp.started_iso})", "busy")
            cow_path = f"{self.paths.base}.cow.{os.getpid()}"
            cow_fd = os.open(cow_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.unlink(cow_path)  # nothing to clean up after a crash
            try:
                os.ftruncate(cow_fd, self.size)
                with self.gate.exclusive():
                    changes = self.changes_since(since) if since is not None else None
                    with self._state:
                        self.epoch += 1
                        cid = self._new_id(self.epoch)
                        self._next = np.zeros(self.nb, bool)
                        self._epoch_map = self._next
                        token = secrets.token_hex(16)
                        self.pending = Pending(cid, since, token, time.monotonic(),
                                               changelog.now_iso(), owner, cow_fd, np.zeros(self.nb, np.uint8))
                        self._stale = True
            except BaseException:
                os.close(cow_fd)
                raise
            nchanged = int(np.count_nonzero(changes)) if changes is not None else None
            self._log("checkpoint", change_id=cid, since=since, changed_blocks=nchanged, owner=owner)
            return {"change_id": cid, "token": token, "since": since,
                    "block_size": self.bs, "size": self.size, "changed_blocks": nchanged,
                    "bitmap": None if changes is None else zlib.compress(pack(changes), 1)}

    def _end_pending(self) -> Pending:
        cp = self.pending
        assert cp is not None
        with self._cow_lock:
            self.pending = None
        return cp

    def commit(self, change_id: str, owner: str | None = None) -> dict:
        with self._ctl:
            cp = self.pending
            if cp is None or cp.change_id != change_id:
                raise TrackerError(f"checkpoint {change_id} is not open (it was aborted or already ended)",
                                   "state")
            if owner is not None and cp.owner != owner:
                raise TrackerError(f"checkpoint {change_id} belongs to another control connection", "state")
            with self.gate.exclusive():
                assert self._next is not None
                with self._state:
                    if self.valid and self.committed_id is not None:
                        self.history.append({"from": self.committed_id, "to": cp.change_id,
                                             "time": changelog.now_iso(), "bitmap": self._dirty})
                        keep = max(0, self.cfg.history)
                        self.history = self.history[-keep:] if keep else []
                    else:
                        self.history = []
                    prev = self.committed_id
                    self.committed_id = cp.change_id
                    was_invalid = not self.valid
                    self.valid, self.invalid_reason = True, None
                    self._dirty = self._next
                    self._next = None
                    self._epoch_map = self._dirty
                    self._end_pending()
                err = None
                try:
                    self._write_rct(clean=False)
                    self.mrt.rewrite(self._region_bits(self._dirty), self._mrt_fields())
                except OSError as e:
                    err = f"could not write the state files: {e.strerror}"
            os.close(cp.cow_fd)
            self._log("commit", change_id=cp.change_id, previous=prev, copied_blocks=cp.copied_blocks,
                      duration_s=round(time.monotonic() - cp.started, 3),
                      message="tracking is valid again" if was_invalid else None)
            if err:
                raise TrackerError(f"checkpoint {change_id} committed in memory, but {err}", "error")
            return {"change_id": cp.change_id, "committed": True}

    def abort(self, change_id: str | None, reason: str) -> bool:
        with self._ctl:
            cp = self.pending
            if cp is None or (change_id is not None and cp.change_id != change_id):
                return False
            with self.gate.exclusive():
                assert self._next is not None
                with self._state:
                    self._dirty |= self._next
                    self._next = None
                    self._epoch_map = self._dirty
                    self._end_pending()
                    self._stale = True
            os.close(cp.cow_fd)
            self.last_abort = {"change_id": cp.change_id, "reason": reason, "time": changelog.now_iso()}
            self._log("abort", change_id=cp.change_id, reason=reason, copied_blocks=cp.copied_blocks)
            return True

    # ------------------------------------------------------------------ status and stop
    def status(self) -> dict:
        cp = self.pending
        dirty = self._dirty if self._next is None else (self._dirty | self._next)
        nd = int(np.count_nonzero(dirty))
        return {
            "disk": self.ident.path, "size": self.size, "block_size": self.bs,
            "mrt_region_size": self.mrt.region, "rct_interval_s": self.cfg.rct_interval,
            "mrt_write_through": self.cfg.mrt_sync,
            "socket": self.cfg.socket, "tcp": self.cfg.tcp, "pid": os.getpid(),
            "tracker_id": self.tracker_id, "state_dir": self.paths.state_dir,
            "rct": self.paths.rct, "mrt": self.paths.mrt, "log": self.paths.log,
            "tracking": "valid" if self.valid else "invalid", "invalid_reason": self.invalid_reason,
            "recovery": self.recovery, "notes": list(self.notes), "identity_check": self.identity_check,
            "identity_hash_limit": self.cfg.hash_limit, "crash_lease_s": self.cfg.lease,
            "lease_until": _iso(int(self.mrt.lease_until * 1e9)) if self.mrt.lease_until else None,
            "committed_change_id": self.committed_id,
            "known_change_ids": ([h["from"] for h in self.history] + [self.committed_id]
                                 if self.committed_id else []),
            "epoch": self.epoch,
            "dirty_blocks": nd, "dirty_bytes": min(nd * self.bs, self.size),
            "mrt_dirty_regions": int(np.count_nonzero(self.mrt.durable)),
            "mrt_syncs": self.mrt.syncs,
            "rct_generation": self.rct_generation,
            "rct_age_s": None if self.rct_written_at is None else round(time.time() - self.rct_written_at, 3),
            "rct_error": self.rct_error,
            "checkpoint": None if cp is None else {
                "change_id": cp.change_id, "since": cp.since, "owner": cp.owner, "started": cp.started_iso,
                "age_s": round(time.monotonic() - cp.started, 3),
                "copied_blocks": cp.copied_blocks, "cow_bytes": cp.copied_blocks * self.bs,
                "next_epoch_blocks": int(np.count_nonzero(self._next)) if self._next is not None else 0,
            },
            "last_abort": self.last_abort,
            "writes": self.writes, "bytes_written": self.bytes_written, "trims": self.trims,
            "zeroes": self.zeroes, "uptime_s": round(time.time() - self.started, 3),
        }

    def shutdown(self, reason: str = "stop") -> None:
        """Clean stop: no write after this is accepted; the .rct is written with the clean flag."""
        with self._ctl:
            if self.closed:
                return
            if self.pending is not None:
                self.abort(None, f"the tracker is stopping ({reason})")
            with self.gate.exclusive():
                self.closed = True
                self._stop_event.set()
                err = None
                try:
                    self.mrt.flush_pending()
                    # What proves at the next start that nothing wrote the disk while it was not
                    # tracked: taken after the last write, once its timestamps are in the past.
                    os.fdatasync(self.fd)
                    identity.settle(self.fd)
                    ident = identity.take(self.fd, self.cfg.hash_limit)
                    self._write_rct(clean=True, stop_identity=ident)
                    self.mrt.rewrite(self.mrt.bits, {**self._mrt_fields(), "clean": True, "stop_identity": ident})
                except OSError as e:
                    err = e.strerror
            self._log("stop", reason=reason, clean=err is None, error=err,
                      dirty_blocks=int(np.count_nonzero(self._dirty)), committed_id=self.committed_id)
            self.mrt.close()
