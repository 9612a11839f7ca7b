"""Damage stays local (issue 18): a truncated, bit-flipped or swapped manifest or index
file harms only what needs it, is named, and can be removed or rebuilt; a damaged prune
mark is reported by check and removed by prune; a pack a prune sweep deleted is not an
error for check. Everything runs through the real CLI, in unencrypted and encrypted
repositories."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest

MiB = 1 << 20
PW = "damage test"
ENCS = ["none", "aes-256-gcm"]
HOW = ["truncated", "flipped", "swapped"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, init_repo, new_disk):
    """Disk a: full a1, incrementals a2 and a3 (a3's chain is a3, a2, a1); disk b: full b1."""
    base = tmp_path_factory.mktemp("damage")
    a = new_disk(base, "a.raw", 2 * MiB + 8192, seed=181)
    b = new_disk(base, "b.raw", MiB + 4096, seed=182)
    repos = {enc: init_repo(base / enc, enc, password=PW) for enc in ENCS}
    ids: dict[str, dict[str, str]] = {enc: {} for enc in ENCS}
    for enc, r in repos.items():
        ids[enc]["a1"] = r.backup(a, "a")["id"]
        ids[enc]["b1"] = r.backup(b, "b")["id"]
    a.save("a1")
    b.save("b1")
    a.write_random(MiB // 2, 200_000, seed=183)
    for enc, r in repos.items():
        ids[enc]["a2"] = r.backup(a, "a")["id"]
    a.save("a2")
    a.write_random(3 * MiB // 2, 100_000, seed=184)
    for enc, r in repos.items():
        ids[enc]["a3"] = r.backup(a, "a")["id"]
    a.save("a3")
    return {"repos": repos, "ids": ids, "a": a, "b": b}


def copy(world, enc: str, dest):  # noqa: ANN001
    src = world["repos"][enc]
    shutil.copytree(src.path, dest)
    return dataclasses.replace(src, path=dest)


def damage(path, how: str, other=None) -> None:  # noqa: ANN001
    """truncated: the second half is cut; flipped: one bit in the middle; swapped: the bytes
    of ``other`` (another object of the same kind) saved under this one's name."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    elif how == "flipped":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        shutil.copyfile(other, path)


def listing(repo) -> dict[str, int]:  # noqa: ANN001
    return {str(p.relative_to(repo.path)): p.stat().st_size for p in repo.path.rglob("*")
            if p.is_file() and "locks" not in p.parts}


def warnings(stderr: str) -> list[str]:
    lines = stderr.strip("\n").splitlines()
    assert all(x.startswith("vmbak: warning: ") for x in lines), stderr
    return lines


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("enc", ENCS)
def test_a_damaged_manifest_harms_only_itself_and_its_dependents(world, enc, how, tmp_path, assert_cli_error,
                                                                 assert_same_file):
    repo = copy(world, enc, tmp_path / "r")
    ids = world["ids"][enc]
    bad = ids["a2"]
    snaps = repo.path / "snapshots"
    damage(snaps / bad, how, snaps / ids["a1"])

    # snapshots: the others are listed, the damaged one is named once on stderr
    p = repo.run("snapshots")
    listed = [row.split()[0] for row in p.stdout.splitlines()[1:-1]]
    assert sorted(listed) == sorted(ids[k][:8] for k in ("a1", "a3", "b1"))
    (w,) = warnings(p.stderr)
    assert f"snapshot {bad} is damaged" in w and f"vmbak forget {bad}" in w
    if how == "swapped":
        assert "does not match its name" in w
    p = repo.run("snapshots", "--json")
    assert sorted(s["id"] for s in json.loads(p.stdout)) == sorted(ids[k] for k in ("a1", "a3", "b1"))
    (w,) = warnings(p.stderr)
    assert bad in w

    # restores: other disks and the snapshot's own parent work; its dependents name it
    for spec, key, disk in (("b:latest", "b1", "b"), (ids["a1"][:8], "a1", "a")):
        repo.restore(spec, tmp_path / f"{key}.raw")
        assert_same_file(tmp_path / f"{key}.raw", world[disk].version(key))
    line = assert_cli_error(repo.run("restore", "a:latest", tmp_path / "o.raw", check=False),
                            f"snapshot {ids['a3'][:8]}", f"parent snapshot {bad[:8]} is damaged")
    assert not (tmp_path / "o.raw").exists(), line
    assert_cli_error(repo.run("restore", bad[:8], tmp_path / "o.raw", check=False), f"snapshot {bad[:8]} is damaged")

    # check: everything else is checked; the damaged manifest and its dependent are errors
    p = repo.run("check", "--json", check=False)
    rep = json.loads(p.stdout.splitlines()[-1])
    assert p.returncode == 1 and not rep["ok"] and rep["snapshots"] == 3
    assert list(rep["damaged_manifests"]) == [bad]
    assert list(rep["damaged_snapshots"]) == [ids["a3"]]
    (err,) = [e for e in rep["errors"] if bad in e]
    assert "damaged" in err and ids["a3"][:8] in err
    assert len(rep["errors"]) == 2, rep["errors"]  # the manifest, and a3 naming it
    assert "Traceback" not in p.stderr

    # prune refuses: it cannot know what the damaged manifest references
    before = listing(repo)
    assert_cli_error(repo.run("prune", "--grace", "0", check=False), f"snapshot {bad}", "damaged",
                     f"vmbak forget {bad}")
    assert listing(repo) == before

    # forget by full id removes it; a3 (which needed it) is named as broken until forgotten
    out = repo.json("forget", bad)
    assert out["removed_damaged"] == [bad] and not (snaps / bad).exists()
    p = repo.run("snapshots")
    assert p.stderr == ""
    rep = repo.check(read_data=False, ok=False)
    assert list(rep["damaged_snapshots"]) == [ids["a3"]]
    repo.run("forget", ids["a3"][:8])
    repo.run("prune", "--grace", "0")
    repo.check(read_data=True)
    for spec, key, disk in (("b:latest", "b1", "b"), ("a:latest", "a1", "a")):
        repo.restore(spec, tmp_path / f"{key}-2.raw")
        assert_same_file(tmp_path / f"{key}-2.raw", world[disk].version(key))


@pytest.mark.parametrize("enc", ENCS)
def test_forget_by_rules_works_beside_a_damaged_manifest(world, enc, tmp_path, assert_same_file):
    repo = copy(world, enc, tmp_path / "r")
    ids = world["ids"][enc]
    damage(repo.path / "snapshots" / ids["a1"], "flipped")
    # a2 and a3 depend on the damaged full: forget leaves them as they are, and keeps b
    out = repo.json("forget", "--keep-last", "1", "--name", "b")
    assert out["deleted"] == []
    # a2 is forgotten and folded into a3, which still names the damaged a1 as its parent
    p = repo.run("forget", "--keep-last", "1", "--name", "a", check=False)
    assert p.returncode == 0, p.stderr
    assert any(ids["a1"] in w for w in p.stderr.splitlines() if w.startswith("vmbak: warning: "))
    (a,) = [s for s in repo.snapshots() if s["name"] == "a"]
    assert a["parent"] == ids["a1"]
    # so putting back an intact copy of a1 makes it restorable again
    shutil.copyfile(world["repos"][enc].path / "snapshots" / ids["a1"], repo.path / "snapshots" / ids["a1"])
    repo.restore("a:latest", tmp_path / "a.raw")
    assert_same_file(tmp_path / "a.raw", world["a"].version("a3"))


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("enc", ENCS)
def test_a_damaged_index_file_is_skipped_named_and_rebuilt(world, enc, how, tmp_path, assert_cli_error,
                                                           assert_same_file):
    repo = copy(world, enc, tmp_path / "r")
    files = sorted((repo.path / "index").iterdir())
    assert len(files) == 4  # one per backup
    bad = files[0]
    damage(bad, how, files[1])
    name = f"index/{bad.name}"

    # prune refuses until it is repaired
    before = listing(repo)
    assert_cli_error(repo.run("prune", "--grace", "0", check=False), name, "vmbak repair index")
    assert listing(repo) == before

    # check names it and checks everything else
    p = repo.run("check", "--read-data", "--json", check=False)
    rep = json.loads(p.stdout.splitlines()[-1])
    assert p.returncode == 1 and rep["snapshots"] == 4 and rep["damaged_snapshots"] == {}
    (err,) = rep["errors"]
    assert name in err and "repair index" in err
    assert any("not in any index file" in w for w in rep["warnings"])  # its packs, found by their headers

    # A lock holder (check, here) writes an index file for the packs it found unindexed.
    # Unencrypted, that file is byte for byte the lost one, under the same name: healed.
    healed = enc == "none"
    assert (bad.read_bytes() == world["repos"][enc].path.joinpath("index", bad.name).read_bytes()) == healed

    # every snapshot restores, and the skipped file is named while it is there
    for key, disk in (("a3", "a"), ("a1", "a"), ("b1", "b")):
        out = tmp_path / f"{key}.raw"
        p = repo.run("restore", world["ids"][enc][key][:8], out, "--json")
        assert_same_file(out, world[disk].version(key))
        if healed:
            assert p.stderr == ""
        else:
            (w,) = warnings(p.stderr)
            assert f"index file {name} is damaged" in w and "vmbak repair index" in w

    out = repo.json("repair", "index")
    assert list(out["damaged_index_files"]) == ([] if healed else [name])
    assert name in out["removed_index_files"]
    left = sorted((repo.path / "index").iterdir())
    assert [f"index/{p.name}" for p in left] == [out["new_index"]]
    rep = repo.check(read_data=True)
    assert rep["warnings"] == []
    p = repo.run("restore", "a:latest", tmp_path / "again.raw")
    assert p.stderr == ""
    assert_same_file(tmp_path / "again.raw", world["a"].version("a3"))
    repo.run("forget", "--keep-last", "1")
    repo.run("prune", "--grace", "0")
    repo.check(read_data=True)


def test_repair_index_on_a_sound_repository_consolidates_and_waits_for_prune(world, tmp_path, assert_cli_error):
    repo = copy(world, "none", tmp_path / "r")
    out = repo.json("repair", "index")
    assert out["damaged_index_files"] == {} and len(out["removed_index_files"]) == 4
    assert out["packs"] == len(repo.pack_files())
    repo.check(read_data=True)
    # one at a time with prune: a live prune lock refuses it
    lib = repo.open()
    with lib.lock(purpose="prune"):
        assert_cli_error(repo.run("repair", "index", check=False), "locked", "prune")


@pytest.mark.parametrize("enc", ENCS)
def test_a_damaged_prune_mark_is_reported_by_check_and_removed_by_prune(world, enc, tmp_path):
    repo = copy(world, enc, tmp_path / "r")
    repo.run("forget", world["ids"][enc]["b1"][:8])
    out = repo.json("prune")  # marks b's packs (grace 1h)
    assert out["marked"]["doomed_packs"] >= 1
    mark = next(p for p in (repo.path / "prune").iterdir() if p.name.startswith("mark-"))
    damage(mark, "flipped")
    rep = repo.check(read_data=False, ok=False)
    (err,) = rep["errors"]
    assert f"prune mark {mark.name[5:13]}" in err and "next 'vmbak prune' removes it" in err
    out = repo.json("prune", "--grace", "0")
    assert out["removed_damaged_marks"] == [mark.name[5:]]
    assert not mark.exists() and not (repo.path / "prune" / f"ready-{mark.name[5:]}").exists()
    # the garbage it named is marked again, and swept
    assert out["marked"]["doomed_packs"] >= 1 and len(out["swept"]) == 1
    repo.check(read_data=True)
    assert not list((repo.path / "prune").iterdir())


@pytest.mark.parametrize("enc", ENCS)
def test_check_does_not_report_a_pack_a_sweep_deleted(world, enc, tmp_path):
    """What a check sees when a prune sweep runs while it reads: the index files it read
    name a doomed pack that the sweep has since deleted (built here from a real sweep:
    the index files and mark from before it are put back)."""
    repo = copy(world, enc, tmp_path / "r")
    repo.run("forget", world["ids"][enc]["b1"][:8])
    repo.json("prune")  # mark
    saved = tmp_path / "saved"
    for sub in ("index", "prune"):
        shutil.copytree(repo.path / sub, saved / sub)
    packs = set(p.name for p in repo.pack_files())
    out = repo.json("prune", "--grace", "0")  # sweep: new index, old index files, doomed packs, mark go
    gone = packs - set(p.name for p in repo.pack_files())
    assert gone and out["swept"][0]["deleted_packs"] == len(gone)
    for sub in ("index", "prune"):
        shutil.copytree(saved / sub, repo.path / sub, dirs_exist_ok=True)
    rep = repo.check(read_data=True)
    assert sum("already deleted" in w for w in rep["warnings"]) == len(gone)
    # the next prune finishes the work
    repo.run("prune", "--grace", "0")
    rep = repo.check(read_data=True)
    assert rep["warnings"] == []


def test_repair_index_beside_a_running_backup(make_repo, make_disk, popen_vmbak, tmp_path, assert_same_file):
    """The packs a running backup has landed (not yet indexed) are indexed from their
    headers; the backup's own index file, written later, is left alone."""
    repo = make_repo("none", pack_size=1 * MiB)
    disk = make_disk("big.raw", 48 * MiB, seed=185)
    proc = popen_vmbak("backup", disk.path, "--name", "big", env=repo.env())
    data = repo.path / "data"
    while proc.poll() is None and sum(1 for p in data.rglob("*") if p.is_file()) < 3:
        time.sleep(0.01)
    out = repo.json("repair", "index")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert out["damaged_index_files"] == {}
    repo.check(read_data=True)
    repo.restore("big:latest", tmp_path / "o.raw")
    assert_same_file(tmp_path / "o.raw", disk.path)
