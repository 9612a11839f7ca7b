"""Helpers shared by the engines: run finding, block hash tables, bounded thread pools."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import mmap
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from vmbak.errors import IntegrityError
from vmbak.repo.manifest import Manifest, is_full
from vmbak.repo.repository import MAX_CHUNK_SIZE, METADATA_PIECE, ChunkWriter, Repository

# A block hash table (BHT) holds the 16-byte keyed hash of each block, as two uint64
# per row. All-zero rows mean "reads as zeros" (zero, hole or unused block).
BHT_DTYPE = np.dtype("<u8")
BHT_PIECE = METADATA_PIECE  # bytes of hash table per stored chunk


# Tables at least this large are allocated by sparse_table (a 64 GiB disk's at 64 KiB blocks).
_SPARSE_TABLE_BYTES = 16 << 20


def sparse_table(rows: int) -> np.ndarray:
    """A zeroed (rows, 2) hash table whose pages cost memory only once written.

    ``np.zeros`` gets that from calloc, but numpy advises the kernel to back its large
    arrays with 2 MiB transparent huge pages (madvise MADV_HUGEPAGE): then one row written
    makes 2 MiB resident, and a 2 TiB sparse disk's table grew by 2 MiB for every place a
    restore of a long chain writes (measured: +4 MiB per incremental of the chain). A large
    table is therefore an anonymous mapping advised MADV_NOHUGEPAGE: 4 KiB per place.
    """
    nbytes = rows * 2 * BHT_DTYPE.itemsize
    if nbytes < _SPARSE_TABLE_BYTES or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros((rows, 2), BHT_DTYPE)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:
        pass  # a kernel without transparent huge pages
    # the array keeps the mapping alive (its base); the mapping is unmapped with the array
    return np.frombuffer(mm, BHT_DTYPE).reshape(rows, 2)


def hash_blocks(block_hash: Callable[[memoryview], bytes], data: bytes | memoryview, n: int, bs: int,
                zero_hash: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash ``n`` blocks of ``data`` (the last may be short); return the (n, 2) hash rows,
    with zero rows for all-zero blocks, and the non-zero mask.

    A block is zero when its hash is the zero block's hash: one pass over the data
    instead of a separate zero test.
    """
    mv = memoryview(data)
    digests = b"".join([block_hash(mv[j * bs:(j + 1) * bs]) for j in range(n)])
    h = np.frombuffer(digests, BHT_DTYPE).reshape(n, 2).copy()
    nonzero = (h != zero_hash).any(axis=1)
    if len(data) < n * bs:  # the last block is partial: compare with a short zero block
        nonzero[-1] = data[(n - 1) * bs:] != bytes(len(data) - (n - 1) * bs)
    h[~nonzero] = 0
    return h, nonzero


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices and lengths of the runs of True in a bool array (vectorised)."""
    if mask.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = np.concatenate(([False], mask.astype(bool), [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    starts = d[0::2]
    return starts.astype(np.int64), (d[1::2] - starts).astype(np.int64)


def prefix_counts(mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``cs[pos]`` for ``cs = concatenate(([0], cumsum(mask)))`` (the number of True before
    each position), one window at a time: the whole prefix sum of a 2 TiB disk's bitmap
    would take 256 MiB."""
    order = np.argsort(pos, kind="stable")
    sp = np.asarray(pos, np.int64)[order]
    res = np.empty(len(sp), np.int64)
    step = 1 << 20
    carry = lo = 0
    for r in range(0, len(mask) + 1, step):
        hi = int(np.searchsorted(sp, r + step, "left"))
        c = np.cumsum(mask[r:r + step], dtype=np.int64)
        if hi > lo:
            k = sp[lo:hi] - r
            res[lo:hi] = carry + np.where(k > 0, c[np.maximum(k - 1, 0)], 0) if len(c) else carry
            lo = hi
        carry += int(c[-1]) if len(c) else 0
    out = np.empty(len(sp), np.int64)
    out[order] = res
    return out


# The most blocks one extent (one chunk) can have: the largest chunk in blocks of the
# smallest block size (4 KiB).
MAX_EXTENT_BLOCKS = MAX_CHUNK_SIZE // 4096


def extents(m: Manifest, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A manifest's extents as int64 (starts, counts, ends), checked to lie on the disk of
    ``n`` blocks, sorted and disjoint, and no longer than a chunk can be, as every backup,
    merge and copy writes them."""
    st = m.ext_start.astype(np.int64)
    ct = m.ext_count.astype(np.int64)
    if len(st) and int(ct.max()) > MAX_EXTENT_BLOCKS:
        raise IntegrityError(f"snapshot {m.short_id}: extent map has an extent longer than any chunk")
    if len(st) and (int(st.min()) < 0 or int(st.max()) > n):  # (before the sum, which could wrap)
        raise IntegrityError(f"snapshot {m.short_id}: extent map points past the disk end")
    en = st + ct
    if len(st) and int(en.max()) > n:
        raise IntegrityError(f"snapshot {m.short_id}: extent map points past the disk end")
    if len(st) > 1 and bool((st[1:] < en[:-1]).any()):
        raise IntegrityError(f"snapshot {m.short_id}: extent map is out of order or overlaps itself")
    return st, ct, en


def range_text(starts: Iterable[int], lengths: Iterable[int], limit: int = 5) -> str:
    parts = []
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        if i == limit:
            parts.append("...")
            break
        parts.append(f"{s}" if n == 1 else f"{s}-{s + n - 1}")
    return ", ".join(parts)


def store_bht(writer: ChunkWriter, repo: Repository, table: np.ndarray) -> list[bytes]:
    """Store a (n, 2) uint64 hash table as chunks; return their ids."""
    rows = BHT_PIECE // (2 * BHT_DTYPE.itemsize)
    ids = []
    # piece by piece: a whole copy of a 2 TiB disk's table would be another 512 MiB
    for r in range(0, len(table), rows):
        piece = np.ascontiguousarray(table[r:r + rows], dtype=BHT_DTYPE).tobytes()
        cid = repo.sealer.chunk_id(piece)
        if not writer.has(cid):
            writer.add(cid, repo.encode_chunk(cid, piece), len(piece))
        ids.append(cid)
    return ids


def load_bht(repo: Repository, m: Manifest) -> np.ndarray:
    """The hash rows stored with one manifest (all blocks for a full, covered blocks otherwise).

    The table starts as zeros mapped only when written (:func:`sparse_table`) and pieces
    that are all zeros (holes, unused space) are recognised by their chunk id and neither
    read nor copied: a 2 TiB sparse disk's table (512 MiB dense) costs only its data's pages.
    """
    count = m.bht_count
    table = sparse_table(count)
    rows = BHT_PIECE // (2 * BHT_DTYPE.itemsize)
    zero_ids: dict[bytes, int] = {}
    for k in {min(rows, count), count % rows} - {0}:
        zero_ids[repo.sealer.chunk_id(bytes(16 * k))] = k
    r = 0
    for cid in m.bht_chunks:
        k = zero_ids.get(cid)
        if k is None:
            raw = repo.read_chunk(cid, f"block hash table of snapshot {m.short_id}")
            k = len(raw) // 16
            if len(raw) % 16 or r + k > count:
                raise IntegrityError(f"snapshot {m.short_id}: block hash table has the wrong size")
            table[r:r + k] = np.frombuffer(raw, BHT_DTYPE).reshape(-1, 2)
        r += k
        if r > count:
            raise IntegrityError(f"snapshot {m.short_id}: block hash table has the wrong size")
    if r != count:
        raise IntegrityError(f"snapshot {m.short_id}: block hash table has the wrong size")
    return table


def resolve_bht(repo: Repository, chain: list[Manifest]) -> np.ndarray:
    """The hash of every block as the newest manifest of ``chain`` sees it."""
    full = chain[-1]
    assert is_full(full.kind)
    table = load_bht(repo, full)
    if len(table) != full.block_count:
        raise IntegrityError(f"snapshot {full.short_id}: block hash table has the wrong size")
    for m in reversed(chain[:-1]):
        cov = m.covered()
        delta = load_bht(repo, m)
        if len(delta) != int(np.count_nonzero(cov)):
            raise IntegrityError(f"snapshot {m.short_id}: block hash table does not match its bitmaps")
        table[cov] = delta
    return table


def nonzero_rows(table: np.ndarray) -> np.ndarray:
    """``table.any(axis=1)``, piece by piece: bounded temporaries over a table whose untouched
    (zero) pages stay unmapped."""
    out = np.empty(len(table), bool)
    step = BHT_PIECE // (2 * BHT_DTYPE.itemsize)
    for r in range(0, len(table), step):
        np.any(table[r:r + step], axis=1, out=out[r:r + step])
    return out


def bounded_map(pool: cf.Executor, fn: Callable[..., Any], items: Iterable[Any],
                depth: int) -> Iterator[Any]:
    """Like pool.map, in order, with at most ``depth`` items in flight (bounded memory)."""
    q: collections.deque[cf.Future] = collections.deque()
    it = iter(items)
    try:
        for item in it:
            q.append(pool.submit(fn, item))
            if len(q) >= depth:
                yield q.popleft().result()
        while q:
            yield q.popleft().result()
    finally:
        for f in q:
            f.cancel()


def bounded_unordered(pool: cf.Executor, fn: Callable[..., Any], items: Iterable[Any],
                      depth: int) -> Iterator[Any]:
    """Like :func:`bounded_map`, yielding results as they complete: one slow item does not
    leave the other workers idle (what restore needs: its jobs are independent)."""
    pending: set[cf.Future] = set()
    it = iter(items)
    try:
        for item in it:
            pending.add(pool.submit(fn, item))
            if len(pending) >= depth:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        while pending:
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done:
                yield f.result()
    finally:
        for f in pending:
            f.cancel()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
