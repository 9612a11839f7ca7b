"""kill -9 of running backups at random moments. After every kill the repository checks
clean (--read-data), every earlier snapshot restores byte-identically, no half-written
snapshot is listed, and the next backup completes without storing again the chunks that
had already landed (packs left by the killed run are recovered from their headers).

The moments: a typical backup's life is measured first (and re-measured whenever a backup
finishes before its kill). Half of the kills fall at a random time anywhere in that life;
the other half fall at a random point of the pack-writing phase (once a random number of
the run's packs have landed), which is short (tens of ms) and would otherwise be hit by
chance only. The last kill waits until packs have landed, so the reuse of landed chunks is
always tested."""

from __future__ import annotations

import collections
import mmap
import os
import random
import signal
import statistics
import subprocess
import time
from functools import partial

import blake3
import pytest

import vmbak
from vmbak.repo.pack import read_header

MiB = 1 << 20
DISK_SIZE = 48 * MiB
CHANGED_CHUNKS = 8  # 1 MiB chunks rewritten with fresh random data before each backup
KILLS = 20
SEED = 20261123
SLACK = 64 * 1024  # block hash table and rounding


def digest(path) -> str:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return blake3.blake3(m, max_threads=blake3.blake3.AUTO).hexdigest()


def pack_ids(repo) -> set[str]:
    """Names of the packs in data/ (cheap enough to poll every few milliseconds)."""
    data = os.fspath(repo.path / "data")
    out: set[str] = set()
    for sub in os.scandir(data):
        if sub.is_dir(follow_symlinks=False):
            out.update(e.name for e in os.scandir(sub.path) if not e.name.startswith("."))
    return out


def blob_bytes(repo, packs: set[str]) -> int:
    """Bytes of chunk blobs in the given packs, read from the packs' own headers."""
    lib = repo.open()
    return sum(int(read_header(lib.backend, lib.sealer, pid)["len"].sum()) for pid in packs)


def wait_until(proc: subprocess.Popen, t0: float, deadline: float, cond=lambda: False) -> bool:  # noqa: ANN001
    """Poll until ``cond()``, the process ends, or ``deadline`` seconds after ``t0``.
    Return True if the condition came true."""
    while proc.poll() is None and time.monotonic() - t0 < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_kill_9_during_backups(make_repo, make_disk, popen_vmbak, tmp_path):
    rng = random.Random(SEED)
    repo = make_repo("none", pack_size=MiB)  # ~1 MiB packs: many land during one backup
    disk = make_disk("victim.raw", DISK_SIZE, seed=SEED)
    completed: list[tuple[str, str]] = []  # (snapshot id, digest of the disk it holds)
    restore_path = tmp_path / "restored.raw"
    chunk_seed = [SEED]

    def change_disk() -> None:
        for c in rng.sample(range(DISK_SIZE // MiB), CHANGED_CHUNKS):
            chunk_seed[0] += 1
            disk.write_random(c * MiB, MiB, seed=chunk_seed[0])

    def start_backup() -> subprocess.Popen:
        return popen_vmbak("backup", disk.path, "--name", "victim", env=repo.env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def verify_repository(context: str) -> None:
        rep = repo.check(read_data=True)
        assert rep["ok"], f"{context}: {rep['errors']}"
        listed = [s["id"] for s in repo.snapshots()]
        assert listed == [sid for sid, _ in completed], f"{context}: half-written or lost snapshots"
        assert sorted(os.listdir(repo.path / "snapshots")) == sorted(listed)
        lib = repo.open()
        # The full and the newest snapshot restore to new files; the others over the same
        # existing file (--overwrite, faster). The digest of the whole result is the oracle.
        scratch = tmp_path / "scratch.raw"
        for i, (sid, want) in enumerate(completed):
            if i == 0:
                target, overwrite = scratch, False  # a new file, kept for the next ones
            elif i == len(completed) - 1:
                target, overwrite = restore_path, False  # a new file
            else:
                target, overwrite = scratch, True
            vmbak.restore(lib, sid, target, overwrite=overwrite, verify=False)
            assert digest(target) == want, f"{context}: snapshot {sid[:8]} restores wrongly"
        restore_path.unlink(missing_ok=True)
        scratch.unlink()

    # Measure typical backups first: a full, then incrementals that each store 8 MiB.
    s = repo.backup(disk, "victim")
    completed.append((s["id"], digest(disk.path)))
    totals, writing = [], []
    snapdir = repo.path / "snapshots"
    for _ in range(3):
        change_disk()
        before = pack_ids(repo)
        nsnaps = len(os.listdir(snapdir))
        t0 = time.monotonic()
        proc = start_backup()
        wait_until(proc, t0, 60, lambda before=before: bool(pack_ids(repo) - before))
        first = time.monotonic() - t0
        wait_until(proc, t0, 60, lambda nsnaps=nsnaps: len(os.listdir(snapdir)) > nsnaps)
        writing.append(max(time.monotonic() - t0 - first, 0.005))  # first pack -> snapshot committed
        proc.wait(timeout=60)
        totals.append(time.monotonic() - t0)
        assert proc.returncode == 0, proc.stderr.read()
        proc.stderr.close()
        completed.append((repo.snapshots()[-1]["id"], digest(disk.path)))
    recent = collections.deque(totals, maxlen=5)
    lib = repo.open()
    per_backup = max(lib.load_manifest(sid).stats["new_stored_bytes"] for sid, _ in completed[1:])
    assert per_backup >= CHANGED_CHUNKS * MiB

    kills = kills_with_landed_packs = attempts = 0
    final_done = False
    while kills < KILLS or not final_done:
        attempts += 1
        assert attempts < 2 * KILLS, "backups finish before they can be killed"
        final = kills >= KILLS - 1
        change_disk()
        before = pack_ids(repo)

        def landed_packs(n: int, before: set[str] = before) -> bool:
            return len(pack_ids(repo) - before) >= n

        t0 = time.monotonic()
        proc = start_backup()
        if final:  # the last kill: once packs have landed (again if the run got too far)
            wait_until(proc, t0, 60, lambda: landed_packs(2))
        elif kills % 2 == 0:  # anywhere in a typical backup's life
            wait_until(proc, t0, rng.uniform(0, statistics.median(recent)))
        else:  # at a random point of the pack-writing phase: after a random number of packs
            wait_until(proc, t0, 60, partial(landed_packs, rng.randint(1, CHANGED_CHUNKS - 1)))
        if proc.poll() is not None:
            recent.append(time.monotonic() - t0)  # it finished first: re-measure
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
        proc.stderr.close()
        landed = pack_ids(repo) - before
        listed = [s["id"] for s in repo.snapshots()]
        new = listed[len(completed):]
        assert listed[:len(completed)] == [sid for sid, _ in completed] and len(new) <= 1, listed
        if new:  # it committed its snapshot before the signal: a complete snapshot
            completed.append((new[0], digest(disk.path)))
        if rc != -signal.SIGKILL:
            assert rc == 0 and new, err  # it had finished
            continue
        kills += 1
        mid_write = bool(landed) and not new
        kills_with_landed_packs += mid_write
        context = f"after kill {kills} ({len(landed)} packs had landed)"
        verify_repository(context)

        # The next backup completes and stores only what had not landed.
        landed_bytes = blob_bytes(repo, landed)
        s = repo.backup(disk, "victim")
        assert s["type"] == "incremental"
        completed.append((s["id"], digest(disk.path)))
        stored = s["stats"]["new_stored_bytes"]
        if not new:
            assert stored + landed_bytes <= per_backup + SLACK, (
                f"{context}: stored {stored} bytes on top of {landed_bytes} that had landed "
                f"(an uninterrupted backup stores {per_backup})")
            assert stored + landed_bytes >= CHANGED_CHUNKS * MiB, context
        if final and mid_write:
            final_done = True
            assert repo.stats(s["id"])["stats"]["new_stored_bytes"] == stored  # `vmbak stats --json` agrees
            assert stored <= per_backup - landed_bytes + SLACK, context
            assert stored <= per_backup - MiB, context

    assert kills_with_landed_packs >= KILLS // 4, f"only {kills_with_landed_packs} kills hit the pack writes"
    verify_repository("at the end")
    # Dead processes leave nothing behind once the repository has been used again.
    assert list((repo.path / "locks").iterdir()) == []
    assert list((repo.path / "tmp").iterdir()) == []
    print(f"kill test: {kills} kills in {attempts} attempts, {kills_with_landed_packs} after packs had "
          f"landed; backups took {totals} s, writing packs {writing} s; {len(completed)} snapshots")
