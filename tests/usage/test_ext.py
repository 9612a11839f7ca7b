"""ext2/3/4 used-block maps against dumpe2fs and partclone, through backup, restore and e2fsck."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from usage_helpers import usage_helpers  # tests/usage is on sys.path (it has no __init__.py)

from vmbak.usage.model import subtract, total

MiB = 1 << 20

# (mke2fs arguments) covering the feature combinations of the issue; -g keeps groups small so
# that tens of MiB still hold several groups (and flex groups, meta groups, sparse backups).
COMBOS = {
    "ext4": ["-t", "ext4", "-b", "4096", "-g", "2048"],
    "ext4-32bit": ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "^64bit"],
    "ext4-1k": ["-t", "ext4", "-b", "1024"],
    "ext4-2k-uninit_bg": ["-t", "ext4", "-b", "2048", "-g", "4096", "-O", "^metadata_csum,uninit_bg"],
    "ext4-no-flex_bg": ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "^flex_bg"],
    "ext4-meta_bg": ["-t", "ext4", "-b", "1024", "-g", "1024", "-O", "^resize_inode,meta_bg"],
    "ext4-sparse_super2": ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "sparse_super2"],
    "ext4-bigalloc": ["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"],
    "ext4-csum_seed-128": ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "metadata_csum_seed", "-I", "128"],
    "ext3": ["-t", "ext3", "-b", "4096", "-g", "2048"],
    "ext2-no-sparse_super": ["-t", "ext2", "-b", "2048", "-g", "4096", "-O", "^sparse_super,^resize_inode"],
}


def _slack(size: int) -> int:
    """How many bytes the oracles may call free that vmbak keeps (reported; small)."""
    return size // 50


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_feature_combinations_match_oracles(combo, tmp_path, build_ext, file_tree, analyze_image,
                                            oracle_dumpe2fs, oracle_partclone, assert_free_subset):
    size = 48 * MiB
    files = file_tree(tmp_path / "tree", seed=len(combo))
    img = build_ext(tmp_path / "fs.img", size, COMBOS[combo], tmp_path / "tree", seed=3)
    u = analyze_image(img)
    assert u.scheme == "none" and u.entries[0].fstype in ("ext2", "ext3", "ext4"), u.entries
    assert not u.entries[0].notes, u.entries[0].notes
    missed_d = assert_free_subset(u.free, oracle_dumpe2fs(img), _slack(size))
    missed_p = None
    if "bigalloc" not in combo:  # partclone 0.3.23 miscounts bigalloc clusters and refuses
        missed_p = assert_free_subset(u.free, oracle_partclone("extfs", img), _slack(size))
    used = u.used_bytes
    data = sum(len(v) for v in files.values())
    assert used >= data  # every file's bytes are inside the used set
    print(f"{combo}: used {used} free {u.free_bytes} missed vs dumpe2fs {missed_d} vs partclone {missed_p}")


def test_every_file_block_is_used(tmp_path, build_ext, file_tree, analyze_image):
    """Independent of the bitmaps: every block debugfs lists for every file is in the used set."""
    files = file_tree(tmp_path / "tree", seed=11, nfiles=12)
    img = build_ext(tmp_path / "fs.img", 32 * MiB, COMBOS["ext4"], tmp_path / "tree", seed=5)
    u = analyze_image(img)
    blocks: list[int] = []
    for rel in files:
        out = subprocess.run(["debugfs", "-R", f"blocks /{rel}", str(img)], capture_output=True,
                             text=True, check=True).stdout
        blocks += [int(b) for b in out.split()]
    assert len(blocks) * 4096 >= sum(len(v) for v in files.values())
    b = np.array(blocks, np.int64) * 4096
    ranges = np.stack((b, b + 4096), axis=1)
    assert total(ranges) - total(subtract(ranges, u.free)) == 0, "a file's block is called free"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_feature_combinations(data, tmp_path, build_ext, file_tree, analyze_image,
                                     oracle_dumpe2fs, assert_free_subset):
    tmp = tmp_path / "example"  # one directory reused by every example: they would pile up
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kind = data.draw(st.sampled_from(["ext2", "ext3", "ext4"]))
    bs = data.draw(st.sampled_from([1024, 2048, 4096]))
    size = data.draw(st.integers(8, 40)) * MiB + data.draw(st.integers(0, 7)) * bs
    args = ["-t", kind, "-b", str(bs), "-g", str(data.draw(st.sampled_from([bs, 2 * bs, 8 * bs])))]
    feats = []
    if kind == "ext4":
        for f in ("64bit", "flex_bg", "metadata_csum", "huge_file", "dir_index"):
            if data.draw(st.booleans()):
                feats.append("^" + f)
        if "^metadata_csum" in feats and data.draw(st.booleans()):
            feats.append("uninit_bg")
        if data.draw(st.booleans()):
            feats += ["^resize_inode", "meta_bg"]
        elif data.draw(st.booleans()):
            feats.append("sparse_super2")
    elif data.draw(st.booleans()):
        feats += ["^sparse_super", "^resize_inode"]
    if feats:
        args += ["-O", ",".join(feats)]
    args += ["-I", str(data.draw(st.sampled_from([128, 256])))]
    file_tree(tmp / "tree", seed=data.draw(st.integers(0, 1000)), nfiles=8, max_size=200_000)
    img = tmp / "fs.img"
    try:
        build_ext(img, size, args, tmp / "tree", seed=1)
    except subprocess.CalledProcessError:
        event("mke2fs refused")
        return  # a combination mke2fs refuses, or a tree that does not fit: nothing to test
    u = analyze_image(img)
    assert not [n for n in u.entries[0].notes if "no backup superblock" not in n], (args, u.entries[0].notes)
    assert_free_subset(u.free, oracle_dumpe2fs(img), _slack(size) + 64 * bs)


def _sfdisk(img: Path, script: str) -> None:
    subprocess.run(["sfdisk", "-q", str(img)], input=script, text=True, check=True, capture_output=True)


def _place(disk: Path, fs: Path, offset: int) -> None:
    subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=1M", f"seek={offset}", "oflag=seek_bytes",
                    "conv=notrunc", "status=none"], check=True)


def _extract(disk: Path, out: Path, offset: int, size: int) -> Path:
    subprocess.run(["dd", f"if={disk}", f"of={out}", "bs=1M", f"skip={offset}", f"count={size}",
                    "iflag=skip_bytes,count_bytes", "status=none"], check=True)
    return out


def _rdump(img: Path, out: Path) -> dict[str, bytes]:
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(img)], check=True, capture_output=True)
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_mbr_with_logical_partitions(tmp_path, build_ext, file_tree, analyze_image, oracle_dumpe2fs,
                                     assert_free_subset):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(np.random.default_rng(1).bytes(96 * MiB))
    _sfdisk(disk, "label: dos\nstart=2048, size=40960, type=83\nstart=43008, type=5\n"
                  "start=45056, size=40960, type=83\nstart=88064, size=40960, type=83\n")
    file_tree(tmp_path / "tree", seed=2, nfiles=6)
    offsets = {"p1": 2048 * 512, "p5": 45056 * 512, "p6": 88064 * 512}
    expect = []
    for i, (name, off) in enumerate(offsets.items()):
        fs = build_ext(tmp_path / f"{name}.img", 20 * MiB, ["-t", "ext4", "-b", "1024"], tmp_path / "tree", seed=i)
        _place(disk, fs, off)
        expect.append(oracle_dumpe2fs(fs, off))
    u = analyze_image(disk)
    assert u.scheme == "mbr"
    by_name = {e.name: e for e in u.entries}
    assert set(by_name) == {"p1", "p5", "p6"}, by_name
    for name, off in offsets.items():
        assert by_name[name].start == off and by_name[name].fstype == "ext4"
    oracle = np.concatenate(expect)
    assert_free_subset(u.free, oracle, 3 * _slack(20 * MiB))


def test_gpt_backup_restore_fsck_and_files(tmp_path, make_repo, build_ext, file_tree, analyze_image):
    """Back up a GPT disk (ext4, ext2, swap, and garbage in free space), restore it, fsck it."""
    disk = tmp_path / "disk.img"
    size = 160 * MiB
    with open(disk, "wb") as f:
        f.write(np.random.default_rng(9).bytes(size))
    _sfdisk(disk, "label: gpt\nstart=2048, size=131072, type=L\nstart=133120, size=98304, type=L\n"
                  "start=231424, size=65536, type=S\n")
    parts = {"p1": (2048 * 512, 64 * MiB), "p2": (133120 * 512, 48 * MiB), "p3": (231424 * 512, 32 * MiB)}
    trees = {}
    for name, args in (("p1", ["-t", "ext4"]), ("p2", ["-t", "ext2", "-b", "4096"])):
        trees[name] = file_tree(tmp_path / f"tree-{name}", seed=len(name) + ord(name[1]))
        fs = build_ext(tmp_path / f"{name}.img", parts[name][1], args, tmp_path / f"tree-{name}", seed=4)
        _place(disk, fs, parts[name][0])
    swap = tmp_path / "swap.img"
    with open(swap, "wb") as f:
        f.write(np.random.default_rng(3).bytes(32 * MiB))
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)
    _place(disk, swap, parts["p3"][0])

    u = analyze_image(disk)
    assert [e.fstype for e in u.entries] == ["ext4", "ext2", "swap"]
    repo = make_repo()
    st_ = repo.backup(disk, "web")["stats"]
    assert st_["read_bytes"] <= u.used_bytes * 1.05 + 2 * MiB, (st_, u.used_bytes)
    assert st_["read_bytes"] < size / 2
    assert st_["used_bytes"] <= u.used_bytes + 3 * 64 * 1024 * 3
    out = tmp_path / "restored.img"
    repo.restore("web:latest", out)
    assert os.path.getsize(out) == size
    for name, (off, psize) in parts.items():
        if name == "p3":
            continue
        part = _extract(out, tmp_path / f"r-{name}.img", off, psize)
        fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        got = _rdump(part, tmp_path / f"dump-{name}")
        assert got == trees[name]
    # the swap header survives; the garbage after it does not matter and is not stored
    with open(out, "rb") as f:
        f.seek(parts["p3"][0] + 4096 - 10)
        assert f.read(10) == b"SWAPSPACE2"
    # no-skip keeps every block: a second repository reads the whole disk
    st2 = make_repo(name="all").backup(disk, "web", "--no-skip-unused")["stats"]
    assert st2["read_bytes"] == size


def test_dirty_journal_keeps_journaled_allocations(tmp_path, build_ext, file_tree, analyze_image,
                                                   oracle_dumpe2fs, assert_free_subset):
    """A bitmap update still in the journal (needs_recovery) counts: its blocks stay used."""
    file_tree(tmp_path / "tree", seed=4, nfiles=6)
    img = build_ext(tmp_path / "fs.img", 64 * MiB, COMBOS["ext4"], tmp_path / "tree", seed=2)
    clean = analyze_image(img)
    out = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True, check=True).stdout
    # group 0's bitmap block (always initialized) and its first free run
    import re
    groups = re.findall(r"Group (\d+):.*?Block bitmap at (\d+).*?Free blocks: ([\d, -]*)", out, re.S)
    g, bb, free_list = next((gr, b, fl) for gr, b, fl in groups if gr == "0")
    lo, _, hi = free_list.split(",")[0].strip().partition("-")
    lo, hi = int(lo), int(hi or lo)
    mark_end = min(hi + 1, lo + 64)
    with open(img, "rb") as f:
        f.seek(int(bb) * 4096)
        bm = bytearray(f.read(4096))
    for b in range(lo - 2048 * int(g), mark_end - 2048 * int(g)):
        bm[b // 8] |= 1 << (b % 8)
    (tmp_path / "bm.bin").write_bytes(bm)
    (tmp_path / "cmds").write_text(f"jo\njw -b {bb} {tmp_path / 'bm.bin'}\njc\n")
    subprocess.run(["debugfs", "-w", "-f", str(tmp_path / "cmds"), str(img)], check=True, capture_output=True)
    assert "needs_recovery" in subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True).stdout
    u = analyze_image(img)
    assert any("journal needs recovery" in n for n in u.entries[0].notes)
    journaled = np.array([[lo * 4096, mark_end * 4096]], np.int64)
    assert total(subtract(journaled, u.free)) == total(journaled), "a journaled allocation is called free"
    # everything else is as in the clean filesystem
    assert total(subtract(u.free, clean.free)) == 0
    assert total(clean.free) - total(u.free) == total(journaled)


# ---------------------------------------------------------------------------- fuzzing
def _metadata_regions(img: Path) -> list[tuple[int, int]]:
    """Byte ranges of the superblock, descriptors and block bitmaps, as dumpe2fs reports them."""
    import re

    out = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True, check=True).stdout
    bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
    regions = [(1024, 2048)]
    for a, b in re.findall(r"Group descriptors at (\d+)-(\d+)", out):
        regions.append((int(a) * bs, (int(b) + 1) * bs))
    for a in re.findall(r"Block bitmap at (\d+)", out):
        regions.append((int(a) * bs, (int(a) + 1) * bs))
    return regions


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory):
    """Two small filesystems: ext4 with metadata checksums, and ext2 without any."""
    helpers = usage_helpers()
    tmp = tmp_path_factory.mktemp("fuzz")
    bases = {}
    for kind, args in (("ext4", ["-t", "ext4", "-b", "1024", "-g", "2048"]),
                       ("ext2", ["-t", "ext2", "-b", "1024", "-g", "2048"])):
        helpers.make_tree(tmp / f"tree-{kind}", seed=5, nfiles=8, max_size=150_000)
        img = helpers.build_ext_image(tmp / f"{kind}.img", 16 * MiB, args, tmp / f"tree-{kind}", seed=8)
        bases[kind] = (img, _metadata_regions(img))
    return bases


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["ext4", "ext2"]), which=st.integers(0, 10_000), pos=st.integers(0, 1 << 20),
       nbytes=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_corruption_never_frees_used_blocks(kind, which, pos, nbytes, seed, fuzz_bases, tmp_path,
                                            analyze_image):
    img, regions = fuzz_bases[kind]
    baseline = analyze_image(img).free
    a, b = regions[which % len(regions)]
    if kind == "ext2" and a >= 1024 * 3 and b - a == 1024 and regions.index((a, b)) > 2:
        # Without checksums a flipped bitmap bit is undetectable by any reader of the bitmaps
        # (e2fsck finds it only by walking every inode); fuzz the superblock and descriptors.
        a, b = regions[which % 2]
    data = bytearray(img.read_bytes())
    rng = np.random.default_rng(seed)
    off = a + pos % (b - a)
    chunk = rng.bytes(nbytes)
    data[off:off + nbytes] = chunk[: max(0, min(nbytes, len(data) - off))]
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    t0 = time.monotonic()
    u = analyze_image(bad)
    assert time.monotonic() - t0 < 20
    extra = subtract(u.free, baseline)
    assert total(extra) == 0, f"corruption at {off} made {total(extra)} bytes free: {u.entries[0].notes}"


# ---------------------------------------------------------------------------- chains and the CLI
def test_freed_blocks_become_holes_in_a_chain(tmp_path, make_repo, build_ext, file_tree, analyze_image):
    """Delete files between backups: the incremental records them newly unused; each restore is right."""
    files = file_tree(tmp_path / "tree", seed=21, nfiles=10, max_size=600_000)
    img = build_ext(tmp_path / "fs.img", 40 * MiB, COMBOS["ext4"], tmp_path / "tree", seed=6)
    repo = make_repo()
    first = repo.backup(img, "fs")
    v1 = img.read_bytes()
    gone = [k for k in files if files[k]][:4]
    for rel in gone:
        subprocess.run(["debugfs", "-w", "-R", f"rm /{rel}", str(img)], check=True, capture_output=True)
    u = analyze_image(img)
    second = repo.backup(img, "fs")
    assert second["type"] == "incremental"
    diff = repo.json("diff", first["id"], second["id"])
    assert diff, diff
    out2 = tmp_path / "r2.img"
    repo.restore(second["id"], out2)
    ok = subprocess.run(["e2fsck", "-fn", str(out2)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    got = _rdump(out2, tmp_path / "dump2")
    assert got == {k: v for k, v in files.items() if k not in gone}
    # every free byte of the second image reads back as zero; every used byte is the original's
    restored = np.frombuffer(out2.read_bytes(), np.uint8)
    orig = np.frombuffer(img.read_bytes(), np.uint8)
    bm = u.used_bitmap(64 * 1024)
    blocks_r = restored.reshape(-1, 64 * 1024)
    blocks_o = orig.reshape(-1, 64 * 1024)
    assert (blocks_r[~bm] == 0).all()
    assert (blocks_r[bm] == blocks_o[bm]).all()
    # the full snapshot still restores the first version's files
    out1 = tmp_path / "r1.img"
    repo.restore(first["id"], out1)
    assert _rdump(out1, tmp_path / "dump1") == files
    del v1


def test_usage_command(tmp_path, run_vmbak, build_ext, file_tree, assert_cli_error, make_repo):
    file_tree(tmp_path / "tree", seed=2, nfiles=4)
    img = build_ext(tmp_path / "fs.img", 24 * MiB, ["-t", "ext4", "-L", "rootfs"], tmp_path / "tree", seed=2)
    rep = __import__("json").loads(run_vmbak("usage", img, "--json").stdout)
    assert rep["partition_table"] == "none" and rep["volumes"][0]["filesystem"] == "ext4"
    assert rep["volumes"][0]["label"] == "rootfs"
    assert rep["used_bytes"] + rep["free_bytes"] == rep["size"] == 24 * MiB
    text = run_vmbak("usage", img).stdout
    assert "ext4" in text and "rootfs" in text
    # garbage: not understood, all used, said so; exit 0 (nothing is wrong with the file itself)
    junk = tmp_path / "junk.img"
    junk.write_bytes(np.random.default_rng(5).bytes(4 * MiB))
    rep = __import__("json").loads(run_vmbak("usage", junk, "--json").stdout)
    assert rep["free_bytes"] == 0 and "no known filesystem" in " ".join(rep["volumes"][0]["notes"])
    snap = make_repo().backup(junk, "junk")
    assert any("no known filesystem" in n for n in snap["notes"]), snap["notes"]
    assert snap["stats"]["read_bytes"] == 4 * MiB
    # a damaged superblock: all used, with the reason
    bad = tmp_path / "bad.img"
    data = bytearray(img.read_bytes())
    data[1024 + 4: 1024 + 8] = (10**9).to_bytes(4, "little")  # blocks count far past the end
    bad.write_bytes(bytes(data))
    rep = __import__("json").loads(run_vmbak("usage", bad, "--json").stdout)
    assert rep["free_bytes"] == 0 and "larger than its volume" in " ".join(rep["volumes"][0]["notes"])
    assert_cli_error(run_vmbak("usage", tmp_path / "missing.img", check=False), "not found")
    assert_cli_error(run_vmbak("usage", tmp_path, check=False), "directory")
