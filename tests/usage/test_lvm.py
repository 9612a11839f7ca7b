"""LVM2: logical volumes found by reading the PV, checked against LVM's own tools; filesystems in
them; backup and restore; snapshots, thin pools and hidden LVs stay used; corrupted metadata.

The PVs are made by LVM's own commands (pvcreate, vgcreate, lvcreate, lvextend, vgcfgrestore)
on a loop device over an image file, with activation disabled: there is no device-mapper here,
and nothing needs it, since only the on-disk metadata matters.
"""

from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fatlvm_util import (
    MiB,
    PhysicalVolume,
    analyze_path,
    build_fat,
    check_subset,
    corrupt,
    extract_fat,
    fsck_fat_counts,
    garbage_file,
    make_files,
    place,
    read_lv,
    sfdisk,
    tool,
    write_lv,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbak.disks.raw import RawDisk
from vmbak.usage import fat as fatmod
from vmbak.usage import lvm as lvmmod
from vmbak.usage.model import Volume, normalize, subtract, total


def _loop_available() -> bool:
    try:
        p = subprocess.run([tool("losetup"), "-f"], capture_output=True, text=True)
    except AssertionError:
        return False
    return p.returncode == 0 and p.stdout.startswith("/dev/loop")


@pytest.fixture(autouse=True)
def _needs_loop_device() -> None:
    # LVM's tools read block devices only: the oracle needs a loop device (as root).
    assert _loop_available(), "no free loop device: LVM's tools need one (run the tests as root)"


def _volumes(img: Path, offset: int = 0, size: int | None = None) -> list[Volume]:
    with RawDisk(img) as d:
        vol = Volume.linear(d, offset, (size if size is not None else d.size - offset))
        return lvmmod.volumes(vol)


def _disk_pieces(pieces: list[tuple[int, int, int]], base: int) -> list[tuple[int, int, int]]:
    return [(v, base + p, n) for v, p, n in pieces]


def _map_free(free: np.ndarray, pieces: list[tuple[int, int, int]], base: int) -> np.ndarray:
    """Map LV-relative free ranges to disk ranges through LVM's own layout."""
    out = []
    for v, p, n in pieces:
        c = np.clip(free, v, v + n)
        c = c[c[:, 1] > c[:, 0]]
        out.append(c - v + base + p)
    return normalize(np.concatenate(out)) if out else free[:0]


def test_lvm_on_mbr_backup_restore(tmp_path, make_repo, build_ext, file_tree, oracle_dumpe2fs):
    """A Linux LVM partition after a FAT partition: a two-segment ext4 LV, a FAT16 LV, an empty LV.
    The LV maps equal LVM's, every free byte is free per dumpe2fs / fsck.fat, and backup+restore
    gives clean filesystems with the same files."""
    pvf = tmp_path / "pv.img"
    with PhysicalVolume(tmp_path, pvf, 72 * MiB, "vgdata", extent="2m", seed=4) as pv:
        pv.create("root", "20m")
        pv.create("data", "16m")
        pv.create("empty", "4m")
        pv.extend("root", "12m")  # root now has two segments, data between them
        layout = pv.layout()
        seq = pv.seqno()
    assert len(layout["root"]) == 2 and layout["root"][1][1] > layout["data"][0][1]
    file_tree(tmp_path / "tree-root", seed=3, nfiles=10, max_size=300_000)
    ext = build_ext(tmp_path / "root.img", 32 * MiB, ["-t", "ext4", "-b", "1024"], tmp_path / "tree-root", seed=2)
    write_lv(pvf, layout["root"], ext)
    make_files(tmp_path / "tree-data", seed=5, nfiles=8, max_size=200_000)
    fat = tmp_path / "data.img"
    fat_files = build_fat(fat, 16 * MiB, 16, tmp_path / "tree-data", seed=6, spc=4, fragment=True)
    write_lv(pvf, layout["data"], fat)

    disk = tmp_path / "disk.img"
    size = 84 * MiB
    garbage_file(disk, size, seed=9)
    p2 = 10 * MiB
    sfdisk(disk, f"label: dos\nstart=2048, size={(p2 - MiB) // 512}, type=e\nstart={p2 // 512}, "
                 f"size={72 * MiB // 512}, type=8e\n")
    fat_p1 = tmp_path / "p1.img"
    build_fat(fat_p1, p2 - MiB, 16, None, seed=7)
    place(disk, fat_p1, MiB)
    place(disk, pvf, p2)

    with RawDisk(disk) as d:
        vg_name, vg, _uuid = lvmmod.read_vg(Volume.linear(d, p2, 72 * MiB))
    assert vg_name == "vgdata" and vg["seqno"] == seq
    vols = {v.name: v for v in _volumes(disk, p2, 72 * MiB)}
    assert sorted(vols) == ["vgdata/data", "vgdata/empty", "vgdata/root"]
    for name, pieces in layout.items():
        assert vols[f"vgdata/{name}"].segments == _disk_pieces(pieces, p2), name

    u = analyze_path(disk)
    by = {e.name: e for e in u.entries}
    assert by["p1"].fstype == "fat16" and by["p2"].fstype == "lvm"
    assert by["vgdata/root"].fstype == "ext4" and by["vgdata/root"].kind == "lv"
    assert by["vgdata/data"].fstype == "fat16"
    assert by["vgdata/empty"].fstype == "unknown" and by["vgdata/empty"].free == 0
    assert by["vgdata/root"].start == p2 + layout["root"][0][1]
    # free bytes of each LV, mapped through LVM's own layout, are free per the oracles
    oracle_root = _map_free(oracle_dumpe2fs(ext), layout["root"], p2)
    used, count = fsck_fat_counts(fat)
    with RawDisk(fat) as d:
        geo = fatmod.parse_boot_sector(Volume.linear(d, 0, d.size))
    fat_free = analyze_path(fat).free
    assert total(fat_free) == (count - used) * geo.cluster_size
    oracle_data = _map_free(fat_free, layout["data"], p2)
    lv_free = subtract(u.free, np.array([[0, p2]], np.int64))
    missed = check_subset(lv_free, normalize(np.concatenate((oracle_root, oracle_data))))
    assert missed <= 32 * MiB // 50, missed
    # the PV's label and metadata, the unallocated extents and the empty LV are all used
    allocated = normalize(np.array([[p2 + p, p2 + p + n] for ps in layout.values() for _v, p, n in ps], np.int64))
    pv_span = np.array([[p2, p2 + 72 * MiB]], np.int64)
    assert total(subtract(subtract(pv_span, allocated), u.free)) == total(subtract(pv_span, allocated))

    repo = make_repo()
    stats = repo.backup(disk, "lvm")["stats"]
    assert stats["read_bytes"] <= u.used_bytes + 8 * 64 * 1024, (stats, u.used_bytes)
    assert stats["read_bytes"] < size * 0.6
    out = tmp_path / "restored.img"
    repo.restore("lvm:latest", out)
    with RawDisk(out) as d:
        assert lvmmod.read_vg(Volume.linear(d, p2, 72 * MiB))[1]["seqno"] == seq
    r_root = read_lv(out, layout["root"], tmp_path / "r-root.img", p2)
    ok = subprocess.run([tool("e2fsck"), "-fn", str(r_root)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    dump = tmp_path / "dump-root"
    dump.mkdir()
    subprocess.run([tool("debugfs"), "-R", f"rdump / {dump}", str(r_root)], check=True, capture_output=True)
    orig_tree = {str(p.relative_to(tmp_path / "tree-root")): p.read_bytes()
                 for p in (tmp_path / "tree-root").rglob("*") if p.is_file()}
    assert {str(p.relative_to(dump)): p.read_bytes() for p in dump.rglob("*") if p.is_file()} == orig_tree
    r_data = read_lv(out, layout["data"], tmp_path / "r-data.img", p2)
    fsck_fat_counts(r_data)
    assert extract_fat(r_data, tmp_path / "x-data") == fat_files


def _add_to_metadata(text: str, lvs: str) -> str:
    i = text.rindex("\t}\n\n}")
    return text[:i] + lvs + text[i:]


SNAP_AND_THIN = """
\t\tsnap {
\t\t\tid = "Snap00-bbbb-cccc-dddd-eeee-ffff-gggggg"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 4
\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1
\t\t\t\tstripes = ["pv0", 24]
\t\t\t}
\t\t}
\t\tsnapshot0 {
\t\t\tid = "Snap01-bbbb-cccc-dddd-eeee-ffff-hhhhhh"
\t\t\tstatus = ["READ"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 16
\t\t\t\ttype = "snapshot"
\t\t\t\tchunk_size = 8
\t\t\t\torigin = "origin"
\t\t\t\tcow_store = "snap"
\t\t\t}
\t\t}
\t\tpool {
\t\t\tid = "Pool00-bbbb-cccc-dddd-eeee-ffff-iiiiii"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 16
\t\t\t\ttype = "thin-pool"
\t\t\t\tmetadata = "pool_tmeta"
\t\t\t\tpool = "pool_tdata"
\t\t\t\ttransaction_id = 1
\t\t\t\tchunk_size = 128
\t\t\t\tdiscards = "passdown"
\t\t\t\tzero_new_blocks = 1
\t\t\t}
\t\t}
\t\tthin1 {
\t\t\tid = "Thin00-bbbb-cccc-dddd-eeee-ffff-jjjjjj"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 32
\t\t\t\ttype = "thin"
\t\t\t\tthin_pool = "pool"
\t\t\t\ttransaction_id = 0
\t\t\t\tdevice_id = 1
\t\t\t}
\t\t}
\t\tpool_tmeta {
\t\t\tid = "Pool01-bbbb-cccc-dddd-eeee-ffff-kkkkkk"
\t\t\tstatus = ["READ", "WRITE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 1
\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1
\t\t\t\tstripes = ["pv0", 28]
\t\t\t}
\t\t}
\t\tpool_tdata {
\t\t\tid = "Pool02-bbbb-cccc-dddd-eeee-ffff-llllll"
\t\t\tstatus = ["READ", "WRITE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 16
\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1
\t\t\t\tstripes = ["pv0", 29]
\t\t\t}
\t\t}
"""


def test_snapshots_thin_pools_and_hidden_lvs_stay_used(tmp_path):
    """Metadata with an old-style snapshot (origin + COW) and a thin pool, restored by
    vgcfgrestore: only the plain linear LV is returned. A FAT in the thin pool's data LV and in
    the origin is not analyzed (their free clusters may hold the snapshot's or thin LVs' data)."""
    pvf = tmp_path / "pv.img"
    with PhysicalVolume(tmp_path, pvf, 64 * MiB, "vgs", extent="1m", seed=1) as pv:
        pv.create("origin", "16m")
        pv.create("plain", "8m")
        meta = tmp_path / "vg.txt"
        pv.run("vgcfgbackup", "-f", meta, "vgs")
        edited = tmp_path / "vg2.txt"
        edited.write_text(_add_to_metadata(meta.read_text(), SNAP_AND_THIN))
        pv.run("vgcfgrestore", "--force", "-f", edited, "vgs")
        layout = pv.layout()
        lvs = pv.run("lvs", "-a", "--noheadings", "-o", "lv_name,segtype,origin", "vgs")
    assert "thin-pool" in lvs and "[pool_tdata]" in lvs, lvs
    assert any(line.split() == ["snap", "linear", "origin"] for line in lvs.splitlines()), lvs
    for name in ("origin", "pool_tdata", "plain"):
        fs = tmp_path / f"{name}.img"
        build_fat(fs, sum(n for _v, _p, n in layout[name]), 12, None, seed=2)
        write_lv(pvf, layout[name], fs)
    vols = _volumes(pvf)
    assert [v.name for v in vols] == ["vgs/plain"]
    assert vols[0].segments == _disk_pieces(layout["plain"], 0)
    u = analyze_path(pvf)
    plain = layout["plain"][0]
    assert total(u.free) > 6 * MiB
    assert total(subtract(u.free, np.array([[plain[1], plain[1] + plain[2]]], np.int64))) == 0


def test_newest_metadata_wins(tmp_path):
    """Two metadata areas (start and end of the PV). If one still holds an older commit (an
    interrupted update), the newer seqno is used, whichever area holds it."""
    pvf = tmp_path / "pv.img"
    with PhysicalVolume(tmp_path, pvf, 40 * MiB, "vgm", extent="1m", metadatacopies=2, seed=3) as pv:
        pv.create("one", "8m")
        old = pvf.read_bytes()
        old_seq = pv.seqno()
        pv.create("two", "8m")
        new_seq = pv.seqno()
    assert new_seq > old_seq
    new = pvf.read_bytes()
    with RawDisk(pvf) as d:
        _uuid, _data, mdas = lvmmod._pv_header(Volume.linear(d, 0, d.size))
    assert len(mdas) == 2
    for stale in mdas:
        mixed = bytearray(new)
        off, size = stale
        mixed[off:off + size] = old[off:off + size]
        img = tmp_path / f"mixed-{off}.img"
        img.write_bytes(bytes(mixed))
        with RawDisk(img) as d:
            _n, vg, _u = lvmmod.read_vg(Volume.linear(d, 0, d.size))
        assert vg["seqno"] == new_seq
        assert sorted(v.name for v in _volumes(img)) == ["vgm/one", "vgm/two"]
    # a damaged area is skipped only by failing: the volume then counts as all used, with a note
    hdr = mdas[0][0]
    bad = corrupt(pvf, tmp_path / "bad.img", hdr + 100, b"\x00\x01\x02")
    u = analyze_path(bad)
    assert u.free_bytes == 0 and any("checksum" in n for n in u.entries[0].notes), u.entries


def test_lvm_on_gpt_and_whole_disk_usage_cli(tmp_path, run_vmbak):
    pvf = tmp_path / "pv.img"
    with PhysicalVolume(tmp_path, pvf, 24 * MiB, "vgg", extent="4m", seed=5) as pv:
        pv.create("fat", "12m")
        layout = pv.layout()
    fs = tmp_path / "fat.img"
    make_files(tmp_path / "tree", seed=1, nfiles=3, max_size=50_000)
    build_fat(fs, 12 * MiB, 16, tmp_path / "tree", seed=2, label="INLV")
    write_lv(pvf, layout["fat"], fs)
    rep = json.loads(run_vmbak("usage", pvf, "--json").stdout)
    names = {v["name"]: v for v in rep["volumes"]}
    assert names["disk"]["filesystem"] == "lvm" and names["vgg/fat"]["filesystem"] == "fat16"
    assert names["vgg/fat"]["label"] == "INLV" and names["vgg/fat"]["free_bytes"] > 10 * MiB
    disk = tmp_path / "gpt.img"
    garbage_file(disk, 28 * MiB, seed=6)
    sfdisk(disk, f"label: gpt\nstart=2048, size={24 * MiB // 512}, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    place(disk, pvf, MiB)
    rep = json.loads(run_vmbak("usage", disk, "--json").stdout)
    names = {v["name"]: v for v in rep["volumes"]}
    assert rep["partition_table"] == "gpt" and names["p1"]["filesystem"] == "lvm"
    assert names["vgg/fat"]["start"] == MiB + layout["fat"][0][1]
    assert names["vgg/fat"]["free_bytes"] == json.loads(run_vmbak("usage", fs, "--json").stdout)["free_bytes"]
    assert "vgg/fat" in run_vmbak("usage", disk).stdout


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extent=st.sampled_from(["1m", "2m", "4m"]), ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6)),
                                                              min_size=1, max_size=7),
       copies=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_random_lv_layouts(tmp_path_factory, extent, ops, copies, seed):
    """Random sequences of lvcreate/lvextend: the parser's segment maps equal LVM's own."""
    tmp = tmp_path_factory.mktemp("lvm")
    pvf = tmp / "pv.img"
    ext_mb = int(extent[:-1])
    made: set[str] = set()
    with PhysicalVolume(tmp, pvf, 64 * MiB, "vgr", extent=extent, metadatacopies=copies, seed=seed) as pv:
        for which, n in ops:
            name = f"lv{which}"
            try:
                if name in made:
                    pv.extend(name, f"{n * ext_mb}m")
                else:
                    pv.create(name, f"{n * ext_mb}m")
                    made.add(name)
            except AssertionError as e:
                assert "insufficient" in str(e).lower() or "free" in str(e).lower(), e
        layout = pv.layout()
        seq = pv.seqno()
    with RawDisk(pvf) as d:
        assert lvmmod.read_vg(Volume.linear(d, 0, d.size))[1]["seqno"] == seq
    got = {v.name: v.segments for v in _volumes(pvf)}
    want = {f"vgr/{k}": [(vo, p, n) for vo, p, n in v] for k, v in layout.items()}
    # LVM may report adjacent pieces apart; compare the merged maps
    assert {k: _merge(v) for k, v in got.items()} == {k: _merge(v) for k, v in want.items()}
    u = analyze_path(pvf)
    assert u.free_bytes == 0  # no filesystems inside: nothing is free


def _merge(segs):
    out = []
    for vo, p, n in sorted(segs):
        if out and out[-1][0] + out[-1][2] == vo and out[-1][1] + out[-1][2] == p:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((vo, p, n))
    return out


# ---------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def lvm_fuzz_base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lvmfuzz")
    pvf = tmp / "pv.img"
    with PhysicalVolume(tmp, pvf, 40 * MiB, "vgf", extent="1m", metadatacopies=2, seed=8) as pv:
        pv.create("a", "12m")
        pv.create("b", "8m")
        pv.extend("a", "4m")
        layout = pv.layout()
    for name in ("a", "b"):
        fs = tmp / f"{name}.img"
        build_fat(fs, sum(n for _v, _p, n in layout[name]), 12 if name == "b" else 16, None, seed=1)
        write_lv(pvf, layout[name], fs)
    with RawDisk(pvf) as d:
        _u, _data, mdas = lvmmod._pv_header(Volume.linear(d, 0, d.size))
    regions = [(512, 1024)]  # the label sector
    raw = pvf.read_bytes()
    for off, _size in mdas:
        regions.append((off, off + 512))  # the area's header
        loff, lsize = struct.unpack_from("<QQ", raw, off + 40)
        regions.append((off + loff, off + loff + lsize))  # the current metadata text
    base = analyze_path(pvf)
    assert base.free_bytes > 15 * MiB
    return pvf, base.free, regions


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 4), pos=st.integers(0, 1 << 20), nbytes=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_corrupt_lvm_metadata_never_frees_more(lvm_fuzz_base, tmp_path, which, pos, nbytes, seed):
    pvf, baseline, regions = lvm_fuzz_base
    a, b = regions[which % len(regions)]
    off = a + pos % (b - a)
    bad = corrupt(pvf, tmp_path / "bad.img", off, np.random.default_rng(seed).bytes(nbytes))
    t0 = time.monotonic()
    u = analyze_path(bad)
    assert time.monotonic() - t0 < 10
    assert total(subtract(u.free, baseline)) == 0, (off, u.entries)


def test_metadata_parser_handles_garbage():
    """The text parser refuses what is not LVM metadata (UsageError, never another exception)."""
    good = 'vg { id = "x" seqno = 3 extent_size = 8192 a = [ "pv0", 0 ] b { c = 1 } }\n# c\nversion = 1\n'
    tree = lvmmod.parse_metadata(good)
    assert tree["vg"]["seqno"] == 3 and tree["vg"]["a"] == ["pv0", 0] and tree["version"] == 1
    rng = np.random.default_rng(1)
    for i in range(300):
        s = bytearray(good.encode())
        for _ in range(1 + i % 4):
            s[int(rng.integers(0, len(s)))] = int(rng.integers(0, 256))
        try:
            lvmmod.parse_metadata(s.decode("latin-1"))
        except lvmmod.UsageError:
            pass
    for bad in ("{" * 100, "a = [", "a = ", "}", 'a { b = "x" ', "a = = 1", "a = 1 a = 2"):
        with pytest.raises(lvmmod.UsageError):
            lvmmod.parse_metadata(bad)
