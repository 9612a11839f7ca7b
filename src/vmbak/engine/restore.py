"""Chain restore: newest manifest first, an "unrestored" bitmap, every block written once.

For each manifest of the chain, from the snapshot asked for back to its full, the
blocks it covers that no newer manifest covered are taken from it: stored extents are
written, the rest are zeros. A new target file is sparse, so zeros are holes and never
written; an existing target gets its zero ranges written (or punched) once.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import NamedTuple

import numpy as np

from vmbak.buffers import ThreadBuffers
from vmbak.disks.raw import file_data_extents
from vmbak.engine.common import (
    BHT_DTYPE,
    bounded_map,
    bounded_unordered,
    extents,
    hash_blocks,
    nonzero_rows,
    prefix_counts,
    range_text,
    resolve_bht,
    runs,
)
from vmbak.engine.progress import NoProgress, Progress
from vmbak.errors import DiskError, IntegrityError, VmbakError
from vmbak.interrupts import deferred, register_cleanup, unregister_cleanup
from vmbak.repo.backend import pid_alive
from vmbak.repo.manifest import Manifest, is_full
from vmbak.repo.repository import Repository

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

# Direct I/O: offsets, lengths and buffer addresses aligned to this (a multiple of every
# logical block size in use: 512 and 4096).
DIRECT_ALIGN = 4096
_DIRECT_BUF = 4 << 20  # the per-thread aligned bounce buffer (grown for larger writes)


PARTIAL = ".vmbak-partial."  # .NAME.vmbak-partial.HOST.PID.RANDOM: a new target being written
LOCK = ".vmbak-lock"  # .NAME.vmbak-lock: held (flock) by the one restore writing NAME


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def partial_name(path: str) -> str:
    """A unique hidden name next to ``path`` for a new target being written; it embeds
    this host and pid, so that the leftovers of dead processes can be told apart."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}{PARTIAL}{_host()}.{os.getpid()}.{os.urandom(4).hex()}")


def remove_dead_partials(path: str) -> int:
    """Remove the partial files and directories that restores to ``path`` by processes of
    this host that are gone left behind; return how many."""
    d, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}{PARTIAL}"
    host = _host()
    removed = 0
    try:
        entries = [e for e in os.scandir(d) if e.name.startswith(prefix)]
    except OSError:
        return 0
    for ent in entries:
        parts = ent.name[len(prefix):].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if ent.is_dir(follow_symlinks=False):
                shutil.rmtree(ent.path)
            else:
                os.unlink(ent.path)
            removed += 1
        except OSError:
            pass
    return removed


class TargetLock:
    """The right to write one restore target, so that two restores never write, or
    rename into, the same path at once.

    A file target is locked with ``flock`` on ``.NAME.vmbak-lock`` beside it (a new file
    does not exist yet); the lock file is removed on release. A block device is locked
    with ``flock`` on the device itself. The lock is non-blocking: a second restore fails
    at once, naming the pid of the first. The kernel drops the lock of a killed process.
    """

    def __init__(self, path: str, fd: int | None = None, *, device: bool = False) -> None:
        """Lock ``path``; ``fd`` is the open target (a device, or an existing file whose
        directory cannot hold the lock file: then the file itself is locked)."""
        self.target = path
        self.lock_path: str | None = None
        self.fd = -1
        self._own_fd = False
        self._token: int | None = None
        if device:
            assert fd is not None
            self._lock_target(fd)
            return
        d, base = os.path.split(os.path.abspath(path))
        self.lock_path = os.path.join(d, f".{base}{LOCK}")
        while True:
            try:
                lfd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as e:
                if fd is not None and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    self.lock_path = None  # a read-only directory: lock the existing file itself
                    self._lock_target(fd)
                    return
                raise DiskError(f"cannot lock restore target {path}: {e.strerror}") from None
            try:
                self._flock(lfd, self.lock_path)
                st = os.fstat(lfd)
                try:
                    now = os.stat(self.lock_path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
            except BaseException:
                os.close(lfd)
                raise
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                break
            os.close(lfd)  # the holder removed it while we waited: lock the new one
        self.fd = lfd
        self._own_fd = True
        info = f"{socket.gethostname()} {os.getpid()}\n".encode()
        os.ftruncate(lfd, 0)
        os.pwrite(lfd, info, 0)
        self._token = register_cleanup(self.release)

    def _lock_target(self, fd: int) -> None:
        # udev takes a short shared lock on a block device while it probes it: retry a while
        deadline = time.monotonic() + 2
        while True:
            try:
                self._flock(fd, None)
                break
            except DiskError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.fd = fd
        self._token = register_cleanup(self.release)

    def _flock(self, fd: int, lock_path: str | None) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = ""
            if lock_path is not None:
                try:
                    host, pid = os.pread(fd, 256, 0).decode().split()
                    who = f" (pid {pid} on {host})"
                except (OSError, ValueError):
                    pass
            raise DiskError(f"restore target {self.target} is in use by another restore{who}") from None
        except OSError as e:
            raise DiskError(f"cannot lock restore target {self.target}: {e.strerror}") from None

    def release(self) -> None:
        with deferred():
            unregister_cleanup(self._token)
            self._token = None
            if self.fd < 0:
                return
            if self.lock_path is not None:
                try:
                    os.unlink(self.lock_path)  # while still holding it: see __init__
                except OSError:
                    pass
            if self._own_fd:
                os.close(self.fd)
            else:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                except OSError:
                    pass
            self.fd = -1


class RestoreTarget:
    """Where restored bytes go. Subclass to observe or redirect writes.

    A new file is written under a unique hidden name beside ``path`` (see
    ``partial_name``) and renamed to ``path`` by ``commit``; the target is locked
    (``TargetLock``) from construction to ``close``. Under an interrupting signal
    (vmbak.interrupts) the partial file and the lock are removed by the command line
    even if the signal came before the caller held the object.
    """

    def __init__(self, path: str, size: int, overwrite: bool = False) -> None:
        self.path = path
        self.size = size
        self.final_path = path
        self.created = False
        self.fd = -1
        self.lock: TargetLock | None = None
        self._token: int | None = None
        self.dfd = -1  # the same file opened with O_DIRECT, or -1 (see write)
        self._bounce = ThreadBuffers(_DIRECT_BUF, aligned=True)  # write's aligned copy of an unaligned view
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise DiskError(f"cannot use restore target {path}: {e.strerror}") from None
        if st is None:
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                raise DiskError(f"restore target directory does not exist: {d}")
            try:
                with deferred():
                    self.lock = TargetLock(path)
                remove_dead_partials(path)
                if os.path.lexists(path):
                    raise DiskError(f"restore target {path} appeared while the restore started; "
                                    "run it again (with --overwrite to write over it)")
                with deferred():
                    self.path = partial_name(path)
                    try:
                        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    except OSError as e:
                        raise DiskError(f"cannot create restore target {path}: {e.strerror}") from None
                    self.created = True
                    self._token = register_cleanup(self.discard)
                os.ftruncate(self.fd, size)
                self._open_direct()
            except BaseException as e:
                with deferred():
                    self.discard()
                    self.close()
                if isinstance(e, OSError):
                    raise DiskError(f"cannot create restore target {path}: {e.strerror}") from None
                raise
            self.is_file = True
            return
        if stat.S_ISDIR(st.st_mode):
            raise DiskError(f"restore target is a directory: {path}")
        self.is_file = stat.S_ISREG(st.st_mode)
        if self.is_file and not overwrite:
            raise DiskError(f"restore target exists: {path} (use --overwrite to write over it)")
        if not self.is_file and not stat.S_ISBLK(st.st_mode):
            raise DiskError(f"restore target is not a regular file or block device: {path}")
        try:
            with deferred():
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self._token = register_cleanup(self.close)
        except OSError as e:
            raise DiskError(f"cannot open restore target {path}: {e.strerror}") from None
        try:
            with deferred():
                self.lock = TargetLock(path, self.fd, device=not self.is_file)
            have = os.lseek(self.fd, 0, os.SEEK_END)
            if have < size:
                raise DiskError(f"restore target too small: {path} has {have} bytes, the disk needs {size}")
            self._open_direct()
        except BaseException:
            with deferred():
                self.close()
            raise

    def _open_direct(self) -> None:
        """Open a second descriptor of the target with O_DIRECT for ``write``.

        Restored data bypasses the page cache: a restore writes each block once and
        does not read it again, so caching it only costs a copy into freshly allocated
        cache pages (measured: 41% of a restore's CPU, and the main part of its wall
        time, on the benchmark machine) and evicts what other programs cache. Where the
        filesystem refuses O_DIRECT (tmpfs), writes stay buffered.
        """
        if not hasattr(os, "O_DIRECT") or os.environ.get("VMBAK_RESTORE_BUFFERED"):
            return
        try:
            self.dfd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.dfd = -1
            return
        if os.fstat(self.dfd).st_ino != os.fstat(self.fd).st_ino:  # not the same file: never use it
            os.close(self.dfd)
            self.dfd = -1

    def _pwrite_all(self, fd: int, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            self._write(offset, data)
        except OSError as e:  # a full file system, an I/O error of the device
            raise DiskError(f"cannot write the restore target {self.final_path} (at byte {offset}): "
                            f"{e.strerror or e}") from None

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        dfd = self.dfd
        if dfd >= 0 and offset % DIRECT_ALIGN == 0 and len(view) >= DIRECT_ALIGN:
            # Aligned whole pages go through the direct descriptor from an aligned buffer;
            # a tail shorter than a page (the disk's last partial block) is written buffered.
            n = len(view) - len(view) % DIRECT_ALIGN
            if _aligned(view):
                bv = view[:n]  # written from where it is (restore decodes into aligned buffers)
            else:
                bv = self._bounce.view(n)
                bv[:] = view[:n]
            try:
                self._pwrite_all(dfd, bv, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.dfd = -1  # refused after all: write buffered from now on
                self._pwrite_all(self.fd, view[:n], offset)
            view = view[n:]
            offset += n
        self._pwrite_all(self.fd, view, offset)

    def write_zeros(self, offset: int, length: int) -> None:
        if self.created:
            return  # already a hole
        if self.is_file:
            try:
                import ctypes
                import ctypes.util

                libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
                r = libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                   ctypes.c_long(offset), ctypes.c_long(length))
                if r == 0:
                    return
            except (OSError, AttributeError):
                pass
        zero = bytes(min(length, 4 << 20))
        while length > 0:
            n = min(length, len(zero))
            self.write(offset, zero[:n])
            offset += n
            length -= n

    def needs_zero_writes(self) -> bool:
        return not self.created

    def read(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def commit(self, sync: bool = False) -> None:
        if sync:
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise DiskError(f"cannot write the restore target {self.final_path}: {e.strerror or e}") from None
        if self.created:
            with deferred():
                os.replace(self.path, self.final_path)
                self.path = self.final_path
                self.created = False
                unregister_cleanup(self._token)
                self._token = register_cleanup(self.close)
            check_landed(self.final_path, os.fstat(self.fd), sync)

    def discard(self) -> None:
        if self.created:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.created = False

    def close(self) -> None:
        with deferred():
            if self.created:  # never committed: the partial file is of no use
                self.discard()
            unregister_cleanup(self._token)
            self._token = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            dfd, self.dfd = getattr(self, "dfd", -1), -1
            if dfd >= 0:
                os.close(dfd)
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def check_landed(path: str, written: os.stat_result, sync: bool) -> None:
    """After a rename into place: what is at ``path`` must be the file that was written and
    verified (``written``), not one another process put there; with ``sync``, the
    directory entry is made durable."""
    try:
        now = os.stat(path)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):
        raise DiskError(f"restore target {path} was replaced by another process while it was being restored")
    if sync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(d: str) -> None:
    """Flush a directory's entries to stable storage; best effort (errors are ignored)."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Job(NamedTuple):  # a tuple: plan() makes one per chunk, 15,000 for the chain of 30
    level: int
    chunk_id: bytes
    start: int  # first block of the extent
    count: int
    sub: list[tuple[int, int]] | None  # (first block, count) to write, None = all
    # the extent lies wholly inside the blocks its manifest defines (as every backup writes
    # it), so none of its blocks is taken from an older snapshot (see restore's run)
    inside: bool = True


# Blocks of extents that plan() lays end to end at once: its index arrays take about 30
# bytes per block, so a batch stays near 30 MiB at any disk size (an extent is at most
# common.MAX_EXTENT_BLOCKS long).
_PLAN_BATCH = 1 << 20


def plan(chain: list[Manifest]) -> tuple[list[_Job], np.ndarray]:
    """Assign each block to the newest manifest covering it; return write jobs and the
    mask of blocks that get data (the rest are zeros).

    The jobs of each manifest come in the order of its extents, which must be sorted and
    disjoint (as every backup, merge and copy writes them). The work is done on whole
    arrays: the head of the benchmark's chain of 30 incrementals has 15,000 extents, 1,700
    of them partly overridden, and taking them one by one (a slice and a run search each)
    cost 40-70 ms before the restore's first write."""
    n = chain[0].block_count
    # Bitmaps only, no per-block level or prefix sums: at 2 TiB those cost 128-256 MiB each.
    done = np.zeros(n, bool)  # covered by a newer manifest
    jobs: list[_Job] = []
    data_mask = np.zeros(n, bool)
    for i, m in enumerate(chain):
        cov = m.covered()
        own = cov & ~done
        done |= cov
        if len(m.ext_start) == 0:
            continue
        full = is_full(m.kind)
        st, ct, _ = extents(m, n)
        need = _provided(own, st, ct)
        take = np.flatnonzero(need)
        if not len(take):
            continue
        whole = need[take] == ct[take]
        ids = m.ext_id[take].tolist()
        wk = np.flatnonzero(whole)
        wkl = wk.tolist()
        made = map(_Job, repeat(i), map(ids.__getitem__, wkl), st[take[wk]].tolist(), ct[take[wk]].tolist(),
                   repeat(None))
        if len(wkl) == len(take):
            slots: list[_Job | None] = list(made)
        else:
            slots = [None] * len(take)
            for k, job in zip(wkl, made, strict=True):
                slots[k] = job
        for ks in _batches(ct[take], np.flatnonzero(whole)):  # all their blocks get data
            data_mask[_blocks(st[take[ks]], ct[take[ks]])[0]] = True
        for ks in _batches(ct[take], np.flatnonzero(~whole)):
            _cut(i, full, ks, take, st, ct, own, cov, ids, slots, data_mask)
        jobs += slots  # type: ignore[arg-type]  # every slot is filled
        del cov
    assert done.all()
    return jobs, data_mask


def _provided(own: np.ndarray, st: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """How many blocks of each extent (starts ``st``, counts ``ct``) ``own`` marks.

    Where the extents hold a small part of the disk (an incremental's), the blocks are
    summed where they are: a prefix sum of the whole bitmap for each manifest took half of
    the plan of the benchmark's chain of 30 (12 of 22 ms). Elsewhere one pass over the
    bitmap costs less than gathering most of its blocks."""
    if int(ct.sum()) * 4 > len(own):
        pc = prefix_counts(own, np.concatenate((st + ct, st)))
        return pc[:len(st)] - pc[len(st):]
    need = np.zeros(len(st), np.int64)
    for ks in _batches(ct, np.flatnonzero(ct)):
        blk, off = _blocks(st[ks], ct[ks])
        need[ks] = np.add.reduceat(own[blk], off, dtype=np.int64)
    return need


def _batches(counts: np.ndarray, ks: np.ndarray) -> Iterator[np.ndarray]:
    """``ks`` (indices into ``counts``) in runs of about _PLAN_BATCH blocks."""
    cum = np.cumsum(counts[ks])
    lo = 0
    while lo < len(ks):
        base = int(cum[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + _PLAN_BATCH, "right")))
        yield ks[lo:hi]
        lo = hi


def _blocks(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blocks of extents laid end to end (a row), and where each extent starts in it."""
    off = np.cumsum(counts) - counts
    return np.repeat(starts - off, counts) + np.arange(int(counts.sum())), off


def _cut(level: int, full: bool, ks: np.ndarray, take: np.ndarray, st: np.ndarray, ct: np.ndarray,
         own: np.ndarray, cov: np.ndarray, ids: list[bytes], slots: list[_Job | None],
         data_mask: np.ndarray) -> None:
    """The jobs of partly provided extents ``take[ks]``: each gets the runs of the blocks
    it provides, cut at its own ends, found on the extents' blocks laid end to end."""
    ps, pn = st[take[ks]], ct[take[ks]]
    blk, off = _blocks(ps, pn)
    tot = len(blk)
    v = own[blk]
    data_mask[blk[v]] = True
    edge = np.zeros(tot + 1, bool)  # an extent starts (or the row ends) here
    edge[off] = True
    edge[tot] = True
    pad = np.concatenate(([False], v, [False]))
    rs = np.flatnonzero(v & (~pad[:-2] | edge[:-1]))  # first of a run
    re = np.flatnonzero(v & (~pad[2:] | edge[1:])) + 1  # one past its last
    lims = np.searchsorted(rs, off).tolist() + [len(rs)]  # the runs of each extent
    runs_ = list(zip(blk[rs].tolist(), (re - rs).tolist(), strict=True))
    inside = np.logical_and.reduceat(cov[blk], off).tolist()
    for j, (k, s, c) in enumerate(zip(ks.tolist(), ps.tolist(), pn.tolist(), strict=True)):
        slots[k] = _Job(level, ids[k], s, c, runs_[lims[j]:lims[j + 1]], full or bool(inside[j]))


_GROUP_BYTES = 8 << 20  # the stretch of the disk one task restores (more only for a larger chunk)
# The first stretches are shorter (1, 2, 4 MiB, then _GROUP_BYTES), so that the disk gets its
# first write sooner: it waits for one stretch to be decoded while the other workers decode
# theirs beside it.
_FIRST_GROUP_BYTES = 1 << 20


def _groups(jobs: list[_Job], bs: int, size: int) -> Iterator[list[_Job]]:
    """The jobs, sorted by where they start on the disk, cut into groups whose extents lie
    within _GROUP_BYTES of the disk (or a single larger chunk).

    A worker decodes a group's chunks, each at its own place in one buffer that stands
    for that stretch of the disk, and writes each contiguous run of it with one call. The
    head of a chain takes many small chunks from many snapshots (the 30-incremental chain
    of the benchmark: 15,000 chunks of 64 KiB scattered over the disk): taken in the order
    of the packs, each was a 64 KiB direct write of its own (19,000 of them, 2.7 times
    the time of restoring one full backup of the same disk); taken in disk order, they
    join the blocks around them into writes of up to _GROUP_BYTES, as a full's do."""
    group: list[_Job] = []
    base = end = 0
    limit = _FIRST_GROUP_BYTES
    for j in jobs:
        j_end = min((j.start + j.count) * bs, size)
        if group and max(end, j_end) - base > limit:
            yield group
            group = []
            limit = min(2 * limit, _GROUP_BYTES)
        if not group:
            base = j.start * bs
            end = j_end
        group.append(j)
        end = max(end, j_end)
    if group:
        yield group


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _aligned(view: memoryview) -> bool:
    """Whether a buffer starts at a DIRECT_ALIGN boundary (only writable buffers can tell)."""
    if view.readonly or not view.c_contiguous:
        return False
    return _addr(view) % DIRECT_ALIGN == 0


def _addr(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0


def restore(repo: Repository, snapshot: Manifest, target: RestoreTarget | str, *,
            overwrite: bool = False, verify: bool = True, workers: int = 4,
            progress: Progress | None = None, sync: bool = False, readback: bool = False,
            ignore_errors: bool = False) -> dict:
    """Restore ``snapshot`` to ``target`` (a path or a RestoreTarget); return statistics.

    With ``ignore_errors``, a chunk that is missing or fails verification (and blocks that
    do not match the block hashes) does not stop the restore: those blocks are left as
    zeros, every such range is listed in the result's ``damaged`` (sorted, adjacent ranges
    with the same reason joined) and ``complete`` is False. The target is still committed
    (a new file appears under its name): it is whole, with named holes.

    With ``verify``, every block is checked against the snapshot's block hashes: the bytes
    handed to the target are hashed just before they are written (and the blocks meant to
    be zero are checked to be left out), or, with ``readback``, the whole target is read
    back and hashed after writing.
    """
    progress = progress or NoProgress()
    t0 = time.monotonic()
    with repo.lock(purpose="restore"):
        chain = repo.chain(snapshot)
        bs = snapshot.block_size
        size = snapshot.disk_size
        jobs, data_mask = plan(chain)
        damaged: list[tuple[int, int, str, str]] = []  # (first block, count, snapshot short id, reason)
        warnings: list[str] = []
        ids = list(dict.fromkeys(j.chunk_id for j in jobs))
        locs = {c: loc for c, loc in zip(ids, repo.index.get_many(ids), strict=True) if loc is not None}
        if len(locs) < len(ids):
            kept = []
            for j in jobs:
                if j.chunk_id not in locs:
                    m = chain[j.level]
                    if not ignore_errors:
                        raise IntegrityError(f"chunk {j.chunk_id.hex()[:16]} (blocks {j.start}-"
                                             f"{j.start + j.count - 1} of snapshot {m.short_id}) is missing "
                                             "from the repository")
                    for a, b in j.sub or [(j.start, j.count)]:
                        damaged.append((a, b, m.short_id, f"chunk {j.chunk_id.hex()[:16]} is missing"))
                    continue
                kept.append(j)
            jobs = kept
        # In disk order (see _groups); of chunks that start at the same block, the oldest first
        jobs.sort(key=attrgetter("level"), reverse=True)
        jobs.sort(key=attrgetter("start"))
        expected = None
        if verify:
            try:
                expected = resolve_bht(repo, chain)
            except IntegrityError as e:
                if not ignore_errors:
                    raise
                warnings.append(f"{e}; blocks were checked against their chunk ids only")
        inline = expected is not None and not readback
        if expected is not None:
            missing = nonzero_rows(expected) & ~data_mask
            if missing.any():
                ms, ml = runs(missing)
                if not ignore_errors:
                    raise IntegrityError(f"snapshot {snapshot.short_id}: blocks {range_text(ms.tolist(), ml.tolist())} "
                                         "hold data per the block hashes but no chunk covers them")
                for a, b in zip(ms.tolist(), ml.tolist(), strict=True):
                    damaged.append((a, b, snapshot.short_id, "hold data per the block hashes but no chunk covers them"))
            zero_hash = np.frombuffer(repo.sealer.block_hash(bytes(bs)), BHT_DTYPE)
        tgt = target if isinstance(target, RestoreTarget) else RestoreTarget(target, size, overwrite)
        ok = False
        try:
            written = 0

            files = repo.open_files(max(1, workers))  # each worker keeps the packs it reads open
            # each thread's page-aligned buffers, reused: chunks are decoded straight into
            # them and written from them without another copy
            stretch_bufs = ThreadBuffers(DIRECT_ALIGN + _GROUP_BYTES, aligned=True)
            aside_bufs = ThreadBuffers(aligned=True)

            def what(job: _Job) -> str:
                return (f"chunk {job.chunk_id.hex()[:16]} (blocks {job.start}-{job.start + job.count - 1} "
                        f"of snapshot {chain[job.level].short_id})")

            def decode(job: _Job, out: memoryview, at: int) -> list[tuple[int, int, str, str]] | None:
                """Decode one chunk into ``out`` at ``at``; None, or (with ``ignore_errors``)
                the damaged ranges of the chunk that could not be read."""
                label = what(job)
                loc = locs[job.chunk_id]
                # A chunk compressed in frames is decoded only where it provides blocks,
                # which are then checked against the block hashes: the head of the chain of
                # 30 takes 43% of the blocks of its partly replaced chunks.
                ranges = None
                if inline and job.sub is not None:
                    first = job.start * bs
                    ranges = [(a * bs - first, (a + b) * bs - first) for a, b in job.sub]
                try:
                    if loc.raw_length != min(job.count * bs, size - job.start * bs):
                        raise IntegrityError(f"{label}: has the wrong length")
                    repo.read_into(job.chunk_id, loc, out, label, check_id=not inline, files=files, ranges=ranges,
                                   at=at)
                except IntegrityError as e:
                    if not ignore_errors:
                        raise
                    why = str(e).removeprefix(label + ": ")
                    return [(a, b, chain[job.level].short_id, f"chunk {job.chunk_id.hex()[:16]}: {why}")
                            for a, b in job.sub or [(job.start, job.count)]]
                return None

            def run(group: list[_Job]) -> tuple[int, list[tuple[int, int, str, str]]]:
                """Restore the stretch of the disk a group covers: decode it (see
                decode_group), then write each run of it with one call."""
                with decoding:
                    out, writes, lost = decode_group(group)
                base = group[0].start * bs
                n = 0
                for a, b in writes:
                    lo, hi = a * bs, min((a + b) * bs, size)
                    tgt.write(lo, out[lo - base:hi - base])
                    n += hi - lo
                return n, lost

            def decode_group(group: list[_Job]) -> tuple[memoryview, list[tuple[int, int]],
                                                         list[tuple[int, int, str, str]]]:
                """Decode each chunk of a group at its place in this thread's aligned buffer
                that stands for the stretch of the disk the group covers, and check each run
                of adjacent blocks taken from them against the block hashes at once; return
                the buffer, the runs of blocks to write (first block, count) and the damaged
                ranges."""
                base = group[0].start * bs
                span = max(min((j.start + j.count) * bs, size) for j in group) - base
                # a page before the stretch: read_into may borrow the byte before a chunk's
                # place to decrypt a raw chunk into it (the stretch stays page-aligned)
                room = stretch_bufs.view(DIRECT_ALIGN + span)
                out = room[DIRECT_ALIGN:]
                lost: list[tuple[int, int, str, str]] = []
                pieces: list[tuple[int, int, _Job]] = []  # (first block, count, chunk) decoded
                # Older snapshots first, then from each pack in order: a chunk's extent
                # holds only blocks its own snapshot or newer ones provide, so a newer chunk
                # decoded later overwrites only blocks the older one does not provide.
                for job in sorted(group, key=lambda j: (-j.level, locs[j.chunk_id].pack, locs[j.chunk_id].offset)):
                    mine = job.sub or [(job.start, job.count)]
                    if job.inside:
                        bad = decode(job, room, DIRECT_ALIGN + job.start * bs - base)
                    else:  # decoded aside; only the blocks it provides are copied in
                        aside = aside_bufs.view(locs[job.chunk_id].raw_length)
                        bad = decode(job, aside, 0)
                        if bad is None:
                            for a, b in mine:
                                lo, hi = a * bs, min((a + b) * bs, size)
                                out[lo - base:hi - base] = aside[lo - job.start * bs:hi - job.start * bs]
                    if bad is not None:
                        lost += bad
                        continue
                    pieces += [(a, b, job) for a, b in mine]
                pieces.sort(key=itemgetter(0))
                writes: list[tuple[int, int]] = []  # (first block, count)
                i = 0
                while i < len(pieces):  # each run of blocks adjacent on the disk
                    a, b = pieces[i][0], pieces[i][1]
                    j = i + 1
                    while j < len(pieces) and pieces[j][0] == a + b:
                        b += pieces[j][1]
                        j += 1
                    if inline:
                        assert expected is not None
                        h, _ = hash_blocks(repo.sealer.block_hash, out[a * bs - base:min((a + b) * bs, size) - base],
                                           b, bs, zero_hash)
                        bad_rows = (h != expected[a:a + b]).any(axis=1)
                        if bad_rows.any():
                            for pa, pb, job in pieces[i:j]:
                                pbad = bad_rows[pa - a:pa - a + pb]
                                if not pbad.any():
                                    continue
                                rs, rl = runs(pbad)
                                if not ignore_errors:
                                    raise IntegrityError(
                                        f"{what(job)}: blocks {range_text((rs + pa).tolist(), rl.tolist())} do not "
                                        "match the snapshot's block hashes (corrupt data); the restore stopped before "
                                        "writing them")
                                for x, y in zip(rs.tolist(), rl.tolist(), strict=True):
                                    lost.append((pa + x, y, chain[job.level].short_id,
                                                 f"chunk {job.chunk_id.hex()[:16]}: does not match the snapshot's "
                                                 "block hashes (corrupt data)"))
                            gs, gl = runs(~bad_rows)
                            writes += [(a + x, y) for x, y in zip(gs.tolist(), gl.tolist(), strict=True)]
                            i = j
                            continue
                    writes.append((a, b))
                    i = j
                return out, writes, lost

            # From a local repository, at most one group per CPU is decoded at a time; the
            # other workers write theirs meanwhile (the target needs several writes in
            # flight). Decoding is CPU work in short calls that give up the GIL (a read, a
            # decryption, a frame): with more decoding threads than CPUs, each of those
            # calls ends in a wait for the GIL and a context switch. Measured on 2 CPUs
            # with 4 workers, writes discarded (the CPU work alone, bench/README.md): the
            # head of the chain of 30 took 0.622 s and 0.99 CPU-seconds instead of 0.805 s
            # and 1.32, the full 0.396 s instead of 0.467 s. An object store's reads wait
            # on the network instead, so all its workers decode.
            decoding = threading.BoundedSemaphore(min(workers, _cpus()) if files is not None else max(1, workers))
            progress.start(int(np.count_nonzero(data_mask)) * bs, "restore")
            try:
                with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmbak-restore") as pool:
                    for n, lost in bounded_unordered(pool, run, _groups(jobs, bs, size), 2 * workers):
                        written += n
                        damaged.extend(lost)
                        progress.advance(n)
            finally:
                if files is not None:
                    files.close()  # every worker has ended (the pool's exit waits for them)
            zero_bytes = 0
            damaged_mask = np.zeros(len(data_mask), bool)
            for a, b, _, _ in damaged:
                damaged_mask[a:a + b] = True
            if tgt.needs_zero_writes():
                zs, zl = runs(~data_mask | damaged_mask)
                for s, c in zip(zs.tolist(), zl.tolist(), strict=True):
                    ln = min(c * bs, size - s * bs)
                    tgt.write_zeros(s * bs, ln)
                    zero_bytes += ln
            progress.close()
            verified = False
            if expected is not None:
                if readback:
                    _verify(repo, tgt, expected, data_mask, bs, size, snapshot, workers, progress,
                            skip=damaged_mask)
                verified = True
            tgt.commit(sync)
            ok = True
        finally:
            progress.close()
            if not ok:
                tgt.discard()
            if not isinstance(target, RestoreTarget):
                tgt.close()
    return {
        "snapshot": snapshot.id,
        "target": tgt.final_path,
        "chain_length": len(chain),
        "disk_size": size,
        "written_bytes": written,
        "zero_bytes_written": zero_bytes,
        "chunks_read": len(jobs),
        "verified": verified,
        "duration_s": round(time.monotonic() - t0, 3),
        "complete": not damaged,
        "damaged": _damaged_ranges(damaged, bs, size),
        "warnings": warnings,
    }


def _damaged_ranges(damaged: list[tuple[int, int, str, str]], bs: int, size: int) -> list[dict]:
    """The damaged block ranges, sorted, adjacent ones with the same snapshot and reason joined."""
    out: list[dict] = []
    for a, b, sid, why in sorted(damaged):
        last = out[-1] if out else None
        if last and last["snapshot"] == sid and last["reason"] == why and last["start_block"] + last["blocks"] == a:
            last["blocks"] += b
        else:
            out.append({"start_block": a, "blocks": b, "snapshot": sid, "reason": why})
    for d in out:
        d["offset"] = d["start_block"] * bs
        d["length"] = min(d["blocks"] * bs, size - d["offset"])
    return out


def _verify(repo: Repository, tgt: RestoreTarget, expected: np.ndarray, data_mask: np.ndarray, bs: int,
            size: int, snapshot: Manifest, workers: int, progress: Progress,
            skip: np.ndarray | None = None) -> None:
    """Re-read the target and compare every block with the snapshot's block hashes.

    Holes in a regular-file target read as zeros without being read; a new file's
    never-written blocks are holes by construction, so only written blocks (and any
    block expected to hold data) are read back.
    """
    n = len(expected)
    sealer = repo.sealer
    zero_hash = np.frombuffer(sealer.block_hash(bytes(bs)), BHT_DTYPE)
    check_mask = np.ones(n, bool)
    if tgt.created:
        check_mask = data_mask | expected.any(axis=1)
    if tgt.is_file:
        has_data = np.zeros(n, bool)
        for off, ln in file_data_extents(tgt.fd, 0, size):
            has_data[off // bs:(off + ln + bs - 1) // bs] = True
        # Blocks in holes read as zeros: they match only a zero row.
        hole_bad = check_mask & ~has_data & expected.any(axis=1)
        check_mask &= has_data
    else:
        hole_bad = np.zeros(n, bool)
    if skip is not None:  # damaged blocks a restore with ignore_errors left as zeros
        check_mask &= ~skip
        hole_bad &= ~skip
    step = max(1, (8 << 20) // bs)
    pieces = []
    rs, rl = runs(check_mask)
    for s, c in zip(rs.tolist(), rl.tolist(), strict=True):
        for a in range(s, s + c, step):
            pieces.append((a, min(step, s + c - a)))

    def check(piece: tuple[int, int]) -> np.ndarray:
        start, cnt = piece
        want = min(cnt * bs, size - start * bs)
        data = tgt.read(want, start * bs)
        if len(data) != want:
            raise VmbakError(f"restore verification: short read from {tgt.final_path}")
        h, _ = hash_blocks(sealer.block_hash, data, cnt, bs, zero_hash)
        return (h != expected[start:start + cnt]).any(axis=1)

    total = sum(c for _, c in pieces) * bs
    progress.start(total, "verify")
    bad_parts = []
    if hole_bad.any():
        bad_parts.append((0, hole_bad))
    with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmbak-verify") as pool:
        for (start, cnt), bad in zip(pieces, bounded_map(pool, check, pieces, 2 * workers + 2), strict=True):
            if bad.any():
                bad_parts.append((start, bad))
            progress.advance(cnt * bs)
    progress.close()
    if bad_parts:
        mask = np.zeros(n, bool)
        for start, bad in bad_parts:
            mask[start:start + len(bad)] |= bad
        rs, rl = runs(mask)
        raise IntegrityError(f"restore verification failed: blocks {range_text(rs.tolist(), rl.tolist())} of "
                             f"snapshot {snapshot.short_id} differ from the backup")
