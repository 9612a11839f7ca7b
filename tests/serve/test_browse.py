"""vmbak ls / cat / extract: files inside backups of real ext4, XFS, NTFS and FAT images in
GPT and MBR partition tables are byte-identical to the originals, and hostile names never
make extract write outside its target."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vmbak
from vmbak.engine.view import SnapshotView
from vmbak.serve.files import SnapshotFiles

from .conftest import assemble_disk, build_fs

MiB = 1 << 20


def _tree(seed: int, big: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        "hello.txt": b"hello from a backup\n",
        "etc/config.ini": b"[main]\nkey = value\n" * 50,
        "data/big.bin": rng.bytes(big),
        "data/odd.bin": rng.bytes(123_457),
        "deep/a/b/c/leaf.txt": b"leaf\n" * 1000,
        "empty": b"",
    }


@pytest.fixture(scope="module")
def disks(tmp_path_factory, init_repo):
    """Two backed-up disks: GPT (ext4, xfs) and MBR (ntfs, fat). Returns (repo, {name:
    (snapshot id, {partition: files})}, source dirs)."""
    d = tmp_path_factory.mktemp("browse")
    repo = init_repo(d / "repo")
    trees = {"ext4": _tree(1, 3 * MiB + 5), "xfs": _tree(2, 2 * MiB), "ntfs": _tree(3, 2 * MiB + 77),
             "fat": _tree(4, MiB)}
    links = {"link-rel": "etc/config.ini", "link-abs": "/etc/passwd"}
    imgs = {k: build_fs(k, d / f"{k}.img", (32 if k in ("ext4", "xfs") else 16) * MiB, trees[k],
                        links if k == "ext4" else None) for k in trees}
    assemble_disk(d / "gpt.raw", "gpt", [(imgs["ext4"], "L"), (imgs["xfs"], "L")])
    assemble_disk(d / "mbr.raw", "mbr", [(imgs["ntfs"], "7"), (imgs["fat"], "c")])
    lib = repo.open()
    out = {"gpt": (vmbak.backup(lib, d / "gpt.raw", name="gpt").id, {"p1": trees["ext4"], "p2": trees["xfs"]}),
           "mbr": (vmbak.backup(lib, d / "mbr.raw", name="mbr").id, {"p1": trees["ntfs"], "p2": trees["fat"]})}
    return repo, out, d


@pytest.mark.parametrize("disk,part,fs", [("gpt", "p1", "ext4"), ("gpt", "p2", "xfs"), ("mbr", "p1", "ntfs"),
                                          ("mbr", "p2", "fat")])
def test_extract_gives_byte_identical_files(disks, disk, part, fs, tmp_path):
    repo, out, _ = disks
    sid, parts = out[disk]
    files = parts[part]
    r = repo.json("extract", sid[:8], f"/{part}/data", f"/{part}/hello.txt", f"/{part}/deep", f"/{part}/empty",
                  "--target", tmp_path / "out")
    assert r["skipped"] == [] and r["files"] == 5
    assert r["bytes"] == sum(len(v) for k, v in files.items() if not k.startswith("etc/"))
    for rel, content in files.items():
        if rel.startswith("etc/"):
            assert not (tmp_path / "out" / rel).exists()
            continue
        got = (tmp_path / "out" / rel)
        assert got.read_bytes() == content, f"{fs}: {rel} differs"
    # reading one file fetches a small part of the repository, not the whole disk
    assert r["repository_bytes_read"] < 16 * MiB


def test_ls_and_cat(disks):
    repo, out, _ = disks
    sid, parts = out["gpt"]
    top = repo.json("ls", sid)
    assert [e["path"] for e in top] == ["/p1", "/p2"] and all(e["type"] == "dir" for e in top)
    p1 = {e["name"]: e for e in repo.json("ls", sid, "/p1")}
    assert {"hello.txt", "etc", "data", "deep", "empty", "link-rel", "link-abs", "lost+found"} <= set(p1)
    assert p1["data"]["type"] == "dir" and p1["hello.txt"]["size"] == len(parts["p1"]["hello.txt"])
    assert p1["link-abs"]["type"] == "symlink" and p1["link-abs"]["target"] == "/etc/passwd"
    text = repo.run("ls", sid, "/p2/etc").stdout
    assert "config.ini" in text and text.startswith("-rw-r-----")  # the XFS protofile's mode
    rec = repo.json("ls", "gpt:latest", "/p2", "-R")
    assert "/p2/deep/a/b/c/leaf.txt" in [e["path"] for e in rec]
    for disk, part, rel in [("gpt", "p1", "etc/config.ini"), ("gpt", "p2", "data/odd.bin"),
                            ("mbr", "p1", "deep/a/b/c/leaf.txt"), ("mbr", "p2", "data/big.bin")]:
        sid, parts = out[disk]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
        env.update({k: v for k, v in repo.env().items() if v is not None})
        p = subprocess.run([sys.executable, "-m", "vmbak.cli.main", "cat", sid, f"/{part}/{rel}"], env=env,
                           capture_output=True, check=True)
        assert p.stdout == parts[part][rel], f"cat {disk} /{part}/{rel}"
    # binary through a file-free path: the library reads the same bytes
    lib = repo.open()
    files = SnapshotFiles(SnapshotView(lib, lib.load_manifest(out["mbr"][0])))
    node, f = files.open("/p2/DATA/BIG.BIN")  # FAT is case-insensitive
    assert f.read() == out["mbr"][1]["p2"]["data/big.bin"] and node.size == MiB


def test_extract_keeps_mode_mtime_and_symlinks(disks, tmp_path):
    repo, out, src = disks
    sid, parts = out["gpt"]
    lib = repo.open()
    files = SnapshotFiles(SnapshotView(lib, lib.load_manifest(sid)))
    r = repo.json("extract", sid, "/p1", "--target", tmp_path / "o")
    root = tmp_path / "o" / "p1"
    assert r["symlinks"] == 2 and r["files"] == len(parts["p1"])
    assert os.readlink(root / "link-abs") == "/etc/passwd" and os.readlink(root / "link-rel") == "etc/config.ini"
    for rel in ("hello.txt", "data/big.bin", "deep/a/b/c"):
        _, _, node, _ = files.resolve(f"/p1/{rel}")
        st = os.lstat(root / rel)
        assert stat.S_IMODE(st.st_mode) == node.mode
        assert st.st_mtime_ns == node.mtime_ns
    # mtimes are those of the source tree that mkfs.ext4 -d copied (seconds)
    _, _, node, _ = files.resolve("/p1/hello.txt")
    assert node.mtime_ns // 10**9 > 1_600_000_000
    # extracting again leaves an identical file as it is, and replaces one that differs (as restic does)
    r2 = repo.json("extract", sid, "/p1/hello.txt", "--target", tmp_path / "o" / "p1")
    assert r2["files"] == 0 and r2["unchanged"] == 1 and r2["skipped"] == []
    (root / "hello.txt").write_bytes(b"changed locally\n")
    r3 = repo.json("extract", sid, "/p1/hello.txt", "--target", tmp_path / "o" / "p1")
    assert r3["files"] == 1 and r3["updated"] == 1 and r3["skipped"] == []
    assert (root / "hello.txt").read_bytes() == parts["p1"]["hello.txt"]


def test_mount_shows_the_file_trees(disks, tmp_path):
    """vmbak mount's files/: every partition's files byte-identical, symlinks, read-only
    modes and mtimes as ls reports them, for ext4, XFS, NTFS and FAT."""
    repo, out, _ = disks
    lib = repo.open()
    for disk in ("gpt", "mbr"):
        sid, parts = out[disk]
        mp = tmp_path / disk
        mp.mkdir()
        info = repo.json("mount", sid, mp, "--background")
        try:
            root = Path(info["files"])
            assert sorted(os.listdir(mp)) == ["files", f"{disk}.raw"]
            assert sorted(os.listdir(root)) == sorted(parts)
            files = SnapshotFiles(SnapshotView(lib, lib.load_manifest(sid)))
            for part, tree in parts.items():
                seen = set()
                for dirpath, _dirs, names in os.walk(root / part):
                    for n in names:
                        full = Path(dirpath) / n
                        if not full.is_symlink():
                            seen.add(str(full.relative_to(root / part)))
                want = {rel for rel in tree}
                # FAT stores upper-case short names for these; compare case-insensitively there
                norm = (lambda x: {v.lower() for v in x}) if part == "p2" and disk == "mbr" else set
                assert norm(want) <= norm(seen), (disk, part, sorted(norm(want) - norm(seen)))
                for rel, content in tree.items():
                    assert (root / part / rel).read_bytes() == content, f"{disk} /{part}/{rel}"
                    _, _, node, _ = files.resolve(f"/{part}/{rel}")
                    st = os.stat(root / part / rel)
                    assert st.st_size == len(content) and st.st_mtime_ns == node.mtime_ns
                    assert stat.S_IMODE(st.st_mode) == (node.mode & 0o555) | 0o400
            if disk == "gpt":
                assert os.readlink(root / "p1" / "link-abs") == "/etc/passwd"
                assert (root / "p1" / "link-rel").read_bytes() == parts["p1"]["etc/config.ini"]
                assert stat.S_IMODE(os.stat(root / "p2" / "etc" / "config.ini").st_mode) == 0o440
            with pytest.raises(OSError):
                open(root / "p1" / "hello.txt", "r+b").close()  # noqa: SIM115
            with pytest.raises(OSError):
                (root / "p1" / "new").write_bytes(b"x")
            with pytest.raises(FileNotFoundError):
                (root / "p1" / "no-such-file").read_bytes()
        finally:
            subprocess.run(["fusermount3", "-u", mp], check=False)
            end = time.monotonic() + 10
            while os.path.ismount(mp) and time.monotonic() < end:
                time.sleep(0.05)
            assert not os.path.ismount(mp)


def test_hostile_names_never_escape_the_target(make_ext4, debugfs, repo, tmp_path):
    img, _ = make_ext4("evil.img", 16 * MiB)
    outside = tmp_path / "outside"
    outside.mkdir()
    debugfs(img.path, f"symlink /escape {outside}", write=True)  # absolute symlink out of the target
    debugfs(img.path, "symlink /up ../../../../../../../../tmp", write=True)
    debugfs(img.path, "mkdir /escdir", write=True)
    debugfs(img.path, "write /dev/null /escdir/pwned", write=True)
    debugfs(img.path, "ln /escdir /escapf", write=True)  # renamed to a second 'escape' below: a directory
    debugfs(img.path, "mkdir /loop", write=True)
    debugfs(img.path, "ln /loop /loop/again", write=True)  # a directory loop
    debugfs(img.path, "write /dev/null /ABCDEFGHIJK", write=True)
    data = bytearray(img.path.read_bytes())
    i = data.find(b"ABCDEFGHIJK")
    assert i > 0
    data[i:i + 11] = b"../../pwned"  # a name with slashes, as a hostile image would hold
    j = data.find(b"escapf")
    assert j > 0
    data[j:j + 6] = b"escape"
    img.path.write_bytes(bytes(data))
    sid = repo.backup(img, "evil")["id"]
    target = tmp_path / "target"
    r = repo.json("extract", sid, "/disk", "--target", target)
    reasons = {s["path"]: s["reason"] for s in r["skipped"]}
    assert reasons.get("/disk/../../pwned") == "unsafe name"
    assert reasons.get("/disk/escape") == "a symlink is in the way"  # the directory that wanted to go through it
    assert reasons.get("/disk/loop/again") == "directory loop"
    assert list(outside.iterdir()) == [] and not (tmp_path / "pwned").exists()
    assert os.readlink(target / "disk" / "escape") == str(outside)
    assert not (tmp_path / "escape").exists() and not Path("/tmp/pwned").exists()
    for dirpath, _dirs, fnames in os.walk(target):
        for f in fnames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                assert p.resolve().is_relative_to(target.resolve())
    # the regular content still came out
    assert (target / "disk" / "etc" / "hostname").read_bytes() == b"web01\n"


def test_browse_errors_are_one_line(disks, repo, make_disk, assert_cli_error, tmp_path):
    brepo, out, _ = disks
    sid = out["gpt"][0]
    assert_cli_error(brepo.run("ls", sid, "/p1/nope", check=False), "no such file or directory", "/p1/nope")
    assert_cli_error(brepo.run("ls", sid, "/p9", check=False), "no such file", "/p1")
    assert_cli_error(brepo.run("cat", sid, "/p1/etc", check=False), "is a directory")
    assert_cli_error(brepo.run("cat", sid, "/p1/../p2/x", check=False), "..")
    assert_cli_error(brepo.run("cat", "nosuch:latest", "/x", check=False), "no snapshot named")
    assert_cli_error(brepo.run("extract", sid, "/p1/missing", "--target", tmp_path / "x", check=False),
                     "no such file")
    garbage = make_disk("garbage.raw", 4 * MiB, seed=9)
    gid = repo.backup(garbage, "garbage")["id"]
    assert_cli_error(repo.run("ls", gid, "/disk", check=False), "no filesystem")
    # an ext4 superblock magic over garbage: the parser fails, in one line
    data = bytearray(garbage.read())
    data[0x438:0x43A] = b"\x53\xef"
    garbage.write(0, bytes(data))
    gid = repo.backup(garbage, "garbage")["id"]
    assert_cli_error(repo.run("ls", gid, "/disk", check=False), "cannot be read")
    assert json.loads(repo.run("ls", gid, "--json").stdout)[0]["path"] == "/disk"


def test_swap_browses_as_empty_and_an_encrypted_volume_is_named(repo, assert_cli_error, tmp_path):
    """A VM's swap partition holds no files: it lists as an empty directory, and a search of
    the disk is complete (it was "no filesystem", which made every search of a VM with swap
    partial, exit 3). So does a partition of zeros. A LUKS volume cannot be searched, and
    the warning says why."""
    tree = _tree(5, MiB)
    ext = build_fs("ext4", tmp_path / "ext4.img", 32 * MiB, tree)
    swap = tmp_path / "swap.img"
    swap.write_bytes(np.random.default_rng(5).bytes(8 * MiB))
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)
    luks = tmp_path / "luks.img"
    luks.write_bytes(b"LUKS\xba\xbe\x00\x02" + np.random.default_rng(6).bytes(4 * MiB - 8))
    blank = tmp_path / "blank.img"  # a partition never formatted
    blank.write_bytes(bytes(4 * MiB))
    assemble_disk(tmp_path / "d.raw", "gpt", [(ext, "L"), (swap, "S"), (blank, "L")])
    sid = repo.backup(tmp_path / "d.raw", "d")["id"]
    for vol in ("/p2", "/p3"):
        r = repo.run("ls", sid, vol, "--json")
        assert json.loads(r.stdout) == [] and r.stderr == "", (vol, r.stdout, r.stderr)
    r = repo.run("find", "--name", "d", "config.ini")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [line.split()[-1] for line in r.stdout.splitlines()[:-1]] == ["/p1/etc/config.ini"], r.stdout
    assemble_disk(tmp_path / "e.raw", "gpt", [(ext, "L"), (swap, "S"), (luks, "L")])
    eid = repo.backup(tmp_path / "e.raw", "e")["id"]
    assert_cli_error(repo.run("ls", eid, "/p3", check=False), "/p3", "encrypted (LUKS)")
    r = repo.run("find", "--name", "e", "config.ini", check=False)
    assert r.returncode == 3, (r.returncode, r.stderr)
    warnings = r.stderr.splitlines()
    assert len(warnings) == 2 and "/p3: encrypted (LUKS)" in warnings[0], r.stderr
