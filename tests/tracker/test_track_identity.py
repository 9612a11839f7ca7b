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
from pathlib import Path

import pytest
from trackutil import BS, MiB, Tracked


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
    m2 = json.loads(p.stdout)
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
