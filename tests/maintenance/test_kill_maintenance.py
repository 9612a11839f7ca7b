"""kill -9 at random moments of forget, prune, merge and tag, 20 times each. After every kill:
`check --read-data` passes, every snapshot that should remain is listed and restores
byte-identically, and nothing half-written is listed; a later run finishes the work.

The operations under test run as real `vmbak` processes. The repository around them is
prepared and verified through the library in this process (faster than the CLI, so the
kills can be many). Half of the kills fall at a random time of the operation's life,
half right after a random number of changes to the repository's files have been seen,
so that the short writing phases are hit often, not by chance only."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import statistics
import subprocess
import time

import pytest

import vmbak
from vmbak.engine.retention import Policy, forget

MiB = 1 << 20
KILLS = 20


def sha(path) -> str:  # noqa: ANN001
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listing(dirs: list) -> set[str]:  # noqa: ANN001
    out = set()
    for d in dirs:
        for root, _, files in os.walk(d):
            out.update(os.path.join(root, f) for f in files)
    return out


class Killer:
    """Runs one vmbak command and kills it -9 at a random moment."""

    def __init__(self, popen_vmbak, repo, watch: list[str], seed: int, max_changes: int = 6,  # noqa: ANN001
                 max_delay: float = 0.004) -> None:
        self.max_changes = max_changes
        self.max_delay = max_delay
        self.popen = popen_vmbak
        self.repo = repo
        self.watch = [repo.path / w for w in watch]
        self.rng = random.Random(seed)
        self.durations: list[float] = []
        self.kills = 0
        self.after_changes = 0

    def run(self, *args: object) -> bool:
        """Start ``vmbak ARGS`` and kill it; return True if it was killed, False if it
        finished first (then it must have succeeded)."""
        before = listing(self.watch)
        t0 = time.monotonic()
        proc = self.popen(*args, env=self.repo.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        by_changes = self.kills % 2 == 1 or not self.durations
        if by_changes:
            want = self.rng.randint(1, self.max_changes)
            seen = 0
            prev = before
            while proc.poll() is None and time.monotonic() - t0 < 60:
                cur = listing(self.watch)
                seen += len(cur ^ prev)
                prev = cur
                if seen >= want:
                    time.sleep(self.rng.uniform(0, self.max_delay))
                    break
                time.sleep(0.001)
        else:
            deadline = t0 + self.rng.uniform(0.3, 1.1) * statistics.median(self.durations)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
        if proc.poll() is not None:
            err = proc.stderr.read()
            proc.stderr.close()
            assert proc.returncode == 0, err
            self.durations.append(time.monotonic() - t0)
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        self.kills += 1
        self.after_changes += by_changes
        return True

    def complete(self, *args: object) -> None:
        t0 = time.monotonic()
        p = self.repo.run(*args)
        assert "Traceback" not in p.stderr
        self.durations.append(time.monotonic() - t0)


class World:
    """A disk that changes between backups, and the digest of every version by time."""

    def __init__(self, repo, make_disk, tmp_path, size: int, seed: int) -> None:  # noqa: ANN001
        self.repo = repo
        self.disk = make_disk("victim.raw", size, seed=seed)
        self.rng = random.Random(seed)
        self.seed = seed
        self.by_time: dict[str, str] = {}
        self.scratch = tmp_path / "scratch.raw"

    def lib(self):  # noqa: ANN201
        return vmbak.Repository.open(os.fspath(self.repo.path), self.repo.password)

    def change(self) -> None:
        for _ in range(3):
            self.seed += 1
            n = self.rng.randrange(10_000, 400_000)
            self.disk.write_random(self.rng.randrange(0, self.disk.size - n), n, seed=self.seed)

    def backup(self, name: str = "victim") -> vmbak.Manifest:
        m = vmbak.backup(self.lib(), self.disk.path, name)
        self.by_time[m.time] = sha(self.disk.path)
        return m

    def verify(self, context: str, must_have: set[str] | None = None) -> list[vmbak.Manifest]:
        lib = self.lib()
        rep = vmbak.check(lib, read_data=True)
        assert rep.ok, f"{context}: {rep.errors}"
        ms = lib.manifests()
        times = [m.time for m in ms]
        assert set(times) <= set(self.by_time), f"{context}: a snapshot of no known time is listed"
        if must_have is not None:
            assert must_have <= set(times), f"{context}: lost {sorted(must_have - set(times))}"
        for m in ms:
            self.scratch.unlink(missing_ok=True)
            vmbak.restore(lib, m, self.scratch, verify=False)
            assert sha(self.scratch) == self.by_time[m.time], f"{context}: {m.short_id} ({m.time}) restores wrongly"
        return ms


@pytest.mark.slow
def test_kill_9_during_forget(repo, make_disk, popen_vmbak, tmp_path):
    w = World(repo, make_disk, tmp_path, 3 * MiB, seed=901)
    killer = Killer(popen_vmbak, repo, ["snapshots", "data", "index"], seed=902)
    for _ in range(4):
        w.backup()
        w.change()
    killer.complete("forget", "--keep-last", "3")  # measure one whole run
    attempts = half_done = 0
    while killer.kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "forget finishes before it can be killed"
        for _ in range(2):
            w.change()
            w.backup()
        keep = set(sorted(w.by_time)[-3:])
        killed = killer.run("forget", "--keep-last", "3")
        ms = w.verify(f"after kill {killer.kills}" if killed else "after a complete run", keep)
        ids = {m.id for m in ms}
        half_done += killed and (len(ms) > 3 or any(m.extra.get("replaces") in ids for m in ms))
        if not killed or attempts % 5 == 0:
            if killed:
                killer.complete("forget", "--keep-last", "3")
                ms = w.verify("after finishing an interrupted forget", keep)
            assert {m.time for m in ms} == keep  # the interrupted work was finished
            assert len(ms) == 3
    killer.complete("forget", "--keep-last", "3")
    ms = w.verify("at the end", set(sorted(w.by_time)[-3:]))
    assert len(ms) == 3 and ms[0].kind == "synthetic-full"
    assert killer.after_changes >= KILLS // 3
    print(f"forget: {killer.kills} kills, {half_done} left work half done")
    assert half_done >= 3
    assert list((repo.path / "locks").iterdir()) == []


@pytest.mark.slow
def test_kill_9_during_merge(make_repo, make_disk, popen_vmbak, tmp_path):
    repo = make_repo("none", pack_size=128 * 1024)  # the merge's new chunks land in several packs
    w = World(repo, make_disk, tmp_path, 3 * MiB, seed=911)
    # The merge writes for a few milliseconds only: kill just after its first pack lands.
    killer = Killer(popen_vmbak, repo, ["data"], seed=912, max_changes=1, max_delay=0.003)
    w.backup()
    for _ in range(2):
        w.change()
        w.backup()
    killer.complete("merge", "victim", "--into-full")
    attempts = 0
    states = dict.fromkeys(("nothing", "packs landed", "both", "done"), 0)
    while killer.kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "merge finishes before it can be killed"
        w.change()
        latest = w.backup()
        packs = listing([repo.path / "data"])
        killer.run("merge", "victim", "--into-full")
        ms = w.verify(f"after kill {killer.kills}", set(w.by_time))
        same = [m for m in ms if m.time == latest.time]  # the original, its replacement, or both
        assert len(same) == 1 or (len(same) == 2 and any(m.extra.get("replaces") for m in same))
        if len(same) == 2:
            states["both"] += 1  # killed between writing the full and removing the original
        elif same[0].extra.get("replaces"):
            states["done"] += 1
        elif listing([repo.path / "data"]) - packs:
            states["packs landed"] += 1  # the new chunks had landed, the full was not written
        else:
            states["nothing"] += 1
        if len(ms) > 6:  # keep the repository small: forget the oldest through the library
            lib = w.lib()
            forget(lib, Policy(last=4))
            for t in [t for t in w.by_time if t not in {m.time for m in lib.manifests()}]:
                del w.by_time[t]
    w.change()
    w.backup()
    killer.complete("merge", "victim", "--into-full")
    ms = w.verify("at the end", set(w.by_time))
    assert ms[-1].kind == "synthetic-full" and len({m.time for m in ms}) == len(ms)
    assert killer.after_changes >= KILLS // 3
    print(f"merge: {killer.kills} kills: {states}")
    assert states["packs landed"] + states["both"] >= 3


@pytest.mark.slow
def test_kill_9_during_tag(repo, make_disk, popen_vmbak, tmp_path):
    """tag rewrites every snapshot of the chain here (the full's tags change, so each later
    one is re-pointed): a kill leaves each snapshot listed once or, half done, next to its
    replacement; the next run finishes it."""
    w = World(repo, make_disk, tmp_path, 2 * MiB, seed=931)
    killer = Killer(popen_vmbak, repo, ["snapshots"], seed=932, max_changes=9, max_delay=0.002)
    for _ in range(5):
        w.backup()
        w.change()
    attempts = half_done = 0
    while killer.kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "tag finishes before it can be killed"
        args = ("tag", "--name", "victim", "--add" if attempts % 2 else "--remove", "mark")
        killed = killer.run(*args)
        ms = w.verify(f"after kill {killer.kills}" if killed else "after a complete run", set(w.by_time))
        ids = {m.id for m in ms}
        for t in w.by_time:
            same = [m for m in ms if m.time == t]
            assert len(same) == 1 or (len(same) == 2 and any(m.extra.get("replaces") in ids for m in same)), same
        half_done += len(ms) > len(w.by_time)
        killer.complete(*args)
        ms = w.verify("after finishing an interrupted tag", set(w.by_time))
        assert len(ms) == len(w.by_time)  # the interrupted work was finished
        assert all(("mark" in m.tags) == (attempts % 2 == 1) for m in ms), [m.tags for m in ms]
    assert killer.after_changes >= KILLS // 3
    print(f"tag: {killer.kills} kills, {half_done} left work half done")
    assert half_done >= 2  # (3-6 in 6 runs: its writes take milliseconds)
    assert list((repo.path / "locks").iterdir()) == []


@pytest.mark.slow
def test_kill_9_during_prune(make_repo, make_disk, popen_vmbak, tmp_path):
    repo = make_repo("none", pack_size=MiB // 2)  # small packs: several to drop or repack each time
    w = World(repo, make_disk, tmp_path, 3 * MiB, seed=921)
    killer = Killer(popen_vmbak, repo, ["data", "index", "prune"], seed=922)
    w.backup()
    w.change()
    w.backup()
    forget(w.lib(), Policy(last=1))
    w.by_time = {t: d for t, d in w.by_time.items() if t == max(w.by_time)}
    killer.complete("prune", "--grace", "0")
    attempts = marked = mid_sweep = 0
    while killer.kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, "prune finishes before it can be killed"
        w.change()
        w.backup()
        lib = w.lib()
        forget(lib, Policy(last=2))
        w.by_time = {t: d for t, d in w.by_time.items() if t in {m.time for m in lib.manifests()}}
        killed = killer.run("prune", "--grace", "0", "--repack-threshold", "0.3")
        w.verify(f"after kill {killer.kills} of prune", set(w.by_time))
        marks = [p.name for p in (repo.path / "prune").iterdir()] if (repo.path / "prune").exists() else []
        mid_sweep += killed and len(list((repo.path / "index").iterdir())) > 1 and any(
            n.startswith("ready") for n in marks)
        marked += killed and bool(marks)
        w.change()
        w.backup()  # backups go on between interrupted prunes (and honour their marks)
    killer.complete("prune", "--grace", "0")
    killer.complete("prune", "--grace", "0")
    ms = w.verify("at the end", set(w.by_time))
    out = repo.json("prune", "--grace", "0")
    assert out["marked"] is None and out["swept"] == [] and not list((repo.path / "prune").iterdir())
    # what is left is about what the snapshots need: garbage did not pile up
    live = sum(int(m.stats.get("new_stored_bytes", 0)) for m in ms)
    assert repo.pack_bytes() <= max(3 * live, 8 * MiB)
    assert killer.after_changes >= KILLS // 3
    print(f"prune: {killer.kills} kills, {marked} left a mark, {mid_sweep} of them with several index files")
    assert marked >= 3
