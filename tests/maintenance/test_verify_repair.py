"""Proof that a backup restores (issue 15, parts 2 and 3): sampled and resumable verify,
repair snapshots, restore --ignore-errors. Everything runs through the real CLI on small
repositories with many small packs (chunk and pack size 64 KiB)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB
PW = "verify repair"


@pytest.fixture(scope="module")
def world(tmp_path_factory, init_repo, new_disk):
    """Per encryption: disk a (full a1, then incremental a2) and disk b (full b1), in a
    repository whose chunks and packs are 64 KiB, so every chunk is a pack of its own."""
    base = tmp_path_factory.mktemp("verify")
    a = new_disk(base, "a.raw", 2 * MiB, seed=151)
    b = new_disk(base, "b.raw", MiB, seed=152)
    out = {"a": a, "b": b, "repos": {}, "ids": {}}
    for enc in ("none", "aes-256-gcm"):
        r = init_repo(base / enc, enc, pack_size=64 * KiB, password=PW, chunk_size=64 * KiB)
        out["repos"][enc] = r
        out["ids"][enc] = {"a1": r.backup(a, "a")["id"], "b1": r.backup(b, "b")["id"]}
    a.save("a1")
    b.save("b1")
    a.write_random(5 * BLOCK, 3 * BLOCK, seed=153)
    for enc, r in out["repos"].items():
        out["ids"][enc]["a2"] = r.backup(a, "a")["id"]
    a.save("a2")
    return out


def copy(world, enc: str, dest: Path):  # noqa: ANN001, ANN201
    src = world["repos"][enc]
    shutil.copytree(src.path, dest)
    return dataclasses.replace(src, path=dest)


def packs(repo) -> dict[str, Path]:  # noqa: ANN001
    return {p.name: p for p in repo.pack_files()}


def check_json(repo, *args: str, ok: bool = True) -> dict:  # noqa: ANN001
    p = repo.run("check", "--json", *args, check=False)
    rep = json.loads(p.stdout.splitlines()[-1])  # the summary line (docs/json.md)
    assert (p.returncode == 0) == ok and rep["ok"] == ok, f"{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return rep


def chunk_packs(repo, snap: str) -> list[tuple[int, int, str]]:  # noqa: ANN001
    """(first block, blocks, pack id) of each extent of a snapshot's own extent map."""
    lib = repo.open()
    m = lib.find(snap)
    return [(int(s), int(c), lib.index.get(bytes(i)).pack)
            for s, c, i in zip(m.ext_start, m.ext_count, m.ext_id, strict=True)]


def blocks_differing(got: Path, want: Path) -> tuple[list[int], bool]:
    """The blocks where two files differ, and whether ``got`` holds zeros in all of them."""
    g, w = got.read_bytes(), want.read_bytes()
    assert len(g) == len(w)
    diff = [i for i in range((len(w) + BLOCK - 1) // BLOCK) if g[i * BLOCK:(i + 1) * BLOCK] != w[i * BLOCK:(i + 1) * BLOCK]]
    return diff, all(g[i * BLOCK:(i + 1) * BLOCK] == bytes(len(g[i * BLOCK:(i + 1) * BLOCK])) for i in diff)


def named_blocks(ranges: list[dict]) -> set[int]:
    return {b for d in ranges for b in range(d["start_block"], d["start_block"] + d["blocks"])}


# ---------------------------------------------------------------------------- subsets
def test_seven_parts_read_every_pack_exactly_once(world, tmp_path):
    r = copy(world, "none", tmp_path / "r")
    all_packs = set(packs(r))
    assert len(all_packs) > 30
    seen: list[str] = []
    for n in range(1, 8):
        rep = check_json(r, "--read-data-subset", f"{n}/7")
        assert rep["packs_read"] == len(rep["read_packs"])
        assert rep["skipped_packs"] == len(all_packs) - rep["packs_read"]
        seen += rep["read_packs"]
    assert sorted(seen) == sorted(all_packs)  # each exactly once
    # the partition is fixed: the same part reads the same packs again
    assert check_json(r, "--read-data-subset", "3/7")["read_packs"] == check_json(r, "--read-data-subset", "3/7")["read_packs"]


def test_percentage_is_random_and_covers_the_repository(world, tmp_path):
    r1 = copy(world, "none", tmp_path / "r1")
    r2 = copy(world, "none", tmp_path / "r2")
    all_packs = set(packs(r1))
    first = [check_json(r, "--read-data-subset", "25%")["read_packs"] for r in (r1, r2)]
    assert first[0] != first[1]  # random (C(36, 9) choices: equal by chance about once in 10^8)
    seen = list(first[0])
    for _ in range(3):
        seen += check_json(r1, "--read-data-subset", "25%")["read_packs"]
    # least recently verified first: four runs of 25% read every pack (at most one run
    # re-reads the few packs verified longest ago when the count does not divide by 4)
    assert set(seen) == all_packs
    assert len(seen) == 4 * -(-len(all_packs) // 4)
    size = check_json(r1, "--read-data-subset", "200K")
    assert 0 < size["bytes_read"] <= 200 * KiB


def test_flipped_byte_is_found_by_the_subset_that_covers_it(world, tmp_path):
    r = copy(world, "aes-256-gcm", tmp_path / "r")
    _, _, pid = chunk_packs(r, world["ids"]["aes-256-gcm"]["b1"])[3]
    path = packs(r)[pid]
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the first blob
    path.write_bytes(bytes(data))
    part = int(pid, 16) % 7 + 1
    for n in range(1, 8):
        rep = check_json(r, "--read-data-subset", f"{n}/7", ok=n != part)
        if n == part:
            assert pid in rep["read_packs"]
            assert any(pid[:16] in e for e in rep["errors"])
            assert any("b 20" in e or "blocks 3" in e for e in rep["errors"]), rep["errors"]
        else:
            assert pid not in rep["read_packs"]
    # the plain structural check cannot see it; --read-data does
    check_json(r)
    check_json(r, "--read-data", ok=False)


def test_older_than_reads_only_what_was_not_verified_recently(world, tmp_path, run_vmbak):
    r = copy(world, "none", tmp_path / "r")
    n = len(packs(r))
    assert check_json(r, "--read-data", "--older-than", "1h")["packs_read"] == n  # never verified
    assert check_json(r, "--read-data", "--older-than", "1h")["packs_read"] == 0
    rep = check_json(r, "--read-data-subset", "1/2", "--older-than", "0")
    assert 0 < rep["packs_read"] < n
    # records live in the repository (shared by every host); a run that wrote many folds
    # them all into one at its end, and nothing is lost
    assert list((r.path / "verify").iterdir())
    r.run("check", "--read-data", env={"VMBAK_VERIFY_RECORD_PACKS": "1"})
    assert len(list((r.path / "verify").iterdir())) == 1
    assert check_json(r, "--read-data", "--older-than", "1h")["packs_read"] == 0
    p = r.run("check", "--older-than", "soon", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "soon" in p.stderr


def test_resume_survives_kill_9(world, tmp_path, popen_vmbak):
    r = copy(world, "none", tmp_path / "r")
    n = len(packs(r))
    vdir = r.path / "verify"
    for _attempt in range(3):
        shutil.rmtree(vdir, ignore_errors=True)
        proc = popen_vmbak("check", "--read-data", "--workers", "1", "--json",
                           env=r.env(VMBAK_VERIFY_RECORD_PACKS="1"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if vdir.is_dir() and len(os.listdir(vdir)) >= 3:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            break
    else:
        pytest.fail("the check finished before it could be killed, three times (make the repository larger)")
    recorded = len(os.listdir(vdir))
    rep = check_json(r, "--read-data", "--resume")
    res = rep["selection"]["resumed"]
    assert res is not None and res["already_verified"] >= recorded - 1 >= 2
    assert res["already_verified"] + rep["packs_read"] == n
    assert rep["packs_read"] < n
    # the resumed run finished: nothing left to resume, and every pack counts as verified
    assert check_json(r, "--read-data", "--older-than", "1h")["packs_read"] == 0
    again = check_json(r, "--resume")
    assert again["selection"]["resumed"] is None and again["packs_read"] == n


# ---------------------------------------------------------------------------- restore --ignore-errors
@pytest.mark.parametrize("enc", ["none", "aes-256-gcm"])
def test_restore_ignore_errors(world, tmp_path, enc, assert_cli_error):
    r = copy(world, enc, tmp_path / "r")
    ext = chunk_packs(r, world["ids"][enc]["b1"])
    (s1, c1, gone), (s2, c2, flipped) = ext[2], ext[9]
    packs(r)[gone].unlink()
    path = packs(r)[flipped]
    data = bytearray(path.read_bytes())
    data[200] ^= 0x40
    path.write_bytes(bytes(data))
    out = tmp_path / "b.raw"
    assert_cli_error(r.run("restore", "b:latest", out, check=False), "chunk", "of snapshot")
    assert not out.exists()
    p = r.run("restore", "b:latest", out, "--ignore-errors", "--json", check=False)
    assert p.returncode == 3, p.stderr
    rep = json.loads(p.stdout.splitlines()[-1])
    assert rep["complete"] is False
    assert named_blocks(rep["damaged"]) == set(range(s1, s1 + c1)) | set(range(s2, s2 + c2))
    diff, zeros = blocks_differing(out, world["b"].version("b1"))
    assert set(diff) == named_blocks(rep["damaged"]) and zeros
    # text: every range named, exit 3; over an existing file, the damaged ranges are zeroed
    out.write_bytes(b"\xff" * out.stat().st_size)
    p = r.run("restore", "b:latest", out, "--ignore-errors", "--overwrite", check=False)
    assert p.returncode == 3 and "Traceback" not in p.stderr
    assert f"blocks {s1}-{s1 + c1 - 1}" in p.stdout and f"blocks {s2}-{s2 + c2 - 1}" in p.stdout
    diff, zeros = blocks_differing(out, world["b"].version("b1"))
    assert set(diff) == named_blocks(rep["damaged"]) and zeros
    # an undamaged snapshot restores fully, exit 0
    assert r.restore(world["ids"][enc]["a1"], tmp_path / "a1.raw", "--ignore-errors")["damaged"] == []


# ---------------------------------------------------------------------------- repair snapshots
@pytest.mark.parametrize("enc", ["none", "aes-256-gcm"])
def test_repair_snapshots(world, tmp_path, enc):
    r = copy(world, enc, tmp_path / "r")
    ids = world["ids"][enc]
    ext = chunk_packs(r, ids["a1"])
    assert [e[:2] for e in ext][:3] == [(0, 1), (1, 1), (2, 1)]
    # damage: a deleted pack (block 1), every index file deleted, a truncated pack (block 9)
    packs(r)[ext[1][2]].unlink()
    for f in (r.path / "index").iterdir():
        f.unlink()
    trunc = packs(r)[ext[9][2]]
    trunc.write_bytes(trunc.read_bytes()[:trunc.stat().st_size // 2])
    assert not check_json(r, ok=False)["ok"]
    before = sorted(str(p.relative_to(r.path)) for p in r.path.rglob("*") if p.is_file() and "locks" not in p.parts)

    dry = r.json("repair", "snapshots", "--dry-run")
    after_dry = sorted(str(p.relative_to(r.path)) for p in r.path.rglob("*") if p.is_file()
                       and "locks" not in p.parts and "verify" not in p.parts)
    assert after_dry == [x for x in before if not x.startswith("verify")]
    assert {w["old"] for w in dry["rewritten"]} == {ids["a1"], ids["a2"]}

    rep = r.json("repair", "snapshots")
    by_old = {w["old"]: w for w in rep["rewritten"]}
    assert set(by_old) == {ids["a1"], ids["a2"]}  # b1 untouched; a2 re-pointed to the new a1
    assert named_blocks(by_old[ids["a1"]]["lost"]) == {1, 9}
    assert named_blocks(by_old[ids["a2"]]["lost"]) == {1, 9}  # a2 rewrote blocks 5-7 only
    assert by_old[ids["a2"]]["reason"] == "its parent was replaced"
    check_json(r, "--read-data")  # after a repair, check is clean

    snaps = {s["id"]: s for s in r.snapshots()}
    assert ids["b1"] in snaps and ids["a1"] not in snaps and ids["a2"] not in snaps
    new_a1, new_a2 = by_old[ids["a1"]]["new"], by_old[ids["a2"]]["new"]
    assert snaps[new_a2]["parent"] == new_a1
    assert any("blocks 1, 9" in n for n in snaps[new_a1]["notes"])
    # unaffected snapshots restore byte-identical; affected ones with zeros only in the named ranges
    r.restore(ids["b1"], tmp_path / "b1.raw")
    assert (tmp_path / "b1.raw").read_bytes() == world["b"].version("b1").read_bytes()
    for new, label in ((new_a1, "a1"), (new_a2, "a2")):
        r.restore(new, tmp_path / f"{label}.raw")
        diff, zeros = blocks_differing(tmp_path / f"{label}.raw", world["a"].version(label))
        assert set(diff) == {1, 9} and zeros
    # the originals are kept until prune; a second repair finds nothing to do
    assert (r.path / "repaired" / "snapshots" / ids["a1"]).exists()
    assert r.json("repair", "snapshots")["rewritten"] == []
    pr = r.json("prune", "--grace", "0")
    assert any(ids["a1"] in x for x in pr["removed_repaired"])
    assert not [p for p in (r.path / "repaired").rglob("*") if p.is_file()]
    check_json(r, "--read-data")
    r.restore(new_a2, tmp_path / "a2-after-prune.raw")
    assert (tmp_path / "a2-after-prune.raw").read_bytes() == (tmp_path / "a2.raw").read_bytes()


def test_repair_salvages_what_still_reads_and_names_corrupt_chunks(world, tmp_path):
    """With --read-data a flipped byte counts as lost too; a truncated pack that an index
    file still describes gives back every chunk before the cut."""
    r = copy(world, "none", tmp_path / "r")
    ids = world["ids"]["none"]
    ext = chunk_packs(r, ids["b1"])
    path = packs(r)[ext[4][2]]
    data = bytearray(path.read_bytes())
    data[300] ^= 0x02
    path.write_bytes(bytes(data))
    assert r.json("repair", "snapshots")["rewritten"] == []  # the structure is sound: nothing seen
    rep = r.json("repair", "snapshots", "--read-data")
    (w,) = rep["rewritten"]
    assert w["old"] == ids["b1"] and named_blocks(w["lost"]) == {4}
    check_json(r, "--read-data")
    r.restore(w["new"], tmp_path / "b.raw")
    diff, zeros = blocks_differing(tmp_path / "b.raw", world["b"].version("b1"))
    assert diff == [4] and zeros


def test_help_and_errors(world, tmp_path, run_vmbak, assert_cli_error):
    for cmd in (("check",), ("repair", "snapshots"), ("repair", "index"), ("restore",)):
        out = run_vmbak(*cmd, "--help").stdout
        assert "example" in out
    assert "--read-data-subset" in run_vmbak("check", "--help").stdout
    assert "exit" in run_vmbak("restore", "--help").stdout
    r = copy(world, "none", tmp_path / "r")
    for bad in ("0/7", "8/7", "0%", "150%", "lots"):
        assert_cli_error(r.run("check", "--read-data-subset", bad, check=False), "subset")
    assert_cli_error(r.run("restore", "--libvirt", "x:latest", "--ignore-errors", check=False), "ignore-errors")
    d = r.json("repair", "index", "--dry-run")
    assert d["dry_run"] is True


def test_damaged_coverage_record_is_ignored_with_a_warning(world, tmp_path):
    r = copy(world, "aes-256-gcm", tmp_path / "r")
    n = len(packs(r))
    check_json(r, "--read-data-subset", "1/2")
    (rec,) = list((r.path / "verify").iterdir())
    data = bytearray(rec.read_bytes())
    data[len(data) // 2] ^= 0x01
    rec.write_bytes(bytes(data))
    rep = check_json(r, "--read-data", "--older-than", "1h")  # a warning, not an error
    assert rep["packs_read"] == n  # what the damaged record named counts as not verified
    assert any("verification record" in w for w in rep["warnings"])
