"""Round trips through the real CLI: full -> incremental -> differential -> incremental, and
every snapshot restores byte-identically (by id prefix, full id, NAME:latest, NAME@TIME)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

BLOCK = 64 * 1024
MiB = 1 << 20
MARKER = b"VMBAK-PLAINTEXT-MARKER-0123456789-the-quick-brown-fox"


def listed_time(repo, short_id: str) -> str:
    """The TIME (UTC) column that `vmbak snapshots` prints for a snapshot."""
    out = repo.run("snapshots").stdout
    for line in out.splitlines():
        if line.startswith(short_id):
            return line.split()[1]
    raise AssertionError(f"snapshot {short_id} not listed:\n{out}")


def wait_next_second(after_iso: str) -> None:
    """Sleep until the wall clock (UTC) is in a later second than ``after_iso``."""
    t = datetime.strptime(after_iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    target = int(t) + 1
    while time.time() < target + 0.01:
        time.sleep(target + 0.02 - time.time())


def repo_contains(repo, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in repo.path.rglob("*") if p.is_file())


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_full_incremental_differential_chain_restores_every_version(
        encryption, make_repo, make_disk, assert_same_file, changed_extents, tmp_path):
    repo = make_repo(encryption)
    size = 12 * MiB + 12345  # not a multiple of 64 KiB: the last block is partial
    nblocks = (size + BLOCK - 1) // BLOCK
    disk = make_disk("vm.raw", size, seed=11)
    disk.write(3 * BLOCK + 100, MARKER)
    disk.write_zeros(10 * BLOCK, 10 * BLOCK)  # blocks 10-19: written zeros
    disk.punch_hole(40 * BLOCK, 8 * BLOCK)  # blocks 40-47: a hole
    disk.save("v0")

    s0 = repo.backup(disk, "vm")
    assert s0["type"] == "full" and s0["parent"] is None
    st = s0["stats"]
    assert st["logical_bytes"] == size
    assert st["zero_bytes"] == 10 * BLOCK, st
    assert st["read_bytes"] == size - 8 * BLOCK, "holes must not be read"
    stored_data = size - 18 * BLOCK  # zero blocks and holes are never stored
    assert stored_data <= st["new_raw_bytes"] <= stored_data + 16 * nblocks + 4096, st
    assert repo.pack_bytes() < stored_data + 256 * 1024

    # v1: new data, a zeroed range filled again, blocks set back to zero, data in the
    # former hole, the partial last block changed, a data range punched into a hole.
    disk.write_random(0, 100, seed=21)
    disk.write_random(5 * BLOCK, 2 * BLOCK, seed=22)
    disk.write_random(15 * BLOCK + 7, 10, seed=23)
    disk.write_zeros(30 * BLOCK, 4 * BLOCK)
    disk.write_random(44 * BLOCK + BLOCK // 2, 4096, seed=24)
    disk.write_random(size - 1000, 1000, seed=25)
    disk.punch_hole(100 * BLOCK, 2 * BLOCK)
    disk.save("v1")
    s1 = repo.backup(disk, "vm")
    assert s1["type"] == "incremental" and s1["parent"] == s0["id"]
    assert s1["change_source"] == "scan"
    assert s1["stats"]["changed_bytes"] == 12 * BLOCK, s1["stats"]
    # Only the changed non-zero blocks are new: 0, 5, 6, 15, 44 and the partial last one.
    new_data = 5 * BLOCK + size % BLOCK
    assert s1["stats"]["data_bytes"] == 6 * BLOCK, s1["stats"]
    assert new_data <= s1["stats"]["new_raw_bytes"] <= new_data + 16 * 12 + 4096, s1["stats"]

    # v2: a differential holds every change since the full.
    disk.write_random(60 * BLOCK, 10 * BLOCK, seed=26)
    disk.write_random(1, 1, seed=27)
    disk.save("v2")
    s2 = repo.backup(disk, "vm", "--mode", "differential")
    assert s2["type"] == "differential" and s2["parent"] == s0["id"]
    v0, v2 = disk.version("v0").read_bytes(), disk.version("v2").read_bytes()
    since_full = sum((ln + BLOCK - 1) // BLOCK for _, ln in changed_extents(v0, v2))
    assert s2["stats"]["changed_bytes"] == since_full * BLOCK

    # v3 starts in a later second than v2, so v2 is the newest snapshot of its second.
    wait_next_second(s2["time"])
    disk.write_zeros(60 * BLOCK, 3 * BLOCK)
    disk.write_random(150 * BLOCK, 11 * BLOCK, seed=28)
    disk.save("v3")
    s3 = repo.backup(disk, "vm")
    assert s3["type"] == "incremental" and s3["parent"] == s2["id"]

    listed = repo.snapshots()
    assert [m["id"] for m in listed] == [s["id"] for s in (s0, s1, s2, s3)]
    assert [m["type"] for m in listed] == ["full", "incremental", "differential", "incremental"]

    t2 = listed_time(repo, s2["short_id"])
    assert len(t2) == 19 and t2 == s2["time"][:19]
    specs = [
        ("v0", s0["short_id"], 1),
        ("v1", s1["id"], 2),
        ("v2", f"vm@{t2}", 2),
        ("v3", "vm:latest", 3),
        ("v3", f"vm@{listed_time(repo, s3['short_id'])}", 3),
    ]
    for i, (label, spec, chain) in enumerate(specs):
        out = tmp_path / f"restored-{i}-{label}.raw"
        r = repo.restore(spec, out)
        assert r["verified"] is True and r["chain_length"] == chain, (spec, r)
        assert_same_file(out, disk.version(label))
    # A new restore file is sparse: zero blocks and holes are not written.
    v0_restored = tmp_path / "restored-0-v0.raw"
    assert v0_restored.stat().st_blocks * 512 <= stored_data + 8192

    repo.check(read_data=True)
    # Encryption: the repository never holds the disk's plaintext; without it, it does
    # (the chunk holding the marker is incompressible, so it is stored raw).
    assert repo_contains(repo, MARKER) == (encryption == "none")


def test_ext4_image_roundtrip(repo, make_ext4, debugfs, e2fsck_clean, assert_same_file, tmp_path,
                              random_bytes):
    """A real ext4 filesystem (free space full of garbage), changed with debugfs between
    backups. Blocks a usage parser proves free may come back as zeros; everything else is
    byte-identical, and the restored filesystem is clean and holds the same files."""
    disk, files = make_ext4("fs.img", 32 * MiB, seed=5)
    disk.save("v0")
    s0 = repo.backup(disk, "fs")
    assert s0["type"] == "full"

    new_file = tmp_path / "new.bin"
    new_file.write_bytes(random_bytes(1536 * 1024, 99))
    debugfs(disk.path, f"write {new_file} /data/new.bin", write=True)
    debugfs(disk.path, "rm /data/random-2.bin", write=True)
    debugfs(disk.path, "mkdir /data/newdir", write=True)
    disk.save("v1")
    files_v1 = {k: v for k, v in files.items() if k != "data/random-2.bin"}
    files_v1["data/new.bin"] = new_file.read_bytes()
    s1 = repo.backup(disk, "fs")
    assert s1["type"] == "incremental"
    assert 1536 * 1024 <= s1["stats"]["changed_bytes"] < 8 * MiB, s1["stats"]

    for label, snap, expect_files in (("v0", s0, files), ("v1", s1, files_v1)):
        out = tmp_path / f"fs-{label}.img"
        repo.restore(snap["short_id"], out)
        src = disk.version(label)
        if snap["stats"]["used_bytes"] == snap["stats"]["logical_bytes"]:
            assert_same_file(out, src)  # nothing was skipped as unused
        else:
            # Only blocks the backup skipped as unused may differ, and they read as zeros.
            a, b = out.read_bytes(), src.read_bytes()
            assert len(a) == len(b)
            for i in range(0, len(a), BLOCK):
                if a[i:i + BLOCK] != b[i:i + BLOCK]:
                    assert a[i:i + BLOCK] == bytes(len(a[i:i + BLOCK])), f"block {i // BLOCK} differs"
        ok, report = e2fsck_clean(out)
        assert ok, report
        for rel, content in expect_files.items():
            dumped = tmp_path / "dumped"
            debugfs(out, f"dump /{rel} {dumped}")
            assert dumped.read_bytes() == content, rel
            dumped.unlink()


def test_ext4_image_without_skipping_unused_is_byte_identical(repo, make_ext4, debugfs, assert_same_file,
                                                              tmp_path):
    disk, _ = make_ext4("fs2.img", 24 * MiB, seed=9)
    disk.save("v0")
    s0 = repo.backup(disk, "fs2", "--no-skip-unused")
    assert s0["stats"]["used_bytes"] == s0["stats"]["logical_bytes"] == 24 * MiB
    debugfs(disk.path, "rm /var/log/syslog", write=True)
    debugfs(disk.path, "symlink /etc/link /etc/hostname", write=True)
    disk.save("v1")
    s1 = repo.backup(disk, "fs2", "--no-skip-unused")
    assert s1["type"] == "incremental"
    for label, snap in (("v0", s0), ("v1", s1)):
        out = tmp_path / f"fs2-{label}.img"
        repo.restore(snap["id"][:12], out)
        assert_same_file(out, disk.version(label))


def test_sparse_disk_holes_are_not_read(repo, make_disk, assert_same_file, tmp_path):
    size = 64 * MiB
    disk = make_disk("sparse.raw", size, fill="sparse")
    disk.write_random(1 * MiB, 256 * 1024, seed=1)  # blocks 16-19
    disk.write_random(20 * MiB + BLOCK, BLOCK, seed=2)  # block 321
    disk.write_random(63 * MiB, 1 * MiB, seed=3)  # blocks 1008-1023
    disk.save("v0")
    s0 = repo.backup(disk, "sparse")
    st = s0["stats"]
    assert st["read_bytes"] == 21 * BLOCK, st
    assert st["data_bytes"] == 21 * BLOCK and st["zero_bytes"] == 0, st
    assert st["new_raw_bytes"] <= 21 * BLOCK + 16 * 1024 + 4096, st
    assert repo.pack_bytes() < 21 * BLOCK + 64 * 1024

    disk.write_random(40 * MiB, 2 * BLOCK, seed=4)  # new data in a hole
    disk.punch_hole(1 * MiB, 2 * BLOCK)  # data becomes a hole
    disk.write_zeros(63 * MiB, BLOCK)  # data becomes written zeros
    disk.save("v1")
    s1 = repo.backup(disk, "sparse")
    assert s1["type"] == "incremental"
    # A scan reads the blocks that hold data (now 2 + 1 + 2 + 16), never the holes.
    assert s1["stats"]["read_bytes"] == 21 * BLOCK, s1["stats"]
    assert s1["stats"]["changed_bytes"] == 5 * BLOCK, s1["stats"]

    for label, snap in (("v0", s0), ("v1", s1)):
        out = tmp_path / f"sparse-{label}.raw"
        repo.restore(snap["short_id"], out)
        assert_same_file(out, disk.version(label))
        assert out.stat().st_blocks * 512 <= 21 * BLOCK, "a restored sparse disk stays sparse"


def test_zero_blocks_are_never_stored(repo, make_disk, assert_same_file, tmp_path):
    size = 16 * MiB
    disk = make_disk("mostly-zero.raw", size, fill="zero")
    disk.write_random(5 * MiB, 1 * MiB, seed=3)
    s = repo.backup(disk, "z")
    st = s["stats"]
    assert st["zero_bytes"] == 15 * MiB and st["read_bytes"] == size, st
    assert st["data_bytes"] == 1 * MiB, st
    assert 1 * MiB <= st["new_raw_bytes"] <= 1 * MiB + 16 * 256 + 4096, st
    assert repo.pack_bytes() < 1 * MiB + 64 * 1024

    zero = make_disk("all-zero.raw", size, fill="zero")
    before = repo.pack_bytes()
    s = repo.backup(zero, "allzero")
    assert s["stats"]["data_bytes"] == 0 and s["stats"]["zero_bytes"] == size, s["stats"]
    assert s["stats"]["new_raw_bytes"] <= 16 * 256, s["stats"]  # at most its block hash table
    assert repo.pack_bytes() - before < 8192
    out = tmp_path / "all-zero.out"
    repo.restore("allzero:latest", out)
    assert_same_file(out, zero.path)
    assert out.stat().st_blocks == 0, "an all-zero disk restores as one hole"

    # Changing every data block back to zero stores nothing new.
    disk.write_zeros(5 * MiB, 1 * MiB)
    before = repo.pack_bytes()
    s = repo.backup(disk, "z")
    assert s["stats"]["changed_bytes"] == 1 * MiB
    assert s["stats"]["new_raw_bytes"] <= 16 * 16 + 4096, s["stats"]
    assert repo.pack_bytes() - before < 8192
    out = tmp_path / "z.out"
    repo.restore("z:latest", out)
    assert_same_file(out, zero.path)


def test_unchanged_incremental_stores_nothing(repo, make_disk):
    disk = make_disk("same.raw", 8 * MiB + 4096, seed=4)
    repo.backup(disk, "same")
    s = repo.backup(disk, "same")
    assert s["type"] == "incremental"
    assert s["stats"]["changed_bytes"] == 0 and s["stats"]["new_stored_bytes"] == 0, s["stats"]
    assert s["stats"]["data_bytes"] == 0


def test_restore_over_existing_larger_file(repo, make_disk, tmp_path, random_bytes):
    """--overwrite writes the whole disk (zeros too) over an existing file at least as large."""
    disk = make_disk("ow.raw", 4 * MiB + 512, seed=8)
    disk.write_zeros(BLOCK, 3 * BLOCK)
    disk.punch_hole(10 * BLOCK, 2 * BLOCK)
    repo.backup(disk, "ow")
    target = tmp_path / "existing.raw"
    target.write_bytes(random_bytes(6 * MiB, 77))
    r = repo.restore("ow:latest", target, "--overwrite")
    assert r["verified"] is True
    got = target.read_bytes()
    assert len(got) == 6 * MiB
    assert got[:disk.size] == disk.read(), "the restored range must equal the disk"


def test_restore_verify_readback_flag(repo, make_disk, tmp_path, assert_cli_error):
    """--verify-readback reads the written target back; it contradicts --no-verify."""
    disk = make_disk("rb.raw", 3 * MiB + 4096, seed=9)
    repo.backup(disk, "rb")
    disk.write_random(MiB, BLOCK, seed=10)
    repo.backup(disk, "rb")
    r = repo.restore("rb:latest", tmp_path / "rb-out.raw", "--verify-readback")
    assert r["verified"] is True
    assert (tmp_path / "rb-out.raw").read_bytes() == disk.read()
    p = repo.run("restore", "rb:latest", tmp_path / "rb-2.raw", "--verify-readback", "--no-verify", check=False)
    assert_cli_error(p, "contradict")
    assert not (tmp_path / "rb-2.raw").exists()
    text = repo.run("restore", "rb:latest", tmp_path / "rb-3.raw", "--verify-readback").stdout
    assert "verified (read back)" in text
