"""Deduplication: identical chunks within a disk, across disks and across backups are
stored once."""

from __future__ import annotations

import pytest

MiB = 1 << 20
BLOCK = 64 * 1024
SLACK = 64 * 1024  # block hash tables, pack headers


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_two_identical_disks_are_stored_once(make_repo, make_disk, assert_same_file, tmp_path, encryption):
    repo = make_repo(encryption)
    size = 16 * MiB
    a = make_disk("a.raw", size, seed=71)
    b = make_disk("b.raw", size, seed=71)
    sa = repo.backup(a, "alpha")
    after_a = repo.pack_bytes()
    assert size <= after_a < size + SLACK
    sb = repo.backup(b, "beta")
    assert sb["type"] == "full"
    assert sb["stats"]["new_stored_bytes"] < SLACK, sb["stats"]
    assert sb["stats"]["dedup_bytes"] == size, sb["stats"]
    assert repo.pack_bytes() - after_a < SLACK
    st = repo.stats()
    assert st["snapshots"] == 2 and st["names"] == ["alpha", "beta"]
    assert size <= st["unique_raw_bytes"] < size + SLACK, st
    assert st["logical_bytes"] == 2 * size
    assert st["dedup_ratio"] == pytest.approx(2.0, rel=0.01), st
    snap_stats = repo.stats("beta:latest")["stats"]
    assert snap_stats["new_stored_bytes"] == sb["stats"]["new_stored_bytes"]
    for name, disk, s in (("alpha", a, sa), ("beta", b, sb)):
        out = tmp_path / f"{name}.out"
        repo.restore(s["short_id"], out)
        assert_same_file(out, disk.path)


def test_second_full_backup_adds_nothing(repo, make_disk):
    disk = make_disk("f.raw", 12 * MiB + 777, seed=72)
    s1 = repo.backup(disk, "f")
    before = repo.pack_bytes()
    s2 = repo.backup(disk, "f", "--mode", "full")
    assert s2["type"] == "full" and s2["parent"] is None
    assert s2["stats"]["read_bytes"] == disk.size
    assert s2["stats"]["new_stored_bytes"] < SLACK, s2["stats"]
    assert s2["stats"]["new_chunks"] <= 1, s2["stats"]
    assert repo.pack_bytes() - before < SLACK
    assert s1["stats"]["new_stored_bytes"] >= disk.size


def test_repeated_chunks_within_a_disk_are_stored_once(repo, make_disk, random_bytes):
    pattern = random_bytes(MiB, 73)
    disk = make_disk("rep.raw", 8 * MiB, fill="zero")
    for i in range(8):
        disk.write(i * MiB, pattern)
    s = repo.backup(disk, "rep")
    assert s["stats"]["data_bytes"] == 8 * MiB
    assert MiB <= s["stats"]["new_raw_bytes"] < MiB + SLACK, s["stats"]
    assert s["stats"]["dedup_bytes"] == 7 * MiB, s["stats"]
    assert repo.pack_bytes() < MiB + SLACK


def test_changed_data_reverted_to_an_earlier_version_is_not_stored_again(repo, make_disk, assert_same_file,
                                                                         tmp_path):
    disk = make_disk("rev.raw", 4 * MiB, seed=74)
    disk.save("v0")
    repo.backup(disk, "rev")
    disk.write_random(MiB, MiB, seed=75)
    s1 = repo.backup(disk, "rev")
    assert s1["stats"]["new_raw_bytes"] >= MiB
    disk.write(MiB, disk.version("v0").read_bytes()[MiB:2 * MiB])  # back to v0's chunk
    s2 = repo.backup(disk, "rev")
    assert s2["stats"]["changed_bytes"] == MiB
    assert s2["stats"]["new_stored_bytes"] < SLACK, s2["stats"]
    out = tmp_path / "rev.out"
    repo.restore("rev:latest", out)
    assert_same_file(out, disk.version("v0"))


def test_compressible_data_is_compressed(repo, make_disk):
    disk = make_disk("txt.raw", 8 * MiB, fill="zero")
    words = (b"vmbak stores compressible text with zstd; " * 30000)[: 6 * MiB]
    disk.write(0, words)
    s = repo.backup(disk, "txt")
    assert s["stats"]["new_stored_bytes"] < s["stats"]["new_raw_bytes"] / 4, s["stats"]
    assert repo.stats("txt:latest")["stats"]["compression_ratio"] > 4
