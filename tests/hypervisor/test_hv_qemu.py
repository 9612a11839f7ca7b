"""QEMU persistent dirty bitmaps through QMP, against a real qemu-storage-daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hvutil import B, MiB, create, qemu_io, write_random

from vmbak.changes.qemu import QmpClient, QmpError, open_session
from vmbak.errors import ChangeTrackingError, DiskError

SIZE = 32 * MiB
NB = SIZE // B


def rnd(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@pytest.fixture
def image(tmp_path):
    img = create(tmp_path / "vm.qcow2", "qcow2", SIZE)
    write_random(img, "qcow2", 0, 6 * MiB, 1, tmp_path)
    return img


def dirty(cm) -> list[int]:  # noqa: ANN001
    return np.flatnonzero(cm.bitmap).tolist()


def test_full_then_incrementals(image, qsd):
    q = qsd(image)
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    assert s.change_map is None and s.since is None and s.node == "disk0"
    assert s.reader.size == SIZE and s.change_id.startswith("vmbak-")
    before = q.read(0, 6 * MiB)
    assert s.reader.pread(6 * MiB, 0) == before
    assert list(s.reader.data_extents()) == [(0, 6 * MiB)]
    q.write(1 * MiB, rnd(B, 2))  # after the point in time: not in this view
    assert s.reader.pread(6 * MiB, 0) == before
    s.commit()
    assert list(q.bitmaps()) == [s.change_id] and q.leftovers() == {}

    # incremental: the write made during the full backup, and new ones
    q.write(10 * MiB + 4096, rnd(3 * B, 3))  # unaligned: 4 blocks
    q.zero(20 * MiB, B)
    s2 = open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    view = q.read(0, SIZE)
    q.write(30 * MiB, rnd(B, 4))  # concurrent with the backup
    q.write(10 * MiB, rnd(B, 5))  # overwrites a block the backup still has to read
    assert dirty(s2.change_map) == [16, 160, 161, 162, 163, 320]
    assert s2.change_map.reference == s.change_id and s2.change_map.new_reference == s2.change_id
    assert s2.reader.pread(SIZE, 0) == view
    assert set(q.bitmaps()) == {s.change_id, s2.change_id}
    s2.commit()
    assert list(q.bitmaps()) == [s2.change_id] and q.leftovers() == {}

    # the writes made during the last backup show up in the next one
    s3 = open_session(q.qmp, "disk0", s2.change_id, B, nbd_server=q.nbd_sock)
    assert dirty(s3.change_map) == [160, 480]
    s3.commit()
    assert list(q.bitmaps()) == [s3.change_id]


def test_abort_keeps_every_change(image, qsd):
    q = qsd(image)
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    s.commit()
    q.write(2 * MiB, rnd(B, 6))
    s2 = open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    q.write(4 * MiB, rnd(B, 7))  # during the failed backup
    assert dirty(s2.change_map) == [32]
    s2.abort()
    assert list(q.bitmaps()) == [s.change_id] and q.bitmaps()[s.change_id]["recording"]
    assert q.leftovers() == {}
    q.write(5 * MiB, rnd(B, 8))  # after the failure
    with open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock) as s3:
        assert dirty(s3.change_map) == [32, 64, 80]
        s3.commit()
    # leaving a session's with-block without commit aborts it
    with pytest.raises(RuntimeError):
        with open_session(q.qmp, "disk0", s3.change_id, B, nbd_server=q.nbd_sock):
            raise RuntimeError("backup failed")
    assert list(q.bitmaps()) == [s3.change_id] and q.leftovers() == {}


def test_kill9_missing_and_inconsistent_bitmaps(image, qsd):
    q = qsd(image)
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    s.commit()
    q.write(3 * MiB, rnd(B, 9))
    q.kill9()  # the new bitmap was never written to the image
    q.start()
    assert q.bitmaps() == {}
    with pytest.raises(ChangeTrackingError, match="missing") as e:
        open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    assert "\n" not in str(e.value)
    assert q.leftovers() == {} and q.bitmaps() == {}
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)  # the fallback: a full view
    assert s.change_map is None
    s.commit()

    q.restart()  # a clean stop stores the bitmap in the image
    assert list(q.bitmaps()) == [s.change_id] and q.bitmaps()[s.change_id]["persistent"]
    q.write(7 * MiB, rnd(B, 10))
    q.kill9()  # the bitmap is in the image, flagged in use: it cannot be trusted
    q.start()
    assert q.bitmaps()[s.change_id].get("inconsistent")
    with pytest.raises(ChangeTrackingError, match="inconsistent"):
        open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    assert q.bitmaps() == {} and q.leftovers() == {}  # removed, so it cannot pile up
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    s.commit()
    assert list(q.bitmaps()) == [s.change_id]


def test_persists_across_restarts_with_own_nbd_server(tmp_path, image, qsd):
    """No NBD server in QEMU: the session starts its own and stops it. Writes made by
    another QEMU program while the daemon is down are recorded in the bitmap too."""
    q = qsd(image, nbd=False)
    s = open_session(q.qmp, "disk0", None, B)
    assert s.reader.pread(4, 0) == np.random.default_rng(1).bytes(4)
    s.commit()
    q.stop()
    qemu_io(image, "qcow2", "write -P 0x55 12M 128k")
    q.start()
    s2 = open_session(q.qmp, "disk0", s.change_id, B)
    assert dirty(s2.change_map) == [192, 193]
    assert s2.reader.pread(4, 12 * MiB) == b"\x55" * 4
    s2.commit()
    with QmpClient(q.qmp) as c:
        with pytest.raises(QmpError, match="NBD server not running"):
            c.execute("nbd-server-stop")  # the session stopped the server it started
    assert q.leftovers() == {} and list(q.bitmaps()) == [s2.change_id]


def test_clear_errors_leave_nothing(tmp_path, image, qsd):
    with pytest.raises(DiskError, match="QMP socket not found"):
        open_session(str(tmp_path / "none.sock"), "disk0", None, B)
    q = qsd(image)
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    s.commit()
    with pytest.raises(DiskError, match="no block node or drive named 'disk9' .*disk0"):
        open_session(q.qmp, "disk9", s.change_id, B, nbd_server=q.nbd_sock)
    with pytest.raises(ChangeTrackingError, match="missing"):
        open_session(q.qmp, "disk0", "vmbak-20200101T000000-00000000", B, nbd_server=q.nbd_sock)
    assert q.bitmaps() == {}  # a wrong change ID means the chain's bitmap is stale: removed
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    s.commit()
    with pytest.raises(ChangeTrackingError, match="not a vmbak dirty bitmap"):
        open_session(q.qmp, "disk0", "nightly", B, nbd_server=q.nbd_sock)
    # QEMU runs an NBD server the session was not told about
    with pytest.raises(DiskError, match="already runs an NBD server"):
        open_session(q.qmp, "disk0", s.change_id, B)
    assert list(q.bitmaps()) == [s.change_id] and q.bitmaps()[s.change_id]["recording"]
    assert q.leftovers() == {}
    # a bitmap in use by a running backup is not touched by a second one
    s2 = open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    with pytest.raises(ChangeTrackingError, match="in use"):
        open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    s2.commit()
    assert list(q.bitmaps()) == [s2.change_id] and q.leftovers() == {}


KILLED_SESSION = textwrap.dedent("""
    import os, sys
    from vmbak.changes.qemu import open_session
    s = open_session(sys.argv[1], "disk0", sys.argv[2], 65536, nbd_server=sys.argv[3])
    print(s.change_id, flush=True)
    os.kill(os.getpid(), 9)
""")


def test_killed_vmbak_is_cleaned_up_and_merged(image, qsd):
    """vmbak killed in the middle of a backup: the next session removes the export,
    job and fleecing node it left, and merges its bitmap back: no change is lost."""
    q = qsd(image)
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    s.commit()
    q.write(1 * MiB, rnd(B, 11))
    p = subprocess.run([sys.executable, "-c", KILLED_SESSION, q.qmp, s.change_id, q.nbd_sock],
                       capture_output=True, text=True, env={**os.environ, "TMPDIR": "/tmp"})
    assert p.returncode == -9, p.stderr
    orphan = p.stdout.split()[0]
    assert q.leftovers() != {} and not q.bitmaps()[s.change_id]["recording"]
    q.write(2 * MiB, rnd(B, 12))  # recorded by the orphan's bitmap only
    s2 = open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    assert dirty(s2.change_map) == [16, 32]
    assert any("interrupted vmbak session" in n for n in s2.notes)
    assert orphan not in q.bitmaps()
    s2.commit()
    assert q.leftovers() == {} and list(q.bitmaps()) == [s2.change_id]


def test_non_qcow2_node_uses_a_temporary_bitmap(tmp_path, qsd):
    img = create(tmp_path / "vm.vmdk", "vmdk", 16 * MiB)
    q = qsd(img, fmt="vmdk")
    s = open_session(q.qmp, "disk0", None, B, nbd_server=q.nbd_sock)
    assert any("cannot store bitmaps" in n for n in s.notes)
    s.commit()
    assert not q.bitmaps()[s.change_id]["persistent"]
    q.write(5 * MiB, rnd(2 * B, 13))
    s2 = open_session(q.qmp, "disk0", s.change_id, B, nbd_server=q.nbd_sock)
    assert dirty(s2.change_map) == [80, 81]
    s2.commit()
    q.restart()
    with pytest.raises(ChangeTrackingError, match="missing"):
        open_session(q.qmp, "disk0", s2.change_id, B, nbd_server=q.nbd_sock)
