"""prune: two phases (mark, then sweep after a grace period once every operation that
was running at marking time is gone), repacking, dry runs, locks and unlock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

MiB = 1 << 20


def tree(path) -> dict[str, int]:  # noqa: ANN001
    """Every file of a repository (but locks/ and tmp/) with its size."""
    out = {}
    for root, _, files in os.walk(path):
        rel = os.path.relpath(root, path)
        if rel.split(os.sep)[0] in ("locks", "tmp"):
            continue
        for f in files:
            out[os.path.join(rel, f)] = os.path.getsize(os.path.join(root, f))
    return out


def two_generations(repo, make_disk):  # noqa: ANN001
    """Disk "a" backed up in full, then rewritten entirely and backed up again; the first
    snapshot is forgotten, so its packs hold nothing referenced."""
    disk = make_disk("a.raw", 4 * MiB, seed=41)
    s0 = repo.backup(disk, "a")
    v0 = disk.save("v0")
    disk.write_random(0, 4 * MiB, seed=42)
    s1 = repo.backup(disk, "a")
    disk.save("v1")
    repo.run("forget", s0["id"][:8])
    return disk, v0, s1


def test_prune_with_no_grace_frees_the_space_at_once(repo, make_disk, tmp_path, assert_same_file):
    disk, _, s1 = two_generations(repo, make_disk)
    before = repo.pack_bytes()
    out = repo.json("prune", "--grace", "0")
    assert out["marked"]["dropped_packs"] >= 1 and len(out["swept"]) == 1
    assert out["freed_bytes"] >= 4 * MiB and repo.pack_bytes() <= before - 4 * MiB
    assert not list((repo.path / "prune").iterdir())  # the mark is gone once swept
    assert len(list((repo.path / "index").iterdir())) == 1  # one index names every surviving pack
    repo.check(read_data=True)
    repo.restore("a:latest", tmp_path / "r.raw")
    assert_same_file(tmp_path / "r.raw", disk.version("v1"))
    again = repo.json("prune", "--grace", "0")
    assert again["marked"] is None and again["swept"] == [] and again["freed_bytes"] == 0


def test_dry_run_changes_nothing(repo, make_disk):
    two_generations(repo, make_disk)
    before = tree(repo.path)
    out = repo.json("prune", "--grace", "0", "--dry-run")
    assert out["dry_run"] and len(out["marked"]["would_drop"]) >= 1
    assert tree(repo.path) == before
    text = repo.run("prune", "--dry-run").stdout
    assert "would mark" in text


def test_grace_period_then_sweep_and_marked_chunks_are_never_deduplicated(repo, make_disk, tmp_path,
                                                                           assert_same_file):
    disk, v0, _ = two_generations(repo, make_disk)
    before = repo.pack_bytes()
    out = repo.json("prune")  # default grace: 1h
    assert out["marked"]["dropped_packs"] >= 1 and out["swept"] == []
    assert any("grace period" in p["reason"] for p in out["postponed"])
    assert repo.pack_bytes() == before  # nothing deleted yet
    names = sorted(p.name for p in (repo.path / "prune").iterdir())
    assert [n.split("-")[0] for n in names] == ["mark", "ready"]
    out = repo.json("prune")  # still within the grace period: nothing happens
    assert out["swept"] == [] and out["marked"] is None
    # The first disk's content comes back under another name. Its chunks are marked: the
    # backup stores them again instead of referring to packs about to go.
    snap = repo.backup(v0, "again")
    assert snap["stats"]["new_stored_bytes"] >= 4 * MiB - 64 * 1024
    out = repo.json("prune", "--grace", "0")
    assert len(out["swept"]) == 1 and out["swept"][0]["deleted_packs"] >= 1, json.dumps(out)
    repo.check(read_data=True)
    repo.restore("again:latest", tmp_path / "again.raw")
    assert_same_file(tmp_path / "again.raw", v0)
    repo.restore("a:latest", tmp_path / "a.raw")
    assert_same_file(tmp_path / "a.raw", disk.version("v1"))


def fake_lock(repo, pid: int, host: str | None = None, purpose: str = "backup", age_days: float = 0,  # noqa: ANN001
              refreshed_days: float | None = None) -> str:
    """A lock file as another process would write it: taken ``age_days`` ago and, with
    ``refreshed_days``, last refreshed that long ago."""
    from datetime import UTC, datetime, timedelta

    def ago(days: float) -> str:
        return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    d = {"host": host or socket.gethostname(), "pid": pid, "time": ago(age_days), "exclusive": False,
         "purpose": purpose}
    if refreshed_days is not None:
        d["refreshed"] = ago(refreshed_days)
    name = os.urandom(16).hex()
    (repo.path / "locks" / name).write_text(json.dumps(d))
    return f"locks/{name}"


def test_sweep_waits_for_operations_that_started_before_the_mark(repo, make_disk):
    two_generations(repo, make_disk)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = fake_lock(repo, sleeper.pid)  # a live backup on this host
        out = repo.json("prune", "--grace", "0")
        assert out["swept"] == [] and out["marked"]["doomed_packs"] >= 1
        (p,) = out["postponed"]
        assert "still running" in p["reason"] and p["locks"] == [lock]
        assert repo.json("prune", "--grace", "0")["swept"] == []
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone: the lock is stale, the mark is swept
    out = repo.json("prune", "--grace", "0")
    assert len(out["swept"]) == 1
    repo.check(read_data=True)


def test_mostly_garbage_packs_are_repacked(repo, make_disk, tmp_path, assert_same_file):
    disk = make_disk("r.raw", 8 * MiB, seed=43)  # one 8 MiB pack
    repo.backup(disk, "r")
    disk.write_random(0, 6 * MiB, seed=44)  # 6 of its 8 chunks change
    s1 = repo.backup(disk, "r")
    repo.run("forget", "--keep-last", "1")  # s1 becomes a synthetic full reusing 2 old chunks
    (old_pack,) = [p for p in repo.pack_files() if p.stat().st_size > 7 * MiB]
    before = repo.pack_bytes()  # 8 MiB + the 6 MiB of s1
    out = repo.json("prune", "--grace", "0")
    mk = out["marked"]
    assert mk["repacked_packs"] == 1 and mk["new_packs"] == 1
    assert 2 * MiB <= mk["copied_bytes"] <= 2 * MiB + 64 * 1024
    assert not old_pack.exists()
    assert repo.pack_bytes() <= before - 6 * MiB + 64 * 1024
    repo.check(read_data=True)
    repo.restore("r:latest", tmp_path / "r.raw")
    assert_same_file(tmp_path / "r.raw", disk.path)
    assert repo.snapshots()[0]["time"] == s1["time"]
    # a higher threshold leaves partly used packs alone
    disk.write_random(0, 3 * MiB, seed=45)
    repo.backup(disk, "r")
    repo.run("forget", "--keep-last", "1")
    out = repo.json("prune", "--grace", "0", "--repack-threshold", "0.99")
    assert out["marked"] is None or out["marked"]["repacked_packs"] == 0
    # ... and says so: the garbage left there was once "nothing to prune: every stored
    # chunk is referenced"
    assert 3 * MiB <= out["garbage_left"]["bytes"] <= 3 * MiB + 64 * 1024, out["garbage_left"]
    n = out["garbage_left"]["packs"]
    assert n in (1, 2)  # the old pack's, and maybe the rewritten chunks' own
    text = repo.run("prune", "--grace", "0", "--repack-threshold", "0.99").stdout
    assert f"nothing to prune: 3.0 MiB of unreferenced data stays: in {n} pack{'s' if n > 1 else ''} it is less " \
        "than the repack threshold (--repack-threshold)" in text, text
    out = repo.json("prune", "--grace", "0")  # repacks the old pack; a stale block-hash chunk may stay
    assert out["marked"]["repacked_packs"] >= 1 and out["garbage_left"]["bytes"] < 64 * 1024, out
    out = repo.json("prune", "--grace", "0", "--repack-threshold", "1e-9")  # any garbage
    assert out["garbage_left"] == {"bytes": 0, "packs": 0}, out
    assert "nothing to prune: every stored chunk is referenced" in repo.run("prune", "--grace", "0").stdout


def test_prune_upgrades_a_version_1_repository(make_repo, make_disk):
    repo = make_repo(chunk_id="blake3")  # the chunk ids of earlier versions: version 2, made version 1
    cfg_path = repo.path / "config"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["version"] == 2 and "chunk_id" not in cfg
    cfg["version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    two_generations(repo, make_disk)  # version 1 repositories work as they are
    assert json.loads(cfg_path.read_text())["version"] == 1
    out = repo.run("prune", "--grace", "0")
    assert "upgraded to version 2" in out.stdout
    assert json.loads(cfg_path.read_text())["version"] == 2


def test_one_prune_at_a_time_and_backups_wait_for_no_prune(repo, make_disk, assert_cli_error):
    disk, _, _ = two_generations(repo, make_disk)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_lock(repo, sleeper.pid, purpose="prune")
        assert_cli_error(repo.run("prune", "--grace", "0", check=False), "locked", "prune")
        repo.backup(disk, "a")  # a prune lock does not stop a backup
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_files_that_are_not_json_objects_are_no_locks(repo, make_disk, assert_cli_error):
    """A lock file holding JSON that is not an object (a list, null, a string: damage, or a
    hostile repository) counts as no lock, as unreadable bytes do, instead of stopping
    every command with a traceback; unlock lists it as unreadable and removes it. A lock
    with fields of the wrong types is judged without a traceback too."""
    disk = make_disk("a.raw", 1 * MiB, seed=7)
    for text in ("[1, 2]", "null", '"locked"', "7", "{\"host\": 5, \"pid\": \"x\", \"time\": 7, \"refreshed\": []}"):
        name = os.urandom(16).hex()
        (repo.path / "locks" / name).write_text(text)
        if text.startswith("{"):  # a lock of no known host and no readable time: held, never stale
            repo.backup(disk, "a")
            assert_cli_error(repo.run("forget", "--keep-last", "1", check=False), "locked", "pid x on 5")
        else:
            repo.backup(disk, "a")
            assert repo.json("prune", "--grace", "0")["warnings"] == []
            repo.run("forget", "--keep-last", "1")
        out = repo.json("unlock")
        assert [r["lock"] for r in out["removed"]] == [f"locks/{name}"], out
        assert out["removed"][0]["why"] == ("held by another host (removed as asked)" if text.startswith("{")
                                            else "unreadable lock file"), out


def test_unlock(repo, assert_cli_error):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live = fake_lock(repo, sleeper.pid)
        gone = fake_lock(repo, dead.pid, purpose="forget")
        remote = fake_lock(repo, 1234, host="elsewhere.example")
        old_remote = fake_lock(repo, 1234, host="elsewhere.example", age_days=8)
        out = repo.json("unlock", "--remove-stale")
        assert {r["lock"] for r in out["removed"]} == {gone, old_remote}
        assert {r["lock"] for r in out["kept"]} == {live, remote}
        # an exclusive operation is refused while the remote lock is there
        assert_cli_error(repo.run("forget", "--keep-last", "1", check=False), "locked", "vmbak unlock")
        out = repo.json("unlock")
        assert {r["lock"] for r in out["removed"]} == {remote}
        assert {r["lock"] for r in out["kept"]} == {live}
        assert "alive on this host" in repo.run("unlock").stdout
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "removed" in repo.run("unlock").stdout
    assert "no locks" in repo.run("unlock").stdout


def test_a_lock_is_refreshed_under_its_name_while_held_and_never_after(repo):
    """A long holder (serve, mount) rewrites its lock with a new ``refreshed``, under the
    same name and with the same fields; after the holder lets go no refresh lands, so no
    lock is left behind (many short holds with a refresh every millisecond)."""
    import time

    lib = repo.open()
    lib.lock_refresh_s = 0.05
    locks = repo.path / "locks"
    with lib.lock(purpose="serve"):
        (name,) = os.listdir(locks)
        first = json.loads((locks / name).read_text())
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 3:
            assert time.monotonic() < deadline, f"the lock was refreshed {len(seen)} times in 30 s"
            d = json.loads((locks / name).read_text())
            if "refreshed" in d:
                seen.add(d["refreshed"])
                assert d["refreshed"] > d["time"]
                assert {k: v for k, v in d.items() if k != "refreshed"} == first
            time.sleep(0.02)
        assert os.listdir(locks) == [name]
    assert os.listdir(locks) == []
    lib.lock_refresh_s = 0.001
    for _ in range(50):
        with lib.lock(purpose="restore"):
            time.sleep(0.003)
        assert os.listdir(locks) == []


def test_a_refresh_that_fails_is_told_once_and_tried_again() -> None:
    """While the lock's directory refuses writes (immutable: ``chattr +i``, which binds
    root too), the refresher says so once through ``repo.note`` and keeps trying; once
    the directory takes writes again the lock is refreshed, and removed at the end. The
    repository is under /var/tmp: chattr needs a disk file system, and /tmp may be a tmpfs."""
    import shutil
    import tempfile
    import time

    import vmbak

    root = tempfile.mkdtemp(prefix="vmbak-refresh-", dir="/var/tmp")
    locks = os.path.join(root, "r", "locks")
    try:
        lib = vmbak.Repository.init(os.path.join(root, "r"), None, encryption="none")
        notes: list[str] = []
        lib.note = notes.append
        lib.lock_refresh_s = 0.05
        with lib.lock(purpose="serve"):
            (name,) = os.listdir(locks)
            subprocess.run(["chattr", "+i", locks], check=True)
            try:
                deadline = time.monotonic() + 30
                while not notes:
                    assert time.monotonic() < deadline, "no word of the failed refresh in 30 s"
                    time.sleep(0.02)
                time.sleep(0.5)  # about ten more failed tries
                assert len(notes) == 1 and f"cannot refresh the lock locks/{name}" in notes[0], notes
            finally:
                subprocess.run(["chattr", "-i", locks], check=True)
            since = datetime_now_iso()
            deadline = time.monotonic() + 30
            while json.loads(open(os.path.join(locks, name)).read()).get("refreshed", "") <= since:
                assert time.monotonic() < deadline, "the lock was not refreshed once writes were possible"
                time.sleep(0.02)
        assert os.listdir(locks) == [] and len(notes) == 1
    finally:
        subprocess.run(["chattr", "-i", locks], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def datetime_now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_another_hosts_lock_refreshed_within_seven_days_is_not_stale(repo, make_disk, assert_cli_error):
    """Another host's lock taken 30 days ago (an instant recovery left running) but
    refreshed an hour ago still holds: prune waits for it, forget is refused, unlock
    --remove-stale keeps it. Without a refresh for 8 days it is stale."""
    two_generations(repo, make_disk)
    serving = fake_lock(repo, 1234, host="elsewhere.example", purpose="serve", age_days=30,
                        refreshed_days=1 / 24)
    gone = fake_lock(repo, 1235, host="elsewhere.example", purpose="serve", age_days=30, refreshed_days=8)
    out = repo.json("prune", "--grace", "0")
    assert out["swept"] == [] and out["marked"]["doomed_packs"] >= 1
    (p,) = out["postponed"]
    assert "still running" in p["reason"] and p["locks"] == [serving], p
    assert_cli_error(repo.run("forget", "--keep-last", "1", check=False), "locked", "serve")
    out = repo.json("unlock", "--remove-stale")
    assert [r["lock"] for r in out["removed"]] == [gone] and "not refreshed for 7 days" in out["removed"][0]["why"]
    assert [r["lock"] for r in out["kept"]] == [serving] and out["kept"][0]["refreshed"]
    os.unlink(repo.path / serving)
    assert len(repo.json("prune", "--grace", "0")["swept"]) == 1


def test_a_backup_that_loaded_the_index_before_the_mark_is_waited_for(repo, make_disk, tmp_path,
                                                                      assert_same_file):
    """The race prune must win, made deterministic: a backup (here in this process, through
    the library) takes its lock and loads the index; prune then marks the packs holding the
    old content; the backup, unaware of the mark, refers to those chunks. The sweep must
    wait for the backup, and then spare what it now references."""
    import vmbak

    _, v0, _ = two_generations(repo, make_disk)
    lib = repo.open()
    with lib.lock(purpose="backup"):
        assert len(lib.index) > 0  # loaded before the mark: the garbage chunks look usable
        out = repo.json("prune", "--grace", "0")
        assert out["marked"]["dropped_packs"] >= 1 and out["swept"] == []
        assert any("still running" in p["reason"] for p in out["postponed"])
        m = vmbak.backup(lib, v0, "late")
        assert m.stats["new_stored_bytes"] < 64 * 1024  # it deduplicated against the marked chunks
    out = repo.json("prune", "--grace", "0")
    (swept,) = out["swept"]
    assert swept["spared"] and swept["deleted_packs"] == 0, swept
    repo.check(read_data=True)
    repo.restore("late:latest", tmp_path / "late.raw")
    assert_same_file(tmp_path / "late.raw", v0)
    # the spared packs are ordinary packs again: a later prune finds nothing to delete
    out = repo.json("prune", "--grace", "0")
    assert out["marked"] is None
