"""Repository check: structure (packs, index, manifests) and, with read_data, every chunk."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field

import blake3
import numpy as np

from vmbak.engine.common import bounded_map, range_text, runs
from vmbak.engine.progress import NoProgress, Progress
from vmbak.errors import IntegrityError, RepositoryError
from vmbak.repo.index import INDEX_AAD, decode_index
from vmbak.repo.manifest import Manifest
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

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "snapshots": self.snapshots,
                "packs": self.packs, "chunks": self.chunks, "bytes_read": self.bytes_read,
                "damaged_snapshots": self.damaged_snapshots}


def check(repo: Repository, read_data: bool = False, workers: int = 2,
          progress: Progress | None = None) -> CheckReport:
    progress = progress or NoProgress()
    rep = CheckReport()
    with repo.lock(purpose="check"):
        # 1. index files: each must open; collect what they claim
        claimed: dict[str, np.ndarray] = {}
        for name, _ in repo.backend.list("index"):
            try:
                payload = repo.sealer.open(repo.backend.read(name), INDEX_AAD, f"index file {name}")
                _, packs = decode_index(payload, f"index file {name}")
            except RepositoryError as e:
                rep.errors.append(str(e))
                continue
            for pid, ent in packs:
                claimed[pid] = ent
        # 2. packs: every indexed pack exists, and its header agrees with the index
        present = {name.rsplit("/", 1)[-1]: size for name, size in repo.backend.list("data")}
        rep.packs = len(present)
        bad_chunks: dict[bytes, str] = {}
        for pid in sorted(set(claimed) - set(present)):
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
        doomed = repo.index.doomed
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
        try:
            ms = repo.manifests()
        except RepositoryError as e:
            rep.errors.append(str(e))
            ms = []
        rep.snapshots = len(ms)
        _check_manifests(repo, ms, index, bad_chunks, rep)
    return rep


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
