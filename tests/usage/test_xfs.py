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
from fatlvm_util import analyze_path, corrupt, garbage_file, partclone_free, read_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xfsntfs_util import (
    MiB,
    build_xfs,
    delete_every_other,
    make_files,
    mounted,
    run,
    wrongly_free,
    xfs_agfl_ranges,
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
    # force_geometry: a single-AG filesystem has no secondary superblock to check geometry against
    run("xfs_repair", "-o", "force_geometry", img)
    run("xfs_repair", "-n", "-o", "force_geometry", img)
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


# ---------------------------------------------------------------------------- random layouts
@st.composite
def xfs_layouts(draw):
    """A random mkfs.xfs command line within mkfs' limits (AGs of at least 16 MiB, inodes of at
    most half a block, v5: blocks of 1 KiB and more, inodes of 512 B and more) and a random tree."""
    v5 = draw(st.booleans())
    bs = draw(st.sampled_from([1024, 2048, 4096] if v5 else [512, 1024, 2048, 4096]))
    sect = draw(st.sampled_from([s for s in (512, 1024, 2048, 4096) if s <= bs]))
    isize = draw(st.sampled_from([s for s in (256, 512, 1024, 2048) if s <= max(256, bs // 2) and (s >= 512 or not v5)]))
    mib = draw(st.integers(32, 160))
    size = mib * MiB + draw(st.integers(0, 255)) * 512  # the tail past the last whole block too
    agcount = draw(st.integers(1, min(8, mib // 16)))
    if draw(st.booleans()):
        data = f"agcount={agcount}"
    else:  # an AG size that need not divide the device: a short last AG (or one mkfs drops)
        agblocks = max(16 * MiB // bs, mib * MiB // agcount // bs - draw(st.integers(0, 4096)))
        data = f"agsize={agblocks * bs}"
    inode = f"size={isize}"
    rmapbt = reflink = 0
    if v5:
        finobt, rmapbt, reflink, sparse, bigtime = (int(draw(st.booleans())) for _ in range(5))
        inobtcount = finobt and int(draw(st.booleans()))
        meta = f"crc=1,finobt={finobt},rmapbt={rmapbt},reflink={reflink},bigtime={bigtime},inobtcount={inobtcount}"
        inode += f",sparse={sparse}"
    else:
        meta = "crc=0"
    args = ["-b", f"size={bs}", "-s", f"size={sect}", "-d", data, "-i", inode, "-m", meta]
    # the internal log: a stripe unit pads every log record (the unmount record too); v4 may
    # still have a version 1 log (512-byte sectors only). (mkfs.xfs 6.1 misplaces the root inode
    # when an aligned log shares the only AG with it, so stripe units need two AGs.)
    su = ["su=4096", "su=32768", "su=65536"] if agcount > 1 else []
    log = draw(st.sampled_from(["", *su] if v5 else
                               ["", *(["version=2," + x for x in su[1:]]), *(["version=1"] if sect == 512 else [])]))
    if v5 and rmapbt and not reflink:
        # mkfs.xfs 6.1 sizes this log below what a newer kernel mounts (the holes are punched
        # through a mount): give it room
        log = ",".join(x for x in (log, f"size={draw(st.integers(8, 12))}m") if x)
    if log:
        args += ["-l", log]
    nfiles = draw(st.integers(0, 12))
    max_size = max(1, min(draw(st.sampled_from([100, 5000, 100_000, 1_500_000])), size // 4 // max(nfiles, 1)))
    small_size = draw(st.integers(1, 3 * bs))
    small = min(draw(st.integers(0, 1500)), size // 4 // (-(-small_size // bs) * bs + isize))
    return {"size": size, "args": args, "nfiles": nfiles, "max_size": max_size, "small": small,
            "small_size": small_size, "delete": draw(st.booleans()), "seed": draw(st.integers(0, 2**32 - 1))}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=xfs_layouts())
def test_random_xfs_layouts(tmp_path, layout):
    """Random geometry, features and trees (holes punched on v5 through a loop mount, on v4
    offline): nothing partclone.xfs or xfs_db calls used is free, and the only blocks they call
    free that vmbak does not are those on the AG free lists."""
    tmp = tmp_path / "example"  # one directory reused by every example: they would pile up
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tree = tmp / "tree"
    tree.mkdir()
    files = make_files(tree, layout["seed"], layout["nfiles"], layout["max_size"], small=layout["small"],
                       small_size=layout["small_size"])
    img = build_xfs(tmp / "fs.img", layout["size"], tree, layout["args"], layout["seed"])
    shutil.rmtree(tree)
    try:
        left = files
        if layout["delete"] and files:
            if "crc=0" in layout["args"]:
                left = _delete_offline(img, files)
            else:
                with mounted(img, "xfs") as mnt:
                    left = delete_every_other(mnt, files)
        with ThreadPoolExecutor(1) as pool:  # partclone mostly waits: let it while the rest runs
            pc_future = pool.submit(partclone_free, "xfs", img)
            u = analyze_path(img)
            db, agfl_blocks = xfs_db_free(img)
            agfl = xfs_agfl_ranges(img)
            bs = xfs_geometry(img)["blocksize"]
            pc = pc_future.result()
        e = u.entries[0]
        assert e.fstype == "xfs" and not e.notes, (e.fstype, e.notes)
        assert total(agfl) == agfl_blocks * bs
        for name, oracle in (("partclone", pc), ("xfs_db", db)):
            assert wrongly_free(u.free, oracle) == 0, name
            missed = subtract(oracle, u.free)
            assert total(subtract(missed, agfl)) == 0, (name, missed, agfl)
            assert total(missed) == total(agfl), (name, total(missed), total(agfl))
        assert u.used_bytes >= sum(len(v) for v in left.values())
        print(f"xfs {' '.join(layout['args'])} size {layout['size']} files {len(files)} left {len(left)}: "
              f"free {u.free_bytes}, partclone {total(pc)}, xfs_db {total(db)}, AGFL {total(agfl)}")
    finally:
        img.unlink()


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
def test_corruption_never_frees_used_blocks(damaged_bases, tmp_path, variant, which, pos, nbytes, seed):
    img, baseline, regions = damaged_bases[variant]
    a, b = regions[which % len(regions)]
    off = a + pos % (b - a)
    bad = corrupt(img, tmp_path / "bad.img", off,
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
