"""exFAT used maps against partclone.exfat; backup, restore, fsck.exfat and dissect.fat; fuzzing.

mkfs.exfat makes the filesystems. exfatprogs cannot add files and nothing here mounts, so
fatlvm_util.ExfatWriter adds them the way a driver does (bitmap, FAT chains for fragmented
files, NoFatChain for contiguous ones, checksummed entry sets); ``fsck.exfat -n`` must call
every image clean, and dissect.fat (an independent reader) reads the files back.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fatlvm_util import (
    ExfatWriter,
    MiB,
    analyze_path,
    build_exfat,
    build_fat,
    check_subset,
    corrupt,
    exfat_files,
    extract,
    extract_fat,
    flip_byte,
    fsck_exfat,
    fsck_fat_counts,
    garbage_file,
    make_files,
    partclone_free,
    place,
    run,
    sfdisk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbak.disks.raw import RawDisk
from vmbak.usage import exfat as exmod
from vmbak.usage.model import Volume, subtract, total


def _geometry(img: Path) -> exmod.Geometry:
    with RawDisk(img) as d:
        return exmod.parse_boot(Volume.linear(d, 0, d.size))[0]


def check_exfat(img: Path, files: dict[str, bytes]) -> int:
    u = analyze_path(img)
    e = u.entries[0]
    assert e.fstype == "exfat" and not e.notes, (e.fstype, e.notes)
    missed = check_subset(u.free, partclone_free("exfat", img))
    geo = _geometry(img)
    # partclone calls the sectors after the last cluster free; they stay used here
    tail = img.stat().st_size - geo.cluster_offset(geo.count + 2)
    assert missed <= tail, (missed, tail)
    assert exfat_files(img) == files
    # everything before the cluster heap is used
    head = np.array([[0, geo.heap_offset * geo.bps]], np.int64)
    assert total(subtract(head, u.free)) == total(head)
    return missed


@pytest.mark.parametrize("size,cluster,nfiles", [
    (8 * MiB, "512", 0),
    (24 * MiB, "4k", 12),
    (40 * MiB, "32k", 8),
])
def test_exfat_matches_partclone(tmp_path, size, cluster, nfiles):
    files = make_files(tmp_path / "tree", seed=nfiles, nfiles=nfiles, max_size=400_000) if nfiles else {}
    img = tmp_path / "ex.img"
    build_exfat(img, size, files, seed=2, cluster=cluster, label="DATA")
    check_exfat(img, files)
    assert analyze_path(img).entries[0].label == "DATA"


def test_bitmap_that_frees_a_file_cluster_is_refused(tmp_path):
    """A bitmap bit cleared under a contiguous file: the tree walk sees the file and refuses
    (fsck.exfat agrees the image is damaged). Cleared under the FAT-chained bitmap itself: refused."""
    files = {"big.bin": np.random.default_rng(1).bytes(300_000), "d/x.txt": b"hello\n" * 1000}
    img = tmp_path / "ex.img"
    garbage_file(img, 16 * MiB, seed=1)
    run("mkfs.exfat", "-c", "4k", img)
    w = ExfatWriter(img)
    clusters = w.add_file(w.root[0], "big.bin", files["big.bin"], fragmented=False)
    d = w.mkdir(w.root[0], "d")
    w.add_file(d, "x.txt", files["d/x.txt"])
    bm_off = w.coff(w.bm_first)
    w.close()
    fsck_exfat(img)
    clean = analyze_path(img)
    c = clusters[5] - 2
    with open(img, "rb") as f:
        f.seek(bm_off + c // 8)
        byte = f.read(1)[0]
    bad = corrupt(img, tmp_path / "bad.img", bm_off + c // 8, bytes([byte & ~(1 << (c % 8))]))
    p = __import__("subprocess").run(["fsck.exfat", "-n", str(bad)], capture_output=True, text=True)
    assert p.returncode != 0, p.stdout
    u = analyze_path(bad)
    assert u.free_bytes == 0 and "files use" in " ".join(u.entries[0].notes)
    # the bitmap's own first cluster (cluster 2) marked free
    bad2 = corrupt(img, tmp_path / "bad2.img", bm_off, bytes([0xFE]))
    assert analyze_path(bad2).free_bytes == 0
    assert clean.free_bytes > 13 * MiB


def test_backup_boot_region_is_used_when_the_main_one_is_damaged(tmp_path):
    files = make_files(tmp_path / "tree", seed=4, nfiles=5, max_size=100_000)
    img = tmp_path / "ex.img"
    build_exfat(img, 16 * MiB, files, seed=3)
    clean = analyze_path(img)
    bad = flip_byte(img, tmp_path / "bad.img", 100)  # inside the checksummed boot sector
    u = analyze_path(bad)
    assert any("backup boot region" in n for n in u.entries[0].notes)
    assert (u.free == clean.free).all() and u.free_bytes == clean.free_bytes
    # both regions damaged: all used
    worse = flip_byte(bad, tmp_path / "worse.img", 12 * 512 + 100)
    assert analyze_path(worse).free_bytes == 0


def test_gpt_exfat_and_fat_backup_restore(tmp_path, make_repo):
    """A GPT disk with exFAT and FAT32: back up skipping unused blocks, restore, fsck.exfat -n,
    fsck.vfat -n, and every file equal (dissect.fat and mtools read them)."""
    disk = tmp_path / "disk.img"
    size = 84 * MiB
    garbage_file(disk, size, seed=21)
    sfdisk(disk, "label: gpt\nstart=2048, size=81920, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
                 "start=83968, size=86016, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n")
    p1, s1, p2, s2 = 2048 * 512, 81920 * 512, 83968 * 512, 86016 * 512
    ex_files = make_files(tmp_path / "tree-ex", seed=7, nfiles=12, max_size=900_000)
    ex = tmp_path / "ex.img"
    build_exfat(ex, s1, ex_files, seed=8, cluster="4k", label="EXDATA")
    place(disk, ex, p1)
    make_files(tmp_path / "tree-fat", seed=9, nfiles=8, max_size=500_000)
    fat = tmp_path / "fat.img"
    fat_files = build_fat(fat, s2, 32, tmp_path / "tree-fat", seed=10, spc=1, fragment=True)
    place(disk, fat, p2)
    u = analyze_path(disk)
    assert [(e.name, e.fstype) for e in u.entries] == [("p1", "exfat"), ("p2", "fat32")], u.entries
    repo = make_repo()
    stats = repo.backup(disk, "mixed")["stats"]
    # exactly the 64 KiB blocks that hold a used byte are read
    assert stats["read_bytes"] <= int(u.used_bitmap(64 * 1024).sum()) * 64 * 1024, (stats, u.used_bytes)
    assert stats["read_bytes"] < size / 2
    out = tmp_path / "restored.img"
    repo.restore("mixed:latest", out)
    r1 = extract(out, tmp_path / "r1.img", p1, s1)
    fsck_exfat(r1)
    assert exfat_files(r1) == ex_files
    r2 = extract(out, tmp_path / "r2.img", p2, s2)
    fsck_fat_counts(r2)
    assert extract_fat(r2, tmp_path / "x2") == fat_files
    bm = u.used_bitmap(64 * 1024)
    rest = np.frombuffer(out.read_bytes(), np.uint8).reshape(-1, 64 * 1024)
    assert not rest[~bm].any()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cluster=st.sampled_from(["512", "1k", "4k", "16k", "64k"]), mib=st.integers(4, 32),
       extra=st.integers(0, 200), nfiles=st.integers(0, 12), frag=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_random_exfat(tmp_path_factory, cluster, mib, extra, nfiles, frag, seed):
    tmp = tmp_path_factory.mktemp("exfat")
    csize = int(cluster[:-1]) * 1024 if cluster.endswith("k") else int(cluster)
    size = mib * MiB + extra * 512
    budget = size // 5
    files = make_files(tmp / "tree", seed=seed, nfiles=nfiles,
                       max_size=max(2, budget // max(1, nfiles) - csize), dirs=1 + seed % 3)
    img = tmp / "ex.img"
    build_exfat(img, size, files, seed=seed, cluster=cluster, fragment_every=frag)
    check_exfat(img, files)


# ---------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def exfat_fuzz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exfuzz")
    files = make_files(tmp / "tree", seed=3, nfiles=10, max_size=200_000)
    img = tmp / "ex.img"
    build_exfat(img, 12 * MiB, files, seed=4, cluster="4k", fragment_every=2)
    geo = _geometry(img)
    w = ExfatWriter(img)
    bm, root = w.coff(w.bm_first), w.coff(geo.root_cluster)
    sub = w.coff(min(c for c in w.dirs if c != geo.root_cluster)) if len(w.dirs) > 1 else root
    w.f.close()
    fat = geo.fat_offset * geo.bps
    regions = [(0, 512), (512, 12 * 512), (12 * 512, 24 * 512), (fat, fat + 2048), (bm, bm + 512),
               (root, root + 1024), (sub, sub + 512)]
    return img, analyze_path(img).free, regions


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 6), pos=st.integers(0, 1 << 20), nbytes=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_corrupt_exfat_never_frees_more(exfat_fuzz, tmp_path, which, pos, nbytes, seed):
    img, baseline, regions = exfat_fuzz
    a, b = regions[which]
    off = a + pos % (b - a)
    bad = corrupt(img, tmp_path / "bad.img", off, np.random.default_rng(seed).bytes(nbytes))
    t0 = time.monotonic()
    u = analyze_path(bad)
    assert time.monotonic() - t0 < 10
    assert total(subtract(u.free, baseline)) == 0, (off, u.entries)


def test_exfat_probe_and_parse_on_garbage(tmp_path):
    """A volume that only says EXFAT: probed, refused, all used."""
    img = tmp_path / "junk.img"
    garbage_file(img, 4 * MiB, seed=5)
    with open(img, "r+b") as f:
        f.write(b"\xeb\x76\x90EXFAT   ")
    u = analyze_path(img)
    assert u.entries[0].fstype == "exfat" and u.free_bytes == 0 and u.entries[0].notes
