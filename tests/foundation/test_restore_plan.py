"""restore's plan (engine/restore.py) against a block-by-block reference: for random chains
of a full and incrementals, whose extents are partly overridden by newer snapshots, the same
jobs (snapshot, chunk, extent, the runs it provides, whether it lies inside what its snapshot
defines) in the same order, and the same blocks with data. A manifest whose extents overlap
or run past the disk is refused with a one-line error."""

from __future__ import annotations

import numpy as np
import pytest

from vmbak.engine import restore
from vmbak.errors import IntegrityError
from vmbak.repo.manifest import Manifest


def _manifest(n: int, kind: str, extents: list[tuple[int, int]], sid: str, rng: np.random.Generator,
              covered: np.ndarray | None = None) -> Manifest:
    m = Manifest(name="d", kind=kind, time="2026-01-01T00:00:00.000000Z", disk_size=n * 65536, block_size=65536,
                 chunk_blocks=8, source="s", hostname="h", change_source="scan",
                 parent=None if kind == "full" else "p" * 64, id=sid * 64)
    if kind == "full":
        m.used = np.ones(n, bool)
    else:
        assert covered is not None
        unused = covered & (rng.random(n) < 0.2)
        m.changed, m.newly_unused = covered & ~unused, unused
    m.ext_start = np.asarray([s for s, _ in extents], np.uint64)
    m.ext_count = np.asarray([c for _, c in extents], np.uint32)
    m.ext_id = np.asarray([rng.bytes(32) for _ in extents], "V32") if extents else np.zeros(0, "V32")
    return m


def _chain(n: int, length: int, seed: int) -> list[Manifest]:
    """Newest first, as repo.chain gives it: incrementals over one full."""
    rng = np.random.default_rng(seed)
    full_ext, b = [], 0
    while b < n:  # chunks of up to 8 blocks, some holes
        c = int(rng.integers(1, 9))
        if rng.random() < 0.8:
            full_ext.append((b, min(c, n - b)))
        b += c
    chain = [_manifest(n, "full", full_ext, "f", rng)]
    for k in range(length):
        cov = rng.random(n) < rng.choice([0.02, 0.2, 0.6])
        ext = []
        for s in range(0, n, 8):  # an incremental's extents: runs of changed blocks on the chunk grid
            rs = np.flatnonzero(np.diff(np.concatenate(([0], cov[s:s + 8].astype(np.int8), [0]))))
            for a, e in zip(rs[0::2].tolist(), rs[1::2].tolist(), strict=True):
                if rng.random() < 0.9:  # the rest: zero blocks, no chunk
                    ext.append((s + a, e - a))
        if rng.random() < 0.3 and ext:  # an extent reaching past what its snapshot defines
            s, c = ext[-1]
            if s + c < n:
                ext[-1] = (s, c + 1)
        chain.insert(0, _manifest(n, "incremental", ext, f"{k:x}", rng, covered=cov))
    return chain


def _reference(chain: list[Manifest]) -> tuple[list[tuple], np.ndarray]:
    n = chain[0].block_count
    level = np.full(n, -1)
    for i, m in enumerate(chain):
        level[(level < 0) & m.covered()] = i
    jobs, data = [], np.zeros(n, bool)
    for i, m in enumerate(chain):
        cov = m.covered()
        for s, c, cid in zip(m.ext_start.tolist(), m.ext_count.tolist(), m.ext_id.tolist(), strict=True):
            mine = [b for b in range(s, s + c) if level[b] == i]
            if not mine:
                continue
            data[mine] = True
            if len(mine) == c:
                jobs.append((i, cid, s, c, None, True))
                continue
            sub: list[tuple[int, int]] = []
            for b in mine:
                if sub and sub[-1][0] + sub[-1][1] == b:
                    sub[-1] = (sub[-1][0], sub[-1][1] + 1)
                else:
                    sub.append((b, 1))
            jobs.append((i, cid, s, c, sub, m.kind == "full" or bool(cov[s:s + c].all())))
    return jobs, data


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("batch", [restore._PLAN_BATCH, 5])
def test_plan_matches_the_block_by_block_reference(seed: int, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore, "_PLAN_BATCH", batch)  # 5: many batches of partly provided extents
    n = [1, 7, 64, 1000, 3001][seed % 5]
    chain = _chain(n, [0, 1, 3, 9][seed % 4], seed)
    jobs, data = restore.plan(chain)
    want_jobs, want_data = _reference(chain)
    assert [(j.level, j.chunk_id, j.start, j.count, j.sub, j.inside) for j in jobs] == want_jobs
    assert np.array_equal(data, want_data)
    assert any(j.sub for j in jobs) or n < 64 or len(chain) == 1


@pytest.mark.parametrize("extents, why", [
    ([(0, 8), (4, 8)], "is out of order or overlaps itself"),
    ([(8, 8), (0, 8)], "is out of order or overlaps itself"),
    ([(0, 8), (4996, 8)], "points past the disk end"),
    ([(2**63, 1)], "points past the disk end"),
    ([(2**63 - 1, 10)], "points past the disk end"),  # the end wraps round in int64
    ([(0, 4097)], "has an extent longer than any chunk"),
])
def test_plan_refuses_an_extent_map_no_backup_writes(extents: list[tuple[int, int]], why: str) -> None:
    rng = np.random.default_rng(1)
    m = _manifest(5000, "full", extents, "e", rng)
    with pytest.raises(IntegrityError, match=f"snapshot eeeeeeee: extent map {why}"):
        restore.plan([m])
