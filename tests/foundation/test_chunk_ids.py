"""Issue 16: chunk ids from block hashes (repository format version 3), and the chunk ids
of version 1 and 2 repositories, which stay readable and writable.

The ids are recomputed here from docs/repository-format.md with blake3 directly, not
through vmbak's Sealer, so a change of either the code or the document fails.
"""

from __future__ import annotations

import json
import os
import struct

import blake3
import pytest

BLOCK = 64 * 1024
MiB = 1 << 20
SCHEMES = ["blake3-blocks-64k", "blake3"]


def documented_id(scheme: str, id_key: bytes, data: bytes) -> bytes:
    if scheme == "blake3":
        return blake3.blake3(data, key=id_key).digest()
    block_key = blake3.blake3(b"vmbak block hash v1", key=id_key).digest()
    hashes = b"".join(blake3.blake3(data[o:o + BLOCK], key=block_key).digest(16)
                      for o in range(0, len(data), BLOCK))
    return blake3.blake3(b"vmbak chunk id v2" + struct.pack("<Q", len(data)) + hashes, key=id_key).digest()


def mixed_disk(make_disk, name: str, size: int = 6 * MiB + 12345):
    """Random and compressible data, zero blocks, and a partial last block."""
    disk = make_disk(name, size, seed=5)
    disk.write(MiB, (b"compressible log line %d\n" * 40000)[:2 * MiB])
    disk.write_zeros(4 * MiB, BLOCK * 3)
    return disk


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ids_follow_the_documented_scheme(make_repo, make_disk, tmp_path, assert_same_file, scheme):
    repo = make_repo("aes-256-gcm", chunk_id=scheme, name=f"r-{scheme}")
    cfg = json.loads((repo.path / "config").read_text())
    assert cfg["version"] == (4 if scheme != "blake3" else 2)
    assert cfg.get("chunk_id", "blake3") == scheme
    disk = mixed_disk(make_disk, "d.img")
    repo.backup(disk, "d", "--no-skip-unused")
    disk.save("one")
    disk.write_random(2 * MiB + 4096, 3 * BLOCK, seed=9)  # an incremental, chunks not at their cell start
    repo.backup(disk, "d", "--no-skip-unused")
    # another block size: ids come from the plaintext, not from the backup's block hashes
    repo.backup(disk, "d16", "--no-skip-unused", "--block-size", "16384")
    r = repo.open()
    ids = 0
    for cid in _index_ids(r):
        data = r.read_chunk(cid)
        assert documented_id(scheme, r.sealer.id_key, data) == cid
        ids += 1
    assert ids > 8
    assert "no errors found" in repo.run("check", "--read-data").stdout
    repo.restore("d:latest", tmp_path / "r.img")
    assert_same_file(tmp_path / "r.img", disk.path)
    repo.restore("d16:latest", tmp_path / "r16.img")
    assert_same_file(tmp_path / "r16.img", disk.path)


def _index_ids(r) -> list[bytes]:  # noqa: ANN001 - a vmbak Repository
    out = []
    for f in sorted(os.listdir(os.path.join(r.backend.root, "index"))):
        for _pack, entries in r.read_index_file(f"index/{f}"):
            out.extend(entries["id"].tolist())
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_raw_stored_chunk_with_wrong_content_is_detected(make_repo, make_disk, tmp_path, assert_cli_error,
                                                           scheme):
    """Random data is stored raw (codec 0). A blob whose envelope is valid (resealed with the
    repository's own key) but whose content is not what its id says is found by check
    --read-data and stops a restore that does not verify block hashes."""
    repo = make_repo("none", chunk_id=scheme, name=f"c-{scheme}")
    disk = make_disk("rand.img", 2 * MiB, seed=11)
    snap = repo.backup(disk, "x", "--no-skip-unused")
    r = repo.open()
    m = next(m for m in r.manifests() if m.id == snap["id"])
    cid = bytes(m.ext_id[0])
    loc = r.index.get(cid)
    pack = repo.path / "data" / loc.pack[:2] / loc.pack
    blob = pack.read_bytes()[loc.offset:loc.offset + loc.length]
    payload = r.sealer.open(blob, b"vmbak-chunk:" + cid, "test")
    assert payload[0] == 0, "random data should be stored raw"
    forged = bytearray(payload)
    forged[1 + 70000] ^= 1  # one bit of the second 64 KiB block
    sealed = r.sealer.seal(bytes(forged), b"vmbak-chunk:" + cid)
    assert len(sealed) == len(blob)
    with open(pack, "r+b") as f:
        f.seek(loc.offset)
        f.write(sealed)
    out = repo.run("check", "--read-data", check=False)
    assert out.returncode != 0
    assert "does not match its id" in out.stdout + out.stderr
    assert_cli_error(repo.run("restore", "x:latest", tmp_path / "o.img", "--no-verify", check=False),
                     "does not match its id")
    assert not (tmp_path / "o.img").exists()


def test_version_2_repository_keeps_its_ids_for_incrementals(make_repo, make_disk, tmp_path, assert_same_file):
    """A repository of the earlier format takes backups by a newer vmbak without changing
    its format: identical data deduplicates against what the old ids named."""
    repo = make_repo("none", chunk_id="blake3", name="old")
    disk = mixed_disk(make_disk, "o.img")
    first = repo.backup(disk, "o", "--no-skip-unused")
    again = repo.backup(disk, "o2", "--no-skip-unused", "--changes", "full")
    assert again["stats"]["new_chunks"] <= 1, again["stats"]  # only the new block hash table
    assert first["stats"]["new_chunks"] > 4
    cfg = json.loads((repo.path / "config").read_text())
    assert cfg["version"] == 2 and "chunk_id" not in cfg
    repo.restore("o2:latest", tmp_path / "o.img")
    assert_same_file(tmp_path / "o.img", disk.path)


def test_copy_from_a_version_2_repository_into_a_version_3_one(make_repo, make_disk, tmp_path, assert_same_file):
    """copy recomputes ids when the schemes differ: the destination's chunks follow its own scheme."""
    old = make_repo("none", chunk_id="blake3", name="src-old")
    new = make_repo("aes-256-gcm", name="dst-new")
    disk = mixed_disk(make_disk, "c.img")
    old.backup(disk, "c", "--no-skip-unused")
    rep = new.json("copy", "--from-repo", old.path)
    assert len(rep["copied"]) == 1
    r = new.open()
    assert r.sealer.chunk_ids == "blake3-blocks-64k"
    for cid in _index_ids(r):
        assert documented_id("blake3-blocks-64k", r.sealer.id_key, r.read_chunk(cid)) == cid
    assert "no errors found" in new.run("check", "--read-data").stdout
    new.restore("c:latest", tmp_path / "c.img")
    assert_same_file(tmp_path / "c.img", disk.path)
