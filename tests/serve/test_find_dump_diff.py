"""vmbak find, dump and diff --files through the real CLI, on small real ext4 partitions.

One GPT disk of three ext4 partitions is backed up twice: p1 never changes, p2 is changed
between the backups with debugfs (files added, removed, rewritten in place with the same
size and time, a mode and a time changed, a file turned into a directory, a symlink
retargeted, a directory made unreadable), and p3 holds a damaged directory in both.
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import _VMBAK, _env, assemble_disk, build_fs, run

MiB = 1 << 20
ODD = os.fsdecode(b"odd \tname-\xff.txt")  # a tab, a space and a byte that is not UTF-8
P2 = {
    "etc/hostname": b"web01\n",
    "etc/app.conf": b"port = 80\n",
    "etc/old.conf": b"removed later\n",
    "etc/nginx/nginx.conf": b"worker_processes 2;\n" * 40,
    "data/inplace.bin": np.random.default_rng(1).bytes(300_000),
    "data/same.bin": np.random.default_rng(2).bytes(200_000),
    "data/growing.log": b"line\n" * 100,
    "data/thing": b"a file, a directory later\n",
    "data/mode.sh": b"#!/bin/sh\n",
    "data/touched.txt": b"only its time changes\n",
    "README.TXT": b"upper case\n",
    "line\nbreak.conf": b"newline in the name\n",
    ODD: b"odd\n",
    "broken/inside.txt": b"in\n",
}
P1 = {"boot/vmlinuz": np.random.default_rng(3).bytes(500_000), "boot/grub.conf": b"timeout 5\n"}
P3 = {"keep/a.conf": b"a\n", "bad/b.conf": b"b\n", "data/bad.bin": b"x" * 5000}


def _debugfs(img: Path, *requests: str) -> None:
    for r in requests:
        p = run("debugfs", "-w", "-R", r, img)
        assert "not found" not in p.stderr.lower() and "could not" not in p.stderr.lower(), (r, p.stderr)


def _block_size(img: Path) -> int:
    info = run("dumpe2fs", "-h", img).stdout
    return int(next(ln.split()[-1] for ln in info.splitlines() if ln.startswith("Block size:")))


def _run_bytes(repo, *args: object, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """The real CLI with binary standard output."""
    p = subprocess.run([*_VMBAK, *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)],
                       env=_env(repo), stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


@pytest.fixture(scope="module")
def snaps(tmp_path_factory, init_repo):
    """(repo, snapshot 1, snapshot 2, work directory)."""
    d = tmp_path_factory.mktemp("finddump")
    p1 = build_fs("ext4", d / "p1.img", 4 * MiB, P1)
    p2 = build_fs("ext4", d / "p2.img", 8 * MiB, P2, symlinks={"lnk": "etc/hostname", "data/abs": "/etc/passwd"})
    p3 = build_fs("ext4", d / "p3.img", 4 * MiB, P3)
    _debugfs(p3, "sif /bad block[5] 99999999", "sif /data/bad.bin block[0] 0")
    disk = d / "disk.raw"
    assemble_disk(disk, "gpt", [(p1, "L"), (p2, "L"), (p3, "L")])
    repo = init_repo(d / "repo")
    s1 = repo.backup(disk, "web")["id"]

    # change p2
    bs = _block_size(p2)
    block = int(run("debugfs", "-R", "blocks /data/inplace.bin", p2).stdout.split()[3])
    with open(p2, "r+b") as f:  # same size, same mtime: only the bytes tell
        f.seek(block * bs + 7)
        f.write(b"CHANGED")
    (d / "new.txt").write_bytes(b"brand new\n")
    (d / "grown.log").write_bytes(b"line\n" * 150)
    _debugfs(p2, "rm /etc/old.conf", f"write {d / 'new.txt'} /etc/new.conf", "rm /data/growing.log",
             f"write {d / 'grown.log'} /data/growing.log", "rm /data/thing", "mkdir /data/thing",
             f"write {d / 'new.txt'} /data/thing/inner.txt", "sif /data/mode.sh mode 0100755",
             "sif /data/touched.txt mtime 20200101000000", "rm /lnk", "symlink /lnk etc/app.conf",
             "sif /broken block[0] 99999999")
    offsets = assemble_disk(disk, "gpt", [(p1, "L"), (p2, "L"), (p3, "L")])
    assert len(offsets) == 3
    s2 = repo.backup(disk, "web")["id"]
    other = build_fs("ext4", d / "other.img", 4 * MiB, {"x.conf": b"x\n"})
    repo.backup(other, "db")
    return repo, s1, s2, d


# ---------------------------------------------------------------------------- find
def test_find_across_snapshots(snaps):
    repo, s1, s2, _d = snaps
    p = repo.run("find", "*.conf", "--name", "web", check=False)
    assert p.returncode == 3, p.stderr  # /p3/bad cannot be listed, in both snapshots
    lines = p.stdout.splitlines()
    paths = {(ln.split()[0], ln.split()[-1]) for ln in lines[:-1]}
    for sid in (s1[:8], s2[:8]):
        assert (sid, "/p1/boot/grub.conf") in paths
        assert (sid, "/p2/etc/app.conf") in paths
        assert (sid, "/p2/etc/nginx/nginx.conf") in paths
        assert (sid, "/p3/keep/a.conf") in paths
    assert (s1[:8], "/p2/etc/old.conf") in paths and (s2[:8], "/p2/etc/old.conf") not in paths
    assert (s2[:8], "/p2/etc/new.conf") in paths and (s1[:8], "/p2/etc/new.conf") not in paths
    assert not any(path == "/disk/x.conf" for _s, path in paths)  # --name web: db is left out
    assert f"{s1[:8]} -rw-r--r--" in p.stdout
    assert " /p2/line\\nbreak.conf\n" in p.stdout  # escaped: one line per match
    # /p1 and /p3 did not change: the second snapshot takes their matches and problems over
    assert lines[-1] == (f"{len(paths)} matches in 2 of 2 snapshots (2 volumes unchanged since an earlier "
                         "snapshot: not walked again)"), lines[-1]
    warnings = p.stderr.splitlines()
    assert [w.split(": directory cannot be read")[0] for w in warnings[:-1]] == [
        f"vmbak: warning: snapshot {s1[:8]}: /p3/bad", f"vmbak: warning: snapshot {s2[:8]}: /p2/broken",
        f"vmbak: warning: snapshot {s2[:8]}: /p3/bad"], warnings
    assert warnings[-1] == "vmbak: warning: 3 paths could not be read; the search is incomplete"


def _find(repo, *args: object) -> list[dict]:
    """find --json; exit 3 is expected when the search walks /p3 (damaged)."""
    p = repo.run("find", *args, "--json", check=False)
    assert p.returncode in (0, 3) and "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


def test_find_json_and_filters(snaps):
    repo, s1, s2, _d = snaps
    p = repo.run("find", "/p2/etc/*", "-s", s2[:8], "--json")
    found = json.loads(p.stdout)
    assert sorted(f["path"] for f in found) == ["/p2/etc/app.conf", "/p2/etc/hostname", "/p2/etc/new.conf",
                                               "/p2/etc/nginx"]
    host = next(f for f in found if f["path"] == "/p2/etc/hostname")
    assert host["snapshot"] == s2 and host["snapshot_name"] == "web" and host["type"] == "file" and host["size"] == 6
    assert host["mode"] == "0644" and host["mtime"].endswith("Z") and host["snapshot_time"]
    assert next(f for f in found if f["path"] == "/p2/etc/nginx")["type"] == "dir"
    # names are exact in JSON; the anchored pattern matches no deeper
    p = repo.run("find", "odd*", "-s", s1, "--json", check=False)  # walks /p3 too: exit 3
    assert p.returncode == 3
    odd = json.loads(p.stdout)
    assert [f["path"] for f in odd] == ["/p2/" + ODD]
    # case: only with -i; ** crosses directories; --latest keeps the newest of each name
    assert _find(repo, "readme*", "-s", s2) == []
    assert [f["path"] for f in _find(repo, "-i", "readme*", "-s", s2)] == \
        ["/p2/README.TXT"]
    deep = _find(repo, "/p2/**/*.conf", "--latest", "1", "--name", "web")
    assert {f["snapshot"] for f in deep} == {s2} and "/p2/etc/nginx/nginx.conf" in {f["path"] for f in deep}
    assert {f["snapshot_name"] for f in _find(repo, "*.conf", "--latest", "1")} == {"web", "db"}
    sym = _find(repo, "lnk", "-s", s2)
    assert sym[0]["type"] == "symlink" and sym[0]["target"] == "etc/app.conf"


def test_find_damaged_volume_one_warning(snaps):
    repo, s1, _s2, _d = snaps
    p = repo.run("find", "*.bin", "-s", s1, check=False)
    assert p.returncode == 3 and "Traceback" not in p.stderr
    err = p.stderr.splitlines()
    assert len(err) == 2 and err[0].startswith(f"vmbak: warning: snapshot {s1[:8]}: /p3/bad: ")
    assert "/p3/data/bad.bin" in p.stdout and "/p2/data/inplace.bin" in p.stdout  # listing bad.bin is fine


def test_find_errors(snaps, assert_cli_error):
    repo, _s1, _s2, _d = snaps
    assert_cli_error(repo.run("find", "*", "-s", "nosuch:latest", check=False), "nosuch")
    assert_cli_error(repo.run("find", "", check=False), "empty pattern")
    assert_cli_error(repo.run("find", "*", "--latest", "0", check=False), "--latest")


# ---------------------------------------------------------------------------- dump
def test_dump_file_is_its_bytes(snaps):
    repo, s1, s2, _d = snaps
    assert _run_bytes(repo, "dump", s1, "/p2/data/inplace.bin").stdout == P2["data/inplace.bin"]
    changed = _run_bytes(repo, "dump", s2, "/p2/data/inplace.bin").stdout
    assert len(changed) == 300_000 and changed != P2["data/inplace.bin"] and b"CHANGED" in changed
    cat = _run_bytes(repo, "cat", s1, "/p2/data/same.bin").stdout
    assert cat == _run_bytes(repo, "dump", s1, "/p2/data/same.bin").stdout == P2["data/same.bin"]


def _members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as t:
        for m in t:
            out[m.name] = (m, t.extractfile(m).read() if m.isfile() else None)
    return out


def test_dump_directory_is_a_tar(snaps, tmp_path):
    repo, s1, _s2, _d = snaps
    data = _run_bytes(repo, "dump", s1, "/p2").stdout
    members = _members(data)
    for rel, content in P2.items():
        if rel.startswith("broken/"):
            continue
        info, got = members["p2/" + rel]
        assert got == content, rel
        assert info.isfile() and info.size == len(content) and info.mode == 0o644 and info.mtime > 1_600_000_000
    assert members["p2/etc"][0].isdir() and members["p2"][0].isdir()
    assert members["p2/lnk"][0].issym() and members["p2/lnk"][0].linkname == "etc/hostname"
    assert members["p2/data/abs"][0].linkname == "/etc/passwd"
    # the same through a file: appears only once whole; extracted by tar, byte for byte
    target = tmp_path / "p2.tar"
    (tmp_path / ".p2.tar.vmbak-partial").write_bytes(b"left by a killed dump")
    r = repo.json("dump", s1, "/p2/etc", "--target", target)
    assert r["type"] == "dir" and r["files"] == 4 and r["dirs"] == 2 and target.read_bytes()
    assert not list(tmp_path.glob(".*vmbak-partial"))
    out = tmp_path / "x"
    out.mkdir()
    run("tar", "-xf", target, "-C", out)
    assert (out / "p2/etc/nginx/nginx.conf").read_bytes() == P2["etc/nginx/nginx.conf"]
    # the whole snapshot: every volume, the damaged directory and file named and left out
    p = _run_bytes(repo, "dump", s1, "/", check=False)
    assert p.returncode == 3, p.stderr.decode()
    err = p.stderr.decode().splitlines()
    assert any(e.startswith("vmbak: warning: /p3/bad: directory cannot be read") for e in err), err
    assert any(e.startswith("vmbak: warning: /p3/data/bad.bin:") and "left out of the archive" in e for e in err)
    assert err[-1] == "vmbak: warning: 2 paths could not be read; the dump is incomplete", err
    members = _members(p.stdout)
    assert members["p1/boot/vmlinuz"][1] == P1["boot/vmlinuz"] and members["p3/keep/a.conf"][1] == b"a\n"
    assert "p3/data/bad.bin" not in members and "p3/bad" in members
    assert "." not in members and "" not in members and members["p1"][0].isdir()  # "/" itself is no entry


def test_dump_refuses_a_terminal(snaps, assert_cli_error, tmp_path):
    repo, s1, _s2, _d = snaps
    master, slave = pty.openpty()
    try:
        p = subprocess.run([*_VMBAK, "dump", s1, "/p2/etc/hostname"], env=_env(repo), stdin=subprocess.DEVNULL,
                           stdout=slave, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    p.stdout = ""
    assert_cli_error(p, "terminal", "--target")
    assert_cli_error(repo.run("dump", s1, "/p2/lnk", check=False), "not a regular file or directory")
    assert_cli_error(repo.run("dump", s1, "/p2/nope", check=False), "no such file")
    assert_cli_error(repo.run("dump", s1, "/p3/data/bad.bin", check=False), "/p3/data/bad.bin")
    assert_cli_error(repo.run("dump", s1, "/p2", "--json", check=False), "--target")
    assert_cli_error(repo.run("dump", s1, "/p2", "--target", tmp_path, check=False), "directory")


# ---------------------------------------------------------------------------- diff --files
EXPECTED = {
    ("-", "/p2/etc/old.conf"), ("+", "/p2/etc/new.conf"), ("M", "/p2/data/growing.log"),
    ("M", "/p2/data/inplace.bin"), ("T", "/p2/data/thing/"), ("+", "/p2/data/thing/inner.txt"), ("M", "/p2/lnk"),
}


def test_diff_files(snaps):
    repo, s1, s2, _d = snaps
    t = time.monotonic()
    p = repo.run("diff", s1, s2, "--files", check=False)
    assert p.returncode == 3, p.stderr  # /p2/broken is unreadable in the second snapshot
    lines = p.stdout.splitlines()
    assert lines[0] == f"comparing snapshot {s1[:8]} to snapshot {s2[:8]}:"
    got = {(ln[:5].strip(), ln[5:]) for ln in lines[1:] if not ln.endswith(("changed", "metadata"))
           and ln[:1] in "+-MTU"}
    assert got == EXPECTED, got
    assert any(ln.startswith("Files:") and "2 new,     1 removed,     2 changed" in ln for ln in lines), lines
    err = p.stderr.splitlines()
    assert len(err) == 2 and err[0].startswith(f"vmbak: warning: snapshot {s2[:8]}: /p2/broken: ") and \
        err[1] == "vmbak: warning: 1 path could not be read; the comparison is incomplete", err
    # --metadata adds U for the mode and the time; --json has it all
    pj = repo.run("diff", s1, s2, "--files", "--metadata", "--json", check=False)
    assert pj.returncode == 3
    doc = json.loads(pj.stdout)
    changes = {(c["modifier"], c["path"]): c for c in doc["changes"]}
    assert changes[("U", "/p2/data/mode.sh")]["what"] == ["mode"]
    assert changes[("U", "/p2/data/touched.txt")]["what"] == ["mtime"]
    assert changes[("M", "/p2/data/inplace.bin")]["what"] == ["content"]
    assert changes[("M", "/p2/data/growing.log")]["what"] == ["size"]
    assert changes[("M", "/p2/lnk")]["what"] == ["target"]
    assert {(m, p.rstrip("/") if m != "T" else p + "/") for m, p in changes if m != "U"} == EXPECTED
    assert doc["a"] == s1 and doc["b"] == s2 and doc["stats"]["files"]["added"] == 2
    assert [(e["snapshot"], e["path"]) for e in doc["errors"]] == [(s2, "/p2/broken")]
    assert doc["volumes_unchanged"] == ["/p1", "/p3"]  # proven by the block hashes: not even walked
    # ten files of the same size in both: each proven equal by its blocks, or read only where
    # its blocks changed (a 64 KiB block holds many small files and inodes): far less than all
    assert doc["files_proven_by_blocks"] + doc["files_read_in_part"] == 10 and doc["files_read"] == 0, doc
    assert doc["files_proven_by_blocks"] >= 1 and doc["bytes_read"] < 300_000, doc
    print(f"diff --files: {time.monotonic() - t:.2f} s")


def test_diff_files_same_snapshot_and_errors(snaps, assert_cli_error):
    repo, s1, _s2, _d = snaps
    doc = repo.json("diff", s1, s1, "--files")
    assert doc["changes"] == [] and doc["volumes_unchanged"] == ["/p1", "/p2", "/p3"]
    assert_cli_error(repo.run("diff", s1, "db:latest", "--files", check=False), "different disks")
    assert_cli_error(repo.run("diff", s1, "web:latest", "--metadata", check=False), "--files")


def test_help_has_examples(run_vmbak):
    for cmd, example in (("find", "vmbak find '*.conf'"), ("dump", "vmbak dump web:latest /p2/etc > etc.tar"),
                         ("diff", "--files")):
        out = run_vmbak(cmd, "--help").stdout
        assert "examples:" in out and example in out, out


def test_diff_files_after_the_disk_grew(make_repo, tmp_path):
    """Without comparable block hash tables (the disk size changed), every file of the same
    size is read from both snapshots; only real differences are listed."""
    repo = make_repo()
    files = {"a.txt": b"a\n" * 1000, "sub/b.bin": np.random.default_rng(5).bytes(70_000), "sub/c.txt": b"c\n"}
    img = build_fs("ext4", tmp_path / "grow.img", 4 * MiB, files)
    s1 = repo.backup(img, "grow")["id"]
    (tmp_path / "new.txt").write_bytes(b"new\n")
    _debugfs(img, f"write {tmp_path / 'new.txt'} /sub/new.txt")
    with open(img, "r+b") as f:
        f.truncate(5 * MiB)
    s2 = repo.backup(img, "grow")["id"]
    doc = repo.json("diff", s1, s2, "--files")
    assert [(c["modifier"], c["path"]) for c in doc["changes"]] == [("+", "/disk/sub/new.txt")]
    assert doc["volumes_unchanged"] == [] and doc["files_proven_by_blocks"] == 0
    assert doc["files_read"] == 3 and doc["bytes_read"] == 2 * sum(len(v) for v in files.values())


def test_python_api(snaps):
    import vmbak.api

    repo, s1, s2, _d = snaps
    lib = repo.open()
    r = vmbak.api.find(lib, ["/p2/etc/*.conf"], [s1])
    assert sorted(m["path"] for m in r["matches"]) == ["/p2/etc/app.conf", "/p2/etc/old.conf"] and not r["errors"]
    buf = io.BytesIO()
    assert vmbak.api.dump(lib, s1, "/p2/data/same.bin", buf)["bytes"] == 200_000
    assert buf.getvalue() == P2["data/same.bin"]
    d = vmbak.api.diff_files(lib, s1, s2)
    assert ("M", "/p2/data/inplace.bin") in {(c["modifier"], c["path"]) for c in d["changes"]}
    assert [e["path"] for e in d["errors"]] == ["/p2/broken"]
