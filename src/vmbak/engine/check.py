"""Repository check: structure (packs, index, manifests) and, with read_data, every chunk."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field

import blake3
import numpy as np

from vmbak.engine.common import bounded_map, range_text, runs
from vmbak.engine.progress import NoProgress, Progress
from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo.backend import ObjectMissing
from vmbak.repo.manifest import Manifest
from vmbak.repo.marks import load_marks
from vmbak.repo.pack import pack_name, parse_header, read_header
from vmbak.repo.repository import Repository


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

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "snapshots": self.snapshots,
                "packs": self.packs, "chunks": self.chunks, "bytes_read": self.bytes_read,
                "damaged_snapshots": self.damaged_snapshots, "damaged_manifests": self.damaged_manifests}


def check(repo: Repository, read_data: bool = False, workers: int = 2,
          progress: Progress | None = None) -> CheckReport:
    progress = progress or NoProgress()
    rep = CheckReport()
    with repo.lock(purpose="check"):
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
        bad_chunks: dict[bytes, str] = {}
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
            for cid in claimed[pid]["id"].tolist():
                bad_chunks[cid] = f"pack {pid[:16]} is missing"
        for pid in sorted(set(claimed) & set(present)):
            try:
                hdr = read_header(repo.backend, repo.sealer, pid, present[pid])
            except RepositoryError as e:
                rep.errors.append(str(e))
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
                rep.warnings.append(f"pack {pid[:16]} is not in any index file (left by an interrupted "
                                    "backup; its chunks are used)")
        # 3. read every pack (data check)
        if read_data:
            progress.start(sum(present.values()), "check")

            def read_pack(pid: str) -> tuple[str, list[tuple[bytes, str]], int, str | None]:
                size = present[pid]
                try:
                    data = repo.backend.read(pack_name(pid))
                except RepositoryError as e:
                    return pid, [], size, str(e)
                if blake3.blake3(data).hexdigest() != pid:
                    err = f"pack {pid[:16]}: content does not match its name (corrupt)"
                else:
                    err = None
                try:
                    hdr = parse_header(repo.sealer, data, len(data), f"pack {pid[:16]}")
                except IntegrityError as e:
                    return pid, [], size, str(e)
                bad = []
                for cid, off, ln, raw in zip(hdr["id"].tolist(), hdr["off"].tolist(), hdr["len"].tolist(),
                                             hdr["raw"].tolist(), strict=True):
                    try:
                        repo.decode_chunk(cid, data[off:off + ln], raw)
                    except IntegrityError as e:
                        bad.append((cid, str(e)))
                return pid, bad, size, err

            with cf.ThreadPoolExecutor(max(1, workers)) as pool:
                for pid, bad, size, err in bounded_map(pool, read_pack, sorted(present), 2 * workers):
                    rep.bytes_read += size
                    progress.advance(size)
                    if err:
                        rep.errors.append(err)
                        if not bad and pid in claimed:
                            for cid in claimed[pid]["id"].tolist():
                                bad_chunks.setdefault(cid, err)
                    for cid, msg in bad:
                        rep.errors.append(f"pack {pid[:16]}: {msg}")
                        bad_chunks[cid] = msg
            progress.close()
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
    return rep


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
