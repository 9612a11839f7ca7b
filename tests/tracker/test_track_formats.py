"""The .rct and .mrt byte formats and the bitmap helpers (in-process, on real files)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vmbak.tracker.formats import (
    MRT_PAGE_BITS,
    PAGE,
    DiskIdentity,
    RctState,
    StateFileError,
    decode_rct,
    encode_mrt_header,
    encode_mrt_page,
    encode_rct,
    mrt_page_offset,
    read_mrt,
    resample,
    write_atomic,
)


def _reference_resample(bits: np.ndarray, f: int, t: int, size: int) -> np.ndarray:
    out = np.zeros((size + t - 1) // t, bool)
    for i in np.flatnonzero(bits):
        lo, hi = i * f, min((i + 1) * f, size)
        if lo < size:
            out[lo // t:(hi - 1) // t + 1] = True
    return out


@pytest.mark.parametrize("f,t", [(65536, 65536), (65536, 4096), (4096, 65536), (65536, 1 << 20), (24576, 65536),
                                 (65536, 40960)])
def test_resample_never_reports_less(f: int, t: int) -> None:
    rng = np.random.default_rng(f ^ t)
    for size in (1, 4096, 10 * 65536 + 123, 3 << 20):
        bits = rng.random((size + f - 1) // f) < 0.2
        got = resample(bits, f, t, size)
        assert np.array_equal(got, _reference_resample(bits, f, t, size)), (f, t, size)


def _ident(tmp_path) -> tuple[DiskIdentity, str]:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(3 << 20))
    fd = os.open(disk, os.O_RDONLY)
    try:
        return DiskIdentity.of(str(disk), fd), str(disk)
    finally:
        os.close(fd)


def test_rct_round_trip_and_damage(tmp_path) -> None:
    ident, _ = _ident(tmp_path)
    n = 48
    dirty = np.zeros(n, bool)
    dirty[[1, 5, 47]] = True
    hist = [{"from": "a-1-x", "to": "a-2-y", "time": "t", "bitmap": ~dirty}]
    st = RctState("a" * 32, 65536, 7, False, "a-2-y", 2, dirty, hist, pending_id="a-3-z")
    data = encode_rct(ident, st)
    back = decode_rct(data, ident)
    assert np.array_equal(back.dirty, dirty) and np.array_equal(back.history[0]["bitmap"], ~dirty)
    assert (back.committed_id, back.pending_id, back.generation, back.clean) == ("a-2-y", "a-3-z", 7, False)
    for i in range(0, len(data), 7):  # every damaged byte is noticed
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(StateFileError):
            decode_rct(bytes(bad), ident)
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(StateFileError, match="truncated|checksum"):
            decode_rct(data[:cut], ident)
    other = DiskIdentity(ident.path, ident.size, ident.dev, ident.ino + 1)
    with pytest.raises(StateFileError, match="replaced"):
        decode_rct(data, other)


@pytest.mark.parametrize("header", [b"[1, 2]", b"null", b'"x"', b'{"nblocks": [], "disk": 5}'])
def test_rct_with_a_valid_checksum_but_a_header_that_is_no_object(tmp_path, header: bytes) -> None:
    """The checksum is unkeyed: a file written by something else can pass it. A header
    of JSON that is not an object of the right fields is a one-line StateFileError (the
    tracker then starts over from a full), never an AttributeError."""
    import hashlib
    import struct

    ident, _ = _ident(tmp_path)
    body = struct.pack("<8sIIQ", b"VMBAKRCT", 1, len(header), 0) + header
    data = body + hashlib.sha256(body).digest()
    with pytest.raises(StateFileError, match="malformed header|another disk"):
        decode_rct(data, ident)


def test_mrt_header_slots_and_torn_pages(tmp_path) -> None:
    ident, _ = _ident(tmp_path)
    nreg = 3
    hdr = {**ident.header(), "tracker_id": "t", "region_size": 1 << 20, "nregions": nreg, "committed_id": None}
    bits = np.array([False, True, False])
    path = str(tmp_path / "m.mrt")
    h1 = encode_mrt_header({**hdr, "generation": 1})
    h2 = encode_mrt_header({**hdr, "generation": 2, "committed_id": "c"})
    write_atomic(path, h1 + h2 + encode_mrt_page(0, bits))
    m = read_mrt(path, ident)
    assert m.header["committed_id"] == "c" and np.array_equal(m.bits, bits) and not m.bad_pages
    with open(path, "r+b") as f:  # a torn write of the newer header: the older one is used
        f.seek(PAGE + 100)
        f.write(b"\xff" * 50)
    m = read_mrt(path, ident)
    assert m.header["generation"] == 1
    with open(path, "r+b") as f:  # a torn data page: all of its regions count as changed
        f.seek(mrt_page_offset(0) + 20)
        f.write(b"\x00\x01")
    m = read_mrt(path, ident)
    assert m.bad_pages == [0] and m.bits.all()
    os.truncate(path, 2 * PAGE)  # a truncated table: missing pages count as changed
    assert read_mrt(path, ident).bits.all()
    assert MRT_PAGE_BITS == (PAGE - 8) * 8
