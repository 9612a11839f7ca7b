"""The paged chunk index through the real command line (docs/index-memory.md, "Paged
index"): with $VMBAK_INDEX_PAGED_ROWS=1 every command that loads the index builds its table
in a temporary file. Backups (with deduplication), prune (its doomed packs, chunks stored
again beside doomed copies), check and restore give exactly the results they give with the
index in memory."""

from __future__ import annotations

import os

MiB = 1 << 20


def _scenario(repo, make_disk, tmp_path, tag: str, assert_same_file) -> dict:  # noqa: ANN001
    disk = make_disk(f"{tag}.raw", 6 * MiB, seed=61)
    out: dict = {}
    s0 = repo.backup(disk, "a")
    v0 = disk.save("v0")
    disk.write_random(0, 6 * MiB, seed=62)  # every chunk changes: s0's pack holds only garbage once forgotten
    s1 = repo.backup(disk, "a")
    v1 = disk.save("v1")
    # half of v0 (now only in s0's pack) and half of v1 (deduplicated against s1's pack)
    mixed = tmp_path / f"{tag}-mixed.raw"
    mixed.write_bytes(v0.read_bytes()[:3 * MiB] + v1.read_bytes()[3 * MiB:])
    m0 = repo.backup(mixed, "m")  # both halves deduplicated: s0's pack is not doomed yet
    repo.run("forget", s0["id"][:8])
    repo.run("forget", m0["id"][:8])
    mark = repo.json("prune")  # the default grace: s0's pack is doomed, not deleted
    again = repo.backup(mixed, "again")  # v0's half stored again (its copies are doomed), v1's half not
    swept = repo.json("prune", "--grace", "0")
    rep = repo.check(read_data=True)
    repo.restore("a:latest", tmp_path / f"{tag}-a.raw")
    assert_same_file(tmp_path / f"{tag}-a.raw", v1)
    repo.restore("again:latest", tmp_path / f"{tag}-again.raw")
    assert_same_file(tmp_path / f"{tag}-again.raw", mixed)
    keys = ("new_raw_bytes", "new_stored_bytes", "data_bytes", "read_bytes")
    for name, snap in (("s0", s0), ("s1", s1), ("m0", m0), ("again", again)):
        out[name] = {k: snap["stats"][k] for k in keys}
    out["doomed"] = mark["marked"]["doomed_packs"]
    out["swept"] = [s["deleted_packs"] for s in swept["swept"]]
    out["check"] = (rep["ok"], rep["chunks"], rep["packs"], rep["snapshots"])
    out["stats"] = {k: v for k, v in repo.stats().items() if "time" not in k}
    return out


def test_backup_prune_check_restore_with_the_index_paged(make_repo, make_disk, tmp_path, assert_same_file):  # noqa: ANN001
    cache = tmp_path / "cache"
    mem = make_repo("none", name="in-memory")
    mem.extra_env["VMBAK_CACHE_DIR"] = os.fspath(cache)
    want = _scenario(mem, make_disk, tmp_path, "mem", assert_same_file)
    assert not cache.exists()  # a small index stays in memory by default
    paged = make_repo("none", name="paged")
    paged.extra_env.update({"VMBAK_INDEX_PAGED_ROWS": "1", "VMBAK_CACHE_DIR": os.fspath(cache)})
    got = _scenario(paged, make_disk, tmp_path, "paged", assert_same_file)
    assert got == want
    assert want["again"]["new_raw_bytes"] >= 3 * MiB > want["m0"]["new_raw_bytes"]  # the doomed half came again
    assert want["doomed"] >= 1 and sum(want["swept"]) >= 1
    assert os.listdir(cache / "tmp") == []  # paged: temporary files were made there, and never had a name


def test_a_bad_paged_rows_setting_is_one_line(repo, make_disk, tmp_path, assert_cli_error):  # noqa: ANN001
    disk = make_disk("d.raw", MiB, seed=63)
    repo.backup(disk, "d")
    for args in (("backup", disk.path, "--name", "d"), ("check",), ("restore", "d:latest", tmp_path / "r.raw")):
        proc = repo.run(*args, env={"VMBAK_INDEX_PAGED_ROWS": "lots"}, check=False)
        assert_cli_error(proc, "VMBAK_INDEX_PAGED_ROWS", "lots")


def test_prune_and_repair_write_the_index_in_bounded_files(repo, make_disk, tmp_path, monkeypatch,  # noqa: ANN001
                                                            assert_same_file):
    """A consolidated index is split into files of at most CONSOLIDATED_ENTRIES entries
    (whole packs), so that no reader has to hold one file naming every chunk."""
    import vmbak.repo.repository as repository_mod
    from vmbak.engine.prune import PruneOptions, prune
    from vmbak.engine.repair import repair_index

    disks = [make_disk(f"d{i}.raw", 3 * MiB, seed=70 + i) for i in range(4)]
    for i, d in enumerate(disks):
        repo.backup(d, f"d{i}")  # one pack each: 3 chunks of data and one of block hashes
    repo.run("forget", "d0:latest")
    monkeypatch.setattr(repository_mod, "CONSOLIDATED_ENTRIES", 8)  # two packs a file
    r = repo.open()
    prune(r, PruneOptions(grace_s=0))
    files = sorted((repo.path / "index").iterdir())
    loaded = [r.read_index_file(f"index/{f.name}") for f in files]
    assert sorted(len(x) for x in loaded) == [1, 2]  # d1-d3's packs, whole
    assert sum(len(e) for x in loaded for _, e in x) == 12
    r = repo.open()
    rep = repair_index(r)
    assert len(rep.new_index_files) == 2 and rep.new_index == rep.new_index_files[0]
    assert sorted(f"index/{f.name}" for f in (repo.path / "index").iterdir()) == sorted(rep.new_index_files)
    assert rep.chunks == 12
    repo.check(read_data=True)
    for i, d in enumerate(disks[1:], 1):
        repo.restore(f"d{i}:latest", tmp_path / f"r{i}.raw")
        assert_same_file(tmp_path / f"r{i}.raw", d.path)
