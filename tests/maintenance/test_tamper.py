"""Authentication of everything read back: a flipped bit in a pack, an index file, a
manifest, a key file or a prune mark is detected and named, and nothing acts on it."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest

MiB = 1 << 20
PW = "tamper test"


@pytest.fixture(scope="module")
def world(tmp_path_factory, init_repo, new_disk):
    base = tmp_path_factory.mktemp("tamper")
    disk = new_disk(base, "t.raw", 3 * MiB + 4096, seed=81)
    repos = {"aes-256-gcm": init_repo(base / "enc", "aes-256-gcm", password=PW),
             "none": init_repo(base / "plain", "none")}
    for r in repos.values():
        r.backup(disk, "t")
    disk.write_random(MiB // 3, 500_000, seed=82)
    for r in repos.values():
        r.backup(disk, "t")
    return {"base": base, "disk": disk, "repos": repos}


def copy(world, enc: str, dest):  # noqa: ANN001
    src = world["repos"][enc]
    shutil.copytree(src.path, dest)
    return dataclasses.replace(src, path=dest)


def flip(path, offset: int) -> None:  # noqa: ANN001
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x04
    path.write_bytes(bytes(data))


def files(repo, sub: str) -> list:  # noqa: ANN001
    return sorted(p for p in (repo.path / sub).rglob("*") if p.is_file())


@pytest.mark.parametrize("enc", ["aes-256-gcm", "none"])
def test_flipped_bit_in_a_pack_is_named_and_never_restored(world, enc, tmp_path, assert_cli_error):
    repo = copy(world, enc, tmp_path / "r")
    lib = repo.open()
    full = lib.manifests()[0]
    cid = bytes(full.ext_id[0])  # the first MiB: the incremental rewrote only part of it
    loc = lib.index.get(cid)
    pack = repo.path / "data" / loc.pack[:2] / loc.pack
    flip(pack, loc.offset + loc.length // 2)
    rep = repo.check(read_data=True, ok=False)
    assert not rep["ok"] and any(loc.pack[:16] in e for e in rep["errors"])
    assert any("authentication failed" in e or "checksum mismatch" in e for e in rep["errors"])
    assert len(rep["damaged_snapshots"]) == 2  # and it names the snapshots it hurts
    for snap in ("t:latest", full.id):
        line = assert_cli_error(repo.run("restore", snap, tmp_path / "o.raw", check=False), cid.hex()[:16])
        assert "authentication failed" in line or "checksum mismatch" in line
        assert not (tmp_path / "o.raw").exists() and not list(tmp_path.glob(".o.raw*"))
    # a merge that must cut the damaged chunk stops, naming it; nothing is removed
    assert_cli_error(repo.run("merge", "t", "--into-full", check=False), cid.hex()[:16])
    assert len(repo.snapshots()) == 2


def test_flipped_bit_in_an_index_file_is_skipped_and_named(world, tmp_path, assert_cli_error):
    """The index file is skipped (its packs describe themselves), every command that
    reads names it; prune, which rewrites the index, waits for 'vmbak repair index'.
    (More in test_damage.py.)"""
    repo = copy(world, "aes-256-gcm", tmp_path / "r")
    idx = files(repo, "index")[0]
    flip(idx, 40)
    before = sorted(p.name for p in files(repo, "data"))
    assert_cli_error(repo.run("prune", "--grace", "0", check=False), f"index file index/{idx.name}",
                     "authentication failed", "vmbak repair index")
    assert sorted(p.name for p in files(repo, "data")) == before
    p = repo.run("restore", "t:latest", tmp_path / "o.raw")
    assert f"index file index/{idx.name} is damaged (authentication failed" in p.stderr
    p = repo.run("check", check=False)
    assert p.returncode != 0 and idx.name in p.stdout + p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("enc", ["aes-256-gcm", "none"])
def test_flipped_bit_in_a_manifest_is_named(world, enc, tmp_path, assert_cli_error):
    """The damaged snapshot is left out and named; prune refuses to guess what it
    references; forget by rules leaves it alone. (More in test_damage.py.)"""
    repo = copy(world, enc, tmp_path / "r")
    man = files(repo, "snapshots")[0]
    flip(man, 30)
    frag = "authentication failed" if enc != "none" else "checksum mismatch"
    p = repo.run("snapshots")
    assert f"snapshot {man.name} is damaged ({frag}" in p.stderr and len(p.stderr.splitlines()) == 1
    assert_cli_error(repo.run("prune", "--grace", "0", check=False), f"snapshot {man.name}", frag)
    repo.run("forget", "--keep-last", "1")
    assert man.exists()  # forget removes a damaged manifest only when named by its full id


def test_a_manifest_under_another_name_is_refused(world, tmp_path):
    repo = copy(world, "aes-256-gcm", tmp_path / "r")
    man = files(repo, "snapshots")[0]
    fake = "ab" * 32
    shutil.copyfile(man, man.parent / fake)
    p = repo.run("snapshots")
    assert f"snapshot {fake} is damaged" in p.stderr and "does not match its name" in p.stderr
    assert len(repo.snapshots()) == 2 and man.name[:8] in p.stdout


def test_a_damaged_prune_mark_is_reported_and_never_acted_upon(world, tmp_path):
    repo = copy(world, "aes-256-gcm", tmp_path / "r")
    repo.run("forget", "--keep-last", "1")
    out = repo.json("prune", "--repack-threshold", "0.2")  # marks (grace 1h)
    assert out["marked"]["doomed_packs"] >= 1
    mark = next(p for p in files(repo, "prune") if p.name.startswith("mark-"))
    flip(mark, 20)
    packs = sorted(p.name for p in files(repo, "data"))
    out = repo.json("prune", "--grace", "0", "--repack-threshold", "0.2")
    assert any(f"prune mark {mark.name[5:13]}" in w and "never acted upon" in w for w in out["warnings"])
    # the damaged mark is not swept but removed; the new mark (same garbage) is swept
    assert all(s["mark"] != mark.name[5:] for s in out["swept"])
    assert out["removed_damaged_marks"] == [mark.name[5:]] and not mark.exists()
    repo.check(read_data=True)
    assert sorted(p.name for p in files(repo, "data")) != packs  # the garbage did go, by the new mark
    repo.restore("t:latest", tmp_path / "o.raw")


def test_authentic_but_malformed_ready_records_are_never_acted_upon(world, tmp_path):
    """Ready records sealed with the repository's key (a buggy or hostile writer) but
    malformed: a version that is no number, a lock name outside locks/. Each counts as
    damaged, as a flipped bit does: prune names it in one line and removes its mark as
    incomplete, check reports it; no traceback, and nothing is swept on its word."""
    from vmbak.repo import marks

    for bad in ({"version": "x"}, {"locks": ["../config"]}, {"locks": ["locks/" + "a" * 32 + "/.."]}):
        repo = copy(world, "aes-256-gcm", tmp_path / "r")
        repo.run("forget", "--keep-last", "1")
        out = repo.json("prune", "--repack-threshold", "0.2")  # marks (grace 1h)
        mid = out["marked"]["mark"]
        lib = repo.open()
        doc = {"version": marks.MARK_VERSION, "mark": mid, "time": "2026-01-01T00:00:00.000000Z", "locks": [], **bad}
        lib.backend.write(f"prune/ready-{mid}", marks._seal_json(lib.sealer, doc, marks.READY_AAD))  # noqa: SLF001
        packs = sorted(p.name for p in files(repo, "data"))
        p = repo.run("check", "--json", check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert any(f"prune ready record {mid[:8]}: malformed" in e for e in json.loads(p.stdout.splitlines()[-1])["errors"]), p.stdout
        p = repo.run("prune", "--grace", "0", "--repack-threshold", "0.2", "--json", check=False)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        out = json.loads(p.stdout.splitlines()[-1])
        assert any(f"prune ready record {mid[:8]}: malformed" in w for w in out["warnings"]), out["warnings"]
        assert all(s["mark"] != mid for s in out["swept"]) and mid in out["removed_incomplete_marks"], out
        repo.check(read_data=True)
        assert sorted(p.name for p in files(repo, "data")) != packs  # the garbage went, by a new mark
        shutil.rmtree(repo.path)


def test_a_flipped_bit_anywhere_is_found_by_check_read_data(world, tmp_path):
    """Ten random bits across packs, index files, manifests and key files: each is found
    (check fails, or the repository refuses to open with a one-line error)."""
    rng = random.Random(83)
    src = world["repos"]["aes-256-gcm"]
    candidates = [p.relative_to(src.path) for sub in ("data", "index", "snapshots", "keys")
                  for p in files(src, sub)]
    for i in range(10):
        repo = copy(world, "aes-256-gcm", tmp_path / f"r{i}")
        rel = rng.choice(candidates)
        target = repo.path / rel
        if rel.parts[0] == "keys":
            # A key file's "created", "host" and "user" are informational and unauthenticated:
            # flip a bit of the wrapped key itself ("data").
            text = target.read_text()
            start = text.index('"data": "') + len('"data": "')
            flip(target, start + rng.randrange(text.index('"', start) - start))
        else:
            flip(target, rng.randrange(target.stat().st_size))
        p = repo.run("check", "--read-data", "--json", check=False)
        assert p.returncode != 0, f"flipped bit in {rel} not detected"
        assert "Traceback" not in p.stderr
        shutil.rmtree(repo.path)
