"""XFS used maps against partclone.xfs and xfs_db freesp; backup, restore, xfs_repair -n; damage.

Images are made by mkfs.xfs -p (no mount). Holes come from deleting files: on v5 through a loop
mount (the kernel splits and merges the free-space trees), on v4 (this kernel cannot mount it)
offline, by clearing inodes with xfs_db and letting xfs_repair free their blocks (its bulk loader
builds the trees). Many small files deleted every other one give multi-level B+trees.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xfsntfs_util import (
    MiB,
    analyze_path,
    build_xfs,
    corrupt,
    delete_every_other,
    garbage_file,
    make_files,
    mounted,
    partclone_free,
    read_tree,
    run,
    wrongly_free,
    xfs_db,
    xfs_db_free,
    xfs_geometry,
)

from vmbak.usage.model import subtract, total

# name: (size, mkfs.xfs arguments, small files to fragment with, their size, min bnobt height)
VARIANTS = {
    "v5-4k-3ag": (50 * MiB + 40 * 1024, ["-d", "agcount=3"], 300, 3000, 1),
    "v5-1k-deep": (32 * MiB, ["-b", "size=1024", "-d", "agcount=2"], 1000, 300, 2),
    "v5-rmap-reflink-4ksect": (40 * MiB, ["-m", "rmapbt=1,reflink=1", "-s", "size=4096", "-d", "agcount=2"],
                               300, 3000, 1),
    "v4-512-deep": (32 * MiB, ["-m", "crc=0", "-b", "size=512", "-d", "agcount=2"], 5400, 200, 3),
    "v4-4k": (32 * MiB, ["-m", "crc=0", "-d", "agcount=2"], 200, 5000, 1),
}


def _delete_offline(img: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Delete every other small file (and every third big one) without mounting: clear their
    inodes with xfs_db, then xfs_repair frees their blocks and directory entries."""
    victims = set(sorted(k for k in files if k.startswith("small/"))[::2])
    victims |= set(sorted(k for k in files if not k.startswith("small/"))[::3])
    cmds = []
    for d in sorted({k.rsplit("/", 1)[0] for k in victims}):
        for ino, name in re.findall(r"^\d+\s+(\d+)\s+regular\s+\S+\s+\d+\s+(\S+)", xfs_db(img, f"ls /{d}"), re.M):
            if f"{d}/{name}" in victims:
                cmds += [f"inode {ino}", "write core.mode 0"]
    run("xfs_db", "-x", *[a for c in cmds for a in ("-c", c)], img)
    run("xfs_repair", img)
    run("xfs_repair", "-n", img)
    return {k: v for k, v in files.items() if k not in victims}


def _build(tmp: Path, variant: str, seed: int = 1) -> tuple[Path, dict[str, bytes]]:
    size, args, small, small_size, _lvl = VARIANTS[variant]
    tree = tmp / f"tree-{variant}"
    files = make_files(tree, seed, 9, 400_000, small=small, small_size=small_size)
    img = build_xfs(tmp / f"{variant}.img", size, tree, args, seed)
    if "crc=0" in args:
        left = _delete_offline(img, files)
    else:
        with mounted(img, "xfs") as mnt:
            left = delete_every_other(mnt, files)
    return img, left


def _log_range(img: Path) -> tuple[int, int]:
    """Byte range of the internal log, from xfs_db."""
    out = xfs_db(img, "sb 0", "p logstart logblocks agblklog agblocks blocksize")
    v = {k: int(x) for k, x in re.findall(r"^(\w+) = (\d+)$", out, re.M)}
    agno, agbno = v["logstart"] >> v["agblklog"], v["logstart"] & ((1 << v["agblklog"]) - 1)
    start = (agno * v["agblocks"] + agbno) * v["blocksize"]
    return start, start + v["logblocks"] * v["blocksize"]


def _levels(img: Path) -> int:
    g = xfs_geometry(img)
    return max(int(re.search(r"bnolevel = (\d+)", xfs_db(img, f"agf {a}", "p bnolevel")).group(1))
               for a in range(g["agcount"]))


@pytest.fixture(scope="module")
def xfs_images(tmp_path_factory):
    """Every variant, built once, with partclone's free set. partclone takes a fixed ~3 s per
    run whatever the image (mostly waiting), so all of them run at the same time."""
    tmp = tmp_path_factory.mktemp("xfs")
    built = {v: _build(tmp, v) for v in VARIANTS}
    with ThreadPoolExecutor(len(built)) as pool:
        pcs = dict(zip(built, pool.map(lambda v: partclone_free("xfs", built[v][0]), built), strict=True))
    return {v: (img, left, pcs[v]) for v, (img, left) in built.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_xfs_matches_oracles(xfs_images, variant):
    img, left, pc = xfs_images[variant]
    assert _levels(img) >= VARIANTS[variant][4], f"free-space tree not deep enough: {_levels(img)}"
    t0 = time.perf_counter()
    u = analyze_path(img)
    dt = time.perf_counter() - t0
    e = u.entries[0]
    assert e.fstype == "xfs" and not e.notes, (e.fstype, e.notes)
    db, agfl_blocks = xfs_db_free(img)
    bs = xfs_geometry(img)["blocksize"]
    # never free where an oracle says used
    assert wrongly_free(u.free, pc) == 0
    assert wrongly_free(u.free, db) == 0
    # and free everywhere they say free, except the AG free-list blocks (kept as used on purpose)
    assert total(pc) - u.free_bytes == agfl_blocks * bs, (total(pc), u.free_bytes, agfl_blocks)
    assert total(db) - u.free_bytes == agfl_blocks * bs
    assert u.used_bytes >= sum(len(v) for v in left.values())
    print(f"{variant}: bnobt height {_levels(img)}, free {u.free_bytes} vs partclone {total(pc)} "
          f"vs xfs_db {total(db)}; missed {total(pc) - u.free_bytes} (AGFL), wrongly free 0; {dt * 1000:.1f} ms")


def test_xfs_backup_restore_repair_and_files(tmp_path, make_repo, xfs_images):
    """An XFS partition on a GPT disk with garbage in free space: back up skipping unused
    blocks, restore, xfs_repair -n, and every file is byte-identical."""
    img, left, _pc = xfs_images["v5-1k-deep"]
    fs_size = img.stat().st_size
    disk = garbage_file(tmp_path / "disk.img", fs_size + 3 * MiB, seed=9)
    subprocess.run(["sfdisk", "-q", str(disk)], input=f"label: gpt\nstart=2048, size={fs_size // 512}, type=L\n",
                   text=True, check=True, capture_output=True)
    off = 2048 * 512
    with open(disk, "r+b") as f, open(img, "rb") as src:
        f.seek(off)
        f.write(src.read())
    u = analyze_path(disk)
    assert [e.fstype for e in u.entries] == ["xfs"], u.entries
    repo = make_repo()
    st_ = repo.backup(disk, "xfs")["stats"]
    # the backup reads whole 64 KiB blocks: those the used map does not call wholly free
    assert st_["read_bytes"] <= int(u.used_bitmap(64 * 1024).sum()) * 64 * 1024, (st_, u.used_bytes)
    assert st_["read_bytes"] < disk.stat().st_size / 2
    out = tmp_path / "restored.img"
    repo.restore("xfs:latest", out)
    part = tmp_path / "part.img"
    with open(out, "rb") as f, open(part, "wb") as p:
        f.seek(off)
        p.write(f.read(fs_size))
    rep = run("xfs_repair", "-n", part, check=False)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    with mounted(part, "xfs", readonly=True) as mnt:
        assert read_tree(mnt) == left
    # free blocks came back as zeros, used ones as the original's
    bm = u.used_bitmap(64 * 1024)
    n = len(bm) * 64 * 1024
    orig = np.frombuffer(disk.read_bytes().ljust(n, b"\0"), np.uint8).reshape(-1, 64 * 1024)
    rest = np.frombuffer(out.read_bytes().ljust(n, b"\0"), np.uint8).reshape(-1, 64 * 1024)
    assert not rest[~bm].any()
    assert (rest[bm] == orig[bm]).all()


def test_dirty_log_counts_as_all_used(tmp_path, xfs_images):
    """A copy taken while mounted (as a crash-consistent snapshot is) has a log to replay."""
    img = tmp_path / "fs.img"
    shutil.copyfile(xfs_images["v5-4k-3ag"][0], img)
    assert analyze_path(img).free_bytes > 0
    snap = tmp_path / "snap.img"
    with mounted(img, "xfs") as mnt:
        for i in range(20):
            (mnt / f"new{i}").write_bytes(np.random.default_rng(i).bytes(50_000))
        subprocess.run(["sync"], check=True)
        shutil.copyfile(img, snap)
    rep = run("xfs_repair", "-n", snap, check=False)
    assert "log" in (rep.stdout + rep.stderr).lower()  # the oracle agrees: a log to replay
    u = analyze_path(snap)
    assert u.free_bytes == 0 and any("log needs recovery" in n for n in u.entries[0].notes), u.entries
    # after a clean unmount the same filesystem is analysed again
    assert analyze_path(img).free_bytes > 0


# ---------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def damaged_bases(xfs_images):
    """A v4 (no checksums: only structure protects it) and a v5 image, both with deep trees,
    and the byte ranges of their metadata: superblock, AGFs, tree blocks, log head."""
    out = {}
    for variant in ("v4-512-deep", "v5-1k-deep"):
        img = xfs_images[variant][0]
        g = xfs_geometry(img)
        bs, agb = g["blocksize"], g["agblocks"]
        sect = int(re.search(r"sectsize = (\d+)", xfs_db(img, "sb 0", "p sectsize")).group(1))
        regions = [(0, 256)]
        for a in range(g["agcount"]):
            base = a * agb * bs
            regions.append((base + sect, base + sect + 64))
            agf = xfs_db(img, f"agf {a}", "p bnoroot cntroot")
            for root in re.findall(r"root = (\d+)", agf):
                regions.append((base + int(root) * bs, base + (int(root) + 1) * bs))
            # the bnobt's children (leaves of a 2-level tree, nodes of a 3-level one)
            ptrs = xfs_db(img, f"agf {a}", "addr bnoroot", "p ptrs")
            for p in re.findall(r"\d+:(\d+)", ptrs)[:4]:
                regions.append((base + int(p) * bs, base + (int(p) + 1) * bs))
        log = _log_range(img)
        regions.append((log[0], log[0] + 64 * 1024))
        out[variant] = (img, analyze_path(img).free, regions)
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(["v4-512-deep", "v5-1k-deep"]), which=st.integers(0, 1000),
       pos=st.integers(0, 1 << 20), nbytes=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_corruption_never_frees_used_blocks(damaged_bases, tmp_path_factory, variant, which, pos, nbytes, seed):
    img, baseline, regions = damaged_bases[variant]
    a, b = regions[which % len(regions)]
    off = a + pos % (b - a)
    bad = corrupt(img, tmp_path_factory.mktemp("bad") / "bad.img", off,
                  np.random.default_rng(seed).bytes(nbytes)[: b - off])
    t0 = time.monotonic()
    u = analyze_path(bad)
    assert time.monotonic() - t0 < 10
    extra = subtract(u.free, baseline)
    assert total(extra) == 0, f"corruption at {off} made {total(extra)} bytes free: {u.entries[0].notes}"


def test_specific_damage_counts_as_all_used(damaged_bases, tmp_path):
    """Bad magic, loops, out-of-range pointers, wrong counts, a truncated volume: all used, noted."""
    img, _baseline, _ = damaged_bases["v4-512-deep"]
    g = xfs_geometry(img)
    bs = g["blocksize"]
    agf = xfs_db(img, "agf 0", "p bnoroot bnolevel freeblks")
    freeblks = int(re.search(r"freeblks = (\d+)", agf).group(1))
    root = int(re.search(r"bnoroot = (\d+)", agf).group(1))
    assert int(re.search(r"bnolevel = (\d+)", agf).group(1)) >= 2
    ptr_off = root * bs + 16 + ((bs - 16) // 12) * 8  # first pointer of the v4 root node
    with open(img, "rb") as f:
        f.seek(ptr_off)
        first = f.read(4)
    sect = 512
    cases = {
        "superblock magic": (0, b"XFSX", "no known filesystem"),
        "superblock version": (100, b"\x00\x07", "version"),
        "AGF magic": (sect, b"XAGX", "AGF magic"),
        "tree loop (a pointer to itself)": (ptr_off, root.to_bytes(4, "big"), "twice"),
        "tree loop (one child twice)": (ptr_off + 4, first, "sibling links"),
        "pointer out of the AG": (ptr_off, (10**9).to_bytes(4, "big"), "outside the AG"),
        "tree taller than possible": (sect + 28, (40).to_bytes(4, "big"), "height"),
        "AGF free count": (sect + 52, (freeblks + 1).to_bytes(4, "big"), "disagree"),
        "dblocks past the AGs": (8, (10**12).to_bytes(8, "big"), "block count does not match"),
    }
    for name, (off, data, why) in cases.items():
        bad = corrupt(img, tmp_path / "bad.img", off, data)
        u = analyze_path(bad)
        notes = " ".join(u.entries[0].notes) if u.entries else ""
        assert u.free_bytes == 0, (name, notes)
        assert why in notes, (name, notes)
    # a truncated volume (the image cut in half)
    cut = tmp_path / "cut.img"
    shutil.copyfile(img, cut)
    with open(cut, "r+b") as f:
        f.truncate(img.stat().st_size // 2)
    u = analyze_path(cut)
    assert u.free_bytes == 0 and "larger than its volume" in " ".join(u.entries[0].notes)
    # a v5 block whose checksum no longer matches
    img5, _b, _r = damaged_bases["v5-1k-deep"]
    root5 = int(re.search(r"bnoroot = (\d+)", xfs_db(img5, "agf 0", "p bnoroot")).group(1))
    bad5 = corrupt(img5, tmp_path / "bad5.img", root5 * 1024 + 200, b"\x55")
    with open(img5, "rb") as f:
        f.seek(root5 * 1024 + 200)
        assert f.read(1) != b"\x55"
    u5 = analyze_path(bad5)
    assert u5.free_bytes == 0 and "checksum" in " ".join(u5.entries[0].notes)
    # a log that was zeroed, or overwritten with garbage, proves nothing: all used
    lo, hi = _log_range(img5)
    for name, data in (("zeroed", bytes(hi - lo)), ("garbage", np.random.default_rng(1).bytes(hi - lo))):
        u = analyze_path(corrupt(img5, tmp_path / f"log-{name}.img", lo, data))
        assert u.free_bytes == 0 and "log" in " ".join(u.entries[0].notes), (name, u.entries[0].notes)


def test_usage_cli_on_xfs(tmp_path, run_vmbak):
    import json

    tree = tmp_path / "tree"
    make_files(tree, 5, 3, 20_000)
    img = build_xfs(tmp_path / "x.img", 32 * MiB, tree, ["-L", "data"], 5)
    rep = json.loads(run_vmbak("usage", img, "--json").stdout)
    v = rep["volumes"][0]
    assert v["filesystem"] == "xfs" and v["label"] == "data" and v["free_bytes"] > 20 * MiB, v
