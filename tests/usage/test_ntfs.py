"""NTFS used maps against partclone.ntfs and ntfscluster; backup, restore, ntfsfix -n; damage.

Images are made by mkntfs on files full of garbage and filled through an ntfs-3g FUSE mount;
every other small file and every third big one is then deleted, leaving holes.
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
    build_ntfs,
    make_files,
    mounted,
    ntfscluster_free_bytes,
    run,
    wrongly_free,
)

from vmbak.usage.model import subtract, total

# name: (size, mkntfs arguments)
VARIANTS = {
    "4k-clusters": (40 * MiB, []),
    "512-clusters": (24 * MiB + 3 * 512, ["-c", "512"]),
    "64k-clusters": (64 * MiB + 7 * 512, ["-c", "65536"]),
    "4k-sectors-8k-clusters": (40 * MiB, ["-s", "4096", "-c", "8192"]),
}


def _build(tmp: Path, variant: str, seed: int = 1) -> tuple[Path, dict[str, bytes]]:
    size, args = VARIANTS[variant]
    tree = tmp / f"tree-{variant}"
    make_files(tree, seed, 9, 400_000, small=120, small_size=3000)
    img = tmp / f"{variant}.img"
    left = build_ntfs(img, size, tree, args, seed)
    return img, left


def _geometry(img: Path) -> dict[str, int]:
    """Cluster size, MFT record size and the MFT's first cluster, from ntfsinfo."""
    out = run("ntfsinfo", "-m", img).stdout
    return {"cluster": int(re.search(r"Cluster Size: (\d+)", out).group(1)),
            "record": int(re.search(r"MFT Record Size: (\d+)", out).group(1)),
            "mft_lcn": int(re.search(r"LCN of Data Attribute for FILE_MFT: (\d+)", out).group(1))}


def _data_lcn(img: Path, inode: int) -> int:
    """First cluster of an inode's unnamed $DATA, from ntfsinfo's run list."""
    out = run("ntfsinfo", "-i", str(inode), "-v", img).stdout
    m = re.search(r"Runlist:\s+VCN\s+LCN\s+Length\s+0x0\s+0x([0-9a-f]+)", out)
    return int(m.group(1), 16)


@pytest.fixture(scope="module")
def ntfs_images(tmp_path_factory):
    """Every variant, built once, with partclone's free set (its runs take a fixed few seconds
    each, so they run at the same time)."""
    tmp = tmp_path_factory.mktemp("ntfs")
    built = {v: _build(tmp, v) for v in VARIANTS}
    with ThreadPoolExecutor(len(built)) as pool:
        pcs = dict(zip(built, pool.map(lambda v: partclone_free("ntfs", built[v][0]), built), strict=True))
    return {v: (img, left, pcs[v]) for v, (img, left) in built.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ntfs_matches_oracles(ntfs_images, variant):
    img, left, pc = ntfs_images[variant]
    t0 = time.perf_counter()
    u = analyze_path(img)
    dt = time.perf_counter() - t0
    e = u.entries[0]
    assert e.fstype == "ntfs" and not e.notes, (e.fstype, e.notes)
    assert wrongly_free(u.free, pc) == 0
    missed = total(pc) - u.free_bytes
    assert missed == 0, missed
    assert u.free_bytes == ntfscluster_free_bytes(img)
    assert u.used_bytes >= sum(len(v) for v in left.values())
    g = _geometry(img)
    # the boot region, the MFT's first records and the backup boot sector are used
    size = img.stat().st_size
    meta = np.array([[0, 8192], [g["mft_lcn"] * g["cluster"], g["mft_lcn"] * g["cluster"] + 16 * g["record"]],
                     [size - 512, size]], np.int64)
    assert total(subtract(meta, u.free)) == total(meta)
    print(f"{variant}: free {u.free_bytes} = partclone {total(pc)} = ntfscluster; missed 0, "
          f"wrongly free 0; {dt * 1000:.2f} ms")


# ---------------------------------------------------------------------------- random layouts
CLUSTERS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


@st.composite
def ntfs_layouts(draw):
    """A random mkntfs command line (clusters no smaller than sectors, an MFT zone of 1/8 to
    4/8 of the volume, compression, which NTFS only has up to 4 KiB clusters, on the root
    directory) and a random tree."""
    sector = draw(st.sampled_from([512, 4096]))
    cluster = draw(st.sampled_from([c for c in CLUSTERS if c >= sector]))
    mib = draw(st.integers(8, 96))
    size = mib * MiB + draw(st.integers(0, 15)) * 512  # sectors past the last whole cluster
    compress = cluster <= 4096 and draw(st.booleans())
    args = ["-c", str(cluster), "-s", str(sector), "-z", str(draw(st.integers(1, 4))), *(["-C"] if compress else [])]
    nfiles = draw(st.integers(0, 12))
    max_size = max(1, min(draw(st.sampled_from([100, 5000, 100_000, 1_500_000])), size // 4 // max(nfiles, 1)))
    small_size = draw(st.integers(1, 3 * 4096))
    small = min(draw(st.integers(0, 400)), size // 4 // (-(-small_size // cluster) * cluster + 1024))
    return {"size": size, "args": args, "quick": draw(st.booleans()), "nfiles": nfiles, "max_size": max_size,
            "small": small, "small_size": small_size, "delete": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**32 - 1))}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=ntfs_layouts())
def test_random_ntfs_layouts(tmp_path, layout):
    """Random geometry and trees, written through ntfs-3g (holes punched or not): vmbak's free
    set is exactly partclone.ntfs's, and its size ntfscluster's."""
    tmp = tmp_path / "example"  # one directory reused by every example: they would pile up
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tree = tmp / "tree"
    tree.mkdir()
    make_files(tree, layout["seed"], layout["nfiles"], layout["max_size"], small=layout["small"],
               small_size=layout["small_size"])
    img = tmp / "fs.img"
    try:
        left = build_ntfs(img, layout["size"], tree, layout["args"], layout["seed"], quick=layout["quick"],
                          delete=layout["delete"])
        shutil.rmtree(tree)
        with ThreadPoolExecutor(1) as pool:  # partclone mostly waits: let it while the rest runs
            pc_future = pool.submit(partclone_free, "ntfs", img)
            u = analyze_path(img)
            nc = ntfscluster_free_bytes(img)
            g = _geometry(img)
            pc = pc_future.result()
        e = u.entries[0]
        assert e.fstype == "ntfs" and not e.notes, (e.fstype, e.notes)
        assert wrongly_free(u.free, pc) == 0
        assert total(subtract(pc, u.free)) == 0, subtract(pc, u.free)
        assert u.free_bytes == nc
        if "-C" not in layout["args"]:  # compressed files may take less room than their bytes
            assert u.used_bytes >= sum(len(v) for v in left.values())
        size = img.stat().st_size
        meta = np.array([[0, 8192], [g["mft_lcn"] * g["cluster"], g["mft_lcn"] * g["cluster"] + 16 * g["record"]],
                         [size - 512, size]], np.int64)
        assert total(subtract(meta, u.free)) == total(meta)
        print(f"ntfs {' '.join(layout['args'])} size {layout['size']} quick {layout['quick']} files {len(left)}: "
              f"free {u.free_bytes}, partclone {total(pc)}, ntfscluster {nc}")
    finally:
        img.unlink(missing_ok=True)


def test_ntfs_backup_restore_ntfsfix_and_files(tmp_path, make_repo, ntfs_images):
    """NTFS in an MBR partition, garbage in free space: back up skipping unused blocks, restore,
    ntfsfix -n is clean and every file is byte-identical."""
    img, left, _pc = ntfs_images["4k-clusters"]
    fs_size = img.stat().st_size
    disk = garbage_file(tmp_path / "disk.img", fs_size + 2 * MiB, seed=5)
    subprocess.run(["sfdisk", "-q", str(disk)], input=f"label: dos\nstart=2048, size={fs_size // 512}, type=7\n",
                   text=True, check=True, capture_output=True)
    off = 2048 * 512
    with open(disk, "r+b") as f:
        f.seek(off)
        f.write(img.read_bytes())
    u = analyze_path(disk)
    assert [e.fstype for e in u.entries] == ["ntfs"], u.entries
    repo = make_repo()
    st_ = repo.backup(disk, "ntfs")["stats"]
    assert st_["read_bytes"] <= int(u.used_bitmap(64 * 1024).sum()) * 64 * 1024, (st_, u.used_bytes)
    assert st_["read_bytes"] < disk.stat().st_size / 2
    out = tmp_path / "restored.img"
    repo.restore("ntfs:latest", out)
    part = tmp_path / "part.img"
    with open(out, "rb") as f, open(part, "wb") as p:
        f.seek(off)
        p.write(f.read(fs_size))
    fix = run("ntfsfix", "-n", part, check=False)
    assert fix.returncode == 0 and "processed successfully" in fix.stdout, fix.stdout + fix.stderr
    with mounted(part, "ntfs", readonly=True) as mnt:
        assert read_tree(mnt) == left
    bm = u.used_bitmap(64 * 1024)
    n = len(bm) * 64 * 1024
    orig = np.frombuffer(disk.read_bytes().ljust(n, b"\0"), np.uint8).reshape(-1, 64 * 1024)
    rest = np.frombuffer(out.read_bytes().ljust(n, b"\0"), np.uint8).reshape(-1, 64 * 1024)
    assert not rest[~bm].any()
    assert (rest[bm] == orig[bm]).all()


def test_unclean_volume_counts_as_all_used(tmp_path, ntfs_images):
    """ntfsfix schedules a chkdsk (the dirty flag); a $LogFile that is neither empty nor clean."""
    img = tmp_path / "fs.img"
    shutil.copyfile(ntfs_images["4k-clusters"][0], img)
    run("ntfsfix", img)
    assert "Volume is scheduled for check" in run("ntfsinfo", "-m", img, check=False).stderr
    u = analyze_path(img)
    assert u.free_bytes == 0 and "dirty" in " ".join(u.entries[0].notes), u.entries
    # a $LogFile holding something other than a clean restart area
    src = ntfs_images["4k-clusters"][0]
    log = _data_lcn(src, 2) * _geometry(src)["cluster"]
    bad = corrupt(src, tmp_path / "log.img", log, np.random.default_rng(2).bytes(64 * 1024))
    u = analyze_path(bad)
    assert u.free_bytes == 0 and "$LogFile" in " ".join(u.entries[0].notes), u.entries


# ---------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def damaged_base(ntfs_images):
    img = ntfs_images["4k-clusters"][0]
    g = _geometry(img)
    mft = g["mft_lcn"] * g["cluster"]
    regions = [(0, 512)] + [(mft + n * g["record"], mft + (n + 1) * g["record"]) for n in (0, 1, 2, 3, 6)]
    return img, analyze_path(img).free, regions, g


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1000), pos=st.integers(0, 1 << 20), nbytes=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_corruption_never_frees_used_clusters(damaged_base, tmp_path, which, pos, nbytes, seed):
    img, baseline, regions, _g = damaged_base
    a, b = regions[which % len(regions)]
    off = a + pos % (b - a)
    bad = corrupt(img, tmp_path / "bad.img", off,
                  np.random.default_rng(seed).bytes(nbytes)[: b - off])
    t0 = time.monotonic()
    u = analyze_path(bad)
    assert time.monotonic() - t0 < 10
    extra = subtract(u.free, baseline)
    assert total(extra) == 0, f"corruption at {off} made {total(extra)} bytes free: {u.entries[0].notes}"


def _bitmap_runlist_offset(img: Path, g: dict[str, int]) -> int:
    """Byte offset in the image of the first run of $Bitmap's run list (record 6's $DATA)."""
    rec_off = g["mft_lcn"] * g["cluster"] + 6 * g["record"]
    with open(img, "rb") as f:
        f.seek(rec_off)
        rec = f.read(g["record"])
    pos = int.from_bytes(rec[20:22], "little")
    while int.from_bytes(rec[pos:pos + 4], "little") != 0x80:
        pos += int.from_bytes(rec[pos + 4:pos + 8], "little")
    return rec_off + pos + int.from_bytes(rec[pos + 32:pos + 34], "little")


def test_specific_damage_counts_as_all_used(damaged_base, tmp_path):
    img, _baseline, _r, g = damaged_base
    mft = g["mft_lcn"] * g["cluster"]
    rl = _bitmap_runlist_offset(img, g)
    with open(img, "rb") as f:
        f.seek(rl)
        head = f.read(1)[0]
    nlen = head & 0xF
    bitmap_lcn = _data_lcn(img, 6)
    # $Bitmap moved onto a run of free (garbage) clusters, or onto zeros
    far = (bitmap_lcn + 2000).to_bytes(head >> 4, "little", signed=True)
    size = img.stat().st_size
    cases = {
        "bitmap run moved": (rl + 1 + nlen, far, "calls the boot sector"),
        "bitmap run past the volume": (rl + 1 + nlen, ((1 << (8 * (head >> 4) - 1)) - 1).to_bytes(
            head >> 4, "little"), "outside the volume"),
        "bitmap run list truncated": (rl, b"\x00", "does not cover"),
        "bitmap calls the boot cluster free": (bitmap_lcn * g["cluster"], b"\x00", "calls the boot sector"),
        "MFT record magic": (mft + 6 * g["record"], b"FILX", "bad magic"),
        "torn MFT record": (mft + 6 * g["record"] + 510, b"\x99\x99", "torn"),
        "sectors per cluster": (13, b"\x03", "sectors per cluster"),
        "MFT cluster past the end": (0x30, (10**9).to_bytes(8, "little"), "outside the volume"),
        "backup boot sector disagrees": (size - 512 + 0x40, b"\x02", "backup"),
    }
    for name, (off, data, why) in cases.items():
        u = analyze_path(corrupt(img, tmp_path / "bad.img", off, data))
        notes = " ".join(u.entries[0].notes) if u.entries else ""
        assert u.free_bytes == 0, (name, notes)
        assert why in notes, (name, notes)
    # a truncated volume
    cut = tmp_path / "cut.img"
    shutil.copyfile(img, cut)
    with open(cut, "r+b") as f:
        f.truncate(size // 2)
    u = analyze_path(cut)
    assert u.free_bytes == 0 and "larger than its volume" in " ".join(u.entries[0].notes)


def test_usage_cli_on_ntfs(tmp_path, run_vmbak):
    import json

    img = garbage_file(tmp_path / "n.img", 16 * MiB, seed=3)
    run("mkntfs", "-q", "-F", "-f", "-L", "WinData", img)
    rep = json.loads(run_vmbak("usage", img, "--json").stdout)
    v = rep["volumes"][0]
    assert v["filesystem"] == "ntfs" and v["label"] == "WinData" and v["free_bytes"] > 12 * MiB, v
