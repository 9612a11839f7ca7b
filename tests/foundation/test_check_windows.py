"""check --read-data reads a local pack in windows of a few MiB (engine/check.py, _WINDOW):
every byte of the pack still goes into its name's hash (gaps between blobs, the header,
the trailer), every blob is still verified, whatever the header's layout: a header
longer than the 64 KiB read first, blobs larger than a window, and a hostile header
whose entries overlap."""

from __future__ import annotations

import os

import pytest

from tests.conftest import flip_byte
from vmbak.repo.pack import PackWriter, chunk_aad

MiB = 1 << 20
PAD = 3 * MiB  # longer than a window: a gap that needs a window of its own


@pytest.fixture
def rewritten(make_repo, make_disk):
    """A repository whose backup's chunks were rewritten into one pack, with 3 MiB of
    padding before each blob and 1,500 entries of one small chunk after them (a header of
    72 KiB); the index is dropped, so the header is what names the chunks. Returns the
    repository, the pack file, and where each padding and each big blob lies."""
    repo = make_repo("aes-256-gcm")
    disk = make_disk("w.raw", 4 * MiB, seed=7)
    repo.backup(disk, "w")
    lib = repo.open()
    blobs = repo.take_blobs(lib)
    small = b"a small chunk"
    sid = lib.sealer.chunk_id(small)
    sblob = lib.encode_chunk(sid, small)
    pw = PackWriter(lib.backend, lib.sealer)
    pads, places = [], []
    for c, blob, raw in blobs:
        pads.append(pw.offset)
        pw.pad(os.urandom(PAD))
        places.append(pw.add(c, blob, raw))
    for _ in range(1500):
        pw.add(sid, sblob, len(small))
    pack = pw.finish()
    path = repo.path / "data" / pack.pack_id[:2] / pack.pack_id
    assert path.stat().st_size > 4 * PAD and len(pack.entries) == len(blobs) + 1500
    return repo, path, pads, places


def test_a_sound_pack_passes_whatever_its_layout(rewritten):
    repo, path, _, _ = rewritten
    rep = repo.check()
    assert rep["errors"] == [] and rep["bytes_read"] == path.stat().st_size


def test_a_flipped_byte_in_a_gap_is_found_by_the_packs_name(rewritten):
    repo, path, pads, _ = rewritten
    flip_byte(path, pads[-1] + PAD - 5)  # in the padding just before the last big blob
    rep = repo.check(ok=False)
    pid = path.name
    assert rep["errors"] == [f"pack {pid[:16]}: content does not match its name (corrupt)"], rep["errors"]


def test_a_flipped_byte_in_a_blob_or_the_header_is_found(rewritten):
    repo, path, _, places = rewritten
    flip_byte(path, places[1] + 100)
    rep = repo.check(ok=False)
    assert any("authentication failed" in e for e in rep["errors"]), rep["errors"]
    assert any("does not match its name" in e for e in rep["errors"]), rep["errors"]
    flip_byte(path, places[1] + 100)  # back
    assert repo.check()["errors"] == []
    flip_byte(path, path.stat().st_size - 40 * 1024)  # inside the 72 KiB header, before its last 64 KiB
    rep = repo.check(ok=False)
    assert any("header" in e and "authentication failed" in e for e in rep["errors"]), rep["errors"]


def test_a_header_whose_entries_overlap_is_read_whole_and_each_entry_checked(make_repo, make_disk):
    """A hostile header: a second entry, under another chunk id, covers the first
    entry's blob but its last 1,000 bytes. The first verifies; the second fails
    authentication; the pack's name still matches its bytes."""
    repo = make_repo("aes-256-gcm")
    lib = repo.open()
    data = os.urandom(200_000)
    cid = lib.sealer.chunk_id(data)
    blob = lib.encode_chunk(cid, data)
    other = os.urandom(32)
    pw = PackWriter(lib.backend, lib.sealer)
    pw.add(cid, blob, len(data))
    pw.add(other, blob, len(data))
    pw.offs[1] = pw.offs[0]  # the first blob, 1,000 bytes short
    pw.lens[1] = len(blob) - 1000
    pack = pw.finish()
    assert lib.sealer.open(blob, chunk_aad(cid), "t")  # the first entry is sound
    rep = repo.check(ok=False)
    pid = pack.pack_id
    assert rep["errors"] == [f"pack {pid[:16]}: chunk {other.hex()[:16]}: authentication failed "
                             "(corrupt or tampered data)"], rep["errors"]


def test_a_header_offset_that_wraps_around_is_refused(make_repo):
    """An entry at offset 2**64 - 10 with 20 bytes ends, in 64-bit arithmetic, at 10:
    inside the data. The header is refused as a whole, like any entry past the data."""
    repo = make_repo("aes-256-gcm")
    lib = repo.open()
    data = os.urandom(5000)
    cid = lib.sealer.chunk_id(data)
    pw = PackWriter(lib.backend, lib.sealer)
    pw.add(cid, lib.encode_chunk(cid, data), len(data))
    pw.offs[0] = (1 << 64) - 10
    pw.lens[0] = 20
    pack = pw.finish()
    rep = repo.check(ok=False)
    assert f"pack {pack.pack_id[:16]}: header points past the data" in rep["errors"], rep["errors"]
