"""End to end through the real engine: images of every format, backed up while a
qemu-storage-daemon serves them (dirty bitmaps, fleecing) or from the file (scan),
restored to images with ImageRestoreTarget and compared with qemu-img compare."""

from __future__ import annotations

import numpy as np
import pytest
from hvutil import FORMATS, B, MiB, compare, create, qemu_io, write_random

from vmbak.changes.qemu import open_session
from vmbak.disks.qemu import ImageRestoreTarget, open_image
from vmbak.engine.backup import BackupOptions, backup
from vmbak.engine.restore import restore
from vmbak.errors import ChangeTrackingError

SIZE = 32 * MiB


def rnd(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def restore_to(repo, m, path, fmt):  # noqa: ANN001, ANN201
    tgt = ImageRestoreTarget(str(path), m.disk_size, fmt)
    try:
        stats = restore(repo, m, tgt)
    finally:
        tgt.close()
    return stats


def session_backup(repo, q, since, name="vm", verify=False):  # noqa: ANN001, ANN201
    """One backup through a QEMU session, the way the CLI runs it."""
    try:
        s = open_session(q.qmp, "disk0", since, B, nbd_server=q.nbd_sock)
    except ChangeTrackingError:
        s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    ok = False
    try:
        m = backup(repo, s.reader, BackupOptions(name=name, change_map=s.change_map, change_id=s.change_id,
                                                 skip_unused=False, source=s.reader.description,
                                                 verify_changes=verify))
        ok = True
    finally:
        s.commit() if ok else s.abort()
    return m, s


@pytest.mark.parametrize("fmt", FORMATS)
def test_qemu_bitmap_chain(tmp_path, fmt, qsd, vrepo):
    repo = vrepo()
    img = create(tmp_path / f"vm.{fmt}", fmt, SIZE)
    write_random(img, fmt, 0, 8 * MiB, 1, tmp_path)
    write_random(img, fmt, 20 * MiB, 1 * MiB, 2, tmp_path)
    q = qsd(img, fmt=fmt)

    expected = q.dump(tmp_path / "t0.raw", SIZE)
    m0, s0 = session_backup(repo, q, None)
    assert m0.kind == "full" and m0.change_id == s0.change_id
    restore_to(repo, m0, tmp_path / f"r0.{fmt}", fmt)
    compare(tmp_path / f"r0.{fmt}", expected)

    q.write(1 * MiB, rnd(2 * B, 3))
    q.write(25 * MiB + 512, rnd(4096, 4))
    q.zero(4 * MiB, 3 * B)
    expected1 = q.dump(tmp_path / "t1.raw", SIZE)
    s1 = open_session(q.qmp, "disk0", m0.change_id, B, nbd_server=q.nbd_sock)
    q.write(6 * MiB, rnd(B, 5))  # concurrent with the backup: in the next one
    m1 = backup(repo, s1.reader, BackupOptions(name="vm", change_map=s1.change_map, change_id=s1.change_id,
                                               skip_unused=False))
    s1.commit()
    assert m1.kind == "incremental" and m1.parent == m0.id and m1.change_source == "qemu-dirty-bitmap"
    assert m1.reference == m0.change_id and m1.change_id == s1.change_id
    assert m1.stats["considered_bytes"] == 6 * B
    assert m1.stats["read_bytes"] <= 6 * B
    restore_to(repo, m1, tmp_path / f"r1.{fmt}", fmt)
    compare(tmp_path / f"r1.{fmt}", expected1)

    expected2 = q.dump(tmp_path / "t2.raw", SIZE)
    m2, _ = session_backup(repo, q, m1.change_id)
    assert m2.stats["considered_bytes"] == B and m2.stats["changed_bytes"] == B
    restore_to(repo, m2, tmp_path / f"r2.{fmt}", fmt)
    compare(tmp_path / f"r2.{fmt}", expected2)
    # the older points are still restorable
    restore_to(repo, m1, tmp_path / f"r1b.{fmt}", "qcow2")
    compare(tmp_path / f"r1b.{fmt}", expected1)
    assert q.leftovers() == {} and list(q.bitmaps()) == [m2.change_id]


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_file_scan_chain(tmp_path, fmt, vrepo):
    """Image files read through open_image; the incremental is a scan; restores go to
    another format each time."""
    repo = vrepo()
    img = create(tmp_path / f"disk.{fmt}", fmt, SIZE)
    write_random(img, fmt, 2 * MiB, 6 * MiB, 7, tmp_path)
    with open_image(img) as d:
        m0 = backup(repo, d, BackupOptions(name="d", skip_unused=False))
    others = [f for f in FORMATS if f != fmt]
    restore_to(repo, m0, tmp_path / f"r0.{others[0]}", others[0])
    compare(tmp_path / f"r0.{others[0]}", img)
    write_random(img, fmt, 3 * MiB, 2 * B, 8, tmp_path)
    qemu_io(img, fmt, "write -z 5M 64k", "write -P 0x66 30M 64k")
    with open_image(img) as d:
        m1 = backup(repo, d, BackupOptions(name="d", skip_unused=False))
    assert m1.kind == "incremental" and m1.change_source == "scan"
    assert m1.stats["changed_bytes"] == 4 * B
    restore_to(repo, m1, tmp_path / f"r1.{others[1]}", others[1])
    compare(tmp_path / f"r1.{others[1]}", img)
    restore_to(repo, m1, tmp_path / "r1.raw", "raw")
    compare(tmp_path / "r1.raw", img)


def test_kill9_between_backups(tmp_path, qsd, vrepo):
    """QEMU killed between backups: the next backup sees the broken bitmap, reads a
    full view (a scan against the chain), and the chain stays restorable."""
    repo = vrepo()
    img = create(tmp_path / "vm.qcow2", "qcow2", SIZE)
    write_random(img, "qcow2", 0, 10 * MiB, 9, tmp_path)
    q = qsd(img)
    t0 = q.dump(tmp_path / "t0.raw", SIZE)
    m0, _ = session_backup(repo, q, None)
    q.restart()  # the bitmap is stored in the image
    q.write(2 * MiB, rnd(B, 10))
    q.kill9()
    q.start()  # the bitmap is now inconsistent
    t1 = q.dump(tmp_path / "t1.raw", SIZE)
    with pytest.raises(ChangeTrackingError, match="inconsistent"):
        open_session(q.qmp, "disk0", m0.change_id, B, nbd_server=q.nbd_sock)
    m1, s1 = session_backup(repo, q, m0.change_id)  # falls back to a full view: a scan
    assert s1.since is None and m1.kind == "incremental" and m1.change_source == "scan"
    assert m1.stats["changed_bytes"] == B
    restore_to(repo, m1, tmp_path / "r1.qcow2", "qcow2")
    compare(tmp_path / "r1.qcow2", t1)
    restore_to(repo, m0, tmp_path / "r0.qcow2", "qcow2")
    compare(tmp_path / "r0.qcow2", t0)
    # and tracking works again from the fresh bitmap
    q.write(9 * MiB, rnd(B, 11))
    m2, s2 = session_backup(repo, q, m1.change_id, verify=True)
    assert s2.since == m1.change_id and m2.change_source == "qemu-dirty-bitmap"
    assert m2.stats["changed_bytes"] == B
    assert m2.stats["verify_missed_blocks"] == 0 and m2.stats["verify_reported_blocks"] == 1
    assert list(q.bitmaps()) == [m2.change_id]
