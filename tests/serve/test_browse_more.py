"""vmbak ls / cat / extract on exFAT, btrfs and a filesystem inside LVM2 logical volumes.

The images are real: mkfs.exfat plus the tests' exFAT entry writer (tests/usage/fatlvm_util.py;
nothing here mounts, and exfatprogs cannot add files) judged clean by ``fsck.exfat -n``,
``mkfs.btrfs --rootdir``, and LVM's own tools on a loop device with activation disabled.
They are backed up, and the files extracted from the backups must be byte-identical to the
sources.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import vmbak
from vmbak.serve.exfat import _timestamp_ns

from .conftest import build_fs
from .conftest import run as crun

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "usage"))
from fatlvm_util import (  # noqa: E402  (the usage tests' image builders)
    ExfatWriter,
    PhysicalVolume,
    build_btrfs,
    build_exfat,
    garbage_file,
    place,
    run,
    sfdisk,
    write_lv,
)

MiB = 1 << 20
EXFAT_MTIME = 1704110400 * 10**9  # the entry writer's timestamp: 2024-01-01 12:00, no UTC offset


def _files(seed: int, spaces: bool = True) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    long = "A file name longer than fifteen characters.txt"
    return {
        "hello.txt": b"hello from a backup\n",
        long if spaces else long.replace(" ", "-"): b"long name\n" * 300,  # (mkfs.xfs -p: no spaces)
        "data/big.bin": rng.bytes(3 * MiB + 12345),
        "data/odd.bin": rng.bytes(123_457),
        "data/text.log": b"log line of the test\n" * 20_000,
        "deep/a/b/leaf.txt": b"leaf\n" * 1000,
        "empty": b"",
    }


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def disks(tmp_path_factory, init_repo):
    """Backups of a GPT disk (p1 exFAT with 1 KiB clusters, fragmented files and FAT-chained
    directories; p2 btrfs) and an MBR disk whose second partition is an LVM2 PV holding a
    two-segment ext4 LV and an XFS LV. Returns (repo, {disk: snapshot id}, {volume: files})."""
    d = tmp_path_factory.mktemp("more")
    repo = init_repo(d / "repo")
    trees = {"exfat": _files(11), "btrfs": _files(12), "root": _files(13), "data": _files(14, spaces=False)}

    exfat = d / "exfat.img"
    build_exfat(exfat, 24 * MiB, trees["exfat"], seed=3, cluster="1k", label="VMBAKEX", fragment_every=2)
    btrfs_src = _tree(d / "btrfs-src", trees["btrfs"])
    os.symlink("data/odd.bin", btrfs_src / "link-rel")
    os.symlink("/etc/passwd", btrfs_src / "link-abs")
    os.chmod(btrfs_src / "hello.txt", 0o600)
    btrfs = d / "btrfs.img"
    build_btrfs(btrfs, 128 * MiB, btrfs_src, 5)
    gpt = d / "gpt.raw"
    garbage_file(gpt, 156 * MiB, seed=6)
    sfdisk(gpt, f"label: gpt\nstart=2048, size={24 * MiB // 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
                f"start={26 * MiB // 512}, size={128 * MiB // 512}, type=L\n")
    place(gpt, exfat, MiB)
    place(gpt, btrfs, 26 * MiB)

    pvf = d / "pv.img"
    with PhysicalVolume(d, pvf, 80 * MiB, "vg0", extent="2m", seed=7) as pv:
        pv.create("root", "4m")
        pv.create("data", "24m")
        pv.extend("root", "28m")  # root now has two segments, data between them
        layout = pv.layout()
    assert len(layout["root"]) == 2 and layout["root"][0][2] == 4 * MiB
    root_img = build_fs("ext4", d / "root.img", 32 * MiB, trees["root"])
    blocks = [int(b) * 1024 for b in crun("debugfs", "-R", "blocks /data/big.bin", root_img).stdout.split()]
    assert min(blocks) < 4 * MiB < max(blocks), "big.bin should cross the LV's segment boundary"
    write_lv(pvf, layout["root"], root_img)
    write_lv(pvf, layout["data"], build_fs("xfs", d / "data.img", 24 * MiB, trees["data"]))
    mbr = d / "mbr.raw"
    garbage_file(mbr, 92 * MiB, seed=8)
    sfdisk(mbr, f"label: dos\nstart=2048, size={8 * MiB // 512}, type=83\n"
                f"start={10 * MiB // 512}, size={80 * MiB // 512}, type=8e\n")
    place(mbr, pvf, 10 * MiB)

    lib = repo.open()
    sids = {"gpt": vmbak.backup(lib, gpt, name="gpt").id, "mbr": vmbak.backup(lib, mbr, name="lvm").id}
    return repo, sids, trees


def _check_extracted(root: Path, files: dict[str, bytes]) -> None:
    got = _read_tree(root)
    for rel, content in files.items():
        assert rel in got, f"{rel} was not extracted"
        assert got[rel] == content, f"{rel} differs"


def test_exfat_ls_cat_extract(disks, tmp_path):
    repo, sids, trees = disks
    files = trees["exfat"]
    top = {e["name"]: e for e in repo.json("ls", sids["gpt"], "/p1")}
    assert set(top) == {"hello.txt", "A file name longer than fifteen characters.txt", "data", "deep", "empty"}
    assert top["data"]["type"] == "dir" and top["hello.txt"]["size"] == len(files["hello.txt"])
    rec = [e["path"] for e in repo.json("ls", sids["gpt"], "/p1", "-R")]
    assert "/p1/deep/a/b/leaf.txt" in rec and "/p1/data/big.bin" in rec
    # case-insensitive, as exFAT is
    assert repo.run("cat", "gpt:latest", "/p1/DEEP/A/B/Leaf.TXT").stdout.encode() == files["deep/a/b/leaf.txt"]
    r = repo.json("extract", sids["gpt"], "/p1", "--target", tmp_path / "out")
    assert r["skipped"] == [] and r["files"] == len(files) and r["bytes"] == sum(map(len, files.values()))
    _check_extracted(tmp_path / "out" / "p1", files)
    st = os.stat(tmp_path / "out" / "p1" / "data" / "big.bin")
    assert st.st_mtime_ns == EXFAT_MTIME and stat.S_IMODE(st.st_mode) == 0o644
    # one file: only a small part of the repository is read
    r = repo.json("extract", sids["gpt"], "/p1/data/odd.bin", "--target", tmp_path / "one")
    assert (tmp_path / "one" / "odd.bin").read_bytes() == files["data/odd.bin"]
    assert r["repository_bytes_read"] < 8 * MiB and r["repository_bytes_read"] == r["cache"]["fetched_bytes"]
    assert 1 <= r["repository_chunks_read"] <= 8


def test_exfat_times_and_damage(tmp_path, repo, assert_cli_error):
    # 2023-06-15 10:20:31.5 local time at UTC+02:00 is 08:20:31.5 UTC
    stamp = ((2023 - 1980) << 25) | (6 << 21) | (15 << 16) | (10 << 11) | (20 << 5) | 15
    assert _timestamp_ns(stamp, 150, 0x80 | 8) == 1686817231 * 10**9 + 500_000_000
    assert _timestamp_ns(stamp, 0, 0) == (1686817230 + 7200) * 10**9  # no offset: taken as UTC

    # a fragmented file whose FAT chain loops, and a name that tries to leave the target
    img = tmp_path / "bad.img"
    garbage_file(img, 8 * MiB, seed=2)
    run("mkfs.exfat", "-c", "4k", img)
    w = ExfatWriter(img)
    try:
        loop_data = np.random.default_rng(1).bytes(40_000)
        clusters = w.add_file(w.root[0], "loop.bin", loop_data, fragmented=True)
        w.add_file(w.root[0], "ok.txt", b"still readable\n")
        w.add_file(w.root[0], "..", b"dot-dot\n")
        w.add_file(w.root[0], "../pwned", b"slash\n")
        fat_off = w.fat_off
    finally:
        w.close()
    with open(img, "r+b") as f:
        f.seek(fat_off + 4 * clusters[5])
        f.write(struct.pack("<I", clusters[2]))  # cluster 6 of 10 points back to cluster 3
    sid = repo.backup(img, "badex")["id"]
    assert_cli_error(repo.run("cat", sid, "/disk/loop.bin", check=False), "exfat", "loops")
    assert repo.run("cat", sid, "/disk/ok.txt").stdout == "still readable\n"
    assert_cli_error(repo.run("ls", sid, "/disk/..", check=False), "..")
    listing = {e["name"] for e in repo.json("ls", sid, "/disk")}
    assert listing == {"loop.bin", "ok.txt", "..", "../pwned"}
    assert_cli_error(repo.run("extract", sid, "/disk/loop.bin", "--target", tmp_path / "t", check=False),
                     "/disk/loop.bin", "loops")
    r = repo.json("extract", sid, "/disk/ok.txt", "--target", tmp_path / "t")
    assert r["files"] == 1 and (tmp_path / "t" / "ok.txt").read_bytes() == b"still readable\n"
    # repair the chain: the rest extracts, and the hostile names are skipped, nothing written outside
    with open(img, "r+b") as f:
        f.seek(fat_off + 4 * clusters[5])
        f.write(struct.pack("<I", clusters[6]))
    sid = repo.backup(img, "badex")["id"]
    r = repo.json("extract", sid, "/disk", "--target", tmp_path / "t2")
    assert sorted(s["path"] for s in r["skipped"]) == ["/disk/..", "/disk/../pwned"]
    assert {s["reason"] for s in r["skipped"]} == {"unsafe name"} and r["files"] == 2
    assert sorted(os.listdir(tmp_path / "t2" / "disk")) == ["loop.bin", "ok.txt"]
    assert (tmp_path / "t2" / "disk" / "loop.bin").read_bytes() == loop_data
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "t2" / "pwned").exists()


def test_btrfs_ls_cat_extract(disks, tmp_path):
    repo, sids, trees = disks
    files = trees["btrfs"]
    top = {e["name"]: e for e in repo.json("ls", sids["gpt"], "/p2")}
    assert {"hello.txt", "data", "deep", "empty", "link-rel", "link-abs"} <= set(top)
    assert top["link-abs"]["type"] == "symlink" and top["link-abs"]["target"] == "/etc/passwd"
    assert top["hello.txt"]["mode"] == "0600" and top["data"]["type"] == "dir"
    assert repo.run("cat", sids["gpt"], "/p2/data/text.log").stdout.encode() == files["data/text.log"]
    r = repo.json("extract", sids["gpt"], "/p2", "--target", tmp_path / "out")
    assert r["skipped"] == [] and r["files"] == len(files) and r["symlinks"] == 2
    root = tmp_path / "out" / "p2"
    _check_extracted(root, files)
    assert os.readlink(root / "link-abs") == "/etc/passwd" and os.readlink(root / "link-rel") == "data/odd.bin"
    assert stat.S_IMODE(os.stat(root / "hello.txt").st_mode) == 0o600


def test_lvm_volumes_ls_and_extract(disks, tmp_path):
    repo, sids, trees = disks
    sid = sids["mbr"]
    assert [e["path"] for e in repo.json("ls", sid)] == ["/p1", "/vg0"]
    assert {e["path"] for e in repo.json("ls", sid, "/vg0")} == {"/vg0/data", "/vg0/root"}
    names = {e["name"] for e in repo.json("ls", sid, "/vg0/root")}
    assert {"hello.txt", "data", "deep", "empty", "lost+found"} <= names
    assert repo.run("cat", "lvm:latest", "/vg0/data/deep/a/b/leaf.txt").stdout.encode() == \
        trees["data"]["deep/a/b/leaf.txt"]
    r = repo.json("extract", sid, "/vg0", "--target", tmp_path / "out")
    assert r["skipped"] == [] and r["files"] == len(trees["root"]) + len(trees["data"])
    _check_extracted(tmp_path / "out" / "root", trees["root"])
    _check_extracted(tmp_path / "out" / "data", trees["data"])
    # the root LV has two segments, with the data LV between them: big.bin crosses from one to the other
    r = repo.json("extract", sid, "/vg0/root/data/big.bin", "--target", tmp_path / "one")
    assert (tmp_path / "one" / "big.bin").read_bytes() == trees["root"]["data/big.bin"]
