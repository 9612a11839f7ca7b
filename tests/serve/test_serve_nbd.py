"""vmbak serve: NBD exports of backups, checked with the real clients (qemu-img, nbdinfo,
nbdcopy, qemu-io) against the source disk at each point in time."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import socket
import subprocess

import pytest

import vmbak

from .conftest import nbd_uri, run

BLOCK = 64 * 1024
MiB = 1 << 20


@pytest.fixture(scope="module")
def chain(tmp_path_factory, init_repo, new_disk):
    """A repository with a full and three incrementals of a 40 MiB disk that has zero
    ranges and holes; returns (VmbakRepo, DiskImage, [snapshot ids]); the disk keeps a copy
    of each version (v0..v3)."""
    d = tmp_path_factory.mktemp("serve")
    repo = init_repo(d / "repo", "aes-256-gcm")
    disk = new_disk(d, "src.raw", 40 * MiB, seed=3)
    disk.punch_hole(8 * MiB, 6 * MiB)
    disk.write_zeros(20 * MiB, 4 * MiB)
    disk.punch_hole(36 * MiB, 4 * MiB)
    lib = repo.open()
    ids = []
    for k in range(4):
        if k:
            disk.write_random(k * 3 * MiB + 4096, 2 * MiB, seed=100 + k)
            disk.write_zeros(k * 5 * MiB, BLOCK)
            disk.write_random(10 * MiB + k * BLOCK, 777, seed=200 + k)  # inside the former hole
        m = vmbak.backup(lib, disk.path, name="web")
        ids.append(m.id)
        disk.save(f"v{k}")
    assert [m.kind for m in lib.manifests()] == ["full", "incremental", "incremental", "incremental"]
    assert len(lib.chain(lib.load_manifest(ids[3]))) == 4
    return repo, disk, ids


def _compare(src: object, uri: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri, check=False)


def test_full_and_deep_incremental_exports_equal_the_source(chain, start_serve, stop_serve, tmp_path):
    repo, disk, ids = chain
    sock = tmp_path / "full.sock"
    p, info = start_serve(repo, ids[0][:8], "--socket", sock)
    assert info["uri"] == nbd_uri(sock) and info["writable"] is False and info["snapshot"] == ids[0]
    r = _compare(disk.version("v0"), info["uri"])
    assert r.returncode == 0, r.stdout + r.stderr
    # base:allocation: the holes and the zero range are reported as holes, the data as data
    m = json.loads(run("nbdinfo", "--map", "--json", info["uri"]).stdout)
    holes = [(e["offset"], e["length"]) for e in m if e["type"] & 1]
    data = [(e["offset"], e["length"]) for e in m if not e["type"] & 1]
    assert (8 * MiB, 6 * MiB) in holes and (20 * MiB, 4 * MiB) in holes
    assert sum(n for _, n in holes) == 14 * MiB and sum(n for _, n in data) == 26 * MiB
    assert not any(o < 8 * MiB + 6 * MiB and o + n > 8 * MiB for o, n in data)
    err = stop_serve(p)
    assert "stopped" in err and not sock.exists()

    # the newest of a chain of four, over loopback TCP
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p, info = start_serve(repo, "web:latest", "--tcp", str(port))
    assert info["uri"] == f"nbd://127.0.0.1:{port}/" and info["snapshot"] == ids[3]
    r = _compare(disk.version("v3"), info["uri"])
    assert r.returncode == 0, r.stdout + r.stderr
    stop_serve(p)

    # a middle one of the chain, by NAME@TIME-free id, differs from the newest and equals its own point
    p, info = start_serve(repo, ids[2], "--socket", tmp_path / "mid.sock", "--cache-size", "2M")
    assert _compare(disk.version("v2"), info["uri"]).returncode == 0
    assert _compare(disk.version("v3"), info["uri"]).returncode == 1
    stop_serve(p)


def test_concurrent_readers_of_one_export_all_get_correct_data(chain, start_serve, stop_serve, tmp_path):
    repo, disk, ids = chain
    sock = tmp_path / "c.sock"
    p, info = start_serve(repo, ids[3], "--socket", sock, "--cache-size", "4M")
    want = hashlib.sha256(disk.version("v3").read_bytes()).hexdigest()

    def copy(i: int) -> str:
        out = tmp_path / f"copy{i}.raw"
        run("nbdcopy", "--connections=2", info["uri"], out)
        h = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        return h

    def compare(i: int) -> int:
        return _compare(disk.version("v3"), info["uri"]).returncode

    with cf.ThreadPoolExecutor(6) as pool:
        copies = [pool.submit(copy, i) for i in range(3)]
        compares = [pool.submit(compare, i) for i in range(3)]
        assert [f.result() for f in copies] == [want] * 3
        assert [f.result() for f in compares] == [0] * 3
    err = stop_serve(p)
    assert "cache hit rate" in err


def _repo_files(repo) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(repo.path):
        if os.path.basename(dirpath) in ("locks", "verify"):  # verify/: what check --read-data read, and when
            continue
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, repo.path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_writable_export_writes_go_to_the_overlay_and_can_be_made_permanent(chain, start_serve, stop_serve,
                                                                             tmp_path):
    repo, disk, ids = chain
    before = _repo_files(repo)
    sock = tmp_path / "w.sock"
    ovl = tmp_path / "ovl.qcow2"
    p, info = start_serve(repo, ids[3], "--socket", sock, "--writable", "--overlay", ovl)
    assert info["writable"] and info["overlay"] == str(ovl) and info["overlay_created"]
    assert info["qmp"] == str(sock) + ".qmp"
    uri = info["uri"]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0xa5 9M 5000", uri)
    expected = bytearray(disk.version("v3").read_bytes())
    expected[MiB:MiB + 65536] = b"\x5a" * 65536
    expected[9 * MiB:9 * MiB + 5000] = b"\xa5" * 5000  # inside a hole of the backup
    (tmp_path / "exp1.raw").write_bytes(expected)
    assert _compare(tmp_path / "exp1.raw", uri).returncode == 0
    stop_serve(p)
    # the writes are in the overlay, which remembers its snapshot
    alone = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(ovl)},
                                   "backing": None})
    omap = json.loads(run("qemu-img", "map", "--output=json", alone).stdout)
    written = [(e["start"], e["length"]) for e in omap if e["data"]]
    assert any(o <= MiB < o + n for o, n in written) and any(o <= 9 * MiB < o + n for o, n in written)
    assert sum(n for _, n in written) <= 4 * 65536  # only the written clusters
    info_ovl = json.loads(run("qemu-img", "info", "--output=json", "-U", ovl).stdout)
    assert ids[3] in info_ovl["backing-filename"]
    # the repository is untouched and still checks out
    assert _repo_files(repo) == before
    repo.check(read_data=True)

    # serving the same overlay again continues where it was; then make it permanent while it runs
    p, info = start_serve(repo, ids[3], "--socket", sock, "--writable", "--overlay", ovl)
    assert info["overlay_created"] is False
    assert _compare(tmp_path / "exp1.raw", uri).returncode == 0
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x33 30M 2M", "-c", "write -P 0x44 3M 4k",
                               uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = tmp_path / "permanent.raw"
    out = repo.json("restore", "--from-serve", sock, target)
    assert writer.wait(60) == 0, writer.stderr.read() if writer.stderr else ""
    assert out["switched"] and out["released_backup"] and out["target"] == str(target), out
    # after the hand-over, writes through the same export land in the target
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 39M 64k", uri)
    expected[30 * MiB:32 * MiB] = b"\x33" * (2 * MiB)
    expected[3 * MiB:3 * MiB + 4096] = b"\x44" * 4096
    expected[39 * MiB:39 * MiB + 65536] = b"\x77" * 65536
    (tmp_path / "exp2.raw").write_bytes(expected)
    assert _compare(tmp_path / "exp2.raw", uri).returncode == 0
    stop_serve(p)
    r = _compare(tmp_path / "exp2.raw", target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert target.stat().st_blocks * 512 < 40 * MiB  # the holes stayed holes
    assert _repo_files(repo) == before
    # the overlay still belongs to snapshot 3: serving it with another snapshot is refused
    p, _ = start_serve(repo, ids[1], "--socket", sock, "--writable", "--overlay", ovl, expect_ready=False)
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "belongs to another snapshot" in err and "Traceback" not in err


def test_serve_errors_are_one_line(chain, tmp_path, assert_cli_error):
    repo, disk, ids = chain
    sock = tmp_path / "e.sock"
    assert_cli_error(repo.run("serve", "nosuch:latest", "--socket", sock, check=False), "no snapshot named")
    assert_cli_error(repo.run("serve", ids[0], "--socket", sock, "--writable", check=False), "--overlay")
    assert_cli_error(repo.run("serve", ids[0], "--tcp", "10.1.2.3:10809", check=False), "loopback")
    assert_cli_error(repo.run("serve", ids[0], "--socket", tmp_path / "nodir" / "s.sock", check=False),
                     "does not exist")
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(os.fspath(sock))
    busy.listen()
    try:
        assert_cli_error(repo.run("serve", ids[0], "--socket", sock, check=False), "already listening")
    finally:
        busy.close()
    (tmp_path / "notqcow").write_bytes(b"x" * 4096)
    assert_cli_error(repo.run("serve", ids[0], "--socket", tmp_path / "o.sock", "--writable", "--overlay",
                              tmp_path / "notqcow", check=False), "not a qcow2")
    assert_cli_error(repo.run("restore", "--from-serve", tmp_path / "none.sock", tmp_path / "t.raw", check=False),
                     "no copy-on-write export")
    assert_cli_error(repo.run("serve", ids[0], "--socket", sock, env={"VMBAK_PASSWORD": "wrong"}, check=False))
