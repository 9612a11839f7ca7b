"""A random-access, read-only view of any snapshot, chain included.

The view answers ``pread(length, offset)`` for the disk as it was at the snapshot's point in
time. Each block is taken from the newest manifest of the chain that covers it (the same
assignment as the chain restore, ``engine.restore.plan``); blocks that no stored extent
holds (zero blocks, holes, unused and newly-unused blocks) read as zeros. A read fetches
only the chunks it overlaps, and decompressed chunks are kept in a bounded LRU cache, so
browsing a filesystem or serving an NBD export touches only what is asked for.

Every chunk is authenticated and checked against its id before use (invariant 5). The view
is safe to use from many threads at once; two threads that want the same chunk fetch it
once.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import threading
from collections.abc import Callable, Iterator

import numpy as np

from vmbak.engine.common import runs
from vmbak.engine.restore import plan
from vmbak.errors import IntegrityError
from vmbak.repo.index import Location
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository

DEFAULT_CACHE_BYTES = 256 << 20


class SnapshotView:
    """The disk of ``snapshot`` as a thread-safe random-access reader (a ``DiskReader``).

    ``cache_bytes`` bounds the decompressed chunks kept in memory (at least one chunk is
    always kept while it is being copied out).
    """

    def __init__(self, repo: Repository, snapshot: Manifest, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.repo = repo
        self.snapshot = snapshot
        self.chain = repo.chain(snapshot)
        self.size = snapshot.disk_size
        self.block_size = bs = snapshot.block_size
        self.description = f"snapshot {snapshot.short_id} ({snapshot.name}, {snapshot.time})"
        self.cache_bytes = max(0, int(cache_bytes))
        jobs, data_mask = plan(self.chain)
        ids: list[bytes] = []
        locs: list[Location] = []
        id_no: dict[bytes, int] = {}
        seg_start: list[int] = []
        seg_count: list[int] = []
        seg_chunk: list[int] = []
        seg_coff: list[int] = []
        index = repo.index
        for j in jobs:
            n = id_no.get(j.chunk_id)
            if n is None:
                loc = index.get(j.chunk_id)
                if loc is None:
                    m = self.chain[j.level]
                    raise IntegrityError(f"chunk {j.chunk_id.hex()[:16]} (blocks {j.start}-{j.start + j.count - 1} "
                                         f"of snapshot {m.short_id}) is missing from the repository")
                n = id_no[j.chunk_id] = len(ids)
                ids.append(j.chunk_id)
                locs.append(loc)
            for a, c in j.sub or [(j.start, j.count)]:
                seg_start.append(a)
                seg_count.append(c)
                seg_chunk.append(n)
                seg_coff.append((a - j.start) * bs)
        order = np.argsort(np.asarray(seg_start, np.int64), kind="stable")
        self._seg_start = np.asarray(seg_start, np.int64)[order] * bs
        self._seg_end = np.minimum(self._seg_start + np.asarray(seg_count, np.int64)[order] * bs, self.size)
        self._seg_chunk = np.asarray(seg_chunk, np.int64)[order]
        self._seg_coff = np.asarray(seg_coff, np.int64)[order]
        self._ids = ids
        self._locs = locs
        rs, rl = runs(data_mask)
        self._run_start = rs * bs
        self._run_end = np.minimum((rs + rl) * bs, self.size)
        self.data_bytes = int((self._run_end - self._run_start).sum()) if len(rs) else 0
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cached = 0
        self._inflight: dict[int, cf.Future[bytes]] = {}
        self.hits = 0
        self.fetched_bytes = 0  # stored (compressed, sealed) bytes read from the repository
        self.fetched_chunks = 0
        self.read_bytes = 0  # bytes handed out by pread

    # ------------------------------------------------------------------ chunks
    def _chunk(self, n: int) -> bytes:
        with self._lock:
            data = self._cache.get(n)
            if data is not None:
                self._cache.move_to_end(n)
                self.hits += 1
                return data
            fut = self._inflight.get(n)
            owner = fut is None
            if fut is None:
                fut = self._inflight[n] = cf.Future()
            else:
                self.hits += 1
        if not owner:
            return fut.result()
        try:
            cid, loc = self._ids[n], self._locs[n]
            data = self.repo.read_at(cid, loc, f"chunk {cid.hex()[:16]} of snapshot {self.snapshot.short_id}")
        except BaseException as e:
            with self._lock:
                del self._inflight[n]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._inflight[n]
            self.fetched_chunks += 1  # each fetch is a cache miss
            self.fetched_bytes += loc.length
            if len(data) <= self.cache_bytes:
                self._cache[n] = data
                self._cached += len(data)
                while self._cached > self.cache_bytes and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        fut.set_result(data)
        return data

    # ------------------------------------------------------------------ reading
    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset`` (short only at the end of the disk)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        self.readinto(out, offset)
        return bytes(out)

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset`` (zeros past the disk end); return the bytes inside the disk."""
        mv = memoryview(buf).cast("B")
        end = min(offset + len(mv), self.size)
        if end <= offset:
            mv[:] = bytes(len(mv))
            return 0
        if end - offset < len(mv):
            mv[end - offset:] = bytes(len(mv) - (end - offset))
        i = int(np.searchsorted(self._seg_end, offset, side="right"))
        j = int(np.searchsorted(self._seg_start, end, side="left"))
        pos = offset  # everything before pos is filled
        for s, e, n, coff in zip(self._seg_start[i:j].tolist(), self._seg_end[i:j].tolist(),
                                 self._seg_chunk[i:j].tolist(), self._seg_coff[i:j].tolist(), strict=True):
            lo, hi = max(s, offset), min(e, end)
            if hi <= lo:
                continue
            if lo > pos:
                mv[pos - offset:lo - offset] = bytes(lo - pos)
            data = self._chunk(n)
            src = coff + (lo - s)
            if src + (hi - lo) > len(data):
                raise IntegrityError(f"chunk {self._ids[n].hex()[:16]} of snapshot {self.snapshot.short_id} "
                                     "is shorter than its extent")
            mv[lo - offset:hi - offset] = memoryview(data)[src:src + (hi - lo)]
            pos = hi
        if pos < end:
            mv[pos - offset:end - offset] = bytes(end - pos)
        with self._lock:
            self.read_bytes += end - offset
        return end - offset

    # ------------------------------------------------------------------ allocation
    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs covering [offset, offset+length) ∩ the disk, in order.

        Runs that are not data read as zeros (holes: zero, unused or never-stored blocks).
        """
        end = min(offset + length, self.size)
        out: list[tuple[int, int, bool]] = []
        if end <= offset:
            return out
        i = int(np.searchsorted(self._run_end, offset, side="right"))
        j = int(np.searchsorted(self._run_start, end, side="left"))
        pos = offset
        for s, e in zip(self._run_start[i:j].tolist(), self._run_end[i:j].tolist(), strict=True):
            lo, hi = max(s, offset), min(e, end)
            if lo > pos:
                out.append((pos, lo - pos, False))
            if hi > lo:
                out.append((lo, hi - lo, True))
            pos = max(pos, hi)
        if pos < end:
            out.append((pos, end - pos, False))
        return out

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) of the ranges that may hold data; the rest reads as zeros."""
        stop = self.size if end is None else min(end, self.size)
        for o, n, data in self.extents(start, stop - start):
            if data:
                yield o, n

    # ------------------------------------------------------------------ misc
    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.fetched_chunks
            return {"cache_hits": self.hits, "cache_misses": self.fetched_chunks,
                    "hit_rate": round(self.hits / total, 4) if total else 0.0,
                    "cached_bytes": self._cached, "cache_limit": self.cache_bytes,
                    "fetched_chunks": self.fetched_chunks, "fetched_bytes": self.fetched_bytes,
                    "read_bytes": self.read_bytes, "chunks": len(self._ids), "data_bytes": self.data_bytes}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0

    def open(self) -> RangeFile:
        """A file-like object over the whole disk."""
        return RangeFile(self.pread, self.size, self.description)

    def close(self) -> None:
        self.clear_cache()

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over ``pread(length, offset)`` of ``size`` bytes.

    For parsers that want ``read``/``seek``/``tell``. Each object has its own position (use
    one per thread).
    """

    def __init__(self, pread: Callable[[int, int], bytes], size: int, name: str = "") -> None:
        super().__init__()
        self._pread = pread
        self.size = size
        self.name = name
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self.size - self._pos)
        n = min(n, max(0, self.size - self._pos))
        if n == 0:
            return b""
        data = self._pread(n, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        memoryview(b).cast("B")[:len(data)] = data
        return len(data)


def volume_file(pread: Callable[[int, int], bytes], segments: list[tuple[int, int, int]], name: str = "") -> RangeFile:
    """A file over a volume made of (volume_offset, disk_offset, length) segments of a disk."""
    size = sum(n for _, _, n in segments)

    def vread(length: int, offset: int) -> bytes:
        end = min(offset + length, size)
        parts = []
        for v, d, n in segments:
            lo, hi = max(offset, v), min(end, v + n)
            if hi > lo:
                parts.append(pread(hi - lo, d + lo - v))
        return b"".join(parts)

    return RangeFile(vread, size, name)


def open_view(repo: Repository, snapshot: Manifest | str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> SnapshotView:
    """A view of ``snapshot`` (a Manifest or a specification such as ``web:latest``)."""
    m = snapshot if isinstance(snapshot, Manifest) else repo.find(snapshot)
    return SnapshotView(repo, m, cache_bytes)
