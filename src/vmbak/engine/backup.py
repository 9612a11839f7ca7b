"""The backup pipeline: select blocks, read, zero-detect, hash, dedup, compress, seal, pack.

One pass over the selected blocks (changed ∧ used ∧ holding data). Reads are grouped
into tasks of up to ``TASK_BYTES``; worker threads read, hash and compress whole
tasks (blake3, zstd, AES-GCM and pread release the GIL) while the main thread appends
the results to packs in order.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vmbak.buffers import ThreadBuffers
from vmbak.changes.base import ChangeMap
from vmbak.disks.base import DiskReader
from vmbak.engine.alloc import reuse_freed_memory
from vmbak.engine.common import (
    BHT_DTYPE,
    bounded_map,
    hash_blocks,
    nonzero_rows,
    range_text,
    resolve_bht,
    runs,
    sparse_table,
    store_bht,
)
from vmbak.engine.progress import NoProgress, Progress, set_phase, watch_upload
from vmbak.errors import DiskError, VmbakError, printable
from vmbak.repo.crypto import CHUNK_ID_BLOCKS, ID_GRAIN
from vmbak.repo.manifest import DIFFERENTIAL, FULL, INCREMENTAL, TORN, UNCHANGED, UNKNOWN, Manifest
from vmbak.repo.pack import CODEC_RAW
from vmbak.repo.repository import Repository, _now_iso

TASK_BYTES = 4 << 20
# Blocks read a second time, after the backup read them, from a disk read directly (no
# checkpoint): if any differs, the disk changed while it was read.
SAMPLE_BLOCKS = 256
MODES = ("auto", "full", "incremental", "differential")
DEFAULT_BLOCK_SIZE = 1 << 16
# Backup names: 1 to NAME_MAX printable characters, no whitespace, none of NAME_FORBIDDEN
# (snapshot specifications are ``NAME:latest`` and ``NAME@TIME``), not starting with '-'.
NAME_MAX = 200
NAME_FORBIDDEN = "/:@"
NAME_RULE = (f"a name has 1 to {NAME_MAX} printable characters, no spaces or control characters, "
             "no '/', ':' or '@', and does not start with '-'")


def check_name(name: str) -> str:
    """``name`` if it is a valid backup name; a one-line VmbakError saying why not.

    Names appear in snapshot specifications (``NAME:latest``, ``NAME@TIME``), in
    tables and on command lines, so they must keep all of these unambiguous.
    """
    if not isinstance(name, str) or not name:
        raise VmbakError(f"a backup needs a name ({NAME_RULE})")
    shown = printable(name if len(name) <= 40 else name[:40] + "...")
    why = None
    if len(name) > NAME_MAX:
        why = f"it has {len(name)} characters"
    elif bad := next((c for c in name if not c.isprintable() or c.isspace()), None):
        why = "it contains a space" if bad == " " else f"it contains the character U+{ord(bad):04X}"
    elif bad := next((c for c in name if c in NAME_FORBIDDEN), None):
        why = f"it contains {bad!r}"
    elif name.startswith("-"):
        why = "it starts with '-'"
    if why:
        raise VmbakError(f"bad backup name '{shown}': {why}; {NAME_RULE}")
    return name


# Tags: like names (printable, no whitespace, not starting with '-'), without ','
# (``--tag a,b`` gives two tags) and at most TAGS_MAX of them on a snapshot.
TAG_MAX = 200
TAGS_MAX = 100
TAG_RULE = (f"a tag has 1 to {TAG_MAX} printable characters, no spaces, control characters or ',', "
            "and does not start with '-'")


def check_tags(tags: list[str] | tuple[str, ...] | None) -> list[str]:
    """The tags of a new backup, duplicates dropped, in the order given; a one-line
    VmbakError naming a bad tag and why."""
    out: list[str] = []
    for tag in tags or ():
        if not isinstance(tag, str) or not tag:
            raise VmbakError(f"empty tag ({TAG_RULE})")
        shown = printable(tag if len(tag) <= 40 else tag[:40] + "...")
        why = None
        if len(tag) > TAG_MAX:
            why = f"it has {len(tag)} characters"
        elif bad := next((c for c in tag if not c.isprintable() or c.isspace()), None):
            why = "it contains a space" if bad == " " else f"it contains the character U+{ord(bad):04X}"
        elif "," in tag:
            why = "it contains ','"
        elif tag.startswith("-"):
            why = "it starts with '-'"
        if why:
            raise VmbakError(f"bad tag '{shown}': {why}; {TAG_RULE}")
        if tag not in out:
            out.append(tag)
    if len(out) > TAGS_MAX:
        raise VmbakError(f"too many tags ({len(out)}); a snapshot has at most {TAGS_MAX}")
    return out


@dataclass
class BackupOptions:
    name: str
    mode: str = "auto"
    changes: str = "auto"  # "auto", "scan" or "full"; a ChangeMap comes through change_map
    change_map: ChangeMap | None = None
    change_id: str | None = None  # the reference point this backup captures (tracker change ID, ...)
    verify_changes: bool = False  # also scan everything and report blocks the change source missed
    block_size: int = DEFAULT_BLOCK_SIZE
    workers: int = 2
    used: np.ndarray | None = None  # bool per block; None = computed (skip_unused) or all used
    skip_unused: bool = True
    notes: list[str] = field(default_factory=list)  # from the change source (fallbacks, repairs)
    extra: dict = field(default_factory=dict)  # kept in the manifest (e.g. a libvirt domain's XML)
    guest_consistency: dict | None = None  # the manifest's guest_consistency (guest.quiesce.Quiescer.record)
    tags: list[str] = field(default_factory=list)  # checked with check_tags
    source: str = ""
    progress: Progress | None = None
    log: Callable[[str], None] | None = None


@dataclass
class _Task:
    runs: list[tuple[int, int]]  # (start block, block count)


@dataclass
class _Result:
    runs: list[tuple[int, int]]
    hashes: list[np.ndarray]  # per run: (n, 2) uint64
    chunks: list[tuple[int, int, bytes, bytes | None, int]]  # start, count, id, blob|None, raw
    read_bytes: int
    zero_blocks: int


def _tasks(mask: np.ndarray, grid: int, task_blocks: int) -> Iterator[_Task]:
    """Group the runs of ``mask`` into tasks, cutting runs at chunk-grid boundaries."""
    starts, lens = runs(mask)
    cur: list[tuple[int, int]] = []
    size = 0
    for s, n in zip(starts.tolist(), lens.tolist(), strict=True):
        end = s + n
        while s < end:
            cut = min(end, (s // grid + 1) * grid, s + task_blocks - size)
            cur.append((s, cut - s))
            size += cut - s
            s = cut
            if size >= task_blocks:
                yield _Task(cur)
                cur, size = [], 0
    if cur:
        yield _Task(cur)


_read_bufs = ThreadBuffers(TASK_BYTES)  # a worker's read buffer (_Pipeline.work)


class _Pipeline:
    def __init__(self, repo: Repository, disk: DiskReader, bs: int, grid: int,
                 parent_bht: np.ndarray | None, writer_has: Callable[[bytes], bool]) -> None:
        self.repo = repo
        self.disk = disk
        self.bs = bs
        self.grid = grid
        self.parent_bht = parent_bht
        self.writer_has = writer_has
        self.zero_hash = np.frombuffer(repo.sealer.block_hash(bytes(bs)), BHT_DTYPE)
        # Hash once: at the chunk id grain, the block hashes give the chunk ids.
        self.ids_from_hashes = repo.sealer.chunk_ids == CHUNK_ID_BLOCKS and bs == ID_GRAIN

    def work(self, task: _Task) -> _Result:
        bs = self.bs
        sealer = self.repo.sealer
        res = _Result(task.runs, [], [], 0, 0)
        wants = [min(n * bs, self.disk.size - s * bs) for s, n in task.runs]
        # A reader that can keep several reads in flight (NBD) gets the whole task at once.
        many = getattr(self.disk, "pread_many", None)
        datas = many([(w, s * bs) for w, (s, _) in zip(wants, task.runs, strict=True)]) if many else None
        into = getattr(self.disk, "pread_into", None) if datas is None else None
        probe = True  # see Repository.encode_chunk_codec: after a chunk that compressed, False
        for j, (s, n) in enumerate(task.runs):
            want = wants[j]
            if datas is not None:
                data: bytes | memoryview = datas[j]
            elif into is not None:  # into this thread's buffer: no new pages per read
                data = _read_bufs.view(want)
                data = data[:into(data, s * bs)]
            else:
                data = self.disk.pread(want, s * bs)
            if len(data) != want:
                raise DiskError(f"short read from {self.disk.description} at offset {s * bs} "
                                "(did the disk shrink during the backup?)")
            res.read_bytes += want
            h, nonzero = hash_blocks(sealer.block_hash, data, n, bs, self.zero_hash)
            mv = memoryview(data)
            res.hashes.append(h)
            res.zero_blocks += n - int(np.count_nonzero(nonzero))
            store = nonzero
            if self.parent_bht is not None:
                store = nonzero & (h != self.parent_bht[s:s + n]).any(axis=1)
            # chunks: runs of stored blocks; the task runs never cross the chunk grid
            st, ln = runs(store)
            for a, k in zip(st.tolist(), ln.tolist(), strict=True):
                piece = mv[a * bs:min((a + k) * bs, want)]
                if self.ids_from_hashes:  # stored blocks are not zero: their rows are their hashes
                    cid = sealer.chunk_id_from_hashes(h[a:a + k].tobytes(), len(piece))
                else:
                    cid = sealer.chunk_id(piece)
                blob = None
                if not self.writer_has(cid):
                    blob, codec = self.repo.encode_chunk_codec(cid, piece, probe)
                    probe = codec == CODEC_RAW
                res.chunks.append((s + a, k, cid, blob, len(piece)))
        return res


def choose_parent(repo: Repository, name: str, mode: str, disk_size: int, block_size: int,
                  log: Callable[[str], None]) -> Manifest | None:
    if mode not in MODES:
        raise VmbakError(f"unknown backup mode {mode!r} (choose {', '.join(MODES)})")
    if mode == "full":
        return None
    parent = repo.latest(name, full_only=(mode == "differential"))
    if parent is None:
        if mode != "auto":
            log(f"no earlier {'full ' if mode == 'differential' else ''}backup named {name!r}: "
                "doing a full backup")
        return None
    if parent.disk_size != disk_size:
        log(f"disk size changed since snapshot {parent.short_id} ({parent.disk_size} -> {disk_size} "
            "bytes): doing a full backup")
        return None
    if parent.block_size != block_size:
        log(f"block size differs from snapshot {parent.short_id}: doing a full backup")
        return None
    return parent


def backup(repo: Repository, disk: DiskReader, opts: BackupOptions) -> Manifest:
    """Back up ``disk`` into ``repo``; return the committed manifest."""
    log = opts.log or (lambda s: None)
    progress = opts.progress or NoProgress()
    bs = opts.block_size
    if bs & (bs - 1) or not (4096 <= bs <= repo.chunk_size):
        raise VmbakError(f"block size must be a power of two between 4 KiB and {repo.chunk_size}")
    check_name(opts.name)
    check_tags(opts.tags)
    t0 = time.monotonic()
    started = _now_iso()
    size = disk.size
    nblocks = (size + bs - 1) // bs
    grid = repo.chunk_size // bs
    notes: list[str] = list(opts.notes)

    def note(msg: str) -> None:
        notes.append(msg)
        log(msg)

    # A live disk read directly (no point-in-time view) may change while it is read.
    source_state = getattr(disk, "source_state", None)
    state_before = source_state() if source_state is not None else None
    set_phase(progress, "analyze")
    with repo.lock(purpose="backup"), reuse_freed_memory():
        parent = choose_parent(repo, opts.name, opts.mode, size, bs, note)
        kind = FULL
        parent_bht = None
        source = "full"
        reference = None
        chain: list[Manifest] = []
        if parent is not None:
            kind = DIFFERENTIAL if opts.mode == "differential" else INCREMENTAL
            chain = repo.chain(parent)
            parent_bht = resolve_bht(repo, chain)
            reference = parent.id
            source = "scan"
        used = opts.used
        if used is None:
            used = used_map(disk, bs, opts.skip_unused, note)
        if len(used) != nblocks:
            raise VmbakError("internal error: used map has the wrong length")
        # What to read: blocks that may hold data, are used, and may have changed.
        considered = np.ones(nblocks, bool)
        tracked: np.ndarray | None = None
        cm = opts.change_map
        if parent is not None and cm is not None and (cm.reference is None or cm.reference != parent.change_id):
            note(f"the {cm.source} change map is relative to {cm.reference!r}, but the parent snapshot "
                 f"{parent.short_id} has change ID {parent.change_id!r}: scanning instead")
            cm = None
        if parent is not None and cm is not None:
            if cm.block_size != bs or len(cm.bitmap) != nblocks:
                raise VmbakError("change map geometry does not match the disk")
            considered = cm.bitmap.astype(bool).copy()
            tracked = considered.copy()
            if opts.verify_changes:
                considered[:] = True
            # Blocks freed since the parent become zeros even if the source did not see them.
            assert parent_bht is not None
            considered |= ~used & nonzero_rows(parent_bht)
            source = cm.source
            reference = cm.reference
            notes.extend(cm.notes)
        elif parent is not None and opts.changes == "full":
            source = "full"
        has_data = np.zeros(nblocks, bool)
        for off, ln in disk.data_extents(0, size):
            has_data[off // bs:(off + ln + bs - 1) // bs] = True
        to_read = considered & used & has_data

        writer = repo.chunk_writer()
        pipe = _Pipeline(repo, disk, bs, grid, parent_bht, writer.has)
        # The new table is the parent's, updated in place (a copy of a 2 TiB disk's table
        # would make all 512 MiB of it resident); ``differs`` records which rows change.
        # A full's table starts as zeros (sparse_table: only the rows written get pages).
        cur = parent_bht if parent_bht is not None else sparse_table(nblocks)
        differs: np.ndarray | None = None
        if parent_bht is not None:
            # Considered blocks that are not read read as zeros (holes, unused blocks).
            differs = np.zeros(nblocks, bool)
            step = 1 << 16  # piece by piece: bounded temporaries, zero pages left unmapped
            for r in range(0, nblocks, step):
                unread = considered[r:r + step] & ~to_read[r:r + step]
                if unread.any():
                    rows = cur[r:r + step]
                    d = differs[r:r + step]
                    np.logical_and(unread, rows.any(axis=1), out=d)
                    rows[d] = 0
        ext_start: list[int] = []
        ext_count: list[int] = []
        ext_id: list[bytes] = []
        read_bytes = zero_blocks = dedup_bytes = 0
        extra_stats: dict = {}
        total = int(np.count_nonzero(to_read)) * bs
        # One bar over the phases: read (and store) the selected blocks, then wait for the
        # last packs to be written or uploaded.
        watch_upload(progress, lambda: (writer.durable_stored, writer.new_stored))
        progress.start(min(total, size), "read")
        try:
            with cf.ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="vmbak-backup") as pool:
                for r in bounded_map(pool, pipe.work, _tasks(to_read, grid, TASK_BYTES // bs),
                                     2 * opts.workers + 2):
                    for (s, n), h in zip(r.runs, r.hashes, strict=True):
                        if differs is not None:  # the worker is done with these parent rows
                            differs[s:s + n] = (h != cur[s:s + n]).any(axis=1)
                        cur[s:s + n] = h
                    for s, n, cid, blob, raw in r.chunks:
                        if blob is None or not writer.add(cid, blob, raw):
                            dedup_bytes += raw
                        ext_start.append(s)
                        ext_count.append(n)
                        ext_id.append(cid)
                    read_bytes += r.read_bytes
                    zero_blocks += r.zero_blocks
                    progress.advance(r.read_bytes)
            set_phase(progress, "upload")
            consistency = None
            if source_state is not None:
                consistency = _consistency(disk, pipe, to_read, cur, state_before, source_state(), note)
            m = Manifest(
                name=opts.name, kind=kind, time=started, disk_size=size, block_size=bs,
                chunk_blocks=grid, source=opts.source or disk.description,
                hostname=socket.gethostname(), change_source=source,
                parent=parent.id if parent is not None else None, reference=reference,
                change_id=opts.change_id or (opts.change_map.new_reference if opts.change_map else None),
                extra=dict(opts.extra), consistency=consistency, guest_consistency=opts.guest_consistency,
                tags=check_tags(opts.tags),
            )
            if parent is None:
                m.used = used
                table = cur
            else:
                assert differs is not None
                differs &= considered
                changed = differs & used
                differs &= ~used  # now: the newly unused blocks
                m.changed, m.newly_unused = changed, differs  # stored packed (Manifest.bits)
                changed_blocks = int(np.count_nonzero(changed))
                if tracked is not None and opts.verify_changes:
                    missed = changed & ~tracked  # newly unused blocks need not have been written
                    n_missed = int(np.count_nonzero(missed))
                    extra_stats["verify_missed_blocks"] = n_missed
                    extra_stats["verify_reported_blocks"] = int(np.count_nonzero(tracked))
                    if n_missed:
                        ms, ml = runs(missed)
                        note(f"verify-changes: the change source missed {n_missed} changed blocks "
                             f"({range_text(ms.tolist(), ml.tolist())}); they are included in this backup")
                    else:
                        note("verify-changes: the change source reported every changed block (0 missed)")
                changed |= differs
                table = cur[changed]  # the covered blocks' rows
                del changed, differs
            order = np.argsort(np.asarray(ext_start, np.uint64), kind="stable")
            m.ext_start = np.asarray(ext_start, np.uint64)[order]
            m.ext_count = np.asarray(ext_count, np.uint32)[order]
            m.ext_id = np.asarray(ext_id, "V32")[order] if ext_id else np.zeros(0, "V32")
            m.bht_count = len(table)
            m.bht_chunks = store_bht(writer, repo, table)
            writer.flush()
            if parent is None:
                changed_blocks = nblocks
            m.stats = extra_stats | {
                "logical_bytes": size,
                "considered_bytes": min(int(np.count_nonzero(considered)) * bs, size),
                "used_bytes": min(int(np.count_nonzero(used)) * bs, size),
                "read_bytes": read_bytes,
                "zero_bytes": zero_blocks * bs,
                "changed_bytes": min(changed_blocks * bs, size),
                "data_bytes": int(m.ext_count.sum()) * bs if len(m.ext_count) else 0,
                "new_chunks": writer.new_chunks,
                "new_raw_bytes": writer.new_raw,
                "new_stored_bytes": writer.new_stored,
                "dedup_bytes": dedup_bytes,
                "duration_s": round(time.monotonic() - t0, 3),
            }
            m.notes = notes
            repo.save_manifest(m)
        except BaseException:
            writer.abandon()
            raise
        finally:
            watch_upload(progress, None)
            progress.close()
    return m


def _consistency(disk: DiskReader, pipe: _Pipeline, read: np.ndarray, hashes: np.ndarray,
                 before: tuple | None, after: tuple | None, note: Callable[[str], None]) -> str:
    """Whether a disk read directly changed while it was read: its state (file size and
    times) before and after, and a sample of the blocks read, read and hashed again."""
    why = []
    if before != after:
        why.append("its size or modification time changed")
    idx = np.flatnonzero(read)
    if len(idx) > SAMPLE_BLOCKS:
        idx = idx[sorted(random.sample(range(len(idx)), SAMPLE_BLOCKS))]  # (numpy.random: 14 ms to import)
    bs = pipe.bs
    differ = 0
    for b in idx.tolist():
        want = min(bs, disk.size - b * bs)
        data = disk.pread(want, b * bs)
        h, _ = hash_blocks(pipe.repo.sealer.block_hash, data, 1, bs, pipe.zero_hash)
        if len(data) != want or not np.array_equal(h[0], hashes[b]):
            differ += 1
    if differ:
        why.append(f"{differ} of {len(idx)} blocks read again differ")
    if why:
        note(f"warning: {disk.description} changed while it was read ({'; '.join(why)}): this snapshot "
             "may be torn (inconsistent). Back up a disk nothing writes to, or read it through a "
             "checkpoint (vmbak track, --changes qemu:..., --libvirt)")
        return TORN
    return UNCHANGED if before is not None else UNKNOWN


def used_map(disk: DiskReader, bs: int, skip_unused: bool, note: Callable[[str], None]) -> np.ndarray:
    """The blocks some partition or filesystem uses; all blocks when unknown or turned off."""
    nblocks = (disk.size + bs - 1) // bs
    if not skip_unused:
        return np.ones(nblocks, bool)
    try:
        from vmbak import usage
    except ImportError:
        return np.ones(nblocks, bool)
    if not hasattr(usage, "analyze"):
        return np.ones(nblocks, bool)
    u = usage.analyze(disk, bs)
    for n in u.notes:
        note(f"usage: {n}")
    for e in u.entries:
        for n in e.notes:
            note(f"usage: {e.name} ({e.fstype}): {n}")
    used = np.asarray(u.used_bitmap(bs), bool)
    if len(used) != nblocks:
        note("usage: map has the wrong size; every block counts as used")
        return np.ones(nblocks, bool)
    return used


def snapshot_time_now() -> str:
    return _now_iso()


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 2))
