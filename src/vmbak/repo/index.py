"""The chunk index: chunk id → (pack, offset, length, raw length).

Index files (``index/<hex>``) are envelopes (AAD ``b"vmbak-index"``) of a zstd frame of::

    b"VMBKIDX1" | u32 n_supersedes | n × 32-byte index ids it replaces
                | u32 n_packs | n × 32-byte pack ids
                | u32 n_entries | n × INDEX_ENTRY

They are written only after the packs they describe are durable. Packs that no
index file names (after a crash) are found by listing ``data/`` and read from their
own headers, so nothing that landed is ever stored twice.
"""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
from collections.abc import Iterator
from typing import IO, NamedTuple

import blake3
import numpy as np
import zstandard

from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo import zstd
from vmbak.repo.backend import makedirs_private
from vmbak.repo.cache import cache_root

INDEX_MAGIC = b"VMBKIDX1"
INDEX_AAD = b"vmbak-index"
INDEX_ENTRY = np.dtype([("id", "V32"), ("pack", "<u4"), ("off", "<u8"), ("len", "<u4"), ("raw", "<u4")])


class Location(NamedTuple):  # a tuple: a restore of a long chain makes tens of thousands at once
    pack: str  # hex pack id
    offset: int
    length: int
    raw_length: int


# The in-memory index (see docs/index-memory.md): one sorted table of columns, 48 bytes per
# chunk. ``key`` is the chunk id's first 8 bytes read big-endian (so sorting by key sorts
# by id prefix); ``r1``..``r3`` are its other 24 bytes; ``pack`` numbers a pack in
# ``Index.packs``. Offsets fit 32 bits: a pack is at most pack_size (<= 1 GiB) plus one chunk.
_COLS = {"key": np.dtype("<u8"), "r1": np.dtype("<u8"), "r2": np.dtype("<u8"), "r3": np.dtype("<u8"),
         "pack": np.dtype("<u4"), "off": np.dtype("<u4"), "len": np.dtype("<u4"), "raw": np.dtype("<u4")}
BYTES_PER_CHUNK = sum(d.itemsize for d in _COLS.values())
_REST = struct.Struct("<QQQ")
_MAX_OFF = (1 << 32) - 1
# Chunks added after the table was built wait in a dict (about 200 bytes each) until there
# are max(COMPACT_MIN, len(table) // COMPACT_DIV) of them; then they are merged in.
COMPACT_MIN = 1 << 16
COMPACT_DIV = 16


class _Table:
    """An immutable, sorted, duplicate-free set of columns (BYTES_PER_CHUNK per chunk)."""

    __slots__ = tuple(_COLS)

    def __init__(self, cols: dict[str, np.ndarray] | None = None) -> None:
        for name, dt in _COLS.items():
            setattr(self, name, np.zeros(0, dt) if cols is None else cols[name])

    def __len__(self) -> int:
        return len(self.key)

    def find(self, cid: bytes) -> int:
        """The row holding ``cid``, or -1."""
        key = self.key
        n = len(key)
        if not n:
            return -1
        k = int.from_bytes(cid[:8], "big")
        i = int(key.searchsorted(np.uint64(k)))
        if i >= n or int(key[i]) != k:
            return -1
        a, b, c = _REST.unpack_from(cid, 8)
        while i < n and int(key[i]) == k:  # more than one row only when 8-byte prefixes collide
            if int(self.r1[i]) == a and int(self.r2[i]) == b and int(self.r3[i]) == c:
                return i
            i += 1
        return -1

    def row(self, i: int) -> tuple[int, int, int, int]:
        return int(self.pack[i]), int(self.off[i]), int(self.len[i]), int(self.raw[i])


def _ids(cols: dict[str, np.ndarray] | _Table, start: int, stop: int) -> np.ndarray:
    """The chunk ids of rows [start, stop) as a V32 array."""
    get = cols.__getitem__ if isinstance(cols, dict) else lambda n: getattr(cols, n)
    key = get("key")[start:stop]
    out = np.empty((len(key), 4), "<u8")
    out[:, 0] = key.byteswap()
    out[:, 1] = get("r1")[start:stop]
    out[:, 2] = get("r2")[start:stop]
    out[:, 3] = get("r3")[start:stop]
    return out.view("V32").reshape(-1)


def _columns(entries: np.ndarray, pack_no: np.ndarray | int) -> dict[str, np.ndarray]:
    """Columns for PACK_ENTRY or INDEX_ENTRY rows (``pack_no``: their global pack numbers)."""
    n = len(entries)
    words = np.ascontiguousarray(entries["id"]).view("<u8").reshape(n, 4)
    cols = {"key": words[:, 0].byteswap(), "r1": words[:, 1].copy(), "r2": words[:, 2].copy(),
            "r3": words[:, 3].copy(), "pack": np.empty(n, "<u4"), "off": entries["off"].astype("<u4"),
            "len": entries["len"].astype("<u4"), "raw": entries["raw"].astype("<u4")}
    cols["pack"][:] = pack_no
    return cols


def _build(pieces: list[dict[str, np.ndarray]], doomed: set[int]) -> _Table:
    """Sort the rows of ``pieces`` by id and keep one row per id: the first one outside a
    doomed pack, else the first one. Column by column, so that the peak is the result plus
    two 8-byte columns per row."""
    cols: dict[str, np.ndarray] = {}
    for name, dt in _COLS.items():
        cols[name] = np.concatenate([p.pop(name) for p in pieces]) if pieces else np.zeros(0, dt)
        trim_heap()  # the pieces were small enough to live in the heap: give their pages back now
    pieces.clear()
    order = np.argsort(cols["key"])
    for name in _COLS:
        cols[name] = cols[name][order]
    key = cols["key"]
    eq = key[1:] == key[:-1]
    if eq.any():  # duplicated ids (and the rare colliding 8-byte prefixes): settle them exactly
        m = np.zeros(len(key), bool)
        m[1:] |= eq
        m[:-1] |= eq
        pos = np.flatnonzero(m)
        rank = order[pos]
        bad = np.isin(cols["pack"][pos], np.fromiter(doomed, np.uint32, len(doomed)))
        perm = np.lexsort((rank, bad, cols["r3"][pos], cols["r2"][pos], cols["r1"][pos], key[pos]))
        for name in _COLS:
            cols[name][pos] = cols[name][pos][perm]
        same = np.ones(len(pos) - 1, bool)
        for name in ("key", "r1", "r2", "r3"):
            v = cols[name][pos]
            same &= v[1:] == v[:-1]
        keep = np.ones(len(key), bool)
        keep[pos[1:][same]] = False
        del order
        for name in _COLS:
            cols[name] = cols[name][keep]
    return _Table(cols)


def _merge(table: _Table, new: dict[bytes, tuple[int, int, int, int]], over: set[bytes],
           base: _DiskTable | None = None) -> tuple[_Table, list[bytes]]:
    """A table holding ``table``'s rows and ``new``'s (rows in ``over`` replace the table's),
    and the ids of ``over`` whose replaced row is in ``base`` (they are inserted, and shadow it)."""
    fresh = [cid for cid in new if cid not in over]
    moved = [cid for cid in over if table.find(cid) < 0] if base is not None else []
    fresh += moved
    cols: dict[str, np.ndarray] = {}
    if fresh:
        arr = np.empty(len(fresh), [("id", "V32"), ("off", "<u8"), ("len", "<u4"), ("raw", "<u4")])
        arr["id"] = np.frombuffer(b"".join(fresh), "V32")
        rows = np.array([new[c] for c in fresh], np.uint64).reshape(-1, 4)
        arr["off"], arr["len"], arr["raw"] = rows[:, 1], rows[:, 2], rows[:, 3]
        add = _columns(arr, rows[:, 0].astype("<u4"))
        order = np.argsort(add["key"])
        at = table.key.searchsorted(add["key"][order])
        for name in _COLS:
            cols[name] = np.insert(getattr(table, name), at, add[name][order])
    else:
        cols = {name: getattr(table, name).copy() for name in _COLS}
    out = _Table(cols)
    for cid in over:
        i = out.find(cid)
        out.pack[i], out.off[i], out.len[i], out.raw[i] = new[cid]
    return out, moved


# -- the paged index (docs/index-memory.md, "Paged index"): above ``paged_rows`` rows the
# sorted table is built in an unlinked temporary file instead of in memory.
PAGED_ROWS = 4_000_000  # the default threshold: an in-memory build's peak stays <= ~256 MiB
PAGED_ROWS_ENV = "VMBAK_INDEX_PAGED_ROWS"
ROW = np.dtype([(name, dt) for name, dt in _COLS.items()])  # one row of the table file, 48 bytes
SPARSE_EVERY = 64  # the sparse array holds the key of every 64th row (3 KiB windows)
BUCKET_BITS = 12  # pass 1 sorts rows into 4096 buckets by the key's top 12 bits
SPILL_ROWS = 1 << 18  # pass 1 writes a group once this many rows are staged (plus the last piece)
RUN_ROWS = 1 << 19  # rows sorted at once in pass 2 (at least one whole bucket)


def paged_rows_setting() -> int:
    """The threshold from ``$VMBAK_INDEX_PAGED_ROWS``, else PAGED_ROWS."""
    v = os.environ.get(PAGED_ROWS_ENV, "").strip()
    if not v:
        return PAGED_ROWS
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise RepositoryError(f"${PAGED_ROWS_ENV} must be a number of rows (0 or more), not {v!r}")
    return n


def _temp_file(what: str) -> IO[bytes]:
    """A private temporary file, unlinked as soon as it is open (O_TMPFILE where the
    filesystem has it): in ``$VMBAK_CACHE_DIR/tmp`` (default ~/.cache/vmbak/tmp, usually a
    disk while /tmp may be RAM), else in $TMPDIR."""
    dirs = [tempfile.gettempdir()]
    if os.environ.get("VMBAK_CACHE_DIR") != "off":
        dirs.insert(0, os.path.join(cache_root(), "tmp"))
    err: OSError | None = None
    for d in dirs:
        try:
            makedirs_private(d)
            return tempfile.TemporaryFile(prefix=f"vmbak-{what}-", dir=d)
        except OSError as e:
            err = e
    raise RepositoryError(f"cannot create a temporary file for the paged index in {dirs[-1]}: "
                          f"{getattr(err, 'strerror', None) or err}")


def _write_at(fd: int, data: np.ndarray, offset: int) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def _read_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise RepositoryError("the paged index's temporary file is shorter than written")
        buf = buf[n:]
        offset += n


class _DiskTable:
    """An immutable, sorted, duplicate-free table of ROW records in an unlinked temporary
    file. A lookup binary-searches the in-memory ``sparse`` keys (every SPARSE_EVERY-th row)
    and reads the window of rows between two of them with os.pread: pread copies into a
    private buffer, so the file's pages stay in the page cache and out of the RSS (a mapping
    would count every page it touched). Safe from several threads (pread has no file position)."""

    __slots__ = ("_file", "_fd", "n", "sparse", "raw_total", "len_total")

    def __init__(self, file: IO[bytes], n: int, sparse: np.ndarray, raw_total: int, len_total: int) -> None:
        self._file = file  # closing it (when the table is freed) frees the disk space
        self._fd = file.fileno()
        self.n = n
        self.sparse = sparse
        self.raw_total = raw_total
        self.len_total = len_total

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a ROW array."""
        size = (stop - start) * ROW.itemsize
        data = os.pread(self._fd, size, start * ROW.itemsize)
        if len(data) != size:
            buf = bytearray(size)
            _read_into(self._fd, memoryview(buf), start * ROW.itemsize)
            data = bytes(buf)
        return np.frombuffer(data, ROW)

    def find(self, cid: bytes) -> tuple[int, int, int, int] | None:
        """(pack, offset, length, raw length) of ``cid``, or None."""
        if not self.n:
            return None
        k = int.from_bytes(cid[:8], "big")
        sp = self.sparse
        j = int(sp.searchsorted(np.uint64(k)))  # rows before sparse[j - 1]'s have smaller keys
        j2 = j
        while j2 < len(sp) and int(sp[j2]) == k:  # the prefix repeats across a window boundary
            j2 += 1
        w = self.rows(max(j - 1, 0) * SPARSE_EVERY, min(j2 * SPARSE_EVERY, self.n))
        keys = w["key"]
        i = int(keys.searchsorted(np.uint64(k)))
        want = _REST.unpack_from(cid, 8)
        while i < len(w) and int(keys[i]) == k:
            t = w[i].item()
            if t[1:4] == want:
                return t[4:]
            i += 1
        return None

    def blocks(self, step: int) -> Iterator[np.ndarray]:
        for s in range(0, self.n, step):
            yield self.rows(s, min(s + step, self.n))


def _block_cols(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(rows[name]) for name in _COLS}


def _drain(pieces: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    while pieces:
        yield pieces.pop(0)


class _Spill:
    """Pass 1 of a paged build: staged rows, written in groups to an unlinked temporary
    file, each group ordered by bucket (the key's top BUCKET_BITS bits; chunk ids are uniform
    hashes, so buckets are even). Within a bucket the rows keep their load order."""

    def __init__(self) -> None:
        self.file = _temp_file("index-spill")
        self.fd = self.file.fileno()
        self.end = 0
        self.groups: list[tuple[int, np.ndarray]] = []  # (file offset, bucket bounds: 4097 row numbers)

    def add(self, pieces: Iterator[dict[str, np.ndarray]] | list[dict[str, np.ndarray]], batch: int) -> None:
        """Write ``pieces`` in order, in groups of about ``batch`` rows (a list is emptied as
        it is written, so that each piece is freed once written)."""
        group: list[dict[str, np.ndarray]] = []
        rows = 0
        for p in _drain(pieces) if isinstance(pieces, list) else pieces:
            group.append(p)
            rows += len(p["key"])
            if rows >= batch:
                self._write(group, rows)
                group, rows = [], 0
        if group:
            self._write(group, rows)

    def _write(self, group: list[dict[str, np.ndarray]], n: int) -> None:
        if not n:
            return
        if n >= 1 << 32:
            raise RepositoryError("an index file names 2^32 chunks or more")
        arr = np.empty(n, ROW)
        pos = 0
        while group:
            p = group.pop(0)
            m = len(p["key"])
            for name in _COLS:
                arr[name][pos:pos + m] = p[name]
            pos += m
        bucket = (arr["key"] >> np.uint64(64 - BUCKET_BITS)).astype(np.uint16)
        order = np.argsort(bucket, kind="stable")  # stable: load order kept within a bucket
        bounds = np.zeros((1 << BUCKET_BITS) + 1, "<u4")
        np.cumsum(np.bincount(bucket, minlength=1 << BUCKET_BITS), out=bounds[1:])
        del bucket
        arr = arr[order]
        del order
        _write_at(self.fd, arr.view(np.uint8), self.end)
        self.groups.append((self.end, bounds))
        self.end += n * ROW.itemsize

    def build(self, doomed: set[int], run_rows: int) -> _DiskTable:
        """Pass 2: sort runs of whole buckets (about ``run_rows`` rows) one at a time, settle
        duplicates as the in-memory build does, and append them to the table file."""
        nb = 1 << BUCKET_BITS
        per_bucket = np.zeros(nb, np.int64)
        for _, b in self.groups:
            per_bucket += np.diff(b.astype(np.int64))
        cum = np.zeros(nb + 1, np.int64)
        np.cumsum(per_bucket, out=cum[1:])
        out = _temp_file("index")
        fd = out.fileno()
        sparse: list[np.ndarray] = []
        n_out = raw = stored = 0
        b0 = 0
        while b0 < nb:
            b1 = int(np.searchsorted(cum, cum[b0] + run_rows, "right")) - 1
            b1 = min(max(b1, b0 + 1), nb)
            m = int(cum[b1] - cum[b0])
            if m:
                arr = np.empty(m, ROW)
                mv = memoryview(arr.view(np.uint8))
                pos = 0
                for off, b in self.groups:
                    s, e = int(b[b0]), int(b[b1])
                    if e > s:
                        _read_into(self.fd, mv[pos * ROW.itemsize:(pos + e - s) * ROW.itemsize],
                                   off + s * ROW.itemsize)
                        pos += e - s
                del mv
                cols = _block_cols(arr)
                del arr
                t = _build([cols], doomed)
                rows = np.empty(len(t), ROW)
                for name in _COLS:
                    rows[name] = getattr(t, name)
                _write_at(fd, rows.view(np.uint8), n_out * ROW.itemsize)
                del rows
                first = (-n_out) % SPARSE_EVERY
                sparse.append(t.key[first::SPARSE_EVERY].copy())
                raw += int(t.raw.sum(dtype=np.uint64))
                stored += int(t.len.sum(dtype=np.uint64))
                n_out += len(t)
                del t
            b0 = b1
        self.file.close()
        keys = np.concatenate(sparse) if sparse else np.zeros(0, "<u8")
        return _DiskTable(out, n_out, keys, raw, stored)


def trim_heap() -> None:
    """Give the heap that loading left free back to the system. glibc raises its mmap
    threshold after the first large free, so the index files' buffers (megabytes each) come
    from the heap and stay in the RSS as free space (~20 bytes per chunk) until trimmed."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class Index:
    """The chunk index. Lookups are safe from several threads while one thread adds.

    Rows live in a sorted table of numpy columns (BYTES_PER_CHUNK bytes per chunk, found by
    binary search); chunks added later wait in a small dict until they are merged in. When
    more than ``paged_rows`` rows are loaded (default ``$VMBAK_INDEX_PAGED_ROWS``, else
    PAGED_ROWS), the loaded table is built in a temporary file instead (``paged``), and the
    in-memory table holds only the chunks added since (docs/index-memory.md)."""

    def __init__(self, paged_rows: int | None = None) -> None:
        self.packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self.pack_sizes: dict[str, int] = {}
        # Packs a prune mark condemned (see repo/marks.py): their copies of a chunk are
        # used only when no other copy is known, and never to deduplicate against.
        self.doomed: frozenset[str] = frozenset()
        self._doomed_no: set[int] = set()
        self.paged_rows = paged_rows_setting() if paged_rows is None else paged_rows
        # (paged table or None, table, recent, ids in recent that replace a row of either
        # table, ids in table that replace a row of the paged table): swapped as one, so a
        # reader never sees half of a merge. Lookups try recent, table, then the paged table.
        self._state: tuple[_DiskTable | None, _Table, dict[bytes, tuple[int, int, int, int]], set[bytes],
                           frozenset[bytes]] = (None, _Table(), {}, set(), frozenset())
        self._staged: list[dict[str, np.ndarray]] = []
        self._staged_rows = 0
        self._spill: _Spill | None = None

    @property
    def paged(self) -> bool:
        """Whether the loaded rows live in a temporary file (see ``paged_rows``)."""
        return self._state[0] is not None

    def __len__(self) -> int:
        base, table, recent, over, shadow = self._state
        n = len(table) + len(recent) - len(over)
        return n if base is None else n + len(base) - len(shadow)

    def _lookup(self, chunk_id: bytes) -> tuple[int, int, int, int] | None:
        base, table, recent, _, _ = self._state
        t = recent.get(chunk_id)
        if t is not None:
            return t
        i = table.find(chunk_id)
        if i >= 0:
            return table.row(i)
        return None if base is None else base.find(chunk_id)

    def __contains__(self, chunk_id: bytes) -> bool:
        return self._lookup(chunk_id) is not None

    def _pno(self, pack_id: str) -> int:
        n = self._pack_no.get(pack_id)
        if n is None:
            n = len(self.packs)
            self.packs.append(pack_id)
            self._pack_no[pack_id] = n
        return n

    def set_doomed(self, packs: set[str] | frozenset[str]) -> None:
        """Declare the packs prune marks condemned; call before ``commit``/``add_pack``."""
        self.doomed = frozenset(packs)
        self._doomed_no = {self._pno(p) for p in packs}

    # -- bulk loading: stage every index file and pack header, then commit once
    def stage(self, pack_ids: list[str], entries: np.ndarray, size: int | None = None) -> None:
        """Stage rows for ``commit``: INDEX_ENTRY rows (``pack`` numbers ``pack_ids``), or
        PACK_ENTRY rows of the single pack in ``pack_ids``. IntegrityError if out of range."""
        if len(entries) and int(entries["off"].max()) > _MAX_OFF:
            raise IntegrityError("a chunk offset lies beyond 4 GiB (no pack is that large)")
        nos = np.fromiter((self._pno(p) for p in pack_ids), np.uint32, len(pack_ids))
        if "pack" in (entries.dtype.names or ()):
            pack_no: np.ndarray | int = nos[entries["pack"]]
        else:
            pack_no = int(nos[0])
            if size is not None:
                self.pack_sizes[pack_ids[0]] = size
        self._staged.append(_columns(entries, pack_no))
        self._staged_rows += len(entries)
        if self._spill is None and self._staged_rows + len(self) > self.paged_rows:
            self._start_spill()
        if self._spill is not None and self._staged_rows >= SPILL_ROWS:
            self._spill.add(self._staged, SPILL_ROWS)
            self._staged_rows = 0

    def _start_spill(self) -> None:
        """Page this load: what the index held before goes first (its rows win ties, as in
        the in-memory build), then everything staged."""
        spill = _Spill()
        spill.add(self._existing_pieces(), SPILL_ROWS)
        self._spill = spill

    def _existing_pieces(self) -> Iterator[dict[str, np.ndarray]]:
        """The rows the index holds now, as column pieces (the paged table's a block at a time)."""
        base, table, recent, over, _ = self._state
        if recent:
            table, _ = _merge(table, recent, over, base)
        if len(table):
            yield {n: getattr(table, n) for n in _COLS}
        if base is not None:
            # (the paged rows that ``shadow`` replaced come along: the table's copy is outside
            # the doomed packs and comes first, so the build keeps it)
            for rows in base.blocks(SPILL_ROWS):
                yield _block_cols(rows)

    def commit(self) -> None:
        """Build the table from everything staged (and what the index held before)."""
        trim_heap()  # what decoding the index files left free, before the sort's peak
        if self._spill is None and self._staged_rows + len(self) > self.paged_rows:
            self._start_spill()
        spill, self._spill = self._spill, None
        if spill is not None:
            spill.add(self._staged, SPILL_ROWS)
            self._staged_rows = 0
            base = spill.build(self._doomed_no, RUN_ROWS)
            self._state = (base, _Table(), {}, set(), frozenset())
            trim_heap()
            return
        base, table, recent, over, _ = self._state
        if base is not None:
            pieces = [*self._existing_pieces(), *self._staged]
        else:
            if recent:
                table, _ = _merge(table, recent, over)
            pieces = [{n: getattr(table, n) for n in _COLS}] + self._staged if len(table) else self._staged
        self._staged = []
        self._staged_rows = 0
        del table, base
        self._state = (None, _build(pieces, self._doomed_no), {}, set(), frozenset())
        trim_heap()

    # -- adding packs one by one (a writer)
    def add_pack(self, pack_id: str, entries: np.ndarray, size: int | None = None) -> None:
        n = self._pno(pack_id)
        if size is not None:
            self.pack_sizes[pack_id] = size
        if len(entries) and int(entries["off"].max()) > _MAX_OFF:
            raise IntegrityError(f"pack {pack_id[:16]}: a chunk offset lies beyond 4 GiB")
        base, table, recent, over, shadow = self._state
        dn = self._doomed_no
        replace = n not in dn  # a copy outside doomed packs wins over a doomed one
        for cid, off, ln, raw in zip(entries["id"].tolist(), entries["off"].tolist(), entries["len"].tolist(),
                                     entries["raw"].tolist(), strict=True):
            t = recent.get(cid)
            if t is None:
                i = table.find(cid)
                if i >= 0:
                    if replace and dn and int(table.pack[i]) in dn:
                        over.add(cid)
                        recent[cid] = (n, off, ln, raw)
                    continue
                r = None if base is None else base.find(cid)
                if r is None:
                    recent[cid] = (n, off, ln, raw)
                elif replace and dn and r[0] in dn:
                    over.add(cid)
                    recent[cid] = (n, off, ln, raw)
            elif replace and t[0] in dn:
                recent[cid] = (n, off, ln, raw)
        # (paged: the in-memory table holds only what this process added, so the dict stays small)
        if len(recent) >= max(COMPACT_MIN, len(table) // COMPACT_DIV):
            merged, moved = _merge(table, recent, over, base)
            self._state = (base, merged, {}, set(), shadow.union(moved) if moved else shadow)

    def usable(self, chunk_id: bytes) -> bool:
        """Whether a writer may reference this chunk without storing it: it has a copy in
        a pack that no prune mark condemned."""
        t = self._lookup(chunk_id)
        return t is not None and t[0] not in self._doomed_no

    def get(self, chunk_id: bytes) -> Location | None:
        t = self._lookup(chunk_id)
        if t is None:
            return None
        return Location(self.packs[t[0]], t[1], t[2], t[3])

    def get_many(self, chunk_ids: list[bytes]) -> list[Location | None]:
        """:meth:`get` of each id, the table searched for all of them at once (a restore of
        a long chain looks up tens of thousands: one by one, that took 15 us each)."""
        n = len(chunk_ids)
        if not n or any(len(c) != 32 for c in chunk_ids):
            return [self.get(c) for c in chunk_ids]
        base, table, recent, _, _ = self._state
        words = np.frombuffer(b"".join(chunk_ids), "<u8").reshape(n, 4)
        key = words[:, 0].byteswap()
        m = len(table)
        packs = self.packs
        if m:
            i = np.minimum(table.key.searchsorted(key), m - 1)
            key_eq = table.key[i] == key
            hit = key_eq & (table.r1[i] == words[:, 1]) & (table.r2[i] == words[:, 2]) & (table.r3[i] == words[:, 3])
            cols = (table.pack[i].tolist(), table.off[i].tolist(), table.len[i].tolist(), table.raw[i].tolist())
            if not recent and hit.all():  # the common case, without a loop in Python
                return list(map(Location, map(packs.__getitem__, cols[0]), *cols[1:]))
            rows = list(zip(*cols, strict=True))
            hits, near = hit.tolist(), (key_eq & ~hit).tolist()
        else:
            rows, hits, near = [], [False] * n, [False] * n
        out: list[Location | None] = []
        for k, cid in enumerate(chunk_ids):
            t = recent.get(cid) if recent else None
            if t is None:
                if hits[k]:
                    t = rows[k]
                elif near[k]:  # 8-byte prefixes collide: the row may be a later one
                    t = self._lookup(cid)
                elif base is not None:  # paged: the rows loaded from the index files
                    t = base.find(cid)
            out.append(None if t is None else Location(packs[t[0]], t[1], t[2], t[3]))
        return out

    def known_packs(self) -> set[str]:
        return set(self.packs)

    def totals(self) -> tuple[int, int]:
        """(sum of raw lengths, sum of stored lengths) over all chunks."""
        base, table, recent, over, shadow = self._state
        raw = int(table.raw.sum(dtype=np.uint64)) + sum(t[3] for t in recent.values())
        stored = int(table.len.sum(dtype=np.uint64)) + sum(t[2] for t in recent.values())
        if base is not None:
            raw += base.raw_total
            stored += base.len_total
            for cid in shadow:  # in both tables: the paged row does not count
                r = base.find(cid)
                assert r is not None
                raw -= r[3]
                stored -= r[2]
        for cid in over:  # counted in a table too
            i = table.find(cid)
            r = table.row(i) if i >= 0 else base.find(cid) if base is not None else None
            assert r is not None
            raw -= r[3]
            stored -= r[2]
        return raw, stored

    def items(self):  # noqa: ANN201 - iterator of (id, Location)
        base, table, recent, over, shadow = self._state
        packs = self.packs
        for cid, t in recent.items():
            yield cid, Location(packs[t[0]], t[1], t[2], t[3])
        step = 1 << 16
        for s in range(0, len(table), step):
            yield from _items_of(table, s, s + step, over, packs)
        if base is not None:
            skip = over | shadow
            for rows in base.blocks(step):
                yield from _items_of({n: rows[n] for n in _COLS}, 0, len(rows), skip, packs)


def _items_of(cols: dict[str, np.ndarray] | _Table, start: int, stop: int, skip: set[bytes] | frozenset[bytes],
              packs: list[str]) -> Iterator[tuple[bytes, Location]]:
    get = cols.__getitem__ if isinstance(cols, dict) else lambda n: getattr(cols, n)
    ids = _ids(cols, start, stop).tolist()
    rows = zip(get("pack")[start:stop].tolist(), get("off")[start:stop].tolist(),
               get("len")[start:stop].tolist(), get("raw")[start:stop].tolist(), strict=True)
    for cid, (p, o, ln, r) in zip(ids, rows, strict=True):
        if cid not in skip:
            yield cid, Location(packs[p], o, ln, r)


def encode_index(pack_entries: list[tuple[str, np.ndarray]], supersedes: list[str] | None = None) -> bytes:
    """Serialise the entries of some packs into an index file's plaintext."""
    supersedes = supersedes or []
    parts = [INDEX_MAGIC, struct.pack("<I", len(supersedes))]
    parts += [bytes.fromhex(s) for s in supersedes]
    parts.append(struct.pack("<I", len(pack_entries)))
    parts += [bytes.fromhex(p) for p, _ in pack_entries]
    total = sum(len(e) for _, e in pack_entries)
    arr = np.zeros(total, dtype=INDEX_ENTRY)
    pos = 0
    for i, (_, e) in enumerate(pack_entries):
        sl = arr[pos:pos + len(e)]
        sl["id"] = e["id"]
        sl["pack"] = i
        sl["off"] = e["off"]
        sl["len"] = e["len"]
        sl["raw"] = e["raw"]
        pos += len(e)
    parts.append(struct.pack("<I", total))
    parts.append(arr.tobytes())
    return zstandard.ZstdCompressor(level=3).compress(b"".join(parts))


def max_plain_size(compressed: int) -> int:
    """The most an index file (or a prune mark) of ``compressed`` bytes may decompress to.

    Both consist mostly of keyed hashes (chunk and pack ids), which do not compress: a
    real index entry of 52 bytes compresses to about 38, so 8 times the compressed size
    leaves a wide margin while a decompression bomb is refused."""
    return 8 * compressed + (64 << 10)


def decode_index_flat(payload: bytes, what: str) -> tuple[list[str], list[str], np.ndarray]:
    """Return (supersedes, pack ids, INDEX_ENTRY rows) from an index plaintext."""
    raw = zstd.decompress(payload, max_plain_size(len(payload)), what)
    try:
        if raw[:8] != INDEX_MAGIC:
            raise IntegrityError(f"{what}: bad magic")
        pos = 8
        (ns,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        sup = [raw[pos + 32 * i:pos + 32 * (i + 1)].hex() for i in range(ns)]
        pos += 32 * ns
        (npk,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        packs = [raw[pos + 32 * i:pos + 32 * (i + 1)].hex() for i in range(npk)]
        pos += 32 * npk
        (ne,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if len(raw) != pos + ne * INDEX_ENTRY.itemsize:
            raise IntegrityError(f"{what}: size mismatch")
        arr = np.frombuffer(raw, dtype=INDEX_ENTRY, count=ne, offset=pos)
    except struct.error:
        raise IntegrityError(f"{what}: truncated") from None
    if ne and int(arr["pack"].max()) >= npk:
        raise IntegrityError(f"{what}: entry names an unknown pack")
    if ne and int(arr["off"].max()) > _MAX_OFF:
        raise IntegrityError(f"{what}: a chunk offset lies beyond 4 GiB")
    return sup, packs, arr


def decode_index(payload: bytes, what: str) -> tuple[list[str], list[tuple[str, np.ndarray]]]:
    """Return (supersedes, [(pack_id, PACK-like entries)]) from an index plaintext."""
    sup, packs, arr = decode_index_flat(payload, what)
    npk = len(packs)
    order = np.argsort(arr["pack"], kind="stable")
    arr = arr[order]
    bounds = np.searchsorted(arr["pack"], np.arange(npk + 1))
    out = []
    for i, p in enumerate(packs):
        out.append((p, arr[bounds[i]:bounds[i + 1]]))
    return sup, out


def index_id(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()
