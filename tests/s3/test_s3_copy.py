"""vmbak copy: local -> S3 -> local and local -> local, with different keys and
encryption, only missing chunks sent, idempotent, and resumable after kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import time

import vmbak

MiB = 1 << 20


def _copy(dst, src, *extra, env=None, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    e = {"VMBAK_FROM_PASSWORD": src.password} if src.password else {}
    return dst.json("copy", "--from-repo", getattr(src, "location", None) or src.path, "--to-repo",
                    getattr(dst, "location", None) or dst.path, *extra, env={**e, **(env or {})}, **kw)


def _verify(repo, tmp_path, expect: dict, assert_same_file) -> None:  # noqa: ANN001
    """check --read-data passes and each spec restores to the expected file (library, in process)."""
    lib = repo.open()
    rep = vmbak.check(lib, read_data=True)
    assert rep.ok, rep.errors
    for spec, want in expect.items():
        out = tmp_path / f"v-{os.urandom(4).hex()}.raw"
        vmbak.restore(lib, spec, out)
        assert_same_file(out, want)
        out.unlink()


def test_copy_in_every_direction(make_repo, make_s3_repo, make_disk, tmp_path, assert_same_file):
    local = make_repo("aes-256-gcm", pack_size=2 * MiB, password="local password")
    web = make_disk("web.raw", 8 * MiB, seed=1)
    db = make_disk("db.raw", 4 * MiB, seed=2)
    db.write(0, web.read(0, 2 * MiB))  # shared with web
    lib = local.open()
    vmbak.backup(lib, web.path, "web")
    v1 = web.save("v1")
    web.write_random(3 * MiB, 300_000, seed=3)
    vmbak.backup(lib, web.path, "web")
    vmbak.backup(lib, db.path, "db")
    # local -> S3, keys differ: decrypted, re-keyed, re-sealed
    s3r = make_s3_repo(encryption="aes-256-gcm", password="s3 password")
    r = _copy(s3r, local, "--name", "web")
    assert not r["same_keys"] and len(r["copied"]) == 2
    assert [c["type"] for c in r["copied"]] == ["full", "incremental"]
    # only db's own chunks travel; the chain of an asked-for snapshot comes along
    r = _copy(s3r, local, "db:latest")
    assert len(r["copied"]) == 1 and r["chunks_present"] >= 2 and r["raw_bytes_sent"] <= 2 * MiB + 65536
    # idempotent: nothing left to do
    r = _copy(s3r, local)
    assert r["copied"] == [] and len(r["present"]) == 3 and r["chunks_sent"] == 0
    _verify(s3r, tmp_path, {"web:latest": web.path, "db:latest": db.path}, assert_same_file)
    # an incremental backup in the copy is a real incremental (the block hashes were re-keyed)
    web.write_random(6 * MiB, 100_000, seed=4)
    b = vmbak.backup(s3r.open(), web.path, "web")
    assert b.kind == "incremental" and b.stats["new_raw_bytes"] <= 256 * 1024
    # S3 -> local, unencrypted destination
    back = make_repo("none", name="back")
    r = _copy(back, s3r)
    assert len(r["copied"]) == 4
    first = min((m for m in back.open().manifests() if m.name == "web"), key=lambda m: m.time)
    _verify(back, tmp_path, {"web:latest": web.path, "db:latest": db.path, first.id[:8]: v1}, assert_same_file)
    # back again S3 <- local: recognised as copies of each other, nothing copied
    r = _copy(s3r, back)
    assert r["copied"] == [] and r["chunks_sent"] == 0
    # local -> local with the same master key (a destination made from the source's key files)
    twin = tmp_path / "twin"
    for d in ("data", "index", "snapshots", "locks", "tmp"):
        (twin / d).mkdir(parents=True)
    shutil.copy(local.path / "config", twin / "config")
    shutil.copytree(local.path / "keys", twin / "keys")
    twin_repo = type(local)(twin, local.encryption, local.password)
    r = _copy(twin_repo, local, "web:latest")
    assert r["same_keys"] and len(r["copied"]) == 2
    r = _copy(twin_repo, local)
    assert len(r["copied"]) == 1 and r["chunks_read"] <= 3, r  # db: only its own chunks are read
    _verify(twin_repo, tmp_path, {"db:latest": db.path}, assert_same_file)


def test_copy_resumes_after_kill(make_repo, make_s3_repo, make_disk, fault_proxy, popen_vmbak, tmp_path,
                                 assert_same_file):
    local = make_repo("none", pack_size=MiB)
    disk = make_disk("big.raw", 24 * MiB, seed=9)
    local.backup(disk, "big")
    dst = make_s3_repo(encryption="aes-256-gcm", pack_size=MiB)
    via = dst.at(dst.location.replace(dst.server.endpoint, fault_proxy.endpoint))
    fault_proxy.set(delay=1.0, delay_s=0.15, only_methods=("PUT",))  # slow uploads, so the kill lands midway
    p = popen_vmbak("copy", "--from-repo", local.path, "--to-repo", via.location, "--workers", "2",
                    env=via.env())
    deadline = time.monotonic() + 60
    while len(dst.objects("data/")) < 4 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    landed = len(dst.objects("data/"))
    assert landed >= 4 and not dst.objects("snapshots/"), "the kill did not land mid-copy"
    fault_proxy.clear()
    r = _copy(via, local)
    assert len(r["copied"]) == 1
    assert r["chunks_present"] >= landed - 1 and r["chunks_sent"] <= 25 - (landed - 1), r
    _verify(dst, tmp_path, {"big:latest": disk.path}, assert_same_file)
