"""Diff and statistics over snapshots."""

from __future__ import annotations

import numpy as np

from vmbak.engine.common import resolve_bht, runs
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository


def diff(repo: Repository, a: Manifest, b: Manifest, max_extents: int = 100000) -> dict:
    """Blocks whose content differs between two snapshots of the same geometry."""
    if a.disk_size != b.disk_size:
        raise VmbakError(f"snapshots {a.short_id} and {b.short_id} have different disk sizes "
                         f"({a.disk_size} and {b.disk_size} bytes): a block diff needs disks of one size")
    if a.block_size != b.block_size:
        raise VmbakError(f"snapshots {a.short_id} and {b.short_id} have different block sizes "
                         f"({a.block_size} and {b.block_size} bytes)")
    ha = resolve_bht(repo, repo.chain(a))
    hb = resolve_bht(repo, repo.chain(b))
    changed = (ha != hb).any(axis=1)
    bs = a.block_size
    rs, rl = runs(changed)
    ext = [{"offset": int(s) * bs, "length": min(int(n) * bs, a.disk_size - int(s) * bs)}
           for s, n in zip(rs[:max_extents].tolist(), rl[:max_extents].tolist(), strict=True)]
    cnt = int(np.count_nonzero(changed))
    last_partial = changed[-1] and a.disk_size % bs
    changed_bytes = cnt * bs - (bs - a.disk_size % bs if last_partial else 0)
    return {"a": a.id, "b": b.id, "block_size": bs, "changed_blocks": cnt, "changed_bytes": changed_bytes,
            "extent_count": len(rs), "extents": ext, "truncated": len(rs) > max_extents}


def referenced_bytes(m: Manifest) -> int:
    """The disk bytes the manifest's extents hold (a partial last block counts as what it is)."""
    if not len(m.ext_count):
        return 0
    bs = m.block_size
    total = int(m.ext_count.sum()) * bs
    nblocks = -(-m.disk_size // bs)
    if m.disk_size % bs and bool(np.any(m.ext_start.astype(np.int64) + m.ext_count == nblocks)):
        total -= bs - m.disk_size % bs
    return total


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if a > 0 and b > 0 else None


def snapshot_stats(repo: Repository, m: Manifest) -> dict:
    s = dict(m.stats)
    raw = s.get("new_raw_bytes", 0)
    stored = s.get("new_stored_bytes", 0)
    data = referenced_bytes(m)
    s["compression_ratio"] = round(raw / stored, 3) if stored else None
    # the data this backup references over the part of it that was new (the block hash
    # table, also counted in new_raw_bytes, is metadata: it is not deduplicated data)
    s["dedup_ratio"] = _ratio(data, data - int(s.get("dedup_bytes", 0)))
    s["chain_length"] = len(repo.chain(m))
    return {"snapshot": m.summary(), "stats": s}


def repo_stats(repo: Repository) -> dict:
    ms = repo.manifests()
    index = repo.index
    pack_bytes = sum(index.pack_sizes.values())
    raw_total, stored_total = index.totals()
    referenced_data = sum(referenced_bytes(m) for m in ms)
    # block hash tables are chunks too, but no extent refers to them: not deduplicated data
    meta = {cid for m in ms for cid in m.bht_chunks}
    meta_raw = sum(loc.raw_length for loc in (index.get(cid) for cid in meta) if loc is not None)
    logical = sum(m.disk_size for m in ms)
    return {
        "snapshots": len(ms),
        "names": sorted({m.name for m in ms}),
        "packs": len(index.pack_sizes),
        "chunks": len(index),
        "logical_bytes": logical,
        "referenced_data_bytes": referenced_data,
        "unique_raw_bytes": raw_total,
        "stored_bytes": stored_total,
        "pack_bytes": pack_bytes,
        "compression_ratio": round(raw_total / stored_total, 3) if stored_total else None,
        "dedup_ratio": _ratio(referenced_data, raw_total - meta_raw),
        "space_saving_ratio": round(logical / pack_bytes, 3) if pack_bytes else None,
    }
