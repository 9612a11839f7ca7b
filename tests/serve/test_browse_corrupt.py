"""Browsing damaged filesystems: ls, extract and mount never print a traceback, name each
path they cannot read in one line, go on with the rest (exit 3), cut directory loops and end
in bounded time.

The corpus is built here, deterministically: small ext4 images damaged with ``debugfs -w``
(a directory hard-linked below itself, a name holding NUL, names with a newline and bytes
that are not UTF-8, a symlink target holding NUL, a file without an extent header, a
directory whose data lies past the end of the volume, a cleared inode, a superblock with no
inodes per group), ext4 and btrfs images with seeded random bytes written over their
metadata, all as partitions of one disk backed up once. A hypothesis test flips random
bytes in the metadata of a small ext4 image and browses each result in-process.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmbak
from vmbak.engine.view import SnapshotView
from vmbak.errors import VmbakError
from vmbak.serve.files import SnapshotFiles

from .conftest import assemble_disk, build_fs, run

MiB = 1 << 20
GOOD = {"etc/hostname": b"web01\n", "data/keep.bin": np.random.default_rng(3).bytes(200_000),
        "home/notes.txt": b"notes\n" * 500}
OPEN_TIMEOUT = 60  # seconds: what a browse of this corpus may take at most, in the worst case


def _patch(img: Path, old: bytes, new: bytes) -> None:
    data = bytearray(img.read_bytes())
    assert data.count(old) == 1, f"{old!r} is not unique in {img}"
    i = data.find(old)
    data[i:i + len(old)] = new
    img.write_bytes(bytes(data))


def _debugfs(img: Path, *requests: str) -> None:
    for r in requests:
        run("debugfs", "-w", "-R", r, img)


def _ext4(d: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    return build_fs("ext4", d / f"{name}.img", 8 * MiB, {**GOOD, **(extra or {})})


def _metadata_regions(img: Path) -> list[tuple[int, int]]:
    """Byte ranges of an ext4 image's superblock, group descriptors, used inodes and directories."""
    info = run("dumpe2fs", img).stdout
    bs = int(next(ln.split()[-1] for ln in info.splitlines() if ln.startswith("Block size:")))
    table = int(next(ln.split("at ")[1].split("-")[0] for ln in info.splitlines() if "Inode table at" in ln))
    regions = [(1024, 2048), (bs * (2 if bs == 1024 else 1), bs * (3 if bs == 1024 else 2)),
               (table * bs, table * bs + 64 * 256)]
    for d in ("/", "/etc", "/data", "/home"):
        for b in run("debugfs", "-R", f"blocks {d}", img).stdout.split():
            regions.append((int(b) * bs, int(b) * bs + bs))
    return regions


def _scribble(img: Path, regions: list[tuple[int, int]], seed: int, count: int) -> None:
    rng = random.Random(seed)
    data = bytearray(img.read_bytes())
    for _ in range(count):
        lo, hi = rng.choice(regions)
        data[rng.randrange(lo, hi)] = rng.randrange(256)
    img.write_bytes(bytes(data))


def _btrfs(d: Path, seed: int) -> Path:
    src = d / "btrfs-src"
    for rel, content in GOOD.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    for i in range(30):
        (src / "home" / f"f{i}").write_bytes(b"%d\n" % i)
    img = d / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(24 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-K", "--mixed", "--rootdir", src, img)
    data = img.read_bytes()
    fsid = data[0x10020:0x10030]
    nodes = [(o, o + 4096) for o in range(0, len(data), 4096) if data[o + 0x20:o + 0x30] == fsid and o != 0x10000]
    assert nodes
    _scribble(img, nodes, seed, 60)
    return img


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, init_repo):
    """One GPT disk of damaged filesystems, backed up. Returns (repo, snapshot id, partition
    -> what was done to it)."""
    d = tmp_path_factory.mktemp("corrupt")
    repo = init_repo(d / "repo")
    parts: dict[str, str] = {}
    images = []

    # p1: hostile names and a directory loop
    odd = {"line\nbreak.txt": b"newline\n", os.fsdecode(b"bad-\xff\xfe.txt"): b"latin\n", "NULNAMEXX": b"nul\n"}
    img = _ext4(d, "names", odd)
    _debugfs(img, "mkdir /loop", "mkdir /loop/inner", "ln /loop /loop/inner/up", "symlink /nullink AAAAQBBBB")
    _patch(img, b"NULNAMEXX", b"NUL\0NAMEX")
    _patch(img, b"AAAAQBBBB", b"AAAA\0BBBB")
    images.append(img)
    parts["p1"] = "names"

    # p2: one file without an extent header, one directory whose data lies past the volume, a cleared inode
    img = _ext4(d, "inodes", {"data/bad.bin": b"x" * 5000, "broken/inside.txt": b"in\n", "data/cleared": b"c\n",
                              "zero/a.txt": b"a\n", "zero/b.txt": b"b\n", "explode/e.txt": b"e\n",
                              "data/blockmap.bin": b"b" * 3000})
    _debugfs(img, "sif /data/bad.bin block[0] 0", "sif /broken block[5] 99999999", "clri /data/cleared")
    # block-mapped inodes of a terabyte: dissect would list every block (gigabytes of memory, minutes)
    _debugfs(img, "sif /explode flags 0", "sif /explode size 0xffffffffff", "sif /data/blockmap.bin flags 0",
             "sif /data/blockmap.bin size 0xffffffffff")
    # a zero-length directory entry (dissect logs it and stops listing): reported, not a stray line
    block = int(run("debugfs", "-R", "blocks /zero", img).stdout.split()[0])
    with open(img, "r+b") as f:
        f.seek(block * 1024 + 24 + 4)  # after "." and "..": the first entry's rec_len
        f.write(b"\0\0")
    images.append(img)
    parts["p2"] = "inodes"

    # p3: a superblock no parser accepts
    img = _ext4(d, "super")
    _debugfs(img, "ssv inodes_per_group 0")
    images.append(img)
    parts["p3"] = "super"

    # p4, p5: seeded random bytes over ext4 metadata
    for seed in (22, 19):
        img = _ext4(d, f"random{seed}", {f"home/f{i}": b"%d\n" % i for i in range(40)})
        _scribble(img, _metadata_regions(img), seed, 80)
        images.append(img)
        parts[f"p{len(images)}"] = "random"

    # p6: seeded random bytes over btrfs tree nodes
    images.append(_btrfs(d, 2))
    parts[f"p{len(images)}"] = "btrfs"

    assemble_disk(d / "disk.raw", "gpt", [(i, "L") for i in images])
    sid = repo.backup(d / "disk.raw", "corrupt")["id"]
    return repo, sid, parts


def _check_stderr(err: str) -> list[str]:
    """Every line is one vmbak warning (or a skip note) naming a path; returns the warnings."""
    assert "Traceback" not in err, err
    warnings = []
    for line in err.splitlines():
        assert line.startswith(("vmbak: warning: /", "vmbak: skipped /", "vmbak: warning: ")), line
        warnings.append(line)
    return warnings


def test_ls_recursive_lists_what_it_can(corpus):
    repo, sid, parts = corpus
    t = time.monotonic()
    p = repo.run("ls", sid, "/", "-R", check=False, timeout=OPEN_TIMEOUT)
    assert time.monotonic() - t < OPEN_TIMEOUT
    assert p.returncode == 3, p.stderr
    warnings = _check_stderr(p.stderr)
    out = p.stdout
    # the readable parts of every damaged filesystem are listed
    for part in ("p1", "p2"):
        for rel in GOOD:
            assert f" /{part}/{rel}\n" in out, f"/{part}/{rel} missing"
    # escaped, one line per entry: the names with NUL, newline and undecodable bytes
    assert " /p1/NUL\\x00NAMEX\n" in out and " /p1/line\\nbreak.txt\n" in out and " /p1/bad-\\xff\\xfe.txt\n" in out
    assert "/p1/nullink -> AAAA\\x00BBBB\n" in out
    assert any(w.startswith("vmbak: warning: /p1/loop/inner/up: directory loop") for w in warnings), warnings
    assert any(w.startswith("vmbak: warning: /p2/data/bad.bin") for w in warnings) is False  # listing it is fine
    assert any(w.startswith("vmbak: warning: /p2/broken: directory cannot be read") for w in warnings), warnings
    assert any(w.startswith("vmbak: warning: /p2/zero: directory cannot be read (Zero-length directory entry")
               for w in warnings), warnings
    assert any(w.startswith("vmbak: warning: /p2/explode: directory cannot be read (directory size 1099511627775 "
                            "is larger than the volume") for w in warnings), warnings
    assert any(w.startswith("vmbak: warning: /p3: ") and "blocks or inodes per group" in w for w in warnings)
    assert warnings[-1].endswith("the listing is incomplete")
    # JSON too: the same entries, the same warnings
    pj = repo.run("ls", sid, "/p1", "-R", "--json", check=False, timeout=OPEN_TIMEOUT)
    assert pj.returncode == 3 and "Traceback" not in pj.stderr
    assert "/p1/NUL\\u0000NAMEX" in pj.stdout


def test_extract_extracts_what_it_can(corpus, tmp_path):
    repo, sid, parts = corpus
    target = tmp_path / "out"
    p = repo.run("extract", sid, "/", "--target", target, "--json", check=False, timeout=OPEN_TIMEOUT)
    assert p.returncode == 3, p.stderr
    warnings = _check_stderr(p.stderr)
    import json

    r = json.loads(p.stdout.splitlines()[-1])
    errors = {e["path"]: e["error"] for e in r["errors"]}
    skipped = {s["path"]: s["reason"] for s in r["skipped"]}
    assert "/p2/data/bad.bin" in errors and "extent" in errors["/p2/data/bad.bin"].lower()
    assert "/p2/broken" in errors
    assert "block-mapped file of 1099511627775 bytes is larger than the volume" in errors["/p2/data/blockmap.bin"]
    assert "/p3" in errors and "per group" in errors["/p3"]
    assert skipped["/p1/NUL\0NAMEX"] == "unsafe name"
    assert skipped["/p1/loop/inner/up"] == "directory loop"
    assert skipped["/p1/nullink"].startswith("unsafe symlink target")
    assert len(warnings) == len(r["errors"]) + 1 + sum(1 for w in warnings if w.startswith("vmbak: skipped"))
    for part in ("p1", "p2"):
        for rel, content in GOOD.items():
            assert (target / part / rel).read_bytes() == content, f"/{part}/{rel}"
    assert (target / "p1" / "line\nbreak.txt").read_bytes() == b"newline\n"
    assert (target / "p1" / os.fsdecode(b"bad-\xff\xfe.txt")).read_bytes() == b"latin\n"
    assert not (target / "p2" / "data" / "bad.bin").exists()
    for dirpath, dirs, names in os.walk(target):
        for n in names + dirs:
            assert not n.endswith(".vmbak-partial"), os.path.join(dirpath, n)
            assert "\0" not in n
            p_ = Path(dirpath) / n
            if not p_.is_symlink():
                assert p_.resolve().is_relative_to(target.resolve())


def test_a_volume_that_cannot_be_opened_is_one_line(corpus, assert_cli_error, tmp_path):
    repo, sid, parts = corpus
    assert_cli_error(repo.run("ls", sid, "/p3", check=False), "/p3", "blocks or inodes per group")
    assert_cli_error(repo.run("ls", sid, "/p3", "-R", check=False), "/p3", "blocks or inodes per group")
    assert_cli_error(repo.run("cat", sid, "/p2/data/bad.bin", check=False), "/p2/data/bad.bin", "extent")
    assert_cli_error(repo.run("extract", sid, "/p2/data/bad.bin", "--target", tmp_path, check=False),
                     "/p2/data/bad.bin", "extent")
    assert_cli_error(repo.run("ls", sid, "/p2/broken", check=False), "/p2/broken", "cannot be read")


def test_mount_shows_what_it_can(corpus, tmp_path):
    repo, sid, parts = corpus
    mp = tmp_path / "mnt"
    mp.mkdir()
    info = repo.json("mount", sid, mp, "--background")
    try:
        root = Path(info["files"])
        seen = set()
        for dirpath, _dirs, names in os.walk(root / "p1"):
            for n in names:
                seen.add(os.path.relpath(os.path.join(dirpath, n), root / "p1"))
        assert {"etc/hostname", "data/keep.bin", "line\nbreak.txt"} <= seen
        assert not any("NUL" in s for s in seen)  # a name holding NUL cannot be shown: left out
        assert (root / "p2" / "home" / "notes.txt").read_bytes() == GOOD["home/notes.txt"]
        with pytest.raises(OSError):
            os.listdir(root / "p2" / "broken")
        with pytest.raises(OSError):
            (root / "p2" / "data" / "bad.bin").read_bytes()
        with pytest.raises(OSError):
            os.listdir(root / "p3")
        for part in ("p4", "p5", "p6"):  # whatever is there can be walked
            for _dirpath, _dirs, _names in os.walk(root / part):
                pass
    finally:
        subprocess.run(["fusermount3", "-u", mp], check=False)
        end = time.monotonic() + 10
        while os.path.ismount(mp) and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.ismount(mp)


# ---------------------------------------------------------------------------- hypothesis
@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory, init_repo):
    d = tmp_path_factory.mktemp("fuzz")
    img = _ext4(d, "base", {**{f"home/f{i}": b"%d\n" % i for i in range(30)}, "data/sub/deeper/x.txt": b"x\n"})
    repo = init_repo(d / "repo")
    return d, img.read_bytes(), _metadata_regions(img), repo.open()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 1 << 30), st.integers(0, 255)),
                      min_size=1, max_size=40))
def test_random_metadata_damage_never_breaks_browsing(fuzz_base, flips):
    d, base, regions, lib = fuzz_base
    data = bytearray(base)
    for r, off, value in flips:
        lo, hi = regions[r % len(regions)]
        data[lo + off % (hi - lo)] = value
    img = d / "damaged.img"
    img.write_bytes(bytes(data))
    m = vmbak.backup(lib, img, name="fuzz")
    files = SnapshotFiles(SnapshotView(lib, m))
    files.time_limit = 10.0
    files.metadata_budget = 64 * MiB
    t = time.monotonic()
    out = d / "out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        fs, _vol, node, norm = files.resolve("/disk")
    except VmbakError as e:  # the volume cannot be opened at all: one message naming it
        assert "/disk" in str(e) and "\n" not in str(e)
        return
    listed = list(files.walk(fs, node, norm))
    report = files.extract(["/disk"], str(out))
    assert time.monotonic() - t < 30
    assert listed[0][0] == "/disk"
    for path, why in files.problems:
        assert path.startswith("/disk") and "\n" not in why
    for e in report["errors"]:
        assert e["path"].startswith("/disk")
    for _dirpath, dirs, names in os.walk(out):
        assert not any(n.endswith(".vmbak-partial") for n in names + dirs)


# ---------------------------------------------------------------------------- limits
@pytest.fixture(scope="module")
def limits_tree(tmp_path_factory, init_repo):
    d = tmp_path_factory.mktemp("limits")
    tree = {"a/b/c/d/e/f/leaf.txt": b"leaf\n", **{f"many/m{i:02}": b"%d\n" % i for i in range(30)}, **GOOD}
    img = build_fs("ext4", d / "deep.img", 4 * MiB, tree)
    lib = init_repo(d / "repo").open()
    return d, vmbak.backup(lib, img, name="deep"), lib


@pytest.mark.parametrize("limit,value,where,message", [
    ("max_depth", 3, "/disk/a/b/c", "more than 3 directory levels"),
    ("max_dir_entries", 10, "/disk/many", "more than 10 entries; the rest are left out"),
    ("max_entries", 20, None, "entries in all"),
    ("metadata_budget", 1, "/disk", "more than 1 B of metadata read"),
    ("time_limit", 1e-6, "/disk", "gave up after 1e-06 s"),
])
def test_walks_are_bounded(limits_tree, limit, value, where, message):
    d, m, lib = limits_tree
    # (extract resolves its paths again, which a one-byte or one-microsecond bound already refuses)
    for op in ("walk",) if limit in ("metadata_budget", "time_limit") else ("walk", "extract"):
        files = SnapshotFiles(SnapshotView(lib, m))
        fs, _vol, node, norm = files.resolve("/disk")  # the volume is open: the bound is for what follows
        setattr(files, limit, value)
        if op == "walk":
            listed = [p for p, _n in files.walk(fs, node, norm)]
        else:
            out = d / f"out-{limit}"
            shutil.rmtree(out, ignore_errors=True)
            report = files.extract(["/disk"], str(out))
            assert report["errors"] and all(e["path"].startswith("/disk") for e in report["errors"])
        assert any((where is None or p == where) and message in why for p, why in files.problems), files.problems
        if limit == "max_depth" and op == "walk":
            assert "/disk/a/b/c" in listed and "/disk/a/b/c/d" not in listed and "/disk/many/m29" in listed
        if limit == "max_dir_entries" and op == "extract":
            assert len(os.listdir(out / "disk" / "many")) == 10
            assert (out / "disk" / "etc" / "hostname").read_bytes() == GOOD["etc/hostname"]


# ---------------------------------------------------------------------------- find, dump, diff --files
def test_find_and_dump_go_on_past_damage(corpus, tmp_path):
    import tarfile

    repo, sid, parts = corpus
    p = repo.run("find", "*", "-s", sid, check=False, timeout=OPEN_TIMEOUT)
    assert p.returncode == 3 and "Traceback" not in p.stderr
    assert all(ln.startswith(f"vmbak: warning: snapshot {sid[:8]}: /") for ln in p.stderr.splitlines()[:-1])
    for part in ("p1", "p2"):
        for rel in GOOD:
            assert f" /{part}/{rel}\n" in p.stdout
    target = tmp_path / "all.tar"
    d = repo.run("dump", sid, "/", "--target", target, check=False, timeout=OPEN_TIMEOUT)
    assert d.returncode == 3 and "Traceback" not in d.stderr
    assert not list(tmp_path.glob(".*vmbak-partial"))
    with tarfile.open(target, "r:", encoding="utf-8", errors="surrogateescape") as t:
        members = {m.name: m for m in t}
        for part in ("p1", "p2"):
            for rel, content in GOOD.items():
                assert t.extractfile(members[f"{part}/{rel}"]).read() == content
    assert "p2/data/bad.bin" not in members and "p1/line\nbreak.txt" in members
    assert not any("\0" in n for n in members)


def test_diff_files_reads_both_damaged_trees_alike(corpus):
    """Without block hashes to prove anything, a damaged snapshot compared with itself is
    walked and read on both sides: problems are reported, and nothing is called added,
    removed or changed on the strength of what could not be read."""
    from vmbak.serve.treediff import FileDiff

    repo, sid, parts = corpus
    lib = repo.open()
    m = lib.find(sid)
    fa, fb = SnapshotFiles(SnapshotView(lib, m)), SnapshotFiles(SnapshotView(lib, m))
    for f in (fa, fb):
        f.time_limit = 10.0
    t = time.monotonic()
    changes = list(FileDiff(fa, fb, None, m.block_size).changes())
    assert time.monotonic() - t < OPEN_TIMEOUT
    assert changes == []
    assert {p for p, _ in fa.problems} and {p for p, _ in fb.problems} >= {"/p2/broken"}
