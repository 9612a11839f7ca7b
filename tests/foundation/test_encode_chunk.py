"""Issue 16: how a backup encodes chunks. A chunk whose samples do not compress is stored
raw without compressing the rest of it; the envelope is built in one buffer
(Sealer.seal_payload) and is exactly what Sealer.seal gives; and glibc keeps freed memory
for reuse while a backup runs (engine/alloc.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MiB = 1 << 20


def _text(n: int, seed: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [b"backup", b"block", b"chunk", b"disk", b"error", b"info", b"pack", b"user=", b"ok\n"]
    out = bytearray()
    while len(out) < n:
        out += b"2026-12-03 07:%02d:%02d " % tuple(rng.integers(0, 60, 2))
        out += b" ".join(words[i] for i in rng.integers(0, len(words), 8)) + b"\n"
    return bytes(out[:n])


def _open(tmp_path, encryption: str):  # noqa: ANN001, ANN202
    from vmbak.repo.repository import Repository

    Repository.init(str(tmp_path / encryption), "pw" if encryption != "none" else None, encryption=encryption)
    return Repository.open(str(tmp_path / encryption), "pw" if encryption != "none" else None)


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_seal_payload_is_the_documented_envelope(tmp_path, encryption):
    r = _open(tmp_path, encryption)
    body = os.urandom(MiB + 3)
    for codec in (0, 1):
        out = r.sealer.seal_payload(codec, memoryview(body), b"vmbak-chunk:x")
        assert bytes(r.sealer.open(bytes(out), b"vmbak-chunk:x", "t")) == bytes((codec,)) + body
        if encryption == "none":  # deterministic: byte for byte what seal() gives
            assert bytes(out) == r.sealer.seal(bytes((codec,)) + body, b"vmbak-chunk:x")
        else:
            assert len(out) == 1 + 12 + 1 + len(body) + 16 and out[0] == 1
    small = r.sealer.seal_payload(1, b"abc", b"a")  # the per-thread buffer is only ever too large
    assert bytes(r.sealer.open(bytes(small), b"a", "t")) == b"\x01abc"


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_probe_stores_random_raw_and_compresses_the_rest(tmp_path, encryption):
    from vmbak.repo.repository import PROBE_MIN, PROBE_PIECE, PROBE_SAMPLES, incompressible

    r = _open(tmp_path, encryption)
    rnd, txt = os.urandom(MiB), _text(MiB, 1)
    # random except one eighth of text that covers one sample: compressible, and compressed
    step = MiB // PROBE_SAMPLES
    mixed = rnd[:3 * step] + txt[:step] + rnd[4 * step:]
    # random except text between the samples (what the probe cannot see): stored raw
    hidden = bytearray(rnd)
    for i in range(PROBE_SAMPLES):
        hidden[i * step + PROBE_PIECE:(i + 1) * step] = txt[i * step + PROBE_PIECE:(i + 1) * step]
    small = os.urandom(PROBE_MIN - 1)
    assert incompressible(rnd, r.zstd_level) and not incompressible(txt, r.zstd_level)
    assert not incompressible(mixed, r.zstd_level) and incompressible(bytes(hidden), r.zstd_level)
    # compressed: in 64 KiB frames (codec 2) when longer than one, else one frame (codec 1)
    for data, codec in ((rnd, 0), (txt, 2), (mixed, 2), (bytes(hidden), 0), (small, 0), (small[:1000] * 100, 2),
                        (txt[:64 << 10], 1)):
        cid = r.sealer.chunk_id(data)
        blob = r.encode_chunk(cid, memoryview(data))
        payload = r.sealer.open(bytes(blob), b"vmbak-chunk:" + cid, "t")
        assert payload[0] == codec
        assert r.decode_chunk(cid, bytes(blob), len(data)) == data
        if codec:
            assert len(blob) < len(data) - len(data) // 32


_FAULTS = r"""
import os, resource, sys
sys.path[:0] = sys.argv[1:2]
from vmbak.engine.alloc import reuse_freed_memory

data = os.urandom(1 << 20)
mv = memoryview(data)

def pattern():  # what sealing a chunk did: three new buffers of about 1 MiB each
    for _ in range(150):
        a = b"\x00" + bytes(mv)
        b = a + b"x" * 16
        c = b"\x01" + b
        del a, b, c

def faults(f):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults(pattern)
with reuse_freed_memory():
    with reuse_freed_memory():  # nested: counted
        pass
    kept = faults(pattern)
after = faults(pattern)  # glibc's defaults again
print(plain, kept, after)
"""


def test_freed_memory_is_reused_during_a_pipeline():
    import vmbak

    src = os.path.dirname(os.path.dirname(vmbak.__file__))
    out = subprocess.run([sys.executable, "-c", _FAULTS, src], capture_output=True, text=True, check=True).stdout
    plain, kept, after = map(int, out.split())
    # 150 rounds of three new 1 MiB buffers: about 256 page faults per buffer when glibc
    # hands the memory back each time, a few hundred in all when it keeps it
    assert plain > 150 * 256, (plain, kept, after)
    assert kept * 10 < plain, (plain, kept, after)
    assert after * 2 > plain, (plain, kept, after)


def test_raw_disk_reads_into_a_buffer(tmp_path):
    """The backup reads a raw disk into a buffer it keeps per worker (RawDisk.pread_into):
    the same bytes as pread, fewer only at the end of the disk, and a one-line DiskError."""
    from vmbak.disks.raw import RawDisk
    from vmbak.errors import DiskError

    data = os.urandom(3 * MiB + 777)
    (tmp_path / "d.img").write_bytes(data)
    disk = RawDisk(str(tmp_path / "d.img"))
    buf = bytearray(MiB)
    for off in (0, 12345, 3 * MiB - 100, 3 * MiB + 777, 4 * MiB):
        with memoryview(buf) as mv:
            n = disk.pread_into(mv, off)
        assert n == len(data[off:off + MiB]) and buf[:n] == data[off:off + MiB] == disk.pread(MiB, off)
    disk.close()
    disk = RawDisk(str(tmp_path / "d.img"))
    os.close(disk.fd)
    disk.fd = os.open(tmp_path / "d.img", os.O_WRONLY)  # a descriptor that cannot read
    with pytest.raises(DiskError, match="read error on .* at offset 4096"):
        disk.pread_into(memoryview(buf), 4096)
    os.close(disk.fd)
    disk.fd = -1


def test_backup_compresses_after_a_compressed_chunk_without_the_probe(tmp_path):
    """Within a backup task, a chunk that follows one that compressed is compressed without
    the sampled probe (neighbouring data compresses alike; Repository.encode_chunk_codec).
    A chunk whose text lies between the probe's samples is then stored compressed, where
    the probe alone (encode_chunk) stores it raw; the restore gives the same bytes."""
    from vmbak.disks.raw import RawDisk
    from vmbak.engine.backup import BackupOptions, backup
    from vmbak.engine.restore import restore
    from vmbak.repo.repository import PROBE_PIECE, PROBE_SAMPLES, incompressible

    r = _open(tmp_path, "aes-256-gcm")
    rnd, txt = os.urandom(MiB), _text(2 * MiB, 2)
    step = MiB // PROBE_SAMPLES
    hidden = bytearray(rnd)
    for i in range(PROBE_SAMPLES):
        hidden[i * step + PROBE_PIECE:(i + 1) * step] = txt[MiB + i * step + PROBE_PIECE:MiB + (i + 1) * step]
    assert incompressible(bytes(hidden), r.zstd_level)
    # text, then the hidden chunk (same task: compressed); random, then the hidden chunk
    # again with another random piece (probed: raw)
    hidden2 = bytearray(hidden)
    hidden2[:PROBE_PIECE] = os.urandom(PROBE_PIECE)
    (tmp_path / "d.img").write_bytes(txt[:MiB] + bytes(hidden) + rnd + bytes(hidden2))
    with RawDisk(str(tmp_path / "d.img")) as d:
        m = backup(r, d, BackupOptions(name="t", skip_unused=False))
    codecs = {}
    for s, cid in zip(m.ext_start.tolist(), m.ext_id.tolist(), strict=True):
        loc = r.index.get(bytes(cid))
        blob = r.backend.read_range(f"data/{loc.pack[:2]}/{loc.pack}", loc.offset, loc.length)
        codecs[s // 16] = r.sealer.open(blob, b"vmbak-chunk:" + bytes(cid), "t")[0]
    assert codecs == {0: 2, 1: 2, 2: 0, 3: 0}, codecs
    out = tmp_path / "out.img"
    restore(r, m, str(out))
    assert out.read_bytes() == (tmp_path / "d.img").read_bytes()
