"""Repository check: structure (packs, index, manifests) and, with read_data, every chunk.

Reading the data can be limited to a subset of the packs (``n/t``, ``x%``, a size), to
packs not verified recently, or to what an interrupted run did not reach; every pack
found sound is recorded in the repository's verification coverage (repo/coverage.py),
which every host shares. Packs are read by a thread pool, each pack by one thread, in
order, in windows of a few MiB; hashing, decryption and decompression release the GIL,
so the threads run in parallel.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import blake3
import numpy as np

from vmbak.buffers import ThreadBuffers
from vmbak.engine.common import bounded_map, range_text, runs
from vmbak.engine.progress import NoProgress, Progress
from vmbak.errors import IntegrityError, RepositoryError, VmbakError
from vmbak.repo import zstd
from vmbak.repo.backend import LocalBackend, ObjectMissing, OpenFiles
from vmbak.repo.coverage import CoverageWriter, load_coverage
from vmbak.repo.crypto import CHUNK_ID_BLOCKS, ID_GRAIN
from vmbak.repo.manifest import Manifest
from vmbak.repo.marks import load_marks
from vmbak.repo.pack import (
    CODEC_RAW,
    CODEC_ZSTD,
    CODEC_ZSTD_FRAMES,
    chunk_aad,
    header_at,
    pack_name,
    read_header,
)
from vmbak.repo.repository import Repository


@dataclass
class Subset:
    """Which packs a ``--read-data-subset`` reads: ``n/t`` (a fixed partition of the packs
    by id, so that runs 1/t .. t/t read every pack exactly once), ``x%`` (that share of the
    packs) or a size (packs up to that many stored bytes). The last two choose at random
    among the packs verified longest ago (never verified first), so that repeated runs
    cover the whole repository: ceil(100/x) runs of ``x%`` read every pack."""

    text: str
    n: int = 0
    t: int = 0
    percent: float = 0.0
    size: int = 0

    def select(self, packs: dict[str, int], last: dict[str, str] | None = None) -> list[str]:
        """The chosen pack ids, sorted, from ``packs`` (id -> stored size); ``last`` gives
        the time each pack was last verified (coverage records)."""
        if self.t:
            return sorted(p for p in packs if int(p, 16) % self.t == self.n - 1)
        rng = random.SystemRandom()
        last = last or {}
        keyed = {p: rng.random() for p in packs}
        ids = sorted(packs, key=lambda p: (last.get(p, ""), keyed[p]))
        if self.percent:
            k = min(len(ids), math.ceil(len(ids) * self.percent / 100))
            return sorted(ids[:k])
        out, total = [], 0
        for p in ids:
            if total + packs[p] <= self.size:
                out.append(p)
                total += packs[p]
        return sorted(out)


def parse_subset(text: str) -> Subset:
    """``n/t`` (1 <= n <= t), ``x%`` (0 < x <= 100) or a size such as ``500M``, ``50G``
    (K, M, G, T: powers of 1024); VmbakError otherwise."""
    s = text.strip()
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    if m:
        n, t = int(m.group(1)), int(m.group(2))
        if not 1 <= n <= t:
            raise VmbakError(f"bad subset {text!r}: in n/t, n must be from 1 to t")
        return Subset(text, n=n, t=t)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
    if m:
        x = float(m.group(1))
        if not 0 < x <= 100:
            raise VmbakError(f"bad subset {text!r}: a percentage must be above 0 and at most 100")
        return Subset(text, percent=x)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", s.lower())
    if m and float(m.group(1)) > 0:
        mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
        return Subset(text, size=int(float(m.group(1)) * mult))
    raise VmbakError(f"bad subset {text!r} (use n/t such as 1/7, a percentage such as 10%, or a size such as 50G)")


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    snapshots: int = 0
    packs: int = 0
    chunks: int = 0
    bytes_read: int = 0
    damaged_snapshots: dict[str, list[str]] = field(default_factory=dict)
    damaged_manifests: dict[str, str] = field(default_factory=dict)  # unreadable manifests: id -> reason
    read_packs: list[str] = field(default_factory=list)       # packs read with --read-data*, sorted
    skipped_packs: int = 0        # present packs not read (outside the subset, recently verified, resumed)
    selection: dict = field(default_factory=dict)              # how the packs to read were chosen
    duration_s: float = 0.0
    read_seconds: float = 0.0     # time spent reading and verifying packs
    # Not in the JSON: what repair needs. chunk id -> why it cannot be used; packs that are
    # missing or damaged (named by the index, or present with an unreadable header or bad data).
    bad_chunks: dict[bytes, str] = field(default_factory=dict)
    bad_packs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "snapshots": self.snapshots,
                "packs": self.packs, "chunks": self.chunks, "bytes_read": self.bytes_read,
                "damaged_snapshots": self.damaged_snapshots, "damaged_manifests": self.damaged_manifests,
                "read_packs": self.read_packs, "packs_read": len(self.read_packs),
                "skipped_packs": self.skipped_packs, "selection": self.selection,
                "duration_s": round(self.duration_s, 3), "read_seconds": round(self.read_seconds, 3),
                "read_bytes_per_s": round(self.bytes_read / self.read_seconds) if self.read_seconds else None}


def default_workers() -> int:
    """Threads that read and verify packs: one per core, at least two (reads overlap the CPU work)."""
    return max(2, os.cpu_count() or 2)


def check(repo: Repository, read_data: bool = False, workers: int | None = None,
          progress: Progress | None = None, subset: Subset | None = None, resume: bool = False,
          older_than: float | None = None, locked: bool = False) -> CheckReport:
    """Check the repository's structure and, with ``read_data`` (or a ``subset``), read and
    verify packs. ``older_than`` (seconds) reads only packs not verified that recently;
    ``resume`` skips the packs the last unfinished run verified. Every pack read and found
    sound is recorded in the repository's verification coverage (``verify/``). With
    ``locked``, the caller already holds a lock (repair does)."""
    t_start = time.monotonic()
    progress = progress or NoProgress()
    workers = workers or default_workers()
    read_data = read_data or subset is not None or resume or older_than is not None
    rep = CheckReport()
    with contextlib.nullcontext() if locked else repo.lock(purpose="check"):
        # 1. index files: each must open; collect what they claim. 2. the packs present.
        # 3. the prune marks (read last: a pack a sweep deleted meanwhile is then either
        # still doomed by a mark, or the index files that named it are gone, and we look again).
        for attempt in range(10):
            claimed, index_errors, files, gone = _read_index_files(repo)
            if gone and attempt < 9:
                continue
            present = {name.rsplit("/", 1)[-1]: size for name, size in repo.backend.list("data")}
            marks, mark_problems = load_marks(repo.backend, repo.sealer)
            doomed = {p for mk in marks for p in mk.doomed}
            lost = set(claimed) - set(present) - doomed
            if lost and attempt < 9 and not all(repo.backend.exists(f) for f in files):
                continue  # a prune sweep ran meanwhile: look again
            break
        rep.errors.extend(index_errors)
        rep.errors.extend(f"{p}; it is never acted upon, and the next 'vmbak prune' removes it"
                          for p in mark_problems)
        rep.packs = len(present)
        bad_chunks = rep.bad_chunks
        for pid in sorted(set(claimed) - set(present)):
            if pid in doomed:
                # Deleted by a prune sweep (condemned by a mark): not damage. Its chunks
                # count as missing only where no other copy is known (checked below).
                rep.warnings.append(f"pack {pid[:16]} is condemned by a prune mark and already deleted "
                                    "(the next 'vmbak prune' drops it from the index)")
                for cid in claimed[pid]["id"].tolist():
                    loc = repo.index.get(cid)
                    if loc is None or loc.pack == pid:
                        bad_chunks[cid] = f"pack {pid[:16]} was deleted by prune"
                continue
            rep.errors.append(f"pack {pid[:16]} is named by the index but missing")
            rep.bad_packs[pid] = "missing"
            for cid in claimed[pid]["id"].tolist():
                bad_chunks[cid] = f"pack {pid[:16]} is missing"
        for pid in sorted(set(claimed) & set(present)):
            try:
                hdr = read_header(repo.backend, repo.sealer, pid, present[pid])
            except RepositoryError as e:
                rep.errors.append(str(e))
                rep.bad_packs[pid] = str(e)
                for cid in claimed[pid]["id"].tolist():
                    bad_chunks[cid] = f"pack {pid[:16]} is damaged"
                continue
            a = np.sort(hdr[["id", "off", "len", "raw"]].astype(hdr.dtype), order="id")
            b_src = claimed[pid]
            b = np.zeros(len(b_src), hdr.dtype)
            for f in ("id", "off", "len", "raw"):
                b[f] = b_src[f]
            b = np.sort(b, order="id")
            if len(a) != len(b) or not (a == b).all():
                rep.errors.append(f"pack {pid[:16]}: index disagrees with the pack header")
        for pid in sorted(set(present) - set(claimed)):
            if pid in doomed:
                rep.warnings.append(f"pack {pid[:16]} is condemned by a prune mark and awaits deletion "
                                    "(the next 'vmbak prune' sweeps it)")
            else:
                try:
                    read_header(repo.backend, repo.sealer, pid, present[pid])
                except ObjectMissing:
                    continue
                except RepositoryError as e:
                    rep.warnings.append(f"{e}; it is in no index file, so nothing uses it "
                                        "('vmbak repair snapshots' sets it aside)")
                    rep.bad_packs[pid] = str(e)
                    continue
                rep.warnings.append(f"pack {pid[:16]} is not in any index file (left by an interrupted "
                                    "backup; its chunks are used)")
        # 3. read the packs (data check)
        if read_data:
            _read_packs(repo, rep, present, claimed, workers, progress, subset, resume, older_than)
        # 4. manifests: every chunk they name is indexed and intact
        index = repo.index
        rep.chunks = len(index)
        ms = repo.manifests()
        rep.snapshots = len(ms)
        damaged = repo.damaged_manifests()
        rep.damaged_manifests = damaged
        for sid, deps in _dependents(ms, damaged).items():
            why = damaged[sid].removeprefix(f"snapshot {sid[:8]}: ")
            rep.errors.append(f"snapshot {sid} is damaged ({why})"
                              + (f"; snapshots that depend on it cannot be restored: {', '.join(deps)}"
                                 if deps else "")
                              + f"; 'vmbak forget {sid}' removes it")
        _check_manifests(repo, ms, index, bad_chunks, rep)
    rep.duration_s = time.monotonic() - t_start
    return rep


# A pack is verified in windows of about this many bytes that end at chunk boundaries (a
# local one read into a buffer each thread reuses): the window is still in the CPU's
# cache when it is hashed, decrypted and decompressed. A whole pack (32 MiB) is not:
# reading and hashing the 0.6 GiB of bench_verify's repository took 0.28 s whole
# against 0.20 s in windows of 1-4 MiB (0.23 s in 8 MiB).
_WINDOW = 2 << 20
_windows = ThreadBuffers(_WINDOW)
_payloads = ThreadBuffers()


def _verify_chunk(repo: Repository, cid: bytes, blob: memoryview, raw: int, label: str) -> None:
    """Authenticate one blob, decompress it and check its length and id (no copies of
    stored plaintext); IntegrityError if anything is wrong."""
    out = _payloads.view(len(blob))  # this thread's, reused: no allocation per chunk
    n = repo.sealer.open_into(blob, chunk_aad(cid), label, out)
    if not n:
        raise IntegrityError(f"{label}: empty payload")
    if raw > repo.max_chunk:
        raise IntegrityError(f"{label}: claims {raw} bytes, more than a chunk of this repository holds "
                             f"({repo.max_chunk})")
    payload = out[:n]
    body = payload[1:]
    if payload[0] == CODEC_ZSTD:
        data: bytes | memoryview = zstd.decompress(body, raw, label)
    elif payload[0] == CODEC_ZSTD_FRAMES:
        sealer = repo.sealer
        if sealer.chunk_ids == CHUNK_ID_BLOCKS and zstd.frames_table(body, raw, label)[0] == ID_GRAIN:
            # each frame is one piece of the id: hashed as soon as it is decoded, while it
            # is in the cache, and never joined into the whole chunk
            hashes = b"".join([sealer.block_hash(part) for part in zstd.frames(body, raw, label)])
            if sealer.chunk_id_from_hashes(hashes, raw) != cid:
                raise IntegrityError(f"{label}: content does not match its id (corrupt data)")
            return
        data = zstd.decompress_frames(body, raw, label)
    elif payload[0] == CODEC_RAW:
        data = body
    else:
        raise IntegrityError(f"{label}: unknown codec {payload[0]}")
    if len(data) != raw or repo.sealer.chunk_id(data) != cid:
        raise IntegrityError(f"{label}: content does not match its id (corrupt data)")


def _verify_pack(repo: Repository, pid: str,
                 files: OpenFiles | None = None) -> tuple[list[tuple[bytes, str]], str | None]:
    """Read one pack and verify it: its name (BLAKE3 of all its bytes), its header, and
    every chunk (authenticated, decompressed, length and id checked). Returns the bad
    chunks and a pack-level error. Thread-safe; the heavy work releases the GIL.

    The pack is taken in order in windows (see _WINDOW): each is hashed into the pack's
    name and its chunks verified before the next. A local pack is read window by window
    (``files`` keeps its descriptor open between them); one on object storage is fetched
    whole (one request) and then walked the same way."""
    name = pack_name(pid)
    backend = repo.backend
    try:
        if isinstance(backend, LocalBackend):
            return _verify_windows(repo, pid, backend.size(name), _reader(backend, name, pid, files))
        data = memoryview(backend.read(name))
        return _verify_windows(repo, pid, len(data), lambda pos, n: data[pos:pos + n])
    except RepositoryError as e:
        return [], str(e)


def _reader(backend: LocalBackend, name: str, pid: str,
            files: OpenFiles | None) -> Callable[[int, int], memoryview]:
    """``read(pos, n)``: ``n`` bytes of a local pack from ``pos``, in this thread's window
    buffer (valid until its next read)."""
    def read(pos: int, n: int) -> memoryview:
        buf = _windows.view(n)
        if backend.read_range_into(name, pos, buf, files) < n:
            raise RepositoryError(f"pack {pid[:16]}: shorter than its size (truncated while read)")
        return buf
    return read


def _verify_windows(repo: Repository, pid: str, size: int,
                    read: Callable[[int, int], memoryview]) -> tuple[list[tuple[bytes, str]], str | None]:
    """:func:`_verify_pack` of a pack of ``size`` bytes that ``read(pos, n)`` returns."""
    try:
        hdr = header_at(lambda pos, n: bytes(read(pos, n)), repo.sealer, size, f"pack {pid[:16]}")
    except IntegrityError as e:
        return [], str(e)
    order = np.argsort(hdr["off"], kind="stable")
    offs = hdr["off"][order].astype(np.int64)
    ends = offs + hdr["len"][order].astype(np.int64)
    if len(order) > 1 and (offs[1:] < ends[:-1]).any():  # overlapping blobs (not written by vmbak)
        data = read(0, size)
        hasher = blake3.blake3(data)
        return _verify_chunks(repo, hdr, order.tolist(), data, 0), _name_error(hasher, pid)
    hasher = blake3.blake3()
    bad: list[tuple[bytes, str]] = []
    pos = i = 0
    n = len(order)
    ends_l = ends.tolist()
    while i < n:  # a window: from pos to the end of the chunks that fit in _WINDOW (at least one)
        j = max(i + 1, int(np.searchsorted(ends, pos + _WINDOW, "right")))
        end = ends_l[j - 1]
        data = read(pos, end - pos)
        hasher.update(data)
        bad += _verify_chunks(repo, hdr, order[i:j].tolist(), data, pos)
        pos, i = end, j
    while pos < size:  # what follows the last chunk: the header and the trailer
        k = min(_WINDOW, size - pos)
        hasher.update(read(pos, k))
        pos += k
    return bad, _name_error(hasher, pid)


def _verify_chunks(repo: Repository, hdr: np.ndarray, which: Iterable[int], data: memoryview,
                   base: int) -> list[tuple[bytes, str]]:
    """Verify the chunks ``which`` (rows of a pack's header) in ``data``, which holds the
    pack's bytes from offset ``base``; return the bad ones with their errors."""
    bad = []
    ids, offs, lens, raws = hdr["id"], hdr["off"], hdr["len"], hdr["raw"]
    for k in which:
        cid, off = ids[k].tobytes(), int(offs[k]) - base
        try:
            _verify_chunk(repo, cid, data[off:off + int(lens[k])], int(raws[k]), f"chunk {cid.hex()[:16]}")
        except IntegrityError as e:
            bad.append((cid, str(e)))
    return bad


def _name_error(hasher: blake3.blake3, pid: str) -> str | None:
    if hasher.hexdigest() != pid:
        return f"pack {pid[:16]}: content does not match its name (corrupt)"
    return None


def _read_packs(repo: Repository, rep: CheckReport, present: dict[str, int], claimed: dict[str, np.ndarray],
                workers: int, progress: Progress, subset: Subset | None, resume: bool,
                older_than: float | None) -> None:
    """Choose the packs to read (subset, age, resume), read them in parallel and record
    the sound ones in the verification coverage."""
    cov = load_coverage(repo.backend, repo.sealer)
    for p in cov.problems:
        rep.warnings.append(f"{p}; it is ignored (the packs it named count as not verified)")
    chosen = subset.select(present, cov.packs) if subset else sorted(present)
    sel: dict = {"subset": subset.text if subset else None, "chosen": len(chosen)}
    if older_than is not None:
        limit = datetime.now(UTC).timestamp() - older_than
        before = len(chosen)
        chosen = [p for p in chosen if (t := cov.last_verified(p)) is None or t.timestamp() < limit]
        sel["older_than_s"] = older_than
        sel["recently_verified"] = before - len(chosen)
    if resume:
        run = cov.unfinished_run()
        if run is None:
            sel["resumed"] = None
            rep.warnings.append("nothing to resume: the last check run finished; reading the selection whole")
        else:
            before = len(chosen)
            chosen = [p for p in chosen if cov.packs.get(p, "") < run.started]
            sel["resumed"] = {"run": run.run, "started": run.started, "already_verified": before - len(chosen)}
    rep.selection = sel
    rep.skipped_packs = len(present) - len(chosen)
    every = int(os.environ.get("VMBAK_VERIFY_RECORD_PACKS", "64") or 64)
    writer = CoverageWriter(repo.backend, repo.sealer, every_packs=every)
    progress.start(sum(present[p] for p in chosen), "check")
    t0 = time.monotonic()
    # each thread keeps the descriptor of the local pack it reads open between windows
    files = OpenFiles(1) if isinstance(repo.backend, LocalBackend) else None
    with files or contextlib.nullcontext(), \
            cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmbak-check") as pool:
        for pid, (bad, err) in zip(chosen, bounded_map(pool, lambda p: _verify_pack(repo, p, files),
                                                       chosen, 2 * workers), strict=True):
            size = present[pid]
            rep.bytes_read += size
            rep.read_packs.append(pid)
            progress.advance(size)
            if err:
                rep.errors.append(err)
                rep.bad_packs[pid] = err
                if not bad and pid in claimed:
                    for cid in claimed[pid]["id"].tolist():
                        rep.bad_chunks.setdefault(cid, err)
            for cid, msg in bad:
                rep.errors.append(f"pack {pid[:16]}: {msg}")
                rep.bad_chunks[cid] = msg
                rep.bad_packs.setdefault(pid, msg)
            if not err and not bad:
                writer.add(pid)
    rep.read_seconds = time.monotonic() - t0
    progress.close()
    writer.finish(cov, set(present))
    rep.warnings.extend(writer.errors)


def _read_index_files(repo: Repository) -> tuple[dict[str, np.ndarray], list[str], list[str], bool]:
    """What the index files claim (pack -> entries), one error per damaged file, the files
    listed, and whether one vanished while being read (a consolidation is under way)."""
    claimed: dict[str, np.ndarray] = {}
    errors: list[str] = []
    files = sorted(n for n, _ in repo.backend.list("index"))
    for name in files:
        try:
            packs = repo.read_index_file(name)
        except ObjectMissing:
            return claimed, errors, files, True
        except RepositoryError as e:
            errors.append(f"{e}; its packs are read from their headers; 'vmbak repair index' rebuilds the index")
            continue
        for pid, ent in packs:
            claimed[pid] = ent
    return claimed, errors, files, False


def _dependents(ms: list[Manifest], damaged: dict[str, str]) -> dict[str, list[str]]:
    """For each damaged manifest, the short ids of the readable snapshots whose chain needs it."""
    by_id = {m.id: m for m in ms}
    out: dict[str, list[str]] = {sid: [] for sid in sorted(damaged)}
    for m in ms:
        p, steps = m.parent, 0
        while p is not None and p in by_id and steps <= len(by_id):
            p, steps = by_id[p].parent, steps + 1
        if p in out:
            out[p].append(m.short_id)
    return out


def _own_damage(m: Manifest, index, bad_chunks: dict[bytes, str]) -> tuple[np.ndarray | None, bool]:  # noqa: ANN001
    """Blocks of ``m``'s own extents whose chunks are missing or corrupt, and whether its
    block hash table is damaged."""
    ids = m.ext_id.tolist()
    missing = np.array([cid not in index or cid in bad_chunks for cid in ids], bool)
    mask = None
    if missing.any():
        mask = np.zeros(m.block_count, bool)
        for j in np.flatnonzero(missing).tolist():
            s, c = int(m.ext_start[j]), int(m.ext_count[j])
            mask[s:s + c] = True
    bht_bad = any(cid not in index or cid in bad_chunks for cid in m.bht_chunks)
    return mask, bht_bad


def _check_manifests(repo: Repository, ms: list[Manifest], index, bad_chunks: dict[bytes, str],  # noqa: ANN001
                     rep: CheckReport) -> None:
    """Name every snapshot whose restore would meet a missing or corrupt chunk, with the
    block ranges affected, following each incremental's chain to its full."""
    own = {m.id: _own_damage(m, index, bad_chunks) for m in ms}
    for m in ms:
        problems: list[str] = []
        try:
            chain = repo.chain(m)
        except RepositoryError as e:
            chain = [m]
            problems.append(str(e))
        damaged = np.zeros(m.block_count, bool)
        unrestored = np.ones(m.block_count, bool)
        for level in chain:
            mask, bht_bad = own.get(level.id) or _own_damage(level, index, bad_chunks)
            if bht_bad:
                problems.append("block hash table missing or corrupt"
                                + (f" (in parent {level.short_id})" if level is not m else ""))
            cov = level.covered()
            if mask is not None and len(mask) == len(damaged):
                damaged |= mask & unrestored & cov
            unrestored &= ~cov
        if damaged.any():
            rs, rl = runs(damaged)
            problems.insert(0, f"blocks {range_text(rs.tolist(), rl.tolist())} missing or corrupt")
        if problems:
            rep.damaged_snapshots[m.id] = problems
            for p in problems:
                rep.errors.append(f"snapshot {m.short_id} ({m.name} {m.time}): {p}")
