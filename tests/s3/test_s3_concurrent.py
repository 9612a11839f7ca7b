"""Many writers into one bucket: backups of different disks that share data, at the same
time, deduplicate against each other as on a local directory and never corrupt the
repository; prune's two phases hold on S3 while a backup runs."""

from __future__ import annotations

import json
import random
import time

import vmbak
from vmbak.engine.retention import Policy, forget

MiB = 1 << 20


def _disks(make_disk, shared: bytes, n: int):  # noqa: ANN001, ANN202
    out = []
    for i in range(n):
        d = make_disk(f"host{i}.raw", len(shared) + 2 * MiB, seed=100 + i)  # own random tail
        d.write(0, shared)
        out.append(d)
    return out


def _run_all(repo, disks, prefix, popen_vmbak):  # noqa: ANN001, ANN202
    procs = [popen_vmbak("backup", d.path, "--name", f"{prefix}{i}", "--json", env=repo.env())
             for i, d in enumerate(disks)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in e, e
        outs.append(json.loads(o.splitlines()[-1]))  # the summary line
    return outs


def test_concurrent_writers_share_one_bucket(make_s3_repo, make_repo, make_disk, popen_vmbak, random_bytes,
                                             tmp_path, assert_same_file):
    shared = random_bytes(6 * MiB, 7)
    disks = _disks(make_disk, shared, 3)
    results = {}
    for kind, repo in (("s3", make_s3_repo(encryption="none", pack_size=MiB)),
                       ("local", make_repo("none", pack_size=MiB))):
        first = _run_all(repo, disks, "host", popen_vmbak)  # three hosts at once
        again = _run_all(repo, disks, "again", popen_vmbak)  # same data, new names, at once
        # every chunk any writer stored is found by later writers: nothing is stored twice
        assert all(r["stats"]["new_stored_bytes"] == 0 for r in again), [r["stats"] for r in again]
        late = make_disk(f"late-{kind}.raw", len(shared) + MiB, seed=9)
        late.write(0, shared)
        r = repo.backup(late, "late")
        assert r["stats"]["new_raw_bytes"] <= MiB + 65536, r["stats"]  # only its own tail is new
        repo.check(read_data=True)
        for i, d in enumerate(disks):
            out = tmp_path / f"{kind}-{i}.raw"
            repo.restore(f"host{i}:latest", out)
            assert_same_file(out, d.path)
        results[kind] = sum(x["stats"]["new_stored_bytes"] for x in first)
    # writers that overlap cannot see each other's new chunks (on S3 as on a local directory):
    # each stores at most its own disk once; how much they share depends on their timing
    for kind in results:
        assert results[kind] <= 3 * (len(shared) + 2 * MiB) + MiB, results


def test_prune_during_backup_on_s3(make_s3_repo, make_disk, popen_vmbak, tmp_path, sha256_file):
    """As tests/maintenance/test_concurrent_prune.py, on S3, in fewer rounds."""
    repo = make_s3_repo(encryption="none", pack_size=MiB)
    rng = random.Random(5)
    disk = make_disk("a.raw", 4 * MiB, seed=71)
    lib = repo.open()
    vmbak.backup(lib, disk.path, "a")
    want: dict[str, str] = {}
    overlaps = 0
    for rnd in range(2):
        old = disk.save(f"r{rnd}")
        old_digest = sha256_file(old)
        for _ in range(3):
            n = rng.randrange(200_000, MiB)
            disk.write_random(rng.randrange(0, disk.size - n), n, seed=rng.randrange(1 << 30))
        lib = repo.open()
        m = vmbak.backup(lib, disk.path, "a")
        want[m.time] = sha256_file(disk.path)
        forget(lib, Policy(last=1), name="a")
        order = ["backup", "prune"] if rnd % 2 == 0 else ["prune", "backup"]
        procs, t0, t1 = {}, {}, {}
        for i, what in enumerate(order):
            if i:
                time.sleep(rng.uniform(0, 0.4))
            t0[what] = time.monotonic()
            args = ("backup", old, "--name", "b") if what == "backup" else ("prune", "--grace", "0")
            procs[what] = popen_vmbak(*args, "--json", env=repo.env())
        out = {}
        for what, p in procs.items():
            o, e = p.communicate(timeout=120)
            t1[what] = time.monotonic()
            assert p.returncode == 0 and "Traceback" not in e, f"round {rnd}: {what} failed: {e}"
            out[what] = json.loads(o.splitlines()[-1])  # the summary line
        want[out["backup"]["time"]] = old_digest
        overlaps += t0["backup"] < t1["prune"] and t0["prune"] < t1["backup"]
        lib = repo.open()
        rep = vmbak.check(lib, read_data=True)
        assert rep.ok, f"round {rnd}: {rep.errors}"
        for s in lib.manifests():
            target = tmp_path / "r.raw"
            target.unlink(missing_ok=True)
            vmbak.restore(lib, s, target, verify=False)
            assert sha256_file(target) == want[s.time], f"round {rnd}: snapshot {s.short_id} restores wrongly"
    assert overlaps >= 1
    repo.run("prune", "--grace", "0")
    repo.run("prune", "--grace", "0")
    assert not repo.objects("prune/")
    repo.check(read_data=True)
