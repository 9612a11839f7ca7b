"""The repository on S3: the full round trip, the object layout, the local cache, the
location forms and the locks of other hosts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

MiB = 1 << 20


def test_roundtrip_on_s3(make_s3_repo, make_disk, tmp_path, assert_same_file):
    repo = make_s3_repo(pack_size=12 * MiB)
    # packs above 5 MiB go up as multipart uploads of 5 MiB parts, several at once
    repo.base_env.update(VMBAK_S3_MULTIPART_THRESHOLD=str(5 * MiB), VMBAK_S3_PART_SIZE=str(5 * MiB),
                         VMBAK_S3_CONCURRENCY="3")
    disk = make_disk("web.raw", 24 * MiB, seed=11)
    s1 = repo.backup(disk, "web")
    assert s1["type"] == "full"
    v1 = disk.save("v1")
    for off, n, seed in ((MiB, 200_000, 12), (9 * MiB + 4096, 65536, 13), (20 * MiB, 2 * MiB, 14)):
        disk.write_random(off, n, seed)
    disk.write_zeros(5 * MiB, MiB)
    s2 = repo.backup(disk, "web")
    assert s2["type"] == "incremental" and s2["parent"] == s1["id"]
    assert s2["stats"]["new_raw_bytes"] <= 3 * MiB
    for spec, want in ((s1["id"][:8], v1), ("web:latest", disk.path)):
        out = tmp_path / f"out-{spec.replace(':', '_')}.raw"
        repo.restore(spec, out)
        assert_same_file(out, want)
    repo.check(read_data=True)
    # the objects have the names of a local repository, under the prefix; nothing is left over
    objs = repo.objects()
    assert "config" in objs
    tops = {n.split("/", 1)[0] for n in objs}
    assert tops <= {"config", "keys", "data", "index", "snapshots", "verify"}, tops  # verify/: check's coverage
    packs = [n for n in objs if n.startswith("data/")]
    assert all(len(n.split("/")) == 3 and n.split("/")[2].startswith(n.split("/")[1]) for n in packs)
    assert max(objs[n] for n in packs) > 5 * MiB  # a multipart upload landed whole
    assert len([n for n in objs if n.startswith("snapshots/")]) == 2
    assert not repo.server.client().list_multipart_uploads(Bucket=repo.bucket).get("Uploads")


def test_cache_saves_downloads_and_losing_it_loses_nothing(make_s3_repo, make_disk, fault_proxy, s3_env):
    repo = make_s3_repo(encryption="none")
    disk = make_disk("d.raw", 4 * MiB, seed=21)
    for i in range(3):
        disk.write_random(i * MiB, 100_000, seed=30 + i)
        repo.backup(disk, "d")
    via = repo.at(repo.location.replace(repo.server.endpoint, fault_proxy.endpoint))
    cache = s3_env["VMBAK_CACHE_DIR"]
    assert via.snapshots() and via.snapshots()  # the first run may fill the cache
    fault_proxy.reset_counts()
    assert len(via.snapshots()) == 3
    gets = [p for m, p in fault_proxy.log if m == "GET" and ("/snapshots/" in p or "/index/" in p)]
    assert not gets, f"cached objects were downloaded again: {gets}"
    # a damaged cache file is noticed and ignored; a deleted cache is rebuilt
    cached = [os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if "/snapshots" in r]
    assert len(cached) == 3
    with open(cached[0], "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff\xff\xff")
    fault_proxy.reset_counts()
    assert len(via.snapshots()) == 3
    gets = [p for m, p in fault_proxy.log if m == "GET" and "/snapshots/" in p]
    assert len(gets) == 1, gets
    shutil.rmtree(cache)
    assert len(via.snapshots()) == 3
    via.check(read_data=True)


def test_location_forms_and_s3_endpoint_option(make_s3_repo, s3):
    repo = make_s3_repo(encryption="none", prefix="deep/er/prefix")
    short = f"s3:{repo.bucket}/deep/er/prefix"
    p = repo.run("--s3-endpoint", s3.endpoint, "-r", short, "snapshots", "--json")
    assert json.loads(p.stdout) == []
    p = repo.run("-r", short, "check", "--json", env={"VMBAK_S3_ENDPOINT": s3.endpoint})
    assert json.loads(p.stdout.splitlines()[-1])["ok"]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=repo.bucket)["Contents"]]
    assert "deep/er/prefix/config" in keys and all(k.startswith("deep/er/prefix/") for k in keys)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_locks_of_other_hosts_are_never_judged_by_local_pids(make_s3_repo, make_disk, assert_cli_error):
    from vmbak.repo.backend import host_id

    repo = make_s3_repo(encryption="none")
    disk = make_disk("d.raw", 2 * MiB, seed=41)
    c = repo.server.client()
    dead = _dead_pid()
    mine = {"host": socket.gethostname(), "pid": dead, "time": "2026-01-01T00:00:00.000000Z", "exclusive": False,
            "purpose": "backup", "hostid": host_id()}
    # same hostname (a container, a cloned VM), but another machine: its pid means nothing here
    other = dict(mine, hostid="another-boot/pid:[4026531836]", time=_now())
    c.put_object(Bucket=repo.bucket, Key="repo/locks/" + "a" * 32, Body=json.dumps(mine).encode())
    c.put_object(Bucket=repo.bucket, Key="repo/locks/" + "b" * 32, Body=json.dumps(other).encode())
    repo.backup(disk, "d")
    left = set(repo.objects("locks"))
    assert left == {"locks/" + "b" * 32}, left  # the dead local process's lock went, the other stayed
    # an exclusive lock of another host blocks forget, with a clear message
    c.put_object(Bucket=repo.bucket, Key="repo/locks/" + "c" * 32,
                 Body=json.dumps(dict(other, exclusive=True, purpose="forget")).encode())
    p = repo.run("forget", "d:latest", check=False)
    assert_cli_error(p, "locked")


def _now(days_ago: float = 0) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_held_lock_is_refreshed_in_place_and_a_refreshed_one_is_not_stale(make_s3_repo, assert_cli_error):
    """A lock on S3 is rewritten under its own key while held (a serve or mount may hold it
    for weeks) and removed after; another host's lock taken 30 days ago but refreshed an
    hour ago still blocks forget, one refreshed 8 days ago does not."""
    import time

    repo = make_s3_repo(encryption="none")
    lib = repo.open()
    lib.lock_refresh_s = 0.05
    c = repo.server.client()
    with lib.lock(purpose="mount"):
        (key,) = repo.objects("locks")
        deadline = time.monotonic() + 30
        while True:
            d = json.loads(c.get_object(Bucket=repo.bucket, Key=f"{repo.prefix}/{key}")["Body"].read())
            if "refreshed" in d and d["refreshed"] > d["time"]:
                break
            assert time.monotonic() < deadline, "the lock was not refreshed in 30 s"
            time.sleep(0.05)
        assert list(repo.objects("locks")) == [key] and d["purpose"] == "mount"
    assert repo.objects("locks") == {}
    other = {"host": "elsewhere.example", "pid": 1234, "exclusive": False, "purpose": "serve", "time": _now(30)}
    c.put_object(Bucket=repo.bucket, Key=f"{repo.prefix}/locks/" + "d" * 32,
                 Body=json.dumps(dict(other, refreshed=_now(1 / 24))).encode())
    assert_cli_error(repo.run("forget", "--keep-last", "1", check=False), "locked", "serve")
    c.put_object(Bucket=repo.bucket, Key=f"{repo.prefix}/locks/" + "d" * 32,
                 Body=json.dumps(dict(other, refreshed=_now(8))).encode())
    repo.run("forget", "--keep-last", "1")


def test_check_read_data_finds_a_flipped_byte_in_a_pack_on_s3(make_s3_repo, make_disk):
    """A pack on object storage is fetched whole and walked in windows like a local one
    (engine/check.py): a flipped byte in a chunk's blob fails that chunk's authentication
    and the pack's name, and only there."""
    repo = make_s3_repo()
    repo.backup(make_disk("f.raw", 8 * MiB, seed=21), "f")
    lib = repo.open()
    cid, loc = next((c, lc) for c, lc in lib.index.items() if lc.length > 100_000)
    key = f"{repo.prefix}/data/{loc.pack[:2]}/{loc.pack}"
    c = repo.server.client()
    body = bytearray(c.get_object(Bucket=repo.bucket, Key=key)["Body"].read())
    body[loc.offset + loc.length // 2] ^= 0x08
    c.put_object(Bucket=repo.bucket, Key=key, Body=bytes(body))
    rep = repo.check(ok=False)
    pid = loc.pack
    assert rep["errors"][:2] == [f"pack {pid[:16]}: content does not match its name (corrupt)",
                                 f"pack {pid[:16]}: chunk {cid.hex()[:16]}: authentication failed "
                                 "(corrupt or tampered data)"], rep["errors"]
    assert len(rep["errors"]) == 3 and "missing or corrupt" in rep["errors"][2]  # the snapshot that uses it
