"""The disk's identity at a clean stop, and the proof at start that nobody wrote it since.

The tracker sees only the writes that pass through it. While it is stopped, anything may
write the disk file, so at a clean stop it records an identity of the disk and at the next
start it must *prove* the disk untouched before it trusts its bitmaps. Anything it cannot
prove makes the tracking invalid: the next backup scans, and says why.

The record (a JSON object, ``stop_identity`` in the headers of the ``.rct`` and ``.mrt``;
docs/tracker.md describes it for readers)::

    {"version": 1, "kind": "file" | "block", "size": N, "dev": N, "ino": N, "rdev": N,
     "mtime_ns": N | null, "ctime_ns": N | null, "taken_at_ns": N,
     "hash": {"kind": "full", "algorithm": "sha256", "chunk": 1048576, "digest": HEX,
              "data_bytes": N}
           | {"kind": "sample", "algorithm": "sha256", "chunk": 65536, "offsets": [N, ...],
              "digest": HEX}}

What proves the disk untouched (``verify``):

* the full content hash matches: proof, whatever the times say;
* else (the disk had more data than the hash limit, so only a sample was hashed): a
  regular file whose sample, modification time and change time (ctime, which no tool can
  set back) are all unchanged. The stop waits until the clock has moved past the disk's
  timestamps, so any later write gives a different time;
* a block device has no usable times: without a full hash nothing proves it untouched.

A sample can prove that the disk changed, never that it did not.

Only the standard library is used: this runs in nbdkit's embedded Python too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import struct
import time
from dataclasses import dataclass

VERSION = 1
FULL_CHUNK = 1 << 20
SAMPLE_CHUNK = 64 << 10
SAMPLE_COUNT = 64
DEFAULT_HASH_LIMIT = 256 << 20  # bytes of data (holes are free) hashed in full at a stop
_ENTRY = struct.Struct("<QI")
_ZERO = bytes(FULL_CHUNK)
_CLOCK_REALTIME_COARSE = 5  # Linux; what the kernel stamps files with (unless fine-grained)


@dataclass
class Verdict:
    """Whether the disk was proven untouched since the identity was taken, and why (not)."""

    proven: bool
    reason: str  # one line: how it was proven, or why it could not be


def _kind(st: os.stat_result) -> str:
    return "block" if stat.S_ISBLK(st.st_mode) else "file"


def _size(fd: int, st: os.stat_result) -> int:
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def _pread(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


def data_chunks(fd: int, size: int, chunk: int) -> list[int]:
    """Indices of the ``chunk``-sized pieces of [0, size) that may hold data (SEEK_DATA)."""
    out: list[int] = []
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            return list(range((size + chunk - 1) // chunk))  # no SEEK_DATA: everything
        if d >= size:
            break
        try:
            h = min(os.lseek(fd, d, os.SEEK_HOLE), size)
        except OSError:
            h = size
        first, last = d // chunk, (h - 1) // chunk
        if out and out[-1] >= first:
            first = out[-1] + 1
        out.extend(range(first, last + 1))
        pos = max(h, d + 1)
    return out


def full_hash(fd: int, size: int, chunk: int = FULL_CHUNK) -> tuple[str, int]:
    """A hash of the disk's logical content, and the bytes read for it.

    For every ``chunk``-sized piece i (the last one may be shorter) that is not all zeros,
    in ascending order: u64 LE i, u32 LE the piece's length, SHA-256 of the piece; the
    digest is the SHA-256 of that sequence. Holes are all zeros and are not read, so the
    cost follows the data, and a hole and written zeros hash alike."""
    outer = hashlib.sha256()
    read = 0
    zero = _ZERO if chunk == FULL_CHUNK else bytes(chunk)
    for i in data_chunks(fd, size, chunk):
        off = i * chunk
        n = min(chunk, size - off)
        buf = _pread(fd, n, off)
        read += len(buf)
        if len(buf) < n:
            buf += bytes(n - len(buf))
        if buf == (zero if n == chunk else bytes(n)):
            continue
        outer.update(_ENTRY.pack(i, n))
        outer.update(hashlib.sha256(buf).digest())
    return outer.hexdigest(), read


def sample_offsets(size: int, chunk: int = SAMPLE_CHUNK, count: int = SAMPLE_COUNT) -> list[int]:
    """The first and last chunk and random others (chosen anew at every stop)."""
    n = (size + chunk - 1) // chunk
    if n <= count:
        return [i * chunk for i in range(n)]
    picked = {0, n - 1}
    while len(picked) < count:
        picked.add(secrets.randbelow(n))
    return [i * chunk for i in sorted(picked)]


def sample_hash(fd: int, size: int, offsets: list[int], chunk: int = SAMPLE_CHUNK) -> str:
    """SHA-256 over (u64 LE offset, u32 LE length, SHA-256 of the bytes) of each sampled chunk."""
    outer = hashlib.sha256()
    for off in offsets:
        n = max(0, min(chunk, size - off))
        buf = _pread(fd, n, off)
        buf += bytes(n - len(buf))
        outer.update(_ENTRY.pack(off, n))
        outer.update(hashlib.sha256(buf).digest())
    return outer.hexdigest()


def allocated_bytes(fd: int, size: int) -> int:
    return len(data_chunks(fd, size, FULL_CHUNK)) * FULL_CHUNK


def _granularity(ns: int) -> int:
    """The coarsest timestamp granularity ``ns`` is consistent with (1 ns up to 2 s)."""
    if ns % 1_000_000_000 == 0:
        return 2_000_000_000  # 1 s (ext4 with small inodes) or 2 s (FAT)
    g = 1
    while g < 100_000_000 and ns % (g * 10) == 0:
        g *= 10
    return g


def _coarse_now() -> int:
    try:
        return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
    except OSError:
        return time.time_ns() - 20_000_000  # a tick behind, at worst


def settle(fd: int, limit: float = 3.0) -> None:
    """Wait until the clock the kernel stamps files with has moved past the disk's times (at
    the file system's granularity), so that any later write changes them."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return
    stamp = max(st.st_mtime_ns, st.st_ctime_ns)
    target = stamp + max(_granularity(st.st_mtime_ns), _granularity(st.st_ctime_ns))
    end = time.monotonic() + limit
    while _coarse_now() < target and time.monotonic() < end:
        time.sleep(min(0.005, max(0.0, (target - _coarse_now()) / 1e9)))


def take(fd: int, hash_limit: int = DEFAULT_HASH_LIMIT) -> dict:
    """The identity of the disk open on ``fd``, after its last write (call ``settle`` first).

    The whole content is hashed when its data (holes excluded) is at most ``hash_limit``
    bytes, else a sample."""
    st = os.fstat(fd)
    kind = _kind(st)
    size = _size(fd, st)
    rec: dict = {
        "version": VERSION, "kind": kind, "size": size, "dev": st.st_dev, "ino": st.st_ino,
        "rdev": st.st_rdev,
        "mtime_ns": st.st_mtime_ns if kind == "file" else None,
        "ctime_ns": st.st_ctime_ns if kind == "file" else None,
        "taken_at_ns": time.time_ns(),
    }
    data = allocated_bytes(fd, size) if kind == "file" else size
    if data <= hash_limit:
        digest, read = full_hash(fd, size)
        rec["hash"] = {"kind": "full", "algorithm": "sha256", "chunk": FULL_CHUNK, "digest": digest,
                       "data_bytes": read}
    else:
        offs = sample_offsets(size)
        rec["hash"] = {"kind": "sample", "algorithm": "sha256", "chunk": SAMPLE_CHUNK, "offsets": offs,
                       "digest": sample_hash(fd, size, offs)}
    return rec


WRITTEN = "the disk was written while the tracker was stopped"
UNPROVEN = "the disk may have been written while the tracker was stopped"


def verify(rec: object, fd: int) -> Verdict:
    """Compare the identity taken at the clean stop with the disk open on ``fd`` now."""
    if not isinstance(rec, dict) or rec.get("version") != VERSION:
        return Verdict(False, f"{UNPROVEN}: the clean stop recorded no disk identity this vmbak can check")
    st = os.fstat(fd)
    kind = _kind(st)
    size = _size(fd, st)
    try:
        if rec["kind"] != kind:
            return Verdict(False, f"{WRITTEN}: it was a {rec['kind']} and is now a {kind}")
        if rec["size"] != size:
            return Verdict(False, f"{WRITTEN}: its size changed from {rec['size']} to {size} bytes")
        if (rec["dev"], rec["ino"], rec["rdev"]) != (st.st_dev, st.st_ino, st.st_rdev):
            return Verdict(False, f"{WRITTEN}: the disk was replaced (another inode or device)")
        h = rec["hash"]
        if h.get("algorithm") != "sha256":
            return Verdict(False, f"{UNPROVEN}: unknown hash algorithm {h.get('algorithm')!r}")
        if h["kind"] == "full":
            digest, _ = full_hash(fd, size, int(h["chunk"]))
            if digest != h["digest"]:
                return Verdict(False, f"{WRITTEN}: its content hash differs from the one taken at the "
                                      "clean stop")
            return Verdict(True, "the disk's content hash matches the one taken at the clean stop")
        if h["kind"] != "sample":
            return Verdict(False, f"{UNPROVEN}: unknown hash kind {h['kind']!r}")
        if sample_hash(fd, size, [int(o) for o in h["offsets"]], int(h["chunk"])) != h["digest"]:
            return Verdict(False, f"{WRITTEN}: sampled blocks differ from the ones hashed at the clean stop")
        if kind != "file":
            return Verdict(False, f"{UNPROVEN}: a block device has no modification time, and the disk "
                                  "was too large to hash in full, so a matching sample proves nothing "
                                  "(see --identity-hash-limit)")
        if rec["mtime_ns"] != st.st_mtime_ns:
            return Verdict(False, f"{WRITTEN}: its modification time changed since the clean stop")
        if rec["ctime_ns"] != st.st_ctime_ns:
            return Verdict(False, f"{UNPROVEN}: its change time (ctime) changed since the clean stop (a "
                                  "write, or a chmod, chown, rename or xattr change; without a full content "
                                  "hash the tracker cannot tell them apart)")
    except (KeyError, TypeError, ValueError) as e:
        return Verdict(False, f"{UNPROVEN}: the recorded disk identity is malformed ({e})")
    return Verdict(True, "the disk's size, inode, times and sampled blocks are unchanged since the clean stop")
