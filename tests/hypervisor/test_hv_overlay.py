"""Overlay images as a change source: the top layer's clusters are the changes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hvutil import B, MiB, compare, create, qemu_io, write_random

from vmbak.changes.overlay import image_identity, overlay_change_map, top_layer_extents
from vmbak.disks.qemu import ImageRestoreTarget, open_image
from vmbak.engine.backup import BackupOptions, backup
from vmbak.engine.restore import restore
from vmbak.errors import ChangeTrackingError, DiskError


def blocks(*ranges: tuple[int, int], n: int) -> np.ndarray:
    m = np.zeros(n, bool)
    for off, ln in ranges:
        m[off // B:(off + ln + B - 1) // B] = True
    return m


def test_qcow2_overlay_map(tmp_path):
    base = create(tmp_path / "base.qcow2", "qcow2", 16 * MiB)
    write_random(base, "qcow2", 0, 8 * MiB, 1, tmp_path)
    ov = create(tmp_path / "ov.qcow2", "qcow2", 16 * MiB, "-b", "base.qcow2", "-F", "qcow2")
    write_random(ov, "qcow2", 1 * MiB + 100, 1000, 2, tmp_path)  # one cluster
    qemu_io(ov, "qcow2", "write -z 2M 128k", "discard 4M 64k", "write -P 3 12M 200k")
    cm = overlay_change_map(ov, B)
    want = blocks((1 * MiB, B), (2 * MiB, 2 * B), (4 * MiB, B), (12 * MiB, 200 * 1024), n=256)
    assert (cm.bitmap == want).all(), np.flatnonzero(cm.bitmap ^ want)
    assert cm.source == "overlay" and cm.block_size == B
    assert cm.reference == image_identity(base) and cm.new_reference == image_identity(ov)
    assert cm.reference != cm.new_reference and "5 blocks" not in cm.notes[0]
    # a coarser block size covers the same bytes
    cm4 = overlay_change_map(ov, 1 * MiB)
    assert np.flatnonzero(cm4.bitmap).tolist() == [1, 2, 4, 12]
    # identity follows the content
    before = image_identity(base)
    qemu_io(base, "qcow2", "write -P 9 15M 64k")
    assert image_identity(base) != before
    assert top_layer_extents(base)  # a base's own clusters are its top layer
    assert image_identity("/dev/null") is None  # a device's content cannot be named


def test_vmdk_delta_map(tmp_path):
    base = create(tmp_path / "base.vmdk", "vmdk", 16 * MiB)
    write_random(base, "vmdk", 0, 4 * MiB, 3, tmp_path)
    delta = create(tmp_path / "delta.vmdk", "vmdk", 16 * MiB, "-b", "base.vmdk", "-F", "vmdk")
    write_random(delta, "vmdk", 3 * MiB, 3 * B, 4, tmp_path)
    write_random(delta, "vmdk", 10 * MiB + 5, 10, 5, tmp_path)
    cm = overlay_change_map(delta, B)
    assert np.flatnonzero(cm.bitmap).tolist() == [48, 49, 50, 160]
    assert cm.reference == image_identity(base)


def test_refusals(tmp_path):
    plain = create(tmp_path / "plain.qcow2", "qcow2", 4 * MiB)
    with pytest.raises(ChangeTrackingError, match="no backing file"):
        overlay_change_map(plain, B)
    ov = create(tmp_path / "ov.qcow2", "qcow2", 4 * MiB, "-b", "plain.qcow2", "-F", "qcow2")
    os.unlink(plain)
    with pytest.raises(DiskError, match="backing file of image .* is missing"):
        overlay_change_map(ov, B)
    with pytest.raises(DiskError, match="disk not found"):
        overlay_change_map(tmp_path / "nope.qcow2", B)


def test_overlay_backups_end_to_end(tmp_path, vrepo):
    """Full backup of the base, then an incremental from each overlay of a chain; every
    restore matches the image it was taken from."""
    repo = vrepo()
    base = create(tmp_path / "base.qcow2", "qcow2", 32 * MiB)
    write_random(base, "qcow2", 0, 20 * MiB, 10, tmp_path)
    with open_image(base) as d:
        m0 = backup(repo, d, BackupOptions(name="db", change_id=image_identity(base), skip_unused=False))
    assert m0.kind == "full" and m0.change_id == image_identity(base)
    layers = [base]
    for i in range(2):
        ov = create(tmp_path / f"ov{i}.qcow2", "qcow2", 32 * MiB, "-b", layers[-1].name, "-F", "qcow2")
        write_random(ov, "qcow2", (3 + 10 * i) * MiB, 5 * B, 20 + i, tmp_path)
        qemu_io(ov, "qcow2", f"write -z {(6 + i) * MiB} 64k", f"write -P {i + 1} 30M 64k")
        layers.append(ov)
        cm = overlay_change_map(ov, B)
        parent = repo.latest("db")
        assert parent.change_id == cm.reference  # how the caller knows the map is usable
        with open_image(ov) as d:
            m = backup(repo, d, BackupOptions(name="db", change_map=cm, skip_unused=False,
                                              verify_changes=i == 1))
        assert m.kind == "incremental" and m.change_source == "overlay"
        assert m.change_id == image_identity(ov)
        assert m.stats["changed_bytes"] == 7 * B
        if i == 0:
            assert m.stats["read_bytes"] <= 7 * B  # only the top layer's clusters were read
        else:  # --verify-changes read everything: the overlay missed nothing
            assert m.stats["verify_missed_blocks"] == 0
        out = tmp_path / f"restored{i}.qcow2"
        tgt = ImageRestoreTarget(str(out), m.disk_size, "qcow2")
        restore(repo, m, tgt)
        tgt.close()
        compare(out, ov)
