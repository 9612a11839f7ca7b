"""A backup runs while a prune runs in another process, ten times: nothing any snapshot
references is ever deleted, and every snapshot restores byte-identically.

Each round makes garbage first (the disk changes, the old snapshot is forgotten), then
starts a backup of the *old* content under a second name, whose chunks are exactly the
garbage prune wants to delete, together with `prune --grace 0`, at a random offset. A
backup that loaded the index before prune's mark may deduplicate against marked chunks:
prune must then wait for it; one that starts after the mark must store them again."""

from __future__ import annotations

import json
import random
import time

import pytest

import vmbak
from vmbak.engine.retention import Policy, forget

MiB = 1 << 20
ROUNDS = 10


@pytest.mark.slow
def test_backup_concurrent_with_prune(make_repo, make_disk, popen_vmbak, tmp_path, sha256_file):
    repo = make_repo("none", pack_size=MiB)
    rng = random.Random(77)
    disk = make_disk("a.raw", 4 * MiB, seed=71)
    lib = repo.open()
    vmbak.backup(lib, disk.path, "a")
    want: dict[str, str] = {}  # snapshot time -> digest of what it holds
    overlaps = postponed = restored = 0
    for rnd in range(ROUNDS):
        old = disk.save(f"r{rnd}")
        old_digest = sha256_file(old)
        for _ in range(3):
            n = rng.randrange(200_000, MiB)
            disk.write_random(rng.randrange(0, disk.size - n), n, seed=rng.randrange(1 << 30))
        lib = repo.open()
        m = vmbak.backup(lib, disk.path, "a")
        want[m.time] = sha256_file(disk.path)
        forget(lib, Policy(last=1), name="a")  # the old version of "a" is now garbage
        # both at once, in a random order and offset
        procs = {}
        order = ["backup", "prune"] if rng.random() < 0.5 else ["prune", "backup"]
        t_start = {}
        for i, what in enumerate(order):
            if i:
                time.sleep(rng.uniform(0, 0.6))
            t_start[what] = time.monotonic()
            if what == "backup":
                procs[what] = popen_vmbak("backup", old, "--name", "b", "--json", env=repo.env())
            else:
                procs[what] = popen_vmbak("prune", "--grace", "0", "--json", env=repo.env())
        out = {}
        t_end = {}
        for what, p in procs.items():
            o, e = p.communicate(timeout=120)
            t_end[what] = time.monotonic()
            assert p.returncode == 0 and "Traceback" not in e, f"round {rnd}: {what} failed: {e}"
            out[what] = json.loads(o.splitlines()[-1])  # the summary line
        want[out["backup"]["time"]] = old_digest
        overlaps += t_start["backup"] < t_end["prune"] and t_start["prune"] < t_end["backup"]
        postponed += any("still running" in p["reason"] for p in out["prune"]["postponed"])
        # nothing referenced is gone: the whole repository checks and every snapshot restores
        lib = repo.open()
        rep = vmbak.check(lib, read_data=True)
        assert rep.ok, f"round {rnd}: {rep.errors}"
        for s in lib.manifests():
            target = tmp_path / "r.raw"
            target.unlink(missing_ok=True)
            vmbak.restore(lib, s, target, verify=False)
            assert sha256_file(target) == want[s.time], f"round {rnd}: snapshot {s.short_id} restores wrongly"
            restored += 1
    assert overlaps >= ROUNDS // 2, f"only {overlaps} rounds ran at the same time"
    # once nothing runs, everything marked goes
    repo.run("prune", "--grace", "0")
    repo.run("prune", "--grace", "0")
    assert not list((repo.path / "prune").iterdir())
    repo.check(read_data=True)
    print(f"concurrent prune: {overlaps} overlapping rounds, {postponed} sweeps postponed for a running "
          f"backup, {restored} restores checked")
