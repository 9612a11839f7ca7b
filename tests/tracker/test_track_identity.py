"""Issue 18, defect 2: writes made to the disk while the tracker is stopped.

The tracker cannot see them, so at a clean stop it records the disk's identity (size, inode,
times, a content hash) and at start it must prove the disk untouched, or declare the
tracking invalid so that the next backup scans and says why. Each scenario runs through the
real command line: track start, backup via track:, track stop, a write straight into the
disk file, damage to the state files, track start, backup, restore, byte-for-byte compare."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from trackutil import BS, MiB, Tracked

from vmbak.errors import ChangeTrackingError
from vmbak.tracker import identity
from vmbak.tracker.client import TrackerClient
from vmbak.tracker.formats import DiskIdentity, encode_rct, read_mrt, read_rct


def qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"qemu-io failed: {p.stdout}\n{p.stderr}"


def status(run_vmbak, sock: str) -> dict:  # noqa: ANN001
    return json.loads(run_vmbak("track", "status", sock, "--json").stdout)


def start_cli(run_vmbak, t: Tracked, *extra: str) -> str:  # noqa: ANN001
    p = run_vmbak("track", "start", t.disk, "--socket", t.sock, *extra)
    t.pids.append(status(run_vmbak, t.sock)["pid"])  # killed by the fixture if the test fails
    return p.stdout


def write_behind_the_trackers_back(disk: Path, keep_times: bool = False) -> None:
    """Two 64 KiB blocks, in MRT regions the tracker never marked since its last commit."""
    st = os.stat(disk)
    with open(disk, "r+b") as f:
        for off, pat in ((3 * MiB + 5 * BS, b"\x5a"), (11 * MiB, b"\xa5")):
            f.seek(off)
            f.write(pat * BS)
        f.flush()
        os.fsync(f.fileno())
    if keep_times:  # what cp -p, rsync -t or tar x leave behind
        os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage(t: Tracked, how: str) -> None:
    if how in ("rct-deleted", "both-deleted"):
        t.state("rct").unlink()
    if how == "rct-corrupt":
        p = t.state("rct")
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    if how in ("mrt-deleted", "both-deleted"):
        t.state("mrt").unlink()


def untracked_write_scenario(track_disk, repo, run_vmbak, tmp_path, how: str,  # noqa: ANN001
                             keep_times: bool = False, start_args: tuple[str, ...] = (),
                             then_tracked: bool = False) -> None:
    name = f"id-{how}"
    t = track_disk(f"{name}.raw", 16 * MiB, start=False)
    start_cli(run_vmbak, t, *start_args)
    spec = f"track:{t.sock}"
    m1 = repo.json("backup", "--name", name, "--changes", spec)
    qemu_io(t.uri, "write -P 0x41 1M 64k")  # a tracked change after the backup: the MRT marks its region
    run_vmbak("track", "stop", t.sock)

    write_behind_the_trackers_back(t.disk, keep_times)
    damage(t, how)
    out = start_cli(run_vmbak, t, *start_args)
    st = status(run_vmbak, t.sock)
    assert st["tracking"] == "invalid", st
    assert "while the tracker was stopped" in st["invalid_reason"], st["invalid_reason"]
    assert "tracking invalid" in out and "while the tracker was stopped" in out
    text = run_vmbak("track", "status", t.sock).stdout
    assert "tracking:    invalid - " in text and "while the tracker was stopped" in text

    p = repo.run("backup", "--name", name, "--changes", spec, "--json")
    m2 = json.loads(p.stdout.splitlines()[-1])
    assert m2["parent"] == m1["id"] and m2["change_source"] == "scan", m2
    assert "scan" in p.stderr and "while the tracker was stopped" in p.stderr, p.stderr
    assert any("while the tracker was stopped" in n for n in m2["notes"]), m2["notes"]
    assert m2["stats"]["changed_bytes"] == 3 * BS  # the tracked block and the two untracked ones
    restored = tmp_path / f"{name}-restored.raw"
    repo.restore(m2["id"], restored)
    assert restored.read_bytes() == t.disk_bytes()
    if not then_tracked:
        return

    # the scan's commit starts a new, complete chain: the next backup is tracked again
    st = status(run_vmbak, t.sock)
    assert st["tracking"] == "valid" and st["committed_change_id"] == m2["change_id"]
    qemu_io(t.uri, "write -P 0x42 7M 64k")
    m3 = repo.json("backup", "--name", name, "--changes", spec)
    assert m3["change_source"] == "track" and m3["stats"]["changed_bytes"] == BS
    restored = tmp_path / f"{name}-restored-next.raw"
    repo.restore(m3["id"], restored)
    assert restored.read_bytes() == t.disk_bytes()
    run_vmbak("track", "stop", t.sock)


@pytest.mark.parametrize("how", ["rct-deleted", "rct-corrupt"])
def test_lost_rct_after_untracked_writes_forces_a_scan(track_disk, repo, run_vmbak, tmp_path, how) -> None:
    """The reproduction of issue 18: clean stop, writes to the file, .rct gone: the .mrt
    alone cannot prove the disk untouched."""
    untracked_write_scenario(track_disk, repo, run_vmbak, tmp_path, how, then_tracked=how == "rct-deleted")


@pytest.mark.parametrize("how", ["none", "mrt-deleted"])
def test_untracked_writes_with_the_rct_intact_force_a_scan(track_disk, repo, run_vmbak, tmp_path, how) -> None:
    """.rct and .mrt both present, or the clean .rct alone; the writer put the times back."""
    untracked_write_scenario(track_disk, repo, run_vmbak, tmp_path, how, keep_times=True)


@pytest.mark.parametrize("how", ["rct-deleted"])
def test_without_a_full_hash_the_change_time_still_tells(track_disk, repo, run_vmbak, tmp_path, how) -> None:
    """--identity-hash-limit 0: only a sample is hashed; the modification time was put back,
    the change time cannot be."""
    untracked_write_scenario(track_disk, repo, run_vmbak, tmp_path, how, keep_times=True,
                             start_args=("--identity-hash-limit", "0"))


# ---------------------------------------------------------------------------- library level, fast
def _commit(t: Tracked) -> str:
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        cp.commit()
        return cp.change_id


def _tracking(t: Tracked, since: str) -> tuple[str, str]:
    """(tracking, invalid_reason or the identity note) after a start; the change ID is
    accepted exactly when the tracking is valid."""
    st = t.status()
    with TrackerClient(t.sock) as c:
        try:
            c.checkpoint(since, BS).abort()
            assert st["tracking"] == "valid"
        except ChangeTrackingError as e:
            assert st["tracking"] == "invalid" and "\n" not in str(e)
    return st["tracking"], st["invalid_reason"] or (st["identity_check"] or {}).get("reason", "")


def test_a_write_right_after_the_stop_is_seen_without_a_full_hash(track_disk) -> None:
    """A one-byte write right after the stop, where the sample does not look: the times
    catch it (the stop waited until the clock had passed the disk's timestamps)."""
    t = track_disk("quick.raw", 8 * MiB, identity_hash_limit=0)
    since = _commit(t)
    qemu_io(t.uri, "write -P 0x11 0 64k")
    t.stop()
    with open(t.disk, "r+b") as f:
        ident = DiskIdentity.of(str(t.disk), f.fileno())
        sampled = set(read_rct(str(t.state("rct")), ident).stop_identity["hash"]["offsets"])
        f.seek(next(o for o in range(0, 8 * MiB, BS) if o not in sampled) + 12345)  # the sample misses it
        f.write(b"x")
    t.start()
    state, why = _tracking(t, since)
    assert state == "invalid" and "modification time changed" in why


def test_an_untouched_disk_stays_tracked(track_disk) -> None:
    """No false alarm: a clean stop and start, with a full hash and with only a sample; with
    a full hash even a chmod is no reason to scan, with a sample it is (and says so)."""
    for limit, name in ((256 * MiB, "full.raw"), (0, "sample.raw")):
        t = track_disk(name, 8 * MiB, identity_hash_limit=limit)
        since = _commit(t)
        qemu_io(t.uri, "write -P 0x12 1M 64k")
        t.stop()
        t.start()
        state, why = _tracking(t, since)
        assert state == "valid", why
        assert ("content hash matches" if limit else "sampled blocks are unchanged") in why
        t.stop()
        os.chmod(t.disk, 0o640)
        t.start()
        state, why = _tracking(t, since)
        if limit:
            assert state == "valid" and "content hash matches" in why
        else:
            assert state == "invalid" and "change time (ctime) changed" in why
        t.stop()


def test_a_clean_stop_by_an_older_vmbak_is_not_trusted(track_disk) -> None:
    """An .rct whose clean stop recorded no identity (only the modification time): scan once."""
    t = track_disk("old.raw", 8 * MiB)
    since = _commit(t)
    t.stop()
    ident = _ident(t)
    st = read_rct(str(t.state("rct")), ident)
    st.stop_identity = None
    t.state("rct").write_bytes(encode_rct(ident, st))
    t.start()
    state, why = _tracking(t, since)
    assert state == "invalid" and "recorded no disk identity" in why


def test_sample_only_proves_a_change(tmp_path) -> None:
    """The identity of a file: a full hash follows the logical content (a hole and written
    zeros hash alike); a sample sees a change in a sampled block and misses others, which is
    why a sample alone never proves a disk untouched."""
    p = tmp_path / "d.raw"
    with open(p, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(MiB)
        f.write(os.urandom(BS))
    fd = os.open(p, os.O_RDWR)
    try:
        full = identity.take(fd, hash_limit=MiB)
        assert full["hash"]["kind"] == "full" and full["hash"]["data_bytes"] == MiB  # holes are not read
        os.pwrite(fd, bytes(BS), 20 * MiB)  # zeros over a hole: same content
        assert identity.verify(full, fd).proven
        sample = identity.take(fd, hash_limit=0)
        assert sample["hash"]["kind"] == "sample" and len(sample["hash"]["offsets"]) == identity.SAMPLE_COUNT
        offs = set(sample["hash"]["offsets"])
        unsampled = next(o for o in range(0, 32 * MiB, BS) if o not in offs)
        identity.settle(fd)
        os.pwrite(fd, b"\1", unsampled)
        assert not identity.verify(full, fd).proven
        v = identity.verify(sample, fd)
        assert not v.proven and "modification time" in v.reason  # the times caught it, not the sample
        os.utime(fd, ns=(sample["mtime_ns"], sample["mtime_ns"]))
        v = identity.verify(sample, fd)
        assert not v.proven and "ctime" in v.reason
        os.pwrite(fd, b"\2", sorted(offs)[1])
        v = identity.verify(sample, fd)
        assert not v.proven and "sampled blocks differ" in v.reason
    finally:
        os.close(fd)


def test_a_block_device_is_proven_only_by_a_full_hash(tmp_path) -> None:
    """A block device has no modification time: a matching sample proves nothing."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(os.urandom(4 * MiB))
    p = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    assert p.returncode == 0, f"losetup failed (the tests run as root, with util-linux): {p.stderr.strip()}"
    dev = p.stdout.strip()
    try:
        fd = os.open(dev, os.O_RDWR)
        try:
            full = identity.take(fd, hash_limit=4 * MiB)
            sample = identity.take(fd, hash_limit=MiB)
            assert full["kind"] == "block" and full["size"] == 4 * MiB and full["mtime_ns"] is None
            assert identity.verify(full, fd).proven
            v = identity.verify(sample, fd)
            assert not v.proven and "block device has no modification time" in v.reason
            os.pwrite(fd, b"\1" * 512, 2 * MiB)
            os.fsync(fd)
            v = identity.verify(full, fd)
            assert not v.proven and "content hash differs" in v.reason
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.mark.parametrize("written", [True, False])
def test_after_a_crash_a_change_later_than_the_lease_is_seen(track_disk, storm, written) -> None:
    """kill -9, then (or not) a write into the file once the crashed tracker's lease (1 s
    here) has run out: the .mrt's lease shows the tracker cannot have made it."""
    t = track_disk(f"crash-{written}.raw", 8 * MiB, crash_lease=1.0, rct_interval=0.1)
    since = _commit(t)
    w = storm(t, 3, "--count", "100")
    assert w.wait(60) == 0, w.stderr.read()
    t.kill9()
    time.sleep(1.2)
    if written:
        with open(t.disk, "r+b") as f:
            f.seek(7 * MiB)
            f.write(b"after the crash")
    t.start()
    state, why = _tracking(t, since)
    if written:
        assert state == "invalid" and "after the crashed tracker's lease ran out" in why, why
    else:
        assert state == "valid" and "before the crashed tracker's lease ran out" in why, why
        assert any(n.startswith("crash recovery:") for n in t.status()["notes"])


def test_the_lease_is_renewed_while_writing(track_disk) -> None:
    """Writes keep the lease on stable storage ahead of them."""
    t = track_disk("lease.raw", 8 * MiB, crash_lease=1.0)
    for i in range(4):
        qemu_io(t.uri, f"write -P {i + 1} {i}M 64k")
        st = t.status()
        lease = read_mrt(str(t.state("mrt")), _ident(t)).header["lease_until_ns"] / 1e9
        assert lease > os.stat(t.disk).st_ctime_ns / 1e9, st
        time.sleep(0.5)


def _ident(t: Tracked) -> DiskIdentity:
    fd = os.open(t.disk, os.O_RDONLY)
    try:
        return DiskIdentity.of(str(t.disk), fd)
    finally:
        os.close(fd)
