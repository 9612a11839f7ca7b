"""A manifest's bitmaps are held packed (repo/manifest.py Bits) and read back as the bool
arrays they were, at every size and density, through encoding and decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vmbak.repo.manifest import Bits, Manifest, decode_manifest, encode_manifest


def _manifest(n: int, **bitmaps: np.ndarray) -> Manifest:
    kind = "full" if "used" in bitmaps else "incremental"
    return Manifest(name="d", kind=kind, time="2026-01-01T00:00:00.000000Z", disk_size=n * 65536 - 100,
                    block_size=65536, chunk_blocks=4, source="s", hostname="h", change_source="scan",
                    parent=None if kind == "full" else "p" * 64, **bitmaps)


@pytest.mark.parametrize("n", [1, 13, 4096, 8 * 65536 + 5, 3 << 20])
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.03, 0.5, 1.0])
def test_bitmaps_round_trip(n: int, density: float) -> None:
    rng = np.random.default_rng(n)
    c = rng.random(n) < density
    u = (rng.random(n) < density) & ~c
    m = _manifest(n, changed=c, newly_unused=u)
    for got in (m, decode_manifest(encode_manifest(m), "a" * 64), dataclasses.replace(m)):
        for name, want in (("changed", c), ("newly_unused", u)):
            a = getattr(got, name)
            assert a.dtype == bool and len(a) == n and np.array_equal(a, want)
            assert got.bits(name).count() == int(want.sum())
        assert np.array_equal(got.covered(), c | u)
        assert np.array_equal(got.covered_bits().bools(), c | u)
    # what the manifest holds does not change with the arrays it hands out
    a = m.changed
    a[:] = True
    assert np.array_equal(m.changed, c)
    full = decode_manifest(encode_manifest(_manifest(n, used=c)), "b" * 64)
    assert np.array_equal(full.used, c) and full.covered().all() and full.changed is None


def test_sparse_large_bitmap_is_held_small() -> None:
    n = 1 << 25  # a 2 TiB disk at 64 KiB blocks
    c = np.zeros(n, bool)
    c[[0, 12345, n - 1]] = True
    m = decode_manifest(encode_manifest(_manifest(n, changed=c, newly_unused=np.zeros(n, bool))), "c" * 64)
    assert len(m.bits("changed")._data) < 64 << 10  # not the 4 MiB of packed bits
    assert np.array_equal(m.changed, c)


def test_padding_bits_of_a_stored_bitmap_are_ignored() -> None:
    b = Bits(bytes([0xFF, 0xFF]), 13)
    assert b.count() == 13 and b.tobytes() == bytes([0xFF, 0x1F]) and b.bools().all()
    assert Bits.ones(13) == b
    with pytest.raises(ValueError):
        Bits(bytes(3), 13)
