"""ImageRestoreTarget: new images of every format, exact size, thin, atomic."""

from __future__ import annotations

import os
import threading

import pytest
from hvutil import B, MiB, compare, info, qemu_img, vmbak_daemons

from vmbak.disks.qemu import WRITE_FORMATS, ImageRestoreTarget
from vmbak.engine.restore import RestoreTarget
from vmbak.errors import DiskError


def fill(tgt: RestoreTarget, size: int, expected: bytearray) -> None:
    """Write a few scattered pieces from two threads, as the restore workers do."""
    pieces = [(0, os.urandom(B)), (3 * MiB, os.urandom(5 * B)), (size - B, os.urandom(B)),
              (7 * MiB + 512, os.urandom(4096))]

    def put(off: int, data: bytes) -> None:
        tgt.write(off, data)

    ts = [threading.Thread(target=put, args=p) for p in pieces]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for off, data in pieces:
        expected[off:off + len(data)] = data


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
def test_every_format(tmp_path, fmt):
    size = 16 * MiB + 7 * 512  # not a multiple of any cluster, nor of a CHS geometry
    expected = bytearray(size)
    final = tmp_path / f"out.{fmt}"
    tgt = ImageRestoreTarget(str(final), size, fmt)
    assert isinstance(tgt, RestoreTarget)
    assert tgt.created and tgt.final_path == str(final)
    assert not final.exists()
    fill(tgt, size, expected)
    assert tgt.read(4096, 7 * MiB + 512) == bytes(expected[7 * MiB + 512:7 * MiB + 512 + 4096])
    if fmt != "raw":
        assert not tgt.needs_zero_writes() and not tgt.is_file
    tgt.commit()
    tgt.close()
    assert not tgt.created and tgt.path == str(final)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no partial left
    i = info(final)
    assert i["format"] == fmt and i["virtual-size"] == size
    assert i["actual-size"] < 8 * MiB  # thin: the zeros were never written
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    compare(final, ref)
    if fmt in ("qcow2", "vmdk", "vhdx"):
        assert qemu_img("check", final, check=False).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_discard_and_close_leave_nothing(tmp_path, fmt):
    final = tmp_path / f"gone.{fmt}"
    tgt = ImageRestoreTarget(str(final), 4 * MiB, fmt)
    tgt.write(0, b"x" * B)
    pid = tgt._daemon.proc.pid
    tgt.discard()
    tgt.close()
    assert list(tmp_path.iterdir()) == [] and pid not in vmbak_daemons()
    with ImageRestoreTarget(str(final), 4 * MiB, fmt) as tgt:
        tgt.write(0, b"y" * B)
    assert list(tmp_path.iterdir()) == []  # closed before commit: discarded


def test_refusals(tmp_path):
    existing = tmp_path / "there.qcow2"
    existing.write_bytes(b"old")
    with pytest.raises(DiskError, match="restore target exists"):
        ImageRestoreTarget(str(existing), 4 * MiB, "qcow2")
    tgt = ImageRestoreTarget(str(existing), 4 * MiB, "qcow2", overwrite=True)
    assert existing.read_bytes() == b"old"  # replaced only on commit
    tgt.write(B, b"\x07" * B)
    tgt.commit()
    tgt.close()
    assert info(existing)["format"] == "qcow2"
    with pytest.raises(DiskError, match="512-byte sectors"):
        ImageRestoreTarget(str(tmp_path / "odd.qcow2"), 4 * MiB + 100, "qcow2")
    with pytest.raises(DiskError, match="cannot restore to format 'qed2'"):
        ImageRestoreTarget(str(tmp_path / "x.img"), 4 * MiB, "qed2")
    with pytest.raises(DiskError, match="directory does not exist"):
        ImageRestoreTarget(str(tmp_path / "no" / "x.vhdx"), 4 * MiB, "vhdx")
    with pytest.raises(DiskError, match="cannot create vpc image .*huge.vhd: .*too large") as e:
        ImageRestoreTarget(str(tmp_path / "huge.vhd"), 4 << 40, "vhd")  # beyond VHD's 2040 GiB
    assert "partial" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.qcow2"]
