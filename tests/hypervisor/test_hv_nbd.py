"""NbdDisk and NbdWriter against real NBD servers (qemu-storage-daemon, nbdkit)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import numpy as np
import pytest
from hvutil import B, MiB, create, qemu_io, to_raw, write_random

from vmbak.disks.base import DiskReader
from vmbak.disks.nbd import NbdDisk, NbdWriter
from vmbak.errors import DiskError


@pytest.fixture
def served(tmp_path, qsd):
    """A 40 MiB qcow2 with data, compressed and zero clusters, served by qemu-storage-daemon."""
    img = create(tmp_path / "a.qcow2", "qcow2", 40 * MiB)
    write_random(img, "qcow2", 0, 3 * MiB, 1, tmp_path)
    write_random(img, "qcow2", 5 * MiB + 4096, 100_000, 2, tmp_path)
    qemu_io(img, "qcow2", "write -c -P 0x5a 8M 64k", "write -z 10M 1M", "write -P 0x77 39M 1M")
    raw = to_raw(img, tmp_path / "a.raw").read_bytes()
    return qsd(img), raw


def test_reads_extents_and_size(served):
    q, raw = served
    with NbdDisk(q.nbd_sock, "disk0") as d:
        assert isinstance(d, DiskReader)
        assert d.size == len(raw) == 40 * MiB
        assert d.pread(d.size, 0) == raw  # one call larger than the 32 MiB request limit
        assert d.pread(12345, 5 * MiB + 1) == raw[5 * MiB + 1:5 * MiB + 1 + 12345]
        assert d.pread(1 * MiB, d.size - 1000) == raw[-1000:]  # short at the end only
        assert d.pread(10, d.size) == b""
        ext = list(d.data_extents())
        # data: 0-3M, the cluster(s) around 5M, the compressed cluster at 8M, 39-40M
        covered = np.zeros(len(raw) // B, bool)
        for off, ln in ext:
            assert off % 512 == 0 and ln > 0
            covered[off // B:(off + ln + B - 1) // B] = True
        nonzero = np.frombuffer(raw, np.uint8).reshape(-1, B).any(axis=1)
        assert not (nonzero & ~covered).any(), "a block with data is outside the data extents"
        assert not covered[10 * MiB // B:11 * MiB // B].any(), "zero clusters were reported as data"
        assert not covered[12 * MiB // B:39 * MiB // B].any(), "unallocated space was reported as data"
        assert covered.sum() <= 4 * MiB // B + 3 + 16
        # a window of the extents
        assert list(d.data_extents(1 * MiB, 2 * MiB)) == [(1 * MiB, 1 * MiB)]
        assert list(d.data_extents(12 * MiB, 20 * MiB)) == []


def test_pread_many_reads_in_parallel(served):
    """Many reads at once, in parallel on several connections: each result is what pread
    gives, in the order asked, with large reads split and every edge case in one batch."""
    q, raw = served
    rng = random.Random(5)
    reqs = [(d_len, off) for off, d_len in
            [(0, 3 * MiB + 7), (5 * MiB + 1, 12345), (len(raw) - 1000, MiB), (len(raw), 10), (0, 0),
             (10 * MiB, MiB), (39 * MiB, MiB)]]
    reqs += [(rng.randrange(1, 3 * MiB), rng.randrange(0, len(raw))) for _ in range(40)]
    with NbdDisk(q.nbd_sock, "disk0") as d:
        got = d.pread_many(reqs)
        assert [len(g) for g in got] == [len(raw[o:o + n]) for n, o in reqs]
        for (n, o), g in zip(reqs, got, strict=True):
            assert type(g) is bytes and g == raw[o:o + n], (n, o)
        assert d.pread_many([]) == []
        d.min_block = 4096  # a server that wants aligned reads: widened, then cut back
        assert d.pread_many([(100, 5 * MiB + 4097), (5000, 4095)]) == [raw[5 * MiB + 4097:5 * MiB + 4197],
                                                                         raw[4095:9095]]
    d = NbdDisk(q.nbd_sock, "disk0")
    d.pread(10, 0)  # this thread's connection is open
    q.kill9()  # the server dies with reads to do: one line, no traceback
    with pytest.raises(DiskError, match="read error|cannot connect") as e:  # the readers connect now
        d.pread_many([(MiB, 0), (MiB, MiB), (MiB, 2 * MiB)])
    assert "\n" not in str(e.value)
    d.close()


def test_threads_get_their_own_connections(served):
    q, raw = served
    d = NbdDisk(q.nbd_sock, "disk0")
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            off = rng.randrange(0, len(raw) - 1)
            ln = rng.randrange(1, 300_000)
            got = d.pread(ln, off)
            if got != raw[off:off + ln]:
                errors.append(f"mismatch at {off}+{ln}")

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert len(d._handles) == 5  # the opening thread's plus one per worker
    d.close()
    with pytest.raises(DiskError, match="closed"):
        d.pread(10, 0)


def test_writer_writes_zeroes_and_flushes(served, tmp_path):
    q, raw = served
    w = NbdWriter(q.nbd_sock, "disk0")
    data = os.urandom(3 * B + 17)
    w.pwrite(data, 20 * MiB + 512)
    w.write_zeros(0, 1 * MiB)
    t = threading.Thread(target=w.pwrite, args=(b"\x42" * B, 30 * MiB))
    t.start()
    t.join()
    w.flush()
    assert w.pread(len(data), 20 * MiB + 512) == data
    assert w.pread(1 * MiB, 0) == bytes(1 * MiB)
    assert w.pread(B, 30 * MiB) == b"\x42" * B
    with pytest.raises(DiskError, match="past the end"):
        w.pwrite(b"x" * 10, w.size - 5)
    w.close()
    # the writes are in the image: read by a fresh connection
    with NbdDisk(q.nbd_sock, "disk0") as d:
        assert d.pread(B, 30 * MiB) == b"\x42" * B
        assert list(d.data_extents(0, 3 * MiB)) == [(1 * MiB, 2 * MiB)]  # the zeroed MiB is skipped
        assert d.pread(2 * MiB, 1 * MiB) == raw[1 * MiB:3 * MiB]


def test_connection_errors(served, tmp_path):
    q, _ = served
    with pytest.raises(DiskError, match="cannot connect to NBD server") as e:
        NbdDisk(str(tmp_path / "nothing.sock"), "disk0")
    assert "\n" not in str(e.value)
    with pytest.raises(DiskError, match="cannot connect to NBD server"):
        NbdDisk(q.nbd_sock, "no-such-export")


def _nbdkit(sock, *args: str) -> subprocess.Popen:
    """nbdkit on the Unix socket ``sock``, once it accepts connections: it writes its pid
    file only then (the socket file appears at bind(), before listen(): a client that
    connected as soon as it appeared was sometimes refused)."""
    pidfile = sock.with_suffix(".pid")
    proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--pidfile", str(pidfile), "-U",
                             str(sock), *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("nbdkit did not start within 20 s")
        time.sleep(0.01)
    return proc


def test_nbdkit_uri_and_read_only(tmp_path, sockdir):
    """A server that is not QEMU, addressed by URI; a writer refuses a read-only export."""
    sock = sockdir / "kit.sock"
    proc = _nbdkit(sock, "memory", "size=8M")
    try:
        uri = f"nbd+unix:///?socket={sock}"
        w = NbdWriter(uri)
        assert w.size == 8 * MiB
        w.pwrite(b"\x01" * B, 2 * MiB)
        w.flush()
        assert list(w.data_extents()) == [(2 * MiB, B)]
        w.close()
    finally:
        proc.kill()
        proc.wait()
    ro = sockdir / "ro.sock"
    proc = _nbdkit(ro, "-r", "memory", "size=1M")
    try:
        with pytest.raises(DiskError, match="read-only"):
            NbdWriter(str(ro))
        with NbdDisk(str(ro)) as d:
            assert d.pread(4, 0) == bytes(4)
    finally:
        proc.kill()
        proc.wait()
