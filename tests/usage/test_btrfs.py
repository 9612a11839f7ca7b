"""btrfs used maps against btrfs-progs' own tree dumps and partclone.btrfs; backup, restore,
``btrfs check --readonly`` and ``btrfs restore``; edited and corrupted metadata.

The strict oracle is btrfs-progs (``dump-tree`` of the chunk and extent trees, mapped to the
device by its chunk stripes): our free set must be a subset of it. partclone.btrfs is a second,
coarser oracle: it walks the trees at node-size granularity and also keeps the stale tree
blocks that the superblock's backup roots still name; the difference is reported, and every
byte it keeps that we free must be outside the current extent tree (progs calls it free).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import crc32c
import numpy as np
import pytest
from fatlvm_util import (
    MiB,
    analyze_path,
    btrfs_check,
    btrfs_files,
    btrfs_progs_free,
    build_btrfs,
    build_fat,
    check_subset,
    extract,
    extract_fat,
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

from vmbak.usage.model import subtract, total

SB = 0x10000


def check_btrfs(img: Path, files: dict[str, bytes], tmp: Path) -> tuple[int, int]:
    u = analyze_path(img)
    e = u.entries[0]
    assert e.fstype == "btrfs" and not e.notes, (e.fstype, e.notes)
    progs = btrfs_progs_free(img)
    missed = check_subset(u.free, progs)
    assert missed == 0, missed
    pc = partclone_free("btrfs", img)
    extra = subtract(u.free, pc)  # what partclone keeps and we do not
    assert total(subtract(extra, progs)) == 0
    assert btrfs_files(img, tmp / f"restore-{time.monotonic_ns()}") == files
    return total(extra), total(pc) - total(subtract(pc, u.free))


@pytest.mark.parametrize("args", [
    [],  # metadata DUP, data single
    ["-m", "single"],
    ["-M"],  # mixed block groups
    ["-n", "4096"],
    ["-n", "65536", "-O", "^no-holes", "-R", "^free-space-tree"],
    ["--shrink"],  # the filesystem ends before its device
], ids=lambda a: " ".join(a) or "default")
def test_btrfs_matches_oracles(tmp_path, args):
    files = make_files(tmp_path / "tree", seed=len(args), nfiles=12, max_size=1_500_000)
    img = tmp_path / "fs.img"
    build_btrfs(img, 128 * MiB, tmp_path / "tree", 1, *args)
    kept, _ = check_btrfs(img, files, tmp_path)
    u = analyze_path(img)
    assert u.free_bytes > 0.7 * u.entries[0].size
    if "--shrink" in args:  # the device bytes after the filesystem stay used
        assert u.entries[0].size < 128 * MiB and u.free[-1, 1] <= u.entries[0].size
    print(f"btrfs {' '.join(args) or 'default'}: free {u.free_bytes}, partclone keeps {kept} more "
          "(stale backup-root blocks, node-size rounding)")


def test_btrfs_gpt_backup_restore_check_and_files(tmp_path, make_repo):
    disk = tmp_path / "disk.img"
    size = 180 * MiB
    garbage_file(disk, size, seed=3)
    sfdisk(disk, "label: gpt\nstart=2048, size=262144, type=L\nstart=264192, size=40960, type=U\n")
    p1, s1, p2, s2 = MiB, 128 * MiB, 264192 * 512, 20 * MiB
    files = make_files(tmp_path / "tree", seed=4, nfiles=14, max_size=3_000_000)
    fs = tmp_path / "fs.img"
    build_btrfs(fs, s1, tmp_path / "tree", 5, "-L", "rootfs")
    place(disk, fs, p1)
    make_files(tmp_path / "tree-efi", seed=5, nfiles=4, max_size=200_000)
    efi = tmp_path / "efi.img"
    efi_files = build_fat(efi, s2, 16, tmp_path / "tree-efi", seed=6)
    place(disk, efi, p2)
    u = analyze_path(disk)
    assert [(e.name, e.fstype, e.label) for e in u.entries] == [("p1", "btrfs", "rootfs"), ("p2", "fat16", "")]
    repo = make_repo()
    stats = repo.backup(disk, "bt")["stats"]
    assert stats["read_bytes"] <= int(u.used_bitmap(64 * 1024).sum()) * 64 * 1024
    assert stats["read_bytes"] < 0.4 * size, stats
    out = tmp_path / "restored.img"
    repo.restore("bt:latest", out)
    r1 = extract(out, tmp_path / "r1.img", p1, s1)
    btrfs_check(r1)
    assert btrfs_files(r1, tmp_path / "x1") == files
    r2 = extract(out, tmp_path / "r2.img", p2, s2)
    fsck_fat_counts(r2)
    assert extract_fat(r2, tmp_path / "x2") == efi_files
    bm = u.used_bitmap(64 * 1024)
    rest = np.frombuffer(out.read_bytes(), np.uint8).reshape(-1, 64 * 1024)
    assert not rest[~bm].any()


def _resum_super(img: Path, edits: dict[int, bytes]) -> None:
    """Edit superblock fields and recompute its checksum (a consistent, but different, superblock)."""
    with open(img, "r+b") as f:
        f.seek(SB)
        sb = bytearray(f.read(4096))
        for off, data in edits.items():
            sb[off:off + len(data)] = data
        struct.pack_into("<I", sb, 0, crc32c.crc32c(bytes(sb[0x20:])))
        f.seek(SB)
        f.write(sb)


def test_unsafe_states_fall_back(tmp_path):
    """A pending log tree or disagreeing byte counts keep every chunk used (only unallocated
    space is free); several devices or another checksum type make the whole volume used."""
    files = make_files(tmp_path / "tree", seed=6, nfiles=5, max_size=400_000)
    img = tmp_path / "fs.img"
    build_btrfs(img, 128 * MiB, tmp_path / "tree", 2)
    clean = analyze_path(img)
    sup = run("btrfs", "inspect-internal", "dump-tree", "-t", "chunk", img)
    assert "CHUNK_ITEM" in sup
    unallocated = None
    for name, edits, note in (
        ("log", {0x60: struct.pack("<Q", 0x1000000)}, "log tree"),
        ("bytes_used", {0x78: struct.pack("<Q", 12345 * 4096)}, "superblock"),
    ):
        bad = tmp_path / f"{name}.img"
        bad.write_bytes(img.read_bytes())
        _resum_super(bad, edits)
        u = analyze_path(bad)
        assert any(note in n for n in u.entries[0].notes), u.entries[0].notes
        assert total(subtract(u.free, clean.free)) == 0 and u.free_bytes < clean.free_bytes
        if unallocated is None:
            unallocated = u.free_bytes
        assert u.free_bytes == unallocated
    for name, edits, why in (("devices", {0x88: struct.pack("<Q", 2)}, "devices"),
                             ("csum", {0xC4: struct.pack("<H", 1)}, "checksum type"),
                             ("zoned", {0xBC: struct.pack("<Q", 0x1341)}, "incompat")):
        bad = tmp_path / f"{name}.img"
        bad.write_bytes(img.read_bytes())
        _resum_super(bad, edits)
        u = analyze_path(bad)
        assert u.free_bytes == 0 and why in " ".join(u.entries[0].notes), u.entries[0].notes
    del files


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodesize=st.sampled_from([4096, 16384, 32768]), meta=st.sampled_from(["dup", "single"]),
       mixed=st.booleans(), shrink=st.booleans(), nfiles=st.integers(0, 20), seed=st.integers(0, 10_000))
def test_random_btrfs(tmp_path_factory, nodesize, meta, mixed, shrink, nfiles, seed):
    tmp = tmp_path_factory.mktemp("btrfs")
    files = make_files(tmp / "tree", seed=seed, nfiles=nfiles, max_size=2_000_000, dirs=1 + seed % 4)
    (tmp / "tree").mkdir(exist_ok=True)
    args: list[str] = ["-n", str(nodesize)]
    if mixed:
        args += ["-M"]  # mixed groups: metadata and data share a profile
        if nodesize != 4096:
            args[1] = "4096"
    else:
        args += ["-m", meta]
    if shrink:
        args.append("--shrink")
    img = tmp / "fs.img"
    build_btrfs(img, 128 * MiB, tmp / "tree", seed, *args)
    check_btrfs(img, files, tmp)


# ---------------------------------------------------------------------------- fuzzing
def _tree_blocks(img: Path) -> dict[str, int]:
    """Device offsets of the chunk, root, extent and device trees' root blocks (from dump-super
    and the chunk map btrfs-progs prints)."""
    import re

    sup = run("btrfs", "inspect-internal", "dump-super", img)
    roots = {"chunk": int(re.search(r"^chunk_root\s+(\d+)", sup, re.M).group(1)),
             "root": int(re.search(r"^root\s+(\d+)", sup, re.M).group(1))}
    out = run("btrfs", "inspect-internal", "dump-tree", "-t", "root", img)
    for name, key in (("extent", "EXTENT_TREE"), ("dev", "DEV_TREE")):
        m = re.search(key + r" ROOT_ITEM 0\).*?bytenr (\d+)", out, re.S)
        roots[name] = int(m.group(1))
    chunks = run("btrfs", "inspect-internal", "dump-tree", "-t", "chunk", img)
    phys = {}
    for name, logical in roots.items():
        for m in re.finditer(r"CHUNK_ITEM (\d+)\).*?length (\d+).*?stripe 0 devid \d+ offset (\d+)", chunks, re.S):
            lo, n, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if lo <= logical < lo + n:
                phys[name] = p + logical - lo
    return phys


@pytest.fixture(scope="module")
def btrfs_fuzz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("btfuzz")
    make_files(tmp / "tree", seed=8, nfiles=10, max_size=500_000)
    img = tmp / "fs.img"
    build_btrfs(img, 128 * MiB, tmp / "tree", 9, "-m", "single")  # single: no second copy to fall back on
    blocks = _tree_blocks(img)
    regions = [(SB, SB + 0x32B), (SB + 0x32B, SB + 0x32B + 0x200)]  # superblock, sys_chunk_array
    regions += [(b, b + 16384) for b in blocks.values()]
    return img, analyze_path(img).free, regions


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 5), pos=st.integers(0, 1 << 20), nbytes=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1), resum=st.booleans())
def test_corrupt_btrfs_never_frees_more(btrfs_fuzz, which, pos, nbytes, seed, resum):
    img, baseline, regions = btrfs_fuzz
    a, b = regions[which]
    off = a + pos % (b - a)
    data = np.random.default_rng(seed).bytes(nbytes)
    # patched in place and put back (copying 128 MiB per example would dominate the run)
    with open(img, "rb") as f:
        f.seek(SB)
        saved_sb = f.read(4096)
        f.seek(off)
        saved = f.read(nbytes)
    try:
        if resum and which < 2:
            # a superblock field changed *with* a valid checksum: the cross-checks must catch it
            _resum_super(img, {off - SB: data[: max(1, min(nbytes, 0x32B + 0x200 - (off - SB)))]})
        else:
            with open(img, "r+b") as f:
                f.seek(off)
                f.write(data)
        t0 = time.monotonic()
        u = analyze_path(img)
        assert time.monotonic() - t0 < 10
    finally:
        with open(img, "r+b") as f:
            f.seek(off)
            f.write(saved)
            f.seek(SB)
            f.write(saved_sb)
    assert total(subtract(u.free, baseline)) == 0, (off, u.entries)
