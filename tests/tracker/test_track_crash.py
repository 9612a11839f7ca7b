"""Crash resilience: write storms from real NBD clients with kill -9 of the tracker.

After every restart, the blocks that really changed since the last committed checkpoint
(the disk compared with a copy taken at that checkpoint) must all be reported: zero
misses, every time. The over-reporting ratio is printed.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import numpy as np
from trackutil import BS, MiB, changed_blocks, stop_proc, storm

from vmbak.tracker.client import TrackerClient

ITERATIONS = int(os.environ.get("VMBAK_STORM_ITERATIONS", "60"))


def _qemu_io_storm(uri: str, rng: random.Random, size: int) -> subprocess.Popen:
    cmds: list[str] = []
    for _ in range(300):
        r = rng.random()
        ln = rng.choice([4096, 65536, 262144, 1 << 20])
        off = rng.randrange(0, (size - ln) // 4096) * 4096
        if r < 0.6:
            cmds += ["-c", f"write -P {rng.randrange(256)} {off} {ln}"]
        elif r < 0.8:
            cmds += ["-c", f"discard {off} {ln}"]
        else:
            cmds += ["-c", f"write -z {off} {ln}"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, uri], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill9_during_write_storms_never_misses_a_change(track_disk) -> None:
    rng = random.Random(20261122)
    t = track_disk("storm.raw", 16 * MiB, rct_interval=0.2)
    size = 16 * MiB
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        cp.commit()
    base_id, base = cp.change_id, t.disk_bytes()
    actual_total = reported_total = 0
    scenarios: dict[str, int] = {}
    for i in range(ITERATIONS):
        writers = [storm(t, 1000 + i)]
        if i % 3 == 0:
            writers.append(_qemu_io_storm(t.uri, rng, size))
        if i % 4 == 1:
            writers.append(storm(t, 5000 + i))
        scenario = rng.choice(["plain", "plain", "commit-mid", "open-checkpoint"])
        scenarios[scenario] = scenarios.get(scenario, 0) + 1
        time.sleep(rng.uniform(0.05, 0.35))
        holder = None
        if scenario == "commit-mid":
            # a backup while the storm goes on: the frozen view is what gets committed
            c = TrackerClient(t.sock)
            cp = c.checkpoint(base_id, BS)
            frozen = cp.reader.pread(size, 0)
            missed = changed_blocks(base, frozen) & ~cp.change_map.bitmap
            assert not missed.any(), f"iteration {i}: checkpoint missed blocks {np.flatnonzero(missed)[:20]}"
            cp.commit()
            c.close()
            base_id, base = cp.change_id, frozen
            time.sleep(rng.uniform(0.0, 0.2))
        elif scenario == "open-checkpoint":
            holder = TrackerClient(t.sock)
            holder.checkpoint(base_id, BS)  # a backup in progress when the tracker dies
            time.sleep(rng.uniform(0.0, 0.2))
        t.kill9()
        for w in writers:
            stop_proc(w)
        if holder is not None:
            holder.close()
        st = t.start()
        assert st["recovery"] == "unclean", st
        assert st["tracking"] == "valid", st
        now = t.disk_bytes()
        with TrackerClient(t.sock) as c:
            cp = c.checkpoint(base_id, BS)
            actual = changed_blocks(base, now)
            reported = cp.change_map.bitmap
            missed = actual & ~reported
            assert not missed.any(), (f"iteration {i} ({scenario}): {int(missed.sum())} changed blocks not "
                                      f"reported: {np.flatnonzero(missed)[:20]}")
            actual_total += int(actual.sum())
            reported_total += int(reported.sum())
            cp.commit()
        base_id, base = cp.change_id, now
    ratio = reported_total / max(1, actual_total)
    print(f"\nstorm: {ITERATIONS} kill -9 iterations {scenarios}; actually changed blocks {actual_total}, "
          f"reported {reported_total}, misses 0, over-reporting ratio {ratio:.2f}")
    log = (t.state("log")).read_text()
    assert log.count('"recovery": "unclean"') >= ITERATIONS


def test_over_reporting_after_a_crash_is_bounded_by_mrt_regions(track_disk) -> None:
    """Writes whose .rct bits were never written back are reported as their whole MRT region,
    and no more: the worst case is region size / block size (16 by default)."""
    import nbd

    t = track_disk("bound.raw", 64 * MiB, fill="sparse", rct_interval=3600)
    with TrackerClient(t.sock) as c:
        c.checkpoint(None, BS).commit()
        base_id = c.status()["committed_change_id"]
    h = nbd.NBD()
    h.connect_unix(t.sock)
    rng = np.random.default_rng(8)
    blocks = sorted(rng.choice(64 * MiB // BS, 25, replace=False).tolist())
    for b in blocks:
        h.pwrite(b"\x01" * 4096, b * BS)
    t.kill9()
    t.start()
    per_region = MiB // BS
    expect = np.zeros(64 * MiB // BS, bool)
    for b in blocks:
        expect[b // per_region * per_region:(b // per_region + 1) * per_region] = True
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(base_id, BS)
        assert np.array_equal(cp.change_map.bitmap, expect)
        cp.abort()
    print(f"\nworst case after a crash: {len(blocks)} written blocks reported as {int(expect.sum())} "
          f"(ratio {expect.sum() / len(blocks):.1f})")


def test_clean_stop_and_restart_keeps_the_exact_bitmaps(track_disk) -> None:
    t = track_disk("clean.raw", 32 * MiB, fill="sparse")
    import nbd

    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        cp.commit()
    h = nbd.NBD()
    h.connect_unix(t.sock)
    written = np.zeros(32 * MiB // BS, bool)
    rng = np.random.default_rng(3)
    for b in rng.choice(len(written), 40, replace=False).tolist():
        h.pwrite(b"\xab" * 4096, b * BS + 8192)  # 4 KiB inside the block: exactly that block changes
        written[b] = True
    h.trim(2 * BS, 100 * BS)
    h.zero(BS, 200 * BS)
    written[[100, 101, 200]] = True
    h.shutdown()
    before = t.status()
    t.stop()
    log = t.state("log").read_text().strip().splitlines()[-1]
    assert '"event": "stop"' in log and '"clean": true' in log
    st = t.start()
    assert st["recovery"] == "clean" and st["tracking"] == "valid"
    assert st["dirty_blocks"] == before["dirty_blocks"] == int(written.sum())
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(cp.change_id, BS)
        assert np.array_equal(cp.change_map.bitmap, written), "the restart changed the bitmap"
        cp.abort()
    # and again, after an rct write-back and an unclean stop, nothing is lost
    t.kill9()
    st = t.start()
    assert st["recovery"] == "unclean"
    with TrackerClient(t.sock) as c:
        cp2 = c.checkpoint(cp.change_map.reference, BS)
        assert not (written & ~cp2.change_map.bitmap).any()
        cp2.abort()
