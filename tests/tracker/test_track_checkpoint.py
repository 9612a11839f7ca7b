"""Checkpoints: the frozen view under concurrent writers, commit/abort, change IDs, killed backups."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import nbd
import numpy as np
import pytest
from trackutil import BS, MiB, changed_blocks, stop_proc, wait_for

from vmbak.errors import ChangeTrackingError
from vmbak.tracker.client import TrackerBusy, TrackerClient


def _read_parallel(reader, size: int, piece: int = 1 * MiB) -> bytes:
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda off: reader.pread(piece, off), range(0, size, piece)))
    return b"".join(parts)


def test_frozen_view_is_the_disk_at_the_checkpoint_while_writers_go_on(track_disk, storm) -> None:
    t = track_disk("frozen.raw", 32 * MiB)
    size = 32 * MiB
    with TrackerClient(t.sock) as c:
        c.checkpoint(None, BS).commit()
        base_id = c.status()["committed_change_id"]
        h = nbd.NBD()
        h.connect_unix(t.sock)
        h.pwrite(b"\x11" * BS, 3 * BS)
        h.trim(BS, 7 * BS)
        at_checkpoint = t.disk_bytes()  # no writer runs now: this is the disk at the checkpoint
        cp = c.checkpoint(base_id, BS)
        assert np.flatnonzero(cp.change_map.bitmap).tolist() == [3, 7]
        assert cp.change_map.source == "track" and cp.change_map.reference == base_id
        assert cp.change_map.new_reference == cp.change_id
        # writers keep going: a storm (writes, trims, zeroes) and exact aligned writes
        w = storm(t, 7)
        exact = np.zeros(size // BS, bool)
        for b in (0, 3, 100, 101, 511):
            h.pwrite(bytes([b % 251 + 1]) * BS, b * BS)
            exact[b] = True
        time.sleep(0.3)
        frozen = _read_parallel(cp.reader, size)
        frozen_again = cp.reader.pread(size, 0)
        stop_proc(w)
        assert frozen == at_checkpoint, f"frozen view differs: blocks {np.flatnonzero(changed_blocks(frozen, at_checkpoint))[:10]}"
        assert frozen_again == at_checkpoint
        # data_extents of the frozen view: everything but the block trimmed before the checkpoint
        ext = list(cp.reader.data_extents())
        covered = np.zeros(size // BS, bool)
        for off, ln in ext:
            covered[off // BS:(off + ln) // BS] = True
        assert not covered[7] and covered.sum() == size // BS - 1
        st = c.status()
        assert st["checkpoint"]["change_id"] == cp.change_id and st["checkpoint"]["copied_blocks"] > 0
        cp.commit()
        now = t.disk_bytes()
        actual = changed_blocks(at_checkpoint, now)
        assert actual.any()
        cp2 = c.checkpoint(cp.change_id, BS)
        assert not (actual & ~cp2.change_map.bitmap).any(), "the next checkpoint lost concurrent writes"
        assert not (exact & ~cp2.change_map.bitmap).any()
        cp2.abort()
        h.shutdown()


def test_backup_and_restore_of_a_checkpoint_with_the_engine(track_disk, storm, make_repo, tmp_path) -> None:
    """The contract with the backup engine: full from a checkpoint, then an incremental with the
    tracker's change map while a writer keeps writing; each restore equals its frozen view."""
    from vmbak.api import restore
    from vmbak.engine.backup import BackupOptions, backup

    t = track_disk("engine.raw", 16 * MiB)
    repo = make_repo("none").open()
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        assert cp.change_map is None
        frozen1 = t.disk_bytes()
        m1 = backup(repo, cp.reader, BackupOptions(name="web", change_id=cp.change_id, skip_unused=False))
        cp.commit()
        assert m1.change_id == cp.change_id
        w = storm(t, 11, "--count", "200")
        w.wait(60)
        frozen2 = t.disk_bytes()
        cp2 = c.checkpoint(m1.change_id, BS)
        w2 = storm(t, 12)  # writes during the backup
        m2 = backup(repo, cp2.reader, BackupOptions(name="web", change_map=cp2.change_map, skip_unused=False,
                                                    verify_changes=True))
        stop_proc(w2)
        cp2.commit()
        assert m2.change_id == cp2.change_id and m2.kind == "incremental"
        assert m2.stats["verify_missed_blocks"] == 0
    for m, expect in ((m1, frozen1), (m2, frozen2)):
        out = tmp_path / f"restored-{m.short_id}.raw"
        restore(repo, m, str(out))
        assert out.read_bytes() == expect


def test_commit_abort_and_change_ids(track_disk) -> None:
    t = track_disk("ids.raw", 8 * MiB, history=2)
    h = nbd.NBD()
    h.connect_unix(t.sock)
    with TrackerClient(t.sock) as c:
        with pytest.raises(ChangeTrackingError, match="no committed change ID yet|not issued"):
            c.checkpoint("nonsense", BS)
        ids = []
        for i in range(4):
            h.pwrite(b"x" * 512, i * BS)
            cp = c.checkpoint(ids[-1] if ids else None, BS)
            if ids:
                assert np.flatnonzero(cp.change_map.bitmap).tolist() == [i]
            cp.commit()
            ids.append(cp.change_id)
        # older IDs within the history answer with the union of the later epochs
        h.pwrite(b"y" * 512, 6 * BS)
        cp = c.checkpoint(ids[1], BS)
        assert np.flatnonzero(cp.change_map.bitmap).tolist() == [2, 3, 6]
        cp.abort()
        with pytest.raises(ChangeTrackingError, match="stale"):
            c.checkpoint(ids[0], BS)
        # an aborted checkpoint's ID was never committed; its changes stay reported
        h.pwrite(b"z" * 512, 7 * BS)
        aborted = c.checkpoint(ids[-1], BS)
        h.pwrite(b"w" * 512, 5 * BS)  # a write into the next epoch
        aborted.abort()
        with pytest.raises(ChangeTrackingError, match="never committed"):
            c.checkpoint(aborted.change_id, BS)
        with pytest.raises(ChangeTrackingError, match="not issued by this tracker"):
            c.checkpoint("0123abcd-3-abcdef", BS)
        cp = c.checkpoint(ids[-1], 4096)  # another block size: re-expressed, never less
        assert cp.change_map.block_size == 4096
        assert np.flatnonzero(cp.change_map.bitmap).tolist() == list(range(5 * 16, 8 * 16))
        # only one checkpoint at a time
        with TrackerClient(t.sock) as other, pytest.raises(TrackerBusy, match="already open"):
            other.checkpoint(None, BS)
        cp.commit()
        st = c.status()
        assert st["committed_change_id"] == cp.change_id
        assert st["known_change_ids"][-1] == cp.change_id and len(st["known_change_ids"]) == 3
        assert st["dirty_blocks"] == 0
    log = t.state("log").read_text()
    for ev in ("checkpoint", "commit", "abort"):
        assert f'"event": "{ev}"' in log
    h.shutdown()


HOLDER = r"""
import sys, time
from vmbak.tracker.client import TrackerClient
c = TrackerClient(sys.argv[1])
cp = c.checkpoint(sys.argv[2], 65536)
cp.reader.pread(1 << 20, 0)
print(cp.change_id, flush=True)
time.sleep(600)
"""


def test_a_killed_backup_loses_no_changes(track_disk, storm) -> None:
    t = track_disk("killed.raw", 16 * MiB)
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        cp.commit()
    base_id, base = cp.change_id, t.disk_bytes()
    w = storm(t, 21)
    time.sleep(0.3)
    backup = subprocess.Popen([sys.executable, "-c", HOLDER, t.sock, base_id], stdout=subprocess.PIPE, text=True)
    held = backup.stdout.readline().strip()
    assert held, "the backup process did not open a checkpoint"
    assert t.status()["checkpoint"]["change_id"] == held
    time.sleep(0.3)  # writes land in the next epoch and are copied aside
    backup.kill()  # kill -9 in the middle of the backup
    backup.wait()
    wait_for(lambda: t.status()["checkpoint"] is None, 10, "the tracker to abort the dead backup's checkpoint")
    stop_proc(w)
    # the abort's log line lands just after the status no longer shows the checkpoint
    wait_for(lambda: "control connection" in t.state("log").read_text(), 10, "the abort's log line")
    assert held in t.state("log").read_text()
    with TrackerClient(t.sock) as c:
        with pytest.raises(ChangeTrackingError, match="never committed"):
            c.checkpoint(held, BS)
        cp = c.checkpoint(base_id, BS)
        missed = changed_blocks(base, t.disk_bytes()) & ~cp.change_map.bitmap
        assert not missed.any(), f"changes lost with the killed backup: {np.flatnonzero(missed)[:10]}"
        cp.commit()


def test_the_checkpoint_ends_with_its_control_connection(track_disk) -> None:
    t = track_disk("conn.raw", 4 * MiB)
    c = TrackerClient(t.sock)
    cp = c.checkpoint(None, BS)
    reader = cp.reader
    assert len(reader.pread(4096, 0)) == 4096
    c.close()
    wait_for(lambda: t.status()["checkpoint"] is None, 10, "the abort")
    with pytest.raises(ChangeTrackingError):
        reader.pread(4096, 0)  # the frozen export is gone
    # a reader opened afterwards cannot attach to the frozen export either
    h = nbd.NBD()
    h.set_export_name("vmbak-frozen:" + reader.token)
    with pytest.raises(nbd.Error):
        h.connect_unix(t.sock)


def test_many_threads_read_the_frozen_view_while_writes_need_copies(track_disk) -> None:
    t = track_disk("threads.raw", 16 * MiB, block_size=16384)
    size = 16 * MiB
    before = t.disk_bytes()
    errors: list[BaseException] = []
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, 65536)
        stop = threading.Event()

        def writer(seed: int) -> None:
            h = nbd.NBD()
            h.connect_unix(t.sock)
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    off = int(rng.integers(0, size // 512 - 64)) * 512
                    h.pwrite(rng.bytes(int(rng.integers(1, 64)) * 512), off)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            h.shutdown()

        ws = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
        for x in ws:
            x.start()
        try:
            for _ in range(3):
                assert _read_parallel(cp.reader, size, 256 * 1024) == before
        finally:
            stop.set()
            for x in ws:
                x.join()
        assert not errors, errors
        cp.commit()
