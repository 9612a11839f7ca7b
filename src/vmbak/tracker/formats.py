"""Byte layouts of the tracker's state files and bitmap helpers.

This module runs inside nbdkit's embedded interpreter as well as in ordinary vmbak
processes, so it needs only the standard library and numpy.

``.rct`` (fine bitmap, written back lazily; replaced atomically by rename)::

    0   8  magic b"VMBAKRCT"
    8   4  format version (u32 LE) = 1
    12  4  length J of the JSON header (u32 LE)
    16  8  length P of the payload (u64 LE)
    24  J  JSON header (UTF-8): identity, generation, clean flag, change IDs, section table
    ..  P  payload: zlib-compressed, little-endian packed bitmaps named by the header
    ..  32 SHA-256 of everything before it

``.mrt`` (coarse region table, written through; updated in place)::

    0     4096  header slot A  ) magic b"VMBAKMRT", u32 version, u32 JSON length, JSON,
    4096  4096  header slot B  ) zero padding, SHA-256 of the first 4064 bytes in the last 32
    8192+4096*i  data page i: u32 CRC-32 of the next 4092 bytes, u32 page index,
                 4088 bytes of region bits (little-endian bit order)

The header slots alternate (the one with the highest valid generation wins), so a torn
header write leaves the previous header readable. A data page whose CRC fails counts as
all ones: every region it covers is treated as changed (over-reporting, never missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

RCT_MAGIC = b"VMBAKRCT"
MRT_MAGIC = b"VMBAKMRT"
VERSION = 1
PAGE = 4096
MRT_HEADER_SLOTS = 2
MRT_PAGE_BITS = (PAGE - 8) * 8  # regions per data page
_RCT_FIXED = struct.Struct("<8sIIQ")
_MRT_SLOT_FIXED = struct.Struct("<8sII")
_PAGE_HEAD = struct.Struct("<II")


class StateFileError(Exception):
    """A state file is missing, truncated, corrupt, foreign or of an unknown version."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "missing", "truncated", "corrupt", "foreign", "version"


# ---------------------------------------------------------------------------- bitmaps
def pack(bits: np.ndarray) -> bytes:
    return np.packbits(np.asarray(bits, bool), bitorder="little").tobytes()


def unpack(data: bytes, count: int) -> np.ndarray:
    arr = np.frombuffer(data, np.uint8)
    if len(arr) * 8 < count:
        raise ValueError("bitmap too short")
    return np.unpackbits(arr, count=count, bitorder="little").astype(bool)


def nblocks(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def resample(bits: np.ndarray, from_bs: int, to_bs: int, size: int) -> np.ndarray:
    """Re-express a bitmap of ``from_bs`` blocks at ``to_bs`` granularity for a disk of
    ``size`` bytes. A target block is set when any source block overlapping it is set, so
    the result never reports less than the input."""
    bits = np.asarray(bits, bool)
    n_to = nblocks(size, to_bs)
    if from_bs == to_bs:
        out = np.zeros(n_to, bool)
        k = min(n_to, len(bits))
        out[:k] = bits[:k]
        return out
    if n_to == 0:
        return np.zeros(0, bool)
    big, small = max(from_bs, to_bs), min(from_bs, to_bs)
    if big % small == 0:
        k = big // small
        if to_bs > from_bs:  # coarser: OR groups of k
            padded = np.zeros(n_to * k, bool)
            m = min(len(bits), n_to * k)
            padded[:m] = bits[:m]
            return padded.reshape(n_to, k).any(axis=1)
        out = np.repeat(bits, k)  # finer: every sub-block of a set block
        res = np.zeros(n_to, bool)
        m = min(n_to, len(out))
        res[:m] = out[:m]
        return res
    # general case: prefix sums over the source bitmap
    cs = np.zeros(len(bits) + 1, np.int64)
    np.cumsum(bits, out=cs[1:])
    start = np.arange(n_to, dtype=np.int64) * to_bs
    end = np.minimum(start + to_bs, size)
    lo = np.minimum(start // from_bs, len(bits))
    hi = np.minimum((end - 1) // from_bs + 1, len(bits))
    return (cs[hi] - cs[lo]) > 0


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices and lengths of the runs of True in a bool array."""
    m = np.asarray(mask, bool)
    if not len(m):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = np.diff(np.concatenate(([False], m, [False])).astype(np.int8))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return starts, ends - starts


# ---------------------------------------------------------------------------- identity
@dataclass
class DiskIdentity:
    """What ties a state file to one disk: its path, size, inode and the tracker's id."""

    path: str
    size: int
    dev: int
    ino: int

    @classmethod
    def of(cls, path: str, fd: int) -> DiskIdentity:
        st = os.fstat(fd)
        return cls(os.path.realpath(path), st.st_size, st.st_dev, st.st_ino)

    def mismatch(self, hdr: dict) -> str | None:
        """Why a header describes another disk, or None."""
        if hdr.get("disk") != self.path:
            return f"it was made for disk {hdr.get('disk')!r}"
        if hdr.get("disk_size") != self.size:
            return f"it was made for a disk of {hdr.get('disk_size')} bytes, the disk has {self.size}"
        if hdr.get("disk_ino") != self.ino or hdr.get("disk_dev") != self.dev:
            return "the disk file was replaced since (its inode differs)"
        return None

    def header(self) -> dict:
        return {"disk": self.path, "disk_size": self.size, "disk_dev": self.dev, "disk_ino": self.ino}


# ---------------------------------------------------------------------------- .rct
@dataclass
class RctState:
    """The content of a .rct file."""

    tracker_id: str
    block_size: int
    generation: int
    clean: bool
    committed_id: str | None
    epoch: int
    dirty: np.ndarray  # blocks changed since committed_id (bool, one per block)
    history: list[dict] = field(default_factory=list)  # {"from", "to", "time", "bitmap"}
    valid: bool = True
    invalid_reason: str | None = None
    pending_id: str | None = None
    disk_mtime_ns: int | None = None
    stop_identity: dict | None = None  # vmbak.tracker.identity's record, at a clean stop
    extra: dict = field(default_factory=dict)


def encode_rct(ident: DiskIdentity, st: RctState) -> bytes:
    payload = bytearray()

    def section(bits: np.ndarray) -> list[int]:
        data = zlib.compress(pack(bits), 1)
        off = len(payload)
        payload.extend(data)
        return [off, len(data)]

    hdr = {
        **ident.header(),
        "tracker_id": st.tracker_id, "block_size": st.block_size, "generation": st.generation,
        "clean": st.clean, "committed_id": st.committed_id, "epoch": st.epoch,
        "valid": st.valid, "invalid_reason": st.invalid_reason, "pending_id": st.pending_id,
        "disk_mtime_ns": st.disk_mtime_ns, "stop_identity": st.stop_identity, "nblocks": len(st.dirty),
        "dirty": section(st.dirty),
        "history": [{"from": h["from"], "to": h["to"], "time": h["time"], "bitmap": section(h["bitmap"])}
                    for h in st.history],
        **st.extra,
    }
    js = json.dumps(hdr, sort_keys=True).encode()
    body = _RCT_FIXED.pack(RCT_MAGIC, VERSION, len(js), len(payload)) + js + bytes(payload)
    return body + hashlib.sha256(body).digest()


def decode_rct(data: bytes, ident: DiskIdentity) -> RctState:
    if len(data) < _RCT_FIXED.size + 32:
        raise StateFileError("truncated", f"is truncated ({len(data)} bytes)")
    magic, version, jlen, plen = _RCT_FIXED.unpack_from(data)
    if magic != RCT_MAGIC:
        raise StateFileError("corrupt", "is not a vmbak .rct file (bad magic)")
    if version != VERSION:
        raise StateFileError("version", f"has an unknown format version {version}")
    end = _RCT_FIXED.size + jlen + plen
    if len(data) < end + 32:
        raise StateFileError("truncated", f"is truncated ({len(data)} of {end + 32} bytes)")
    if hashlib.sha256(data[:end]).digest() != data[end:end + 32]:
        raise StateFileError("corrupt", "fails its checksum (corrupt)")
    try:
        hdr = json.loads(data[_RCT_FIXED.size:_RCT_FIXED.size + jlen])
        why = ident.mismatch(hdr)
        if why:
            raise StateFileError("foreign", f"belongs to another disk: {why}")
        payload = data[_RCT_FIXED.size + jlen:end]
        n = int(hdr["nblocks"])
        if n != nblocks(ident.size, int(hdr["block_size"])):
            raise StateFileError("corrupt", "does not match the disk geometry")

        def section(ref: list[int]) -> np.ndarray:
            off, ln = ref
            return unpack(zlib.decompress(payload[off:off + ln]), n)

        return RctState(
            tracker_id=str(hdr["tracker_id"]), block_size=int(hdr["block_size"]),
            generation=int(hdr["generation"]), clean=bool(hdr["clean"]),
            committed_id=hdr.get("committed_id"), epoch=int(hdr.get("epoch", 0)),
            dirty=section(hdr["dirty"]),
            history=[{"from": h["from"], "to": h["to"], "time": h["time"], "bitmap": section(h["bitmap"])}
                     for h in hdr.get("history", [])],
            valid=bool(hdr.get("valid", True)), invalid_reason=hdr.get("invalid_reason"),
            pending_id=hdr.get("pending_id"), disk_mtime_ns=hdr.get("disk_mtime_ns"),
            stop_identity=hdr.get("stop_identity"),
        )
    except StateFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as e:  # AttributeError: not an object
        raise StateFileError("corrupt", f"has a malformed header ({e})") from None


def read_rct(path: str, ident: DiskIdentity) -> RctState:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StateFileError("missing", "does not exist") from None
    except OSError as e:
        raise StateFileError("corrupt", f"cannot be read ({e.strerror})") from None
    return decode_rct(data, ident)


def write_atomic(path: str, data: bytes) -> None:
    """Write a file through a temporary name, fsync it, rename it over ``path``, fsync the directory."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------- .mrt
def mrt_pages(nregions: int) -> int:
    return max(1, (nregions + MRT_PAGE_BITS - 1) // MRT_PAGE_BITS)


def encode_mrt_header(hdr: dict) -> bytes:
    js = json.dumps(hdr, sort_keys=True).encode()
    body = _MRT_SLOT_FIXED.pack(MRT_MAGIC, VERSION, len(js)) + js
    if len(body) > PAGE - 32:
        raise ValueError("MRT header too large")
    body = body + bytes(PAGE - 32 - len(body))
    return body + hashlib.sha256(body).digest()


def decode_mrt_header(slot: bytes) -> dict | None:
    if len(slot) < PAGE:
        return None
    body = slot[:PAGE - 32]
    if hashlib.sha256(body).digest() != slot[PAGE - 32:PAGE]:
        return None
    magic, version, jlen = _MRT_SLOT_FIXED.unpack_from(body)
    if magic != MRT_MAGIC or version != VERSION:
        return None
    try:
        hdr = json.loads(body[_MRT_SLOT_FIXED.size:_MRT_SLOT_FIXED.size + jlen])
    except ValueError:
        return None
    return hdr if isinstance(hdr, dict) else None


def encode_mrt_page(index: int, bits: np.ndarray) -> bytes:
    """One data page holding up to MRT_PAGE_BITS region bits."""
    raw = pack(bits)
    raw = raw + bytes(PAGE - 8 - len(raw))
    rest = struct.pack("<I", index) + raw
    return struct.pack("<I", zlib.crc32(rest)) + rest


def mrt_page_offset(index: int) -> int:
    return PAGE * (MRT_HEADER_SLOTS + index)


@dataclass
class MrtContent:
    header: dict
    slot: int
    bits: np.ndarray  # one per region of header["region_size"]
    bad_pages: list[int]


def read_mrt(path: str, ident: DiskIdentity) -> MrtContent:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StateFileError("missing", "does not exist") from None
    except OSError as e:
        raise StateFileError("corrupt", f"cannot be read ({e.strerror})") from None
    if len(data) < PAGE:
        raise StateFileError("truncated", f"is truncated ({len(data)} bytes)")
    best: tuple[int, int, dict] | None = None
    seen_magic = False
    for slot in range(MRT_HEADER_SLOTS):
        raw = data[slot * PAGE:(slot + 1) * PAGE]
        seen_magic = seen_magic or raw[:8] == MRT_MAGIC
        hdr = decode_mrt_header(raw)
        if hdr is not None and (best is None or int(hdr.get("generation", 0)) > best[0]):
            best = (int(hdr.get("generation", 0)), slot, hdr)
    if best is None:
        if not seen_magic:
            raise StateFileError("corrupt", "is not a vmbak .mrt file (bad magic)")
        raise StateFileError("corrupt", "has two headers that fail their checksum (corrupt)")
    _, slot, hdr = best
    why = ident.mismatch(hdr)
    if why:
        raise StateFileError("foreign", f"belongs to another disk: {why}")
    try:
        region = int(hdr["region_size"])
        nreg = int(hdr["nregions"])
        if region <= 0 or nreg != nblocks(ident.size, region):
            raise StateFileError("corrupt", "does not match the disk geometry")
    except (KeyError, TypeError, ValueError):
        raise StateFileError("corrupt", "has a malformed header") from None
    bits = np.zeros(nreg, bool)
    bad: list[int] = []
    for i in range(mrt_pages(nreg)):
        lo, hi = i * MRT_PAGE_BITS, min(nreg, (i + 1) * MRT_PAGE_BITS)
        off = mrt_page_offset(i)
        page = data[off:off + PAGE]
        ok = len(page) == PAGE
        if ok:
            crc, idx = _PAGE_HEAD.unpack_from(page)
            ok = idx == i and zlib.crc32(page[4:]) == crc
        if not ok:
            bad.append(i)
            bits[lo:hi] = True
            continue
        bits[lo:hi] = unpack(page[8:], hi - lo)
    return MrtContent(hdr, slot, bits, bad)
