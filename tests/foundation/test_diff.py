"""vmbak diff reports exactly the extents that changed (by block hashes, no data read)."""

from __future__ import annotations

MiB = 1 << 20
B = 64 * 1024


def extents(d: dict) -> list[tuple[int, int]]:
    return [(e["offset"], e["length"]) for e in d["extents"]]


def test_diff_reports_exactly_the_changed_extents(repo, make_disk, changed_extents):
    size = 8 * MiB + 5000  # 128 full blocks and a partial one of 5000 bytes
    disk = make_disk("d.raw", size, seed=81)
    disk.save("v0")
    s0 = repo.backup(disk, "d")

    disk.write_random(0, 1, seed=1)  # block 0
    disk.write_random(3 * B + B - 6, 10, seed=2)  # straddles blocks 3 and 4
    disk.write_random(5 * B + 1000, 1, seed=3)  # block 5: adjacent, one extent 3-5
    disk.write_zeros(20 * B, 10 * B)  # blocks 20-29 become zeros
    disk.write_random(size - 1, 1, seed=4)  # the partial last block
    disk.save("v1")
    s1 = repo.backup(disk, "d")
    want = [(0, B), (3 * B, 3 * B), (20 * B, 10 * B), (128 * B, 5000)]
    assert changed_extents(disk.version("v0").read_bytes(), disk.version("v1").read_bytes()) == want

    d = repo.json("diff", s0["short_id"], s1["short_id"])
    assert extents(d) == want
    assert d["changed_blocks"] == 15 and d["extent_count"] == 4 and d["block_size"] == B
    assert d["changed_bytes"] == 14 * B + 5000
    assert d["a"] == s0["id"] and d["b"] == s1["id"] and d["truncated"] is False
    assert extents(repo.json("diff", s1["id"], s0["id"])) == want  # symmetric

    same = repo.json("diff", s1["short_id"], "d:latest")
    assert same["extents"] == [] and same["changed_blocks"] == 0 and same["changed_bytes"] == 0

    text = repo.run("diff", s0["short_id"], s1["short_id"]).stdout
    assert "15 blocks changed" in text and "4 extents" in text
    assert all(str(off) in text for off, _ in want)

    # A differential on top: diffs between any two snapshots of the chain are exact.
    disk.write_random(64 * B, 2 * B, seed=5)
    disk.write_random(0, 1, seed=6)
    disk.save("v2")
    s2 = repo.backup(disk, "d", "--mode", "differential")
    assert s2["type"] == "differential"
    vers = {k: disk.version(k).read_bytes() for k in ("v0", "v1", "v2")}
    for (la, sa), (lb, sb) in [(("v0", s0), ("v2", s2)), (("v1", s1), ("v2", s2))]:
        d = repo.json("diff", sa["id"], sb["id"])
        assert extents(d) == changed_extents(vers[la], vers[lb]), (la, lb)
    assert extents(repo.json("diff", s1["id"], s2["id"])) == [(0, B), (64 * B, 2 * B)]
    assert extents(repo.json("diff", s0["id"], s2["id"])) == [(0, B), (3 * B, 3 * B), (20 * B, 10 * B),
                                                               (64 * B, 2 * B), (128 * B, 5000)]


def test_diff_across_names_with_the_same_geometry(repo, make_disk):
    a = make_disk("a.raw", 2 * MiB, seed=82)
    b = make_disk("b.raw", 2 * MiB, seed=82)
    b.write_random(7 * B + 3, 3, seed=9)
    repo.backup(a, "a")
    repo.backup(b, "b")
    assert extents(repo.json("diff", "a:latest", "b:latest")) == [(7 * B, B)]


def test_diff_of_disks_of_two_sizes_names_them(repo, make_disk, assert_cli_error):
    small, big = make_disk("s.raw", 2 * MiB, seed=83), make_disk("l.raw", 3 * MiB, seed=84)
    sa, sb = repo.backup(small, "s")["short_id"], repo.backup(big, "l")["short_id"]
    assert_cli_error(repo.run("diff", "s:latest", "l:latest", check=False),
                     f"snapshots {sa} and {sb} have different disk sizes ({2 * MiB} and {3 * MiB} bytes)")
