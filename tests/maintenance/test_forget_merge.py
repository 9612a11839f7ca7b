"""forget never breaks the snapshots that stay: what they need is merged into them (or
kept, with --keep-dependencies, and said so); merge --into-full folds a chain into a
synthetic full without reading any disk."""

from __future__ import annotations

import os

import pytest

MiB = 1 << 20


@pytest.fixture(scope="module")
def built_chain(tmp_path_factory, init_repo, new_disk):
    """web: full F, incrementals I1..I4 (each changing unaligned ranges), and a
    differential D from F after I2. Built once; tests work on copies (``chain``)."""
    import random

    base = tmp_path_factory.mktemp("chain")
    repo = init_repo(base / "repo", "none")
    disk = new_disk(base, "web.raw", 6 * MiB + 12288, seed=31)
    rng = random.Random(31)
    snaps = []
    for i in range(6):
        if i:
            for k in range(4):
                n = rng.randrange(1000, 300_000)
                disk.write_random(rng.randrange(0, disk.size - n), n, seed=100 * i + k)
        mode = "differential" if i == 3 else "auto"
        s = repo.backup(disk, "web", "--mode", mode)
        snaps.append((s, disk.save(f"v{i}")))
    kinds = [s["type"] for s, _ in snaps]
    assert kinds == ["full", "incremental", "incremental", "differential", "incremental", "incremental"]
    return repo, disk, snaps


@pytest.fixture
def chain(built_chain, tmp_path):
    """A copy of the built chain's repository: (repo, disk, [(snapshot summary, version path)])."""
    import dataclasses
    import shutil

    repo, disk, snaps = built_chain
    shutil.copytree(repo.path, tmp_path / "repo-copy")
    return dataclasses.replace(repo, path=tmp_path / "repo-copy"), disk, snaps


def restores_all(repo, snaps, tmp_path, assert_same_file, by_time):  # noqa: ANN001
    """Every remaining snapshot restores to the version of the disk at its time."""
    want = {s["time"]: v for s, v in snaps}
    listed = repo.snapshots()
    for s in listed:
        out = tmp_path / f"r-{s['id'][:8]}.raw"
        repo.restore(s["id"], out)
        assert_same_file(out, want[s["time"]])
        out.unlink()
    assert sorted(s["time"] for s in listed) == sorted(by_time)
    return listed


def test_keep_last_two_merges_the_rest_into_the_first_kept(chain, tmp_path, assert_same_file):
    repo, _, snaps = chain
    out = repo.json("forget", "--keep-last", "2")
    kept_times = [snaps[4][0]["time"], snaps[5][0]["time"]]
    listed = restores_all(repo, snaps, tmp_path, assert_same_file, kept_times)
    by_time = {s["time"]: s for s in listed}
    first, second = by_time[kept_times[0]], by_time[kept_times[1]]
    assert first["type"] == "synthetic-full" and first["parent"] is None
    assert second["type"] == "incremental" and second["parent"] == first["id"]
    assert first["id"] != snaps[4][0]["id"]  # rewritten: new content, new id
    rw = {r["old"]: r for r in out["rewritten"]}
    assert rw[snaps[4][0]["id"]]["new"] == first["id"] and rw[snaps[4][0]["id"]]["split_extents"] > 0
    assert rw[snaps[5][0]["id"]]["reason"] == "parent rewritten"
    assert repo.stats(first["id"])["stats"]["chain_length"] == 1
    repo.check(read_data=True)


def test_forgetting_a_middle_incremental_folds_it_into_its_child(chain, tmp_path, assert_same_file):
    repo, _, snaps = chain
    i1, i2 = snaps[1][0], snaps[2][0]
    out = repo.json("forget", i1["id"][:8])
    times = [s["time"] for s, _ in snaps if s["id"] != i1["id"]]
    listed = restores_all(repo, snaps, tmp_path, assert_same_file, times)
    new_i2 = next(s for s in listed if s["time"] == i2["time"])
    assert new_i2["type"] == "incremental" and new_i2["parent"] == snaps[0][0]["id"]
    assert i1["id"] not in {s["id"] for s in listed}
    # the differential depended on the full only: untouched
    assert snaps[3][0]["id"] in {s["id"] for s in listed}
    assert {r["old"] for r in out["rewritten"]} == {i2["id"]}  # I3 hangs off the differential
    repo.check(read_data=True)


def test_keep_dependencies_keeps_what_remaining_snapshots_need_and_says_so(chain, tmp_path, assert_same_file):
    repo, _, snaps = chain
    ids = [s["id"] for s, _ in snaps]
    before = sorted(os.listdir(repo.path / "snapshots"))
    out = repo.json("forget", "--keep-last", "1", "--keep-dependencies")
    # the newest (I4) needs I3, the differential D, and F: they stay; I1 and I2 go
    assert set(out["kept_dependencies"]) == {ids[4], ids[3], ids[0]}
    assert sorted(out["deleted"]) == sorted([ids[1], ids[2]]) and out["rewritten"] == []
    rows = {r["id"]: r for r in out["names"]["web"]}
    assert rows[ids[0]]["action"] == "keep" and rows[ids[0]]["reasons"] == [f"needed by {ids[5][:8]}"]
    assert sorted(os.listdir(repo.path / "snapshots")) == sorted(set(before) - {ids[1], ids[2]})
    restores_all(repo, snaps, tmp_path, assert_same_file, [snaps[i][0]["time"] for i in (0, 3, 4, 5)])
    text = repo.run("forget", "--keep-last", "1", "--keep-dependencies", "--dry-run").stdout
    assert f"needed by {ids[5][:8]}" in text


def test_dry_run_changes_nothing(chain):
    repo, _, _ = chain
    before = {p: (repo.path / "snapshots" / p).stat().st_mtime_ns for p in os.listdir(repo.path / "snapshots")}
    out = repo.json("forget", "--keep-last", "1", "--dry-run")
    assert out["dry_run"] and len(out["rewritten"]) == 1 and out["rewritten"][0]["new"] == ""
    assert {p: (repo.path / "snapshots" / p).stat().st_mtime_ns for p in os.listdir(repo.path / "snapshots")} == before


def test_merge_into_full_and_prune_keeps_every_snapshot_restorable(chain, tmp_path, assert_same_file):
    repo, _, snaps = chain
    latest = snaps[-1][0]
    out = repo.json("merge", "web", "--into-full")
    assert out["snapshot"] == latest["id"] and out["chain_length"] == 4  # I4, I3, D, F
    new = out["new_snapshot"]
    listed = restores_all(repo, snaps, tmp_path, assert_same_file, [s["time"] for s, _ in snaps])
    s = next(s for s in listed if s["id"] == new)
    assert s["type"] == "synthetic-full" and s["parent"] is None and s["time"] == latest["time"]
    assert repo.stats(new)["stats"]["chain_length"] == 1
    assert repo.json("snapshots", "--name", "web")[-1]["id"] == new  # web:latest is the merged one
    # a second merge of a full is refused
    p = repo.run("merge", "web", "--into-full", check=False)
    assert p.returncode != 0 and "already a synthetic-full" in p.stderr
    # forget everything but the merged snapshot: it needs nothing any more, nothing is rewritten
    out = repo.json("forget", "--keep-last", "1")
    assert out["rewritten"] == [] and len(out["deleted"]) == 5
    before = repo.pack_bytes()
    repo.run("prune", "--grace", "0")
    assert repo.pack_bytes() < before
    restores_all(repo, snaps, tmp_path, assert_same_file, [latest["time"]])
    repo.check(read_data=True)


def test_merge_errors(chain, assert_cli_error):
    repo, _, snaps = chain
    assert_cli_error(repo.run("merge", "nosuch", "--into-full", check=False), "nosuch")
    assert_cli_error(repo.run("merge", snaps[0][0]["id"][:8], "--into-full", check=False), "already a full")
    assert_cli_error(repo.run("merge", "web", check=False), "--into-full")


def test_merge_of_an_older_snapshot_repoints_its_children(chain, tmp_path, assert_same_file):
    repo, _, snaps = chain
    i2 = snaps[2][0]
    out = repo.json("merge", i2["id"][:8], "--into-full")
    old = {r["old"] for r in out["rewritten"]}
    assert old == {i2["id"]}  # its children: none (D hangs off F, I3 off D)
    listed = restores_all(repo, snaps, tmp_path, assert_same_file, [s["time"] for s, _ in snaps])
    assert {s["type"] for s in listed if s["time"] == i2["time"]} == {"synthetic-full"}
    out = repo.json("merge", snaps[1][0]["id"][:8], "--into-full")  # I1: its child I2' is a full already
    assert {r["old"] for r in out["rewritten"]} == {snaps[1][0]["id"]}
    restores_all(repo, snaps, tmp_path, assert_same_file, [s["time"] for s, _ in snaps])
