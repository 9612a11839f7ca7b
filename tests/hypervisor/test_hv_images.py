"""open_image: every format read through a private qemu-storage-daemon, and its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from hvutil import FORMATS, B, MiB, create, qemu_img, qemu_io, to_raw, vmbak_daemons, write_random

from vmbak.disks.base import DiskReader
from vmbak.disks.qemu import ImageDisk, open_image
from vmbak.disks.raw import RawDisk
from vmbak.errors import DiskError


def read_all(d: DiskReader) -> bytes:
    return b"".join(d.pread(min(4 * MiB, d.size - off), off) for off in range(0, d.size, 4 * MiB))


def data_blocks(d: DiskReader) -> np.ndarray:
    m = np.zeros((d.size + B - 1) // B, bool)
    for off, ln in d.data_extents():
        m[off // B:(off + ln + B - 1) // B] = True
    return m


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_read_like_qemu_img_convert(tmp_path, fmt):
    img = create(tmp_path / f"disk.{fmt}", fmt, 24 * MiB)
    write_random(img, fmt, 0, 2 * MiB + 4096, 11, tmp_path)
    write_random(img, fmt, 6 * MiB, 300_000, 12, tmp_path)
    qemu_io(img, fmt, "write -P 0x33 23M 1M")
    if fmt == "qcow2":
        qemu_io(img, fmt, "write -c -P 0x44 4M 128k", "write -z 5M 512k")
    raw = to_raw(img, tmp_path / "disk.raw").read_bytes()
    with open_image(img) as d:
        assert isinstance(d, ImageDisk) and isinstance(d, DiskReader)
        assert d.format == fmt and d.size == 24 * MiB == len(raw)
        assert read_all(d) == raw
        assert d.pread(1000, 6 * MiB + 77) == raw[6 * MiB + 77:6 * MiB + 1077]
        covered = data_blocks(d)
        nonzero = np.frombuffer(raw, np.uint8).reshape(-1, B).any(axis=1)
        assert not (nonzero & ~covered).any()
        if fmt == "vhdx":  # QEMU's vhdx driver reports no allocation status: all is data
            assert covered.all()
        else:  # never-written space is not data (formats allocate at most 2 MiB around a write)
            assert not covered[10 * MiB // B:20 * MiB // B].any()
        pid = d._daemon.proc.pid
        assert pid in vmbak_daemons()
    assert pid not in vmbak_daemons()


def test_backing_chain(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(np.random.default_rng(5).bytes(16 * MiB))
    mid = create(tmp_path / "mid.qcow2", "qcow2", 16 * MiB, "-b", "base.raw", "-F", "raw")
    write_random(mid, "qcow2", 1 * MiB, 1 * MiB, 6, tmp_path)
    top = create(tmp_path / "top.qcow2", "qcow2", 16 * MiB, "-b", "mid.qcow2", "-F", "qcow2")
    write_random(top, "qcow2", 1 * MiB + 4096, 8192, 7, tmp_path)
    qemu_io(top, "qcow2", "write -z 8M 2M")
    raw = to_raw(top, tmp_path / "top.raw").read_bytes()
    os.chdir(tmp_path.parent)  # relative backing names resolve against the image, not the cwd
    with open_image(top) as d:
        assert d.backing_files == [str(mid), str(base)]
        assert read_all(d) == raw
        assert not data_blocks(d)[8 * MiB // B:10 * MiB // B].any()


def test_raw_stays_raw(tmp_path):
    p = tmp_path / "plain.img"
    p.write_bytes(b"\x01" * MiB)
    with open_image(p) as d:
        assert isinstance(d, RawDisk)
    with open_image(p, "raw") as d:
        assert isinstance(d, RawDisk) and d.size == MiB
    # a file named like a qcow2 without its header is refused, not read as raw
    bad = tmp_path / "looks.qcow2"
    shutil.copy(p, bad)
    with pytest.raises(DiskError, match="named like a qcow2 image"):
        open_image(bad)
    with open_image(bad, "raw") as d:
        assert d.pread(4, 0) == b"\x01" * 4


def test_errors_are_one_line(tmp_path):
    def err(path, fmt=None, match=""):
        with pytest.raises(DiskError, match=match) as e:
            open_image(path, fmt)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
        return str(e.value)

    err(tmp_path / "missing.qcow2", match="disk not found")
    err(tmp_path, match="directory")
    # corrupt header: cluster_bits (offset 20) = 63
    img = create(tmp_path / "c.qcow2", "qcow2", 4 * MiB)
    with open(img, "r+b") as f:
        f.seek(20)
        f.write((63).to_bytes(4, "big"))
    msg = err(img, match="cannot open image")
    assert "cluster size" in msg.lower()
    # missing backing file
    create(tmp_path / "b.qcow2", "qcow2", 4 * MiB)
    top = create(tmp_path / "t.qcow2", "qcow2", 4 * MiB, "-b", "b.qcow2", "-F", "qcow2")
    (tmp_path / "b.qcow2").unlink()
    assert str(tmp_path / "b.qcow2") in err(top, match="backing file of image .* is missing")
    # formats: unknown, unsupported, wrong
    good = create(tmp_path / "g.qcow2", "qcow2", 4 * MiB)
    err(good, "foo", match="unsupported image format 'foo'")
    err(good, "vhdx", match="cannot open image")
    assert vmbak_daemons() == set()


def test_daemon_stops_on_interrupt_and_errors(tmp_path):
    img = create(tmp_path / "k.qcow2", "qcow2", 4 * MiB)
    with pytest.raises(KeyboardInterrupt):
        with open_image(img) as d:
            assert d._daemon.running
            raise KeyboardInterrupt
    assert not d._daemon.running
    with pytest.raises(DiskError, match="closed"):
        d.pread(1, 0)
    d.close()  # twice is fine


def test_image_in_use(tmp_path, qsd):
    img = create(tmp_path / "busy.qcow2", "qcow2", 4 * MiB)
    qemu_io(img, "qcow2", "write -P 0x61 0 64k")
    q = qsd(img)  # opened read-write, as a running VM holds it
    with pytest.raises(DiskError, match="in use by another process"):
        open_image(img)
    with open_image(img, force_share=True) as d:
        assert d.pread(2, 0) == b"aa"
    q.stop()
    with open_image(img) as d:
        assert d.size == 4 * MiB


def test_vmdk_split_extents(tmp_path):
    img = create(tmp_path / "split.vmdk", "vmdk", 8 * MiB, "-o", "subformat=twoGbMaxExtentSparse")
    write_random(img, "vmdk", 3 * MiB, 70_000, 21, tmp_path)
    raw = to_raw(img, tmp_path / "split.raw").read_bytes()
    assert len([p for p in os.listdir(tmp_path) if p.startswith("split-")]) >= 1
    with open_image(img) as d:
        assert read_all(d) == raw
    assert qemu_img("info", img).returncode == 0


KILLED_READER = """
import os, sys
from vmbak.disks.qemu import open_image
d = open_image(sys.argv[1])
print(d._daemon.proc.pid, d._daemon.dir, flush=True)
os.kill(os.getpid(), 9)
"""


def test_daemon_dies_with_a_killed_vmbak(tmp_path):
    img = create(tmp_path / "orphan.qcow2", "qcow2", 4 * MiB)
    p = subprocess.run([sys.executable, "-c", KILLED_READER, str(img)], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    pid, directory = p.stdout.split()
    deadline = time.monotonic() + 10
    while int(pid) in vmbak_daemons():
        assert time.monotonic() < deadline, "the daemon outlived the vmbak that started it"
        time.sleep(0.02)
    shutil.rmtree(directory)  # the private directory is all a SIGKILL can leave behind
