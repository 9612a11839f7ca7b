"""The compact in-memory chunk index (repo/index.py, docs/index-memory.md): every id is
found with its location, duplicates resolve as the format says, and a chunk costs at most
64 bytes of memory."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

import vmbak.repo.index as index_mod
from vmbak.errors import IntegrityError
from vmbak.repo.index import BYTES_PER_CHUNK, INDEX_ENTRY, Index
from vmbak.repo.pack import PACK_ENTRY


def _entries(ids: list[bytes], rng: random.Random) -> np.ndarray:
    e = np.zeros(len(ids), PACK_ENTRY)
    e["id"] = np.frombuffer(b"".join(ids), "V32")
    for i, cid in enumerate(ids):  # a chunk's lengths follow from its id, as in a real repository
        e["off"][i] = rng.randrange(1 << 32)
        e["len"][i] = int.from_bytes(cid[:3], "little")
        e["raw"][i] = int.from_bytes(cid[3:6], "little")
    return e


def _pid(n: int) -> str:
    return f"{n:064x}"


@pytest.mark.parametrize("seed", [1, 2])
def test_index_matches_a_dict_model(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Staged and added packs, duplicated ids, colliding 8-byte prefixes, doomed packs and
    merges of added rows: every lookup agrees with a plain dict that applies the rules."""
    monkeypatch.setattr(index_mod, "COMPACT_MIN", 40)
    rng = random.Random(seed)
    prefix = rng.randbytes(8)
    colliding = [prefix + rng.randbytes(24) for _ in range(6)]
    ids_so_far: list[bytes] = []
    doomed = {_pid(3), _pid(7), _pid(45)}
    model: dict[bytes, list[str]] = {}  # id -> packs holding it, in the order they came
    where: dict[tuple[bytes, str], tuple[int, int, int]] = {}
    idx = Index()

    def pack(p: int) -> tuple[str, np.ndarray]:
        ids = [rng.randbytes(32) for _ in range(25)] + rng.sample(ids_so_far, min(6, len(ids_so_far)))
        ids += colliding[:p % 7]
        ids += [b"\0" * 31 + bytes([p % 3])]  # ids ending in NUL bytes survive
        ids = list(dict.fromkeys(ids))
        e = _entries(ids, rng)
        for cid, o, ln, r in zip(e["id"].tolist(), e["off"].tolist(), e["len"].tolist(), e["raw"].tolist(),
                                 strict=True):
            model.setdefault(cid, []).append(_pid(p))
            where[cid, _pid(p)] = (o, ln, r)
        ids_so_far.extend(ids[:25])
        return _pid(p), e

    for p in range(30):  # one index file of 10 packs, then single packs (pack headers)
        pid, e = pack(p)
        if p < 10:
            ie = np.zeros(len(e), INDEX_ENTRY)
            for f in ("id", "off", "len", "raw"):
                ie[f] = e[f]
            ie["pack"] = 0
            idx.stage([pid], ie)
        else:
            idx.stage([pid], e, size=100)
    idx.set_doomed(doomed)
    idx.commit()
    for p in range(30, 90):
        pid, e = pack(p)
        idx.add_pack(pid, e, 100)

    def expect(cid: bytes) -> str:
        good = [p for p in model[cid] if p not in doomed]
        return (good or model[cid])[0]

    assert len(idx) == len(model)
    for cid in model:
        loc = idx.get(cid)
        assert loc is not None and cid in idx
        want = expect(cid)
        if want in doomed:  # only doomed copies: any of them
            assert loc.pack in model[cid]
        else:
            assert loc.pack not in doomed
        assert (loc.offset, loc.length, loc.raw_length) == where[cid, loc.pack]
        assert idx.usable(cid) == (want not in doomed)
    for _ in range(200):
        missing = rng.randbytes(32)
        assert idx.get(missing) is None and missing not in idx and not idx.usable(missing)
    assert idx.get(prefix + b"\1" * 24) is None
    seen = dict(idx.items())
    assert set(seen) == set(model)
    raw, stored = idx.totals()
    assert raw == sum(loc.raw_length for loc in seen.values())
    assert stored == sum(loc.length for loc in seen.values())


def test_index_memory_per_chunk() -> None:
    """200 000 chunks take at most 64 bytes each once loaded."""
    n = 200_000
    e = np.zeros(n, INDEX_ENTRY)
    e["id"] = np.frombuffer(os.urandom(32 * n), "V32")
    e["off"] = np.arange(n)
    idx = Index()
    idx.stage([_pid(1)], e)
    idx.commit()
    table = idx._state[0]  # noqa: SLF001 - the columns are what is measured
    held = sum(getattr(table, c).nbytes for c in table.__slots__)
    assert len(idx) == n
    assert held == n * BYTES_PER_CHUNK <= n * 64
    assert all(getattr(table, c).base is None or getattr(table, c).base.nbytes <= 8 * n
               for c in table.__slots__)


def test_offset_beyond_4_gib_is_refused() -> None:
    e = np.zeros(1, PACK_ENTRY)
    e["off"] = 1 << 32
    with pytest.raises(IntegrityError, match="beyond 4 GiB"):
        Index().stage([_pid(1)], e)
    with pytest.raises(IntegrityError, match="beyond 4 GiB"):
        Index().add_pack(_pid(1), e)
