"""Peak memory does not grow with the dense size of a sparse disk (issue 16: peak RSS under
512 MiB at any disk size). A disk's block hash table is 16 bytes per 64 KiB block (128 MiB at
512 GiB, 512 MiB at 2 TiB); a full backup, an incremental and a restore of a mostly sparse
disk must neither make it resident nor copy it, nor build per-block int32/int64 arrays."""

from __future__ import annotations

import os

BLOCK = 64 * 1024
MiB = 1 << 20
GiB = 1 << 30


def _max_rss(popen_vmbak, *args: object) -> int:  # noqa: ANN001
    """Run the real CLI; return its own peak RSS in bytes (os.wait4: this child only)."""
    p = popen_vmbak(*args, stdout=None, stderr=None)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, args
    return usage.ru_maxrss * 1024


def test_peak_rss_of_a_large_sparse_disk_stays_far_below_its_dense_hash_table(
        make_repo, make_disk, popen_vmbak, tmp_path):  # noqa: ANN001
    repo = make_repo()
    small = make_disk("small", 64 * MiB, fill="sparse")
    small.write_random(0, 4 * MiB, 1)
    big_size = 512 * GiB
    dense_bht = big_size // BLOCK * 16  # 128 MiB
    big = make_disk("big", big_size, fill="sparse")
    for i, off in enumerate((0, 100 * GiB, 300 * GiB, big_size - 8 * MiB)):
        big.write_random(off, 4 * MiB, 10 + i)
    r = ("-q", "-r", repo.path)
    # the fixed part: interpreter, imports, buffers, on a small disk
    base = max(_max_rss(popen_vmbak, *r, "backup", "--name", "small", small.path),
               _max_rss(popen_vmbak, *r, "restore", "small:latest", tmp_path / "small.raw"))
    full = _max_rss(popen_vmbak, *r, "backup", "--name", "big", big.path)
    for i, off in enumerate((50 * GiB, 300 * GiB + 2 * MiB)):
        big.write_random(off, 3 * MiB, 20 + i)
    incr = _max_rss(popen_vmbak, *r, "backup", "--name", "big", big.path)
    out = tmp_path / "big.raw"
    restore = _max_rss(popen_vmbak, *r, "restore", "big:latest", out)
    # Bitmaps (one byte per block, 8 MiB here) may exist a few at a time, but not one dense
    # hash table beyond the fixed part (before: incremental +346 MiB, restore +282 MiB;
    # now about +80 MiB and +60 MiB).
    bound = base + dense_bht
    got = {"full": full, "incremental": incr, "restore": restore}
    assert all(v < bound for v in got.values()), (
        f"peak RSS {({k: v // MiB for k, v in got.items()})} MiB, bound {bound // MiB} MiB "
        f"(fixed part {base // MiB} MiB)")
    with open(big.path, "rb") as a, open(out, "rb") as b:
        for off in (0, 50 * GiB, 100 * GiB, 300 * GiB, big_size - 8 * MiB):
            a.seek(off)
            b.seek(off)
            assert a.read(8 * MiB) == b.read(8 * MiB), off
    assert os.stat(out).st_blocks * 512 < 256 * MiB  # restored sparse


def test_peak_rss_does_not_grow_with_the_chain_of_a_large_sparse_disk(
        make_repo, make_disk, popen_vmbak, tmp_path):  # noqa: ANN001
    """Every command loads all of a repository's manifests; each incremental of a 512 GiB
    disk has two bitmaps of 8 Mi blocks. Held as bool arrays they cost 16 MiB per manifest
    (a chain of 30 at 2 TiB: 2 GiB); held packed and compressed (Manifest.bits), a few KiB.
    A restore and a new incremental at the end of a chain must cost about what they cost
    at its start."""
    repo = make_repo()
    size = 512 * GiB
    bitmap = size // BLOCK  # bytes of one bool-per-block bitmap: 8 MiB
    big = make_disk("big", size, fill="sparse")
    for i, off in enumerate((0, 200 * GiB, size - 8 * MiB)):
        big.write_random(off, 2 * MiB, 30 + i)
    r = ("-q", "-r", repo.path)
    out = tmp_path / "big.raw"
    _max_rss(popen_vmbak, *r, "backup", "--name", "big", big.path)
    chain = 7
    incr: list[int] = []
    for i in range(chain):
        big.write_random((7 + 61 * i) * GiB, 1 * MiB, 40 + i)
        incr.append(_max_rss(popen_vmbak, *r, "backup", "--name", "big", big.path))
        if i == 0:
            first_restore = _max_rss(popen_vmbak, *r, "restore", "big:latest", out)
            out.unlink()
    last_restore = _max_rss(popen_vmbak, *r, "restore", "big:latest", out)
    # Bool arrays: +2 bitmaps per incremental (measured: +101 MiB and +113 MiB over this
    # chain). Now about +5 and +8 MiB (the index, the extent maps, the heap); allow half a
    # bitmap per incremental.
    bound = (chain - 1) * bitmap // 2
    grew = {"incremental": incr[-1] - incr[1], "restore": last_restore - first_restore}
    assert all(v < bound for v in grew.values()), (
        f"peak RSS grew by {({k: v // MiB for k, v in grew.items()})} MiB over {chain - 1} more "
        f"incrementals, bound {bound // MiB} MiB (incrementals: {[v // MiB for v in incr]} MiB)")
    with open(big.path, "rb") as a, open(out, "rb") as b:
        for i in range(chain):
            off = (7 + 61 * i) * GiB
            a.seek(off)
            b.seek(off)
            assert a.read(MiB) == b.read(MiB), off
