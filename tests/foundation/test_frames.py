"""Issue 16: chunks compressed in frames (codec 2, repository format version 4), so that a
restore decodes only the blocks it takes from a chunk that newer snapshots partly replaced.
"""

from __future__ import annotations

import functools
import json
import os
import struct

import numpy as np
import pytest
import zstandard

from vmbak.errors import IntegrityError
from vmbak.repo import zstd
from vmbak.repo.index import Location
from vmbak.repo.pack import CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_FRAMES, PackWriter, chunk_aad
from vmbak.repo.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
FRAME = zstd.FRAME_SIZE


def _text(n: int, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    words = [b"backup", b"block", b"chunk", b"disk", b"error", b"info", b"pack", b"user=", b"ok\n"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(words[i] for i in rng.integers(0, len(words), 8)) + b"\n"
    return bytes(out[:n])


def _repo(tmp_path, encryption: str = "aes-256-gcm", **kw) -> Repository:  # noqa: ANN001
    pw = "pw" if encryption != "none" else None
    Repository.init(str(tmp_path / "r"), pw, encryption=encryption, **kw)
    return Repository.open(str(tmp_path / "r"), pw)


def _store(repo: Repository, blobs: list[tuple[bytes, bytes | memoryview, int]]) -> dict[bytes, Location]:
    pw = PackWriter(repo.backend, repo.sealer)
    offs = [pw.add(cid, blob, raw) for cid, blob, raw in blobs]  # type: ignore[arg-type]
    pack = pw.finish()
    return {cid: Location(pack.pack_id, off, len(blob), raw) for (cid, blob, raw), off in zip(blobs, offs, strict=True)}


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_a_chunk_longer_than_a_frame_is_stored_in_frames_and_read_back(tmp_path, encryption):
    repo = _repo(tmp_path, encryption)
    assert json.loads((tmp_path / "r" / "config").read_text())["version"] == 4 and repo.frames
    data = _text(MiB - 3 * 4096 + 17)  # a last frame shorter than the others
    cid = repo.sealer.chunk_id(data)
    blob, codec = repo.encode_chunk_codec(cid, data)
    assert codec == CODEC_ZSTD_FRAMES
    payload = repo.sealer.open(bytes(blob), chunk_aad(cid), "t")
    assert payload[0] == CODEC_ZSTD_FRAMES
    # the documented body: frame size, count, the frames' lengths, the frames
    size, count = struct.unpack_from("<II", payload, 1)
    assert size == FRAME and count == -(-len(data) // FRAME) == 16
    lens = struct.unpack_from(f"<{count}I", payload, 9)
    pos = 9 + 4 * count
    assert pos + sum(lens) == len(payload)
    d = zstandard.ZstdDecompressor()
    plain = b""
    for n in lens:
        plain += d.decompress(payload[pos:pos + n])
        pos += n
    assert plain == data
    assert repo.decode_chunk(cid, bytes(blob), len(data)) == data
    locs = _store(repo, [(cid, blob, len(data))])
    out = memoryview(bytearray(MiB))
    assert repo.read_into(cid, locs[cid], out) == len(data) and out[:len(data)] == data


def test_read_into_decodes_only_the_frames_of_the_ranges_asked_for(tmp_path):
    repo = _repo(tmp_path)
    data = _text(MiB, 2)
    rnd = os.urandom(MiB)
    cid, rid = repo.sealer.chunk_id(data), repo.sealer.chunk_id(rnd)
    blob, codec = repo.encode_chunk_codec(cid, data)
    rblob, rcodec = repo.encode_chunk_codec(rid, rnd)
    assert (codec, rcodec) == (CODEC_ZSTD_FRAMES, CODEC_RAW)
    locs = _store(repo, [(cid, blob, MiB), (rid, rblob, MiB)])
    ranges = [(FRAME + 100, FRAME + 101), (5 * FRAME, 7 * FRAME), (MiB - 1, MiB + 4096)]
    frames = {1, 5, 6, 15}
    for c, src in ((cid, data), (rid, rnd)):
        out = memoryview(bytearray(b"\xaa" * MiB))
        repo.read_into(c, locs[c], out, check_id=False, ranges=ranges)
        for i in range(16):
            part = out[i * FRAME:(i + 1) * FRAME]
            if c == cid and i in frames:  # decoded whole
                assert part == src[i * FRAME:(i + 1) * FRAME], i
            elif c == rid and i in frames:  # raw: copied exactly where asked
                assert all(part[j - i * FRAME] == src[j] for lo, hi in ranges
                           for j in range(max(lo, i * FRAME), min(hi, MiB, (i + 1) * FRAME)))
            if i not in frames:  # never touched
                assert part == b"\xaa" * FRAME, i
    with pytest.raises(ValueError):
        repo.read_into(cid, locs[cid], memoryview(bytearray(MiB)), ranges=ranges)  # an id needs all of it


def test_older_repositories_are_written_without_frames(tmp_path):
    repo = _repo(tmp_path, chunk_ids="blake3")  # version 2: its readers know codecs 0 and 1
    assert json.loads((tmp_path / "r" / "config").read_text())["version"] == 2 and not repo.frames
    data = _text(MiB)
    _, codec = repo.encode_chunk_codec(repo.sealer.chunk_id(data), data)
    assert codec == CODEC_ZSTD


def _frames_body(frames: list[bytes], size: int = FRAME, count: int | None = None,
                 lens: list[int] | None = None) -> bytes:
    lens = [len(f) for f in frames] if lens is None else lens
    n = len(frames) if count is None else count
    return struct.pack("<II", size, n) + struct.pack(f"<{len(lens)}I", *lens) + b"".join(frames)


@functools.cache
def _bad_bodies() -> dict[str, tuple[bytes, int]]:
    """Codec-2 bodies that do not describe a chunk of the given length."""
    c = zstandard.ZstdCompressor(level=1)
    good = [c.compress(_text(FRAME, i)) for i in range(4)]
    raw = 4 * FRAME
    return {
        "truncated head": (b"\x00\x00\x01", raw),
        "frame size below 4 KiB": (_frames_body([c.compress(b"x" * 1024)] * 256, size=1024), 256 * 1024),
        "count does not fit the length": (_frames_body(good[:3]), raw),
        "count of zero": (_frames_body([], count=0), 0),
        "table past the end": (struct.pack("<II", FRAME, 4) + b"\x01\x00", raw),
        "lengths do not add up": (_frames_body(good, lens=[len(good[0]) + 1, *map(len, good[1:])]), raw),
        "a frame of length zero": (_frames_body(good, lens=[0, len(good[0]) + len(good[1]), *map(len, good[2:])]),
                                   raw),
        "a short frame": (_frames_body([*good[:3], c.compress(b"y" * 100)]), raw),
        "a long frame": (_frames_body([*good[:3], c.compress(b"y" * (FRAME + 1))]), raw),
        "a long frame without its size": (
            _frames_body([*good[:3], zstandard.ZstdCompressor(level=1, write_content_size=False).compress(
                b"y" * (FRAME + 1))]), raw),
        "garbage in a frame": (_frames_body([*good[:3], b"\x28\xb5\x2f\xfd" + b"\xff" * 40]), raw),
        "a bomb": (_frames_body([*good[:3], c.compress(bytes(256 * MiB))]), raw),
    }


@pytest.mark.parametrize("case", list(_bad_bodies()))
def test_a_damaged_or_hostile_frame_table_is_refused_in_one_line(tmp_path, case):
    from vmbak.engine.check import _verify_chunk

    repo = _repo(tmp_path)
    body, raw = _bad_bodies()[case]
    cid = os.urandom(32)
    blob = repo.sealer.seal_payload(CODEC_ZSTD_FRAMES, body, chunk_aad(cid))
    locs = _store(repo, [(cid, blob, raw)])
    label = f"chunk {cid.hex()[:16]}"
    calls = [lambda: repo.decode_chunk(cid, bytes(blob), raw, check_id=False),
             lambda: repo.read_into(cid, locs[cid], memoryview(bytearray(max(raw, 1))), check_id=False),
             lambda: repo.read_into(cid, locs[cid], memoryview(bytearray(max(raw, 1))), check_id=False,
                                    ranges=[(0, raw)]),
             lambda: _verify_chunk(repo, cid, memoryview(bytes(blob)), raw, label)]
    for call in calls:
        with pytest.raises(IntegrityError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(label) and "\n" not in msg, msg


def _codecs(r: Repository) -> set[int]:
    out = set()
    for cid, loc in r.index.items():
        blob = r.backend.read_range(f"data/{loc.pack[:2]}/{loc.pack}", loc.offset, loc.length)
        out.add(r.sealer.open(blob, chunk_aad(cid), "t")[0])
    return out


def test_copy_into_an_older_repository_compresses_without_frames(make_repo, make_disk, tmp_path, assert_same_file):
    """A version-2 or -3 vmbak cannot read codec 2: copy stores such chunks again as one
    frame when the destination is older than version 4."""
    new = make_repo("none", name="src-new")
    old = make_repo("none", chunk_id="blake3", name="dst-old")
    disk = make_disk("c.img", 6 * MiB, seed=4)
    disk.write(MiB, _text(3 * MiB))
    new.backup(disk, "c", "--no-skip-unused")
    assert CODEC_ZSTD_FRAMES in _codecs(new.open())
    assert len(old.json("copy", "--from-repo", new.path)["copied"]) == 1
    assert _codecs(old.open()) == {CODEC_RAW, CODEC_ZSTD}
    assert "no errors found" in old.run("check", "--read-data").stdout
    old.restore("c:latest", tmp_path / "c.img")
    assert_same_file(tmp_path / "c.img", disk.path)


def test_read_into_decrypts_a_raw_chunk_in_place_and_puts_back_the_byte_before(tmp_path):
    """With ``at`` (a restore's place in its stretch buffer), a chunk stored raw is
    decrypted straight into place, its codec byte borrowing the byte before; that byte is
    put back whatever happens, and a payload of another codec that happens to have the raw
    size is decoded as usual."""
    repo = _repo(tmp_path)
    rnd, txt = os.urandom(MiB), _text(MiB, 3)
    rid, tid = repo.sealer.chunk_id(rnd), repo.sealer.chunk_id(txt)
    rblob, rcodec = repo.encode_chunk_codec(rid, rnd)
    tblob, _ = repo.encode_chunk_codec(tid, txt)
    assert rcodec == CODEC_RAW and len(rblob) == repo.sealer.overhead + 1 + MiB
    # codec 1, padded with a skippable frame to the size of a raw payload
    small = _text(100 * KiB, 4)
    sid = repo.sealer.chunk_id(small)
    frame = zstandard.ZstdCompressor(level=1).compress(small)
    pad = len(small) - len(frame) - 8
    skip = struct.pack("<II", 0x184D2A50, pad) + bytes(pad)
    padded = repo.sealer.seal_payload(CODEC_ZSTD, frame + skip, chunk_aad(sid))
    assert len(padded) == repo.sealer.overhead + 1 + len(small)
    bad = bytearray(rblob)
    bad[100] ^= 1
    bid = os.urandom(32)
    locs = _store(repo, [(rid, rblob, MiB), (tid, tblob, MiB), (sid, padded, len(small)), (bid, bytes(bad), MiB)])
    for cid, want in ((rid, rnd), (tid, txt), (sid, small)):
        for check_id in (True, False):
            out = memoryview(bytearray(b"\x5a" * (2 * MiB)))
            assert repo.read_into(cid, locs[cid], out, check_id=check_id, at=4097) == len(want)
            assert out[4097:4097 + len(want)] == want
            assert out[:4097] == b"\x5a" * 4097 and out[4097 + len(want):] == b"\x5a" * (2 * MiB - 4097 - len(want))
    out = memoryview(bytearray(b"\x5a" * (2 * MiB)))
    with pytest.raises(IntegrityError, match="authentication failed"):
        repo.read_into(bid, locs[bid], out, check_id=False, at=1)
    assert out[0] == 0x5A


@pytest.mark.parametrize("scheme", ["blake3-blocks-64k", "blake3"])
def test_check_verifies_a_chunk_in_frames_against_its_id(tmp_path, scheme):
    """check --read-data hashes each 64 KiB frame as it is decoded (the blocks scheme); a
    chunk whose frames decode but hold other data than its id says is found."""
    from vmbak.engine.check import _verify_chunk

    repo = _repo(tmp_path, chunk_ids=scheme)
    repo.frames = True  # a version-2 repository's writers never use frames; its readers accept them
    data = _text(MiB - 5000, 6)
    cid = repo.sealer.chunk_id(data)
    blob, codec = repo.encode_chunk_codec(cid, data)
    assert codec == CODEC_ZSTD_FRAMES
    _verify_chunk(repo, cid, memoryview(bytes(blob)), len(data), "c")
    other = data[:-1] + b"!"
    wrong = repo.sealer.seal_payload(CODEC_ZSTD_FRAMES, zstd.compress_frames(zstandard.ZstdCompressor(), other),
                                     chunk_aad(cid))
    with pytest.raises(IntegrityError, match="^c: content does not match its id"):
        _verify_chunk(repo, cid, memoryview(bytes(wrong)), len(data), "c")
