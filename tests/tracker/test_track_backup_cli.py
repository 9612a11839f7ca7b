"""`vmbak backup --changes track:SOCKET` through the real command line, as issue 3's user
types it: track start, writes by real NBD clients, backups from checkpoints (with
--verify-changes), track status, restores compared byte for byte, failures that abort the
checkpoint, and one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess

from trackutil import BS, MiB

from vmbak.tracker.client import TrackerClient


def qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"qemu-io failed: {p.stdout}\n{p.stderr}"


def status(run_vmbak, sock: str) -> dict:  # noqa: ANN001
    return json.loads(run_vmbak("track", "status", sock, "--json").stdout)


def restore_bytes(repo, snap: str, path) -> bytes:  # noqa: ANN001
    repo.restore(snap, path)
    return path.read_bytes()


def test_backup_chain_from_tracker_checkpoints(track_disk, repo, run_vmbak, tmp_path) -> None:
    """The whole user flow: start, write through NBD, full, incremental (only the changed
    blocks are read), incremental with --verify-changes (0 missed), status, stop; every
    snapshot restores to the disk as it was."""
    t = track_disk("web.raw", 16 * MiB, start=False)
    run_vmbak("track", "start", t.disk, "--socket", t.sock)
    t.pids.append(status(run_vmbak, t.sock)["pid"])  # killed by the fixture if the test fails
    spec = f"track:{t.sock}"

    m1 = repo.json("backup", "--name", "web", "--changes", spec)
    assert m1["type"] == "full" and m1["change_id"]
    st = status(run_vmbak, t.sock)
    assert st["committed_change_id"] == m1["change_id"] and not st.get("checkpoint")
    assert st["dirty_blocks"] == 0
    v1 = t.disk_bytes()

    qemu_io(t.uri, "write -P 0x41 1M 64k", "write -P 0x42 5242980 4096", "write -z 9M 64k")
    assert status(run_vmbak, t.sock)["dirty_blocks"] == 3
    m2 = repo.json("backup", "--name", "web", "--changes", spec)
    assert m2["type"] == "incremental" and m2["change_source"] == "track"
    assert m2["parent"] == m1["id"] and m2["reference"] == m1["change_id"]
    assert m2["stats"]["considered_bytes"] == 3 * BS and m2["stats"]["changed_bytes"] == 3 * BS
    assert m2["stats"]["read_bytes"] <= 3 * BS  # the rest of the disk was never read
    st = status(run_vmbak, t.sock)
    assert st["committed_change_id"] == m2["change_id"] and st["dirty_blocks"] == 0
    v2 = t.disk_bytes()

    qemu_io(t.uri, "write -P 0x43 0 128k", "discard 12M 64k", "write -P 0x44 15M 8k")
    p = repo.run("backup", "--name", "web", "--changes", spec, "--verify-changes", "--json")
    m3 = json.loads(p.stdout.splitlines()[-1])
    assert m3["change_source"] == "track" and m3["stats"]["verify_missed_blocks"] == 0
    assert m3["stats"]["verify_reported_blocks"] == 4 and m3["stats"]["changed_bytes"] == 4 * BS
    assert m3["stats"]["read_bytes"] > 8 * MiB  # --verify-changes read the whole disk
    assert "0 missed" in p.stderr
    text = repo.run("backup", "--name", "web", "--changes", spec, "--verify-changes").stdout
    assert "verify-changes: 0 changed blocks missed" in text
    v3 = t.disk_bytes()

    for m, want in ((m1, v1), (m2, v2), (m3, v3)):
        assert restore_bytes(repo, m["id"], tmp_path / f"r-{m['short_id']}.raw") == want
    run_vmbak("track", "stop", t.sock)
    recs = json.loads(run_vmbak("track", "log", t.disk, "--json").stdout)
    assert [r["event"] for r in recs].count("commit") == 4 and "abort" not in [r["event"] for r in recs]


def test_unknown_change_id_falls_back_to_a_scan(track_disk, repo, run_vmbak, tmp_path) -> None:
    """A parent the tracker knows nothing about (backed up from the file): the backup says
    so, scans the checkpoint, commits it, and the next one is a tracked incremental."""
    t = track_disk("db.raw", 8 * MiB)
    spec = f"track:{t.sock}"
    m1 = repo.backup(t.disk, "db")
    assert m1["change_id"].startswith("image:")
    qemu_io(t.uri, "write -P 0x51 2M 64k")
    p = repo.run("backup", "--name", "db", "--changes", spec, "--json")
    m2 = json.loads(p.stdout.splitlines()[-1])
    assert m2["type"] == "incremental" and m2["change_source"] == "scan"
    assert "scan" in p.stderr and "tracker" in p.stderr
    assert any("tracker" in n for n in m2["notes"])
    assert m2["stats"]["changed_bytes"] == BS
    assert status(run_vmbak, t.sock)["committed_change_id"] == m2["change_id"]
    qemu_io(t.uri, "write -P 0x52 4M 64k")
    m3 = repo.json("backup", "--name", "db", "--changes", spec)
    assert m3["change_source"] == "track" and m3["stats"]["considered_bytes"] == BS
    assert restore_bytes(repo, "db:latest", tmp_path / "db.raw") == t.disk_bytes()


def test_failed_backup_aborts_the_checkpoint(track_disk, repo, run_vmbak, assert_cli_error, tmp_path) -> None:
    """A backup that fails after the checkpoint opened (the repository is locked by a prune)
    aborts it: the tracker keeps the changes, and the next backup captures them."""
    t = track_disk("app.raw", 8 * MiB)
    spec = f"track:{t.sock}"
    m1 = repo.json("backup", "--name", "app", "--changes", spec)
    qemu_io(t.uri, "write -P 0x61 1M 64k", "write -P 0x62 3M 128k")
    lib = repo.open()
    with lib.lock(exclusive=True, purpose="prune"):
        assert_cli_error(repo.run("backup", "--name", "app", "--changes", spec, check=False), "locked")
    st = status(run_vmbak, t.sock)
    assert not st.get("checkpoint") and st["committed_change_id"] == m1["change_id"]
    assert st["dirty_blocks"] == 3
    events = [r["event"] for r in json.loads(run_vmbak("track", "log", t.sock, "--json").stdout)]
    assert events[-2:] == ["checkpoint", "abort"]
    m2 = repo.json("backup", "--name", "app", "--changes", spec)
    assert m2["change_source"] == "track" and m2["stats"]["changed_bytes"] == 3 * BS
    assert restore_bytes(repo, "app:latest", tmp_path / "app.raw") == t.disk_bytes()


def test_track_errors_are_one_line(track_disk, repo, run_vmbak, assert_cli_error, sockdir) -> None:
    t = track_disk("e.raw", 4 * MiB)
    spec = f"track:{t.sock}"
    assert_cli_error(repo.run("backup", "--name", "e", "--changes", "track:", check=False), "track:")
    assert_cli_error(repo.run("backup", "--name", "e", "--changes", f"track:{sockdir}/none.sock", check=False),
                     "no tracker is running")
    dead = str(sockdir / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead + ".ctl")  # a socket file nobody listens on (a tracker that crashed)
    s.close()
    assert_cli_error(repo.run("backup", "--name", "e", "--changes", f"track:{dead}", check=False),
                     "no tracker answers")
    assert_cli_error(repo.run("backup", t.disk, "--name", "e", "--changes", spec, check=False), "no DISK")
    assert_cli_error(repo.run("backup", "--changes", spec, check=False), "--name")
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)  # another backup holds the checkpoint
        assert_cli_error(repo.run("backup", "--name", "e", "--changes", spec, check=False), "already open")
        cp.abort()
    assert not status(run_vmbak, t.sock).get("checkpoint")
    assert repo.snapshots() == []
