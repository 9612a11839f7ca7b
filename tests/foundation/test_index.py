"""The chunk index (repo/index.py, docs/index-memory.md): every id is found with its
location, duplicates resolve as the format says, and a chunk costs at most 64 bytes of
memory; the paged mode (the loaded table in a temporary file) behaves exactly the same."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

import vmbak.repo.index as index_mod
from vmbak.errors import IntegrityError, RepositoryError
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


# None: the default threshold (in memory); 7 and 0: paged, in groups and runs of a few rows
PAGED = [None, 7, 0]


def _small_runs(monkeypatch: pytest.MonkeyPatch, paged_rows: int | None) -> None:
    """Spill groups and sorted runs of a few rows: many of each, as at scale."""
    if paged_rows is not None:
        monkeypatch.setattr(index_mod, "SPILL_ROWS", max(1, paged_rows))
        monkeypatch.setattr(index_mod, "RUN_ROWS", max(1, paged_rows))


@pytest.mark.parametrize("paged_rows", PAGED)
@pytest.mark.parametrize("seed", [1, 2])
def test_index_matches_a_dict_model(monkeypatch: pytest.MonkeyPatch, seed: int, paged_rows: int | None) -> None:
    """Staged and added packs, duplicated ids, colliding 8-byte prefixes, doomed packs and
    merges of added rows: every lookup agrees with a plain dict that applies the rules."""
    monkeypatch.setattr(index_mod, "COMPACT_MIN", 40)
    _small_runs(monkeypatch, paged_rows)
    rng = random.Random(seed)
    prefix = rng.randbytes(8)
    colliding = [prefix + rng.randbytes(24) for _ in range(6)]
    ids_so_far: list[bytes] = []
    doomed = {_pid(3), _pid(7), _pid(45)}
    model: dict[bytes, list[str]] = {}  # id -> packs holding it, in the order they came
    where: dict[tuple[bytes, str], tuple[int, int, int]] = {}
    idx = Index(paged_rows)

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
    assert idx.paged == (paged_rows is not None)
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
    probe = [*model, *(rng.randbytes(32) for _ in range(50)), prefix + b"\1" * 24]
    assert idx.get_many(probe) == [idx.get(c) for c in probe]  # the batch lookup agrees, in both modes
    seen = dict(idx.items())
    assert set(seen) == set(model)
    assert len(seen) == len(model)  # each id once
    raw, stored = idx.totals()
    assert raw == sum(loc.raw_length for loc in seen.values())
    assert stored == sum(loc.length for loc in seen.values())
    if paged_rows is not None:  # a doomed paged row was replaced by an added copy, merged in
        assert idx._state[4]  # noqa: SLF001


def test_index_memory_per_chunk() -> None:
    """200 000 chunks take at most 64 bytes each once loaded."""
    n = 200_000
    e = np.zeros(n, INDEX_ENTRY)
    e["id"] = np.frombuffer(os.urandom(32 * n), "V32")
    e["off"] = np.arange(n)
    idx = Index()
    idx.stage([_pid(1)], e)
    idx.commit()
    table = idx._state[1]  # noqa: SLF001 - the columns are what is measured
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


def _agree(indexes: list[Index], probe: list[bytes]) -> None:
    want = indexes[0]
    items = dict(want.items())
    for idx in indexes[1:]:
        assert len(idx) == len(want) == len(items)
        assert dict(idx.items()) == items
        assert idx.totals() == want.totals()
        assert idx.known_packs() == want.known_packs()
        assert idx.get_many(probe) == [want.get(c) for c in probe]
        for cid in probe:
            assert idx.get(cid) == want.get(cid)
            assert (cid in idx) == (cid in want)
            assert idx.usable(cid) == want.usable(cid)


@pytest.mark.parametrize("seed", [3, 4])
def test_paged_and_in_memory_indexes_agree(monkeypatch: pytest.MonkeyPatch, tmp_path, seed: int) -> None:  # noqa: ANN001
    """Two loads (the second onto rows added after the first), adds between and after,
    many duplicates across packs, doomed packs, ids sharing an 8-byte prefix: the paged
    indexes answer every question exactly as the in-memory one."""
    monkeypatch.setattr(index_mod, "COMPACT_MIN", 16)
    monkeypatch.setenv("VMBAK_CACHE_DIR", str(tmp_path))
    _small_runs(monkeypatch, 9)
    rng = random.Random(seed)
    pool = [rng.randbytes(32) for _ in range(300)] + [b"\x42" * 8 + rng.randbytes(24) for _ in range(6)]
    indexes = [Index(), Index(5), Index(64)]
    for idx in indexes:
        idx.set_doomed({_pid(2), _pid(5), _pid(9), _pid(14), _pid(22), _pid(31)})

    def packs(lo: int, hi: int) -> list[tuple[str, np.ndarray]]:
        return [(_pid(p), _entries(rng.sample(pool, rng.randrange(5, 40)), rng)) for p in range(lo, hi)]

    for pid, e in packs(0, 10):
        for idx in indexes:
            idx.stage([pid], e, size=7)
    for idx in indexes:
        idx.commit()
    assert [idx.paged for idx in indexes] == [False, True, True]
    probe = pool + [rng.randbytes(32) for _ in range(50)] + [b"\x42" * 8 + b"\0" * 24]
    _agree(indexes, probe)
    for pid, e in packs(10, 20):
        for idx in indexes:
            idx.add_pack(pid, e, 9)
    _agree(indexes, probe)
    for pid, e in packs(20, 25):
        for idx in indexes:
            idx.stage([pid], e)
    for idx in indexes:
        idx.commit()
    _agree(indexes, probe)
    for pid, e in packs(25, 40):
        for idx in indexes:
            idx.add_pack(pid, e)
    _agree(indexes, probe)
    assert not os.listdir(tmp_path / "tmp")  # the temporary files never had a name


def test_paged_index_holds_only_a_sparse_array(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """Paged, 200 000 loaded chunks leave one key in 64 in memory, and each is found."""
    monkeypatch.setenv("VMBAK_CACHE_DIR", str(tmp_path))
    n = 200_000
    e = np.zeros(n, INDEX_ENTRY)
    e["id"] = np.frombuffer(os.urandom(32 * n), "V32")
    e["off"] = np.arange(n)
    e["len"] = np.arange(n) % 1000
    idx = Index(150_000)
    idx.stage([_pid(1)], e[:100_000])
    assert not idx.paged
    idx.stage([_pid(2)], e[100_000:])
    idx.commit()
    assert idx.paged and len(idx) == n
    base, table = idx._state[:2]  # noqa: SLF001 - what stays in memory is what is measured
    assert len(table) == 0 and base.sparse.nbytes == 8 * -(-n // 64)
    assert idx.totals() == (0, int(e["len"].sum()))
    rng = random.Random(5)
    for i in rng.sample(range(n), 3000):
        loc = idx.get(e["id"][i].tobytes())
        assert loc is not None and loc.offset == i and loc.pack == _pid(1 + i // 100_000)
    assert idx.get(os.urandom(32)) is None


def test_paged_rows_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBAK_INDEX_PAGED_ROWS", "3")
    assert Index().paged_rows == 3
    monkeypatch.delenv("VMBAK_INDEX_PAGED_ROWS")
    assert Index().paged_rows == index_mod.PAGED_ROWS
    for bad in ("many", "-1", "1e6"):
        monkeypatch.setenv("VMBAK_INDEX_PAGED_ROWS", bad)
        with pytest.raises(RepositoryError, match="VMBAK_INDEX_PAGED_ROWS"):
            Index()


def test_paged_lookups_from_several_threads_while_one_adds(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """Pipeline threads look chunks up while the writer adds packs and merges them."""
    import threading

    monkeypatch.setattr(index_mod, "COMPACT_MIN", 50)
    monkeypatch.setenv("VMBAK_CACHE_DIR", str(tmp_path))
    rng = random.Random(8)
    loaded = [rng.randbytes(32) for _ in range(20_000)]
    e = _entries(loaded, rng)
    idx = Index(0)
    idx.stage([_pid(1)], e)
    idx.commit()
    assert idx.paged
    want = {cid: int(o) for cid, o in zip(loaded, e["off"].tolist(), strict=True)}
    added = [[rng.randbytes(32) for _ in range(20)] for _ in range(300)]
    errors: list[str] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            cid = r.choice(loaded)
            loc = idx.get(cid)
            if loc is None or loc.offset != want[cid] or not idx.usable(cid):
                errors.append(cid.hex())
                return

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        for p, ids in enumerate(added, 2):
            idx.add_pack(_pid(p), _entries(ids, rng))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(idx) == 20_000 + 300 * 20
    assert all(idx.get(cid).pack == _pid(p) for p, ids in enumerate(added, 2) for cid in ids)
