"""Damaged, truncated, missing and foreign .rct/.mrt files: a clear message and a safe fallback
(tracking invalid, or over-reporting), never a missed change."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from trackutil import BS, MiB, Tracked, changed_blocks

from vmbak.errors import ChangeTrackingError
from vmbak.tracker.client import TrackerClient
from vmbak.tracker.formats import MRT_PAGE_BITS, PAGE


def _base(t: Tracked) -> tuple[str, bytes]:
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        cp.commit()
    return cp.change_id, t.disk_bytes()


def _write(t: Tracked, storm, seed: int, count: int = 150) -> None:
    w = storm(t, seed, "--count", str(count))
    assert w.wait(60) == 0, w.stderr.read()


def _assert_superset(t: Tracked, base_id: str, base: bytes) -> np.ndarray:
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(base_id, BS)
        actual = changed_blocks(base, t.disk_bytes())
        missed = actual & ~cp.change_map.bitmap
        assert not missed.any(), f"missed blocks {np.flatnonzero(missed)[:10]}"
        cp.abort()
        return cp.change_map.bitmap


def _assert_invalid(t: Tracked, base_id: str, *fragments: str) -> None:
    st = t.status()
    assert st["tracking"] == "invalid", st
    for f in fragments:
        assert f in st["invalid_reason"], st["invalid_reason"]
    with TrackerClient(t.sock) as c:
        with pytest.raises(ChangeTrackingError, match="invalid") as ei:
            c.checkpoint(base_id, BS)
        assert "\n" not in str(ei.value)
        # a consistent view for a full or scan backup is still there; its commit heals the tracking
        cp = c.checkpoint(None, BS)
        assert cp.change_map is None
        cp.commit()
        assert c.status()["tracking"] == "valid"
    log = t.state("log").read_text()
    assert '"tracking": "invalid"' in log and "tracking is valid again" in log


def _flip(path: os.PathLike, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_rct_after_a_crash_falls_back_to_the_mrt(track_disk, storm) -> None:
    t = track_disk("c1.raw", 16 * MiB, rct_interval=0.1)
    base_id, base = _base(t)
    _write(t, storm, 1)
    t.kill9()
    _flip(t.state("rct"), os.path.getsize(t.state("rct")) // 2)
    st = t.start()
    assert st["recovery"] == "mrt-only" and st["tracking"] == "valid"
    assert any("checksum" in n and ".rct" in n for n in st["notes"]), st["notes"]
    rep = _assert_superset(t, base_id, base)
    assert rep.sum() % (MiB // BS) == 0  # whole MRT regions: over-reporting, never missing


def test_truncated_rct_and_missing_mrt_make_tracking_invalid(track_disk, storm) -> None:
    t = track_disk("c2.raw", 16 * MiB)
    base_id, _ = _base(t)
    _write(t, storm, 2)
    t.kill9()
    os.truncate(t.state("rct"), 100)
    os.unlink(t.state("mrt"))
    st = t.start()
    assert st["recovery"] == "lost"
    _assert_invalid(t, base_id, "truncated", "does not exist")


def test_unclean_rct_with_missing_mrt_is_invalid(track_disk, storm) -> None:
    t = track_disk("c3.raw", 16 * MiB)
    base_id, _ = _base(t)
    _write(t, storm, 3)
    t.kill9()
    os.unlink(t.state("mrt"))
    t.start()
    _assert_invalid(t, base_id, "unclean stop", ".mrt does not exist")


def test_both_mrt_headers_corrupt_after_a_crash_is_invalid(track_disk, storm) -> None:
    t = track_disk("c4.raw", 16 * MiB)
    base_id, _ = _base(t)
    _write(t, storm, 4)
    t.kill9()
    _flip(t.state("mrt"), 40)
    _flip(t.state("mrt"), PAGE + 40)
    t.start()
    _assert_invalid(t, base_id, "headers that fail their checksum")


def test_a_torn_mrt_page_counts_as_all_changed(track_disk, storm) -> None:
    t = track_disk("c5.raw", 16 * MiB, rct_interval=3600, mrt_region=64 * 1024)
    base_id, base = _base(t)
    _write(t, storm, 5)
    t.kill9()
    _flip(t.state("mrt"), 2 * PAGE + 100)  # data page 0
    st = t.start()
    assert st["tracking"] == "valid"
    assert any("page(s) failed their checksum" in n for n in st["notes"]), st["notes"]
    rep = _assert_superset(t, base_id, base)
    assert rep[:min(len(rep), MRT_PAGE_BITS)].all()  # every region of the page


def test_foreign_state_files_are_refused(track_disk, storm) -> None:
    a = track_disk("a.raw", 16 * MiB)
    b = track_disk("b.raw", 16 * MiB, seed=2)
    base_id, _ = _base(a)
    _base(b)
    _write(a, storm, 6)
    a.kill9()
    b.stop()
    shutil.copyfile(b.state("rct"), a.state("rct"))
    shutil.copyfile(b.state("mrt"), a.state("mrt"))
    st = a.start()
    assert st["recovery"] == "lost"
    _assert_invalid(a, base_id, "belongs to another disk", "b.raw")


def test_garbage_rct_after_a_clean_stop_uses_the_mrt(track_disk, storm) -> None:
    t = track_disk("c6.raw", 16 * MiB)
    base_id, base = _base(t)
    _write(t, storm, 7)
    t.stop()
    t.state("rct").write_bytes(b"this is not a bitmap file at all\n" * 10)
    st = t.start()
    assert st["recovery"] == "mrt-only" and st["tracking"] == "valid"
    assert any("not a vmbak .rct file" in n for n in st["notes"])
    _assert_superset(t, base_id, base)


def test_after_a_clean_stop_the_mrt_is_not_needed(track_disk, storm) -> None:
    t = track_disk("c7.raw", 16 * MiB)
    base_id, base = _base(t)
    _write(t, storm, 8)
    before = t.status()["dirty_blocks"]
    t.stop()
    t.state("mrt").write_bytes(b"\0" * 100)
    st = t.start()
    assert st["recovery"] == "clean" and st["tracking"] == "valid" and st["dirty_blocks"] == before
    assert any("rebuilt" in n for n in st["notes"])
    _assert_superset(t, base_id, base)
    # the rebuilt MRT works after a crash
    t.kill9()
    assert t.start()["tracking"] == "valid"
    _assert_superset(t, base_id, base)


def test_a_disk_changed_while_untracked_is_invalid(track_disk) -> None:
    t = track_disk("c8.raw", 16 * MiB)
    base_id, _ = _base(t)
    t.stop()
    with open(t.disk, "r+b") as f:  # behind the tracker's back
        f.seek(5 * MiB)
        f.write(b"sneaky")
    t.start()
    _assert_invalid(t, base_id, "written while the tracker was stopped", "content hash differs")


def test_a_disk_that_changed_size_is_invalid(track_disk) -> None:
    t = track_disk("c9.raw", 16 * MiB)
    base_id, _ = _base(t)
    t.stop()
    os.truncate(t.disk, 20 * MiB)
    t.start()
    _assert_invalid(t, base_id, "belongs to another disk", "bytes")
