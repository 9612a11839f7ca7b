"""check and damaged repositories: flipped bytes, truncated and deleted packs. Damage is
reported with the snapshots and block ranges it hits; restores that meet it stop with one
line and leave no target file behind."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import flip_byte

BLOCK = 64 * 1024
MiB = 1 << 20


def locate_chunk(repo, snapshot_id: str, first_block: int):
    """(pack file, Location, (start, count)) of the extent of a snapshot starting at a block."""
    r = repo.open()
    m = next(m for m in r.manifests() if m.id == snapshot_id)
    for j, start in enumerate(m.ext_start.tolist()):
        if start == first_block:
            cid = bytes(m.ext_id[j])
            loc = r.index.get(cid)
            assert loc is not None
            pack = repo.path / "data" / loc.pack[:2] / loc.pack
            assert pack.is_file()
            return pack, loc, (start, int(m.ext_count[j]))
    raise AssertionError(f"no extent starts at block {first_block}")


@pytest.fixture
def damaged_setup(request, make_repo, make_disk):
    """A repository with a full and an incremental of a 4 MiB disk, in 1 MiB packs
    (unencrypted unless the test parametrizes ``damaged_setup`` indirectly)."""
    repo = make_repo(getattr(request, "param", "none"), pack_size=MiB)
    disk = make_disk("c.raw", 4 * MiB, seed=41)
    full = repo.backup(disk, "c")
    disk.write_random(40 * BLOCK, BLOCK, seed=42)
    inc = repo.backup(disk, "c")
    return repo, disk, full, inc


def test_clean_repository_passes_check(damaged_setup):
    repo, _, _, _ = damaged_setup
    p = repo.run("check", "--read-data")
    assert p.returncode == 0 and "no errors found" in p.stdout
    rep = repo.check(read_data=True)
    assert rep["ok"] is True and rep["errors"] == [] and rep["snapshots"] == 2
    assert rep["bytes_read"] >= 4 * MiB


@pytest.mark.parametrize("damaged_setup", ["none", "aes-256-gcm"], indirect=True)
def test_flipped_byte_in_pack_is_found_and_stops_restores(damaged_setup, tmp_path, assert_cli_error):
    repo, _, full, inc = damaged_setup
    pack, loc, (start, count) = locate_chunk(repo, full["id"], 16)
    flip_byte(pack, loc.offset + loc.length // 2)
    block_range = f"blocks {start}-{start + count - 1}"

    p = repo.run("check", "--read-data", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert full["short_id"] in p.stdout and block_range in p.stdout, p.stdout
    rep = json.loads(repo.run("check", "--read-data", "--json", check=False).stdout.splitlines()[-1])
    assert rep["ok"] is False and full["id"] in rep["damaged_snapshots"]
    assert any(block_range in e for e in rep["damaged_snapshots"][full["id"]])

    outdir = tmp_path / "out"
    outdir.mkdir()
    for spec in (full["short_id"], inc["short_id"], "c:latest"):
        p = repo.run("restore", spec, outdir / "disk.raw", check=False)
        assert_cli_error(p, block_range)
        assert os.listdir(outdir) == [], f"a failed restore left files: {os.listdir(outdir)}"
    # Also from the library: an IntegrityError (a VmbakError), no file.
    import vmbak
    from vmbak.errors import IntegrityError

    with pytest.raises(IntegrityError, match=block_range):
        vmbak.restore(repo.open(), full["id"], outdir / "lib.raw")
    assert os.listdir(outdir) == []


def test_check_names_snapshots_that_depend_on_a_damaged_chunk(damaged_setup, tmp_path):
    """The incremental restores through the full's damaged chunk, so check must name it too."""
    repo, _, full, inc = damaged_setup
    pack, loc, (start, count) = locate_chunk(repo, full["id"], 0)
    flip_byte(pack, loc.offset + 100)
    p = repo.run("restore", inc["id"], tmp_path / "x.raw", check=False)
    assert p.returncode != 0, "restoring the incremental needs the damaged chunk"
    rep = json.loads(repo.run("check", "--read-data", "--json", check=False).stdout.splitlines()[-1])
    assert rep["ok"] is False
    assert inc["id"] in rep["damaged_snapshots"], (
        f"check does not name snapshot {inc['short_id']}, whose restore fails on the damaged chunk: "
        f"{rep['errors']}")


def test_truncated_pack_is_found_without_read_data(damaged_setup, tmp_path, assert_cli_error):
    repo, _, full, _ = damaged_setup
    pack, _, (start, count) = locate_chunk(repo, full["id"], 32)
    os.truncate(pack, pack.stat().st_size // 2)
    p = repo.run("check", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    assert full["short_id"] in p.stdout and f"blocks {start}-{start + count - 1}" in p.stdout, p.stdout
    assert repo.run("check", "--read-data", check=False).returncode == 1
    out = tmp_path / "t.raw"
    assert_cli_error(repo.run("restore", "c:latest", out, check=False))
    assert not out.exists() and not (tmp_path / ".t.raw.vmbak-partial").exists()


def test_deleted_pack_is_found_without_read_data(damaged_setup):
    repo, _, full, _ = damaged_setup
    pack, _, (start, count) = locate_chunk(repo, full["id"], 48)
    pack.unlink()
    p = repo.run("check", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    assert "missing" in p.stdout, p.stdout
    # The report names what the user lost: the snapshot and its block range.
    assert full["short_id"] in p.stdout and f"blocks {start}-{start + count - 1}" in p.stdout, p.stdout


def test_deleted_pack_fails_restore_with_one_line(damaged_setup, tmp_path, assert_cli_error):
    repo, _, full, _ = damaged_setup
    pack, _, (start, count) = locate_chunk(repo, full["id"], 48)
    pack.unlink()
    out = tmp_path / "d.raw"
    assert_cli_error(repo.run("restore", full["short_id"], out, check=False))
    assert not out.exists()
