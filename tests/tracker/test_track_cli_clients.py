"""The track command line and real NBD clients (qemu-io, qemu-img, nbdcopy, nbdinfo, libnbd)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import nbd
import numpy as np
from trackutil import BS, MiB, changed_blocks, wait_for

from vmbak.tracker import daemon
from vmbak.tracker.client import TrackerClient


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd[0]} failed: {p.stdout}\n{p.stderr}"
    return p


def test_cli_start_status_log_stop(run_vmbak, assert_cli_error, tmp_path, sockdir) -> None:
    disk = tmp_path / "web.raw"
    disk.write_bytes(np.random.default_rng(5).bytes(8 * MiB))
    sock = str(sockdir / "web.sock")
    state = tmp_path / "state"
    p = run_vmbak("track", "start", disk, "--socket", sock, "--state-dir", state, "--block-size", "32K",
                  "--mrt-region", "2M", "--rct-interval", "1")
    assert "tracking" in p.stdout and sock in p.stdout
    pid = json.loads(run_vmbak("track", "status", sock, "--json").stdout)["pid"]
    try:
        uri = f"nbd+unix:///?socket={sock}"
        _run("qemu-io", "-f", "raw", "-c", "write -P 0x41 0 96k", "-c", "discard 4M 64k", uri)
        st = json.loads(run_vmbak("--json", "track", "status", sock).stdout)
        assert st["block_size"] == 32768 and st["mrt_region_size"] == 2 * MiB
        assert st["dirty_blocks"] == 5 and st["dirty_bytes"] == 5 * 32768
        assert st["mrt_dirty_regions"] == 2 and st["tracking"] == "valid"
        assert st["rct"] == str(state / "web.raw.vmbak.rct")
        text = run_vmbak("track", "status", sock).stdout
        assert "tracking:    valid" in text and "160.0 KiB" in text
        assert_cli_error(run_vmbak("track", "start", disk, "--socket", sock, check=False), "already listening")
        other = str(sockdir / "other.sock")
        assert_cli_error(run_vmbak("track", "start", disk, "--socket", other, "--state-dir", state, check=False),
                         "already tracked")
        assert not os.path.exists(other)
        p = run_vmbak("track", "stop", sock)
        assert "stopped" in p.stdout
        assert not os.path.exists(sock) and not os.path.exists(sock + ".ctl")
        assert not daemon.pid_alive(pid)
    finally:
        if daemon.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    recs = json.loads(run_vmbak("track", "log", disk, "--state-dir", state, "--json").stdout)
    assert [r["event"] for r in recs] == ["start", "stop"]
    assert recs[-1]["clean"] is True
    text = run_vmbak("track", "log", disk, "--state-dir", state).stdout
    assert "start" in text and "stop" in text
    assert_cli_error(run_vmbak("track", "status", sock, check=False), "no tracker")
    assert_cli_error(run_vmbak("track", "stop", sock, check=False), "no tracker")
    assert_cli_error(run_vmbak("track", "log", disk, check=False), "no change log")


def test_cli_user_errors_are_one_line(run_vmbak, assert_cli_error, tmp_path, sockdir) -> None:
    sock = str(sockdir / "x.sock")
    assert_cli_error(run_vmbak("track", "start", tmp_path / "missing.raw", "--socket", sock, check=False),
                     "disk not found")
    assert_cli_error(run_vmbak("track", "start", tmp_path, "--socket", sock, check=False), "not a regular file")
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    assert_cli_error(run_vmbak("track", "start", disk, "--socket", sock, "--block-size", "3000", check=False),
                     "power of two")
    assert_cli_error(run_vmbak("track", "start", disk, "--socket", "/tmp/" + "x" * 120, check=False),
                     "too long")
    assert_cli_error(run_vmbak("track", "start", disk, "--socket", "/nonexistent/dir/s.sock", check=False),
                     "socket directory does not exist")
    assert_cli_error(run_vmbak("track", "start", disk, "--socket", sock, "--tcp", "localhost:notaport",
                               check=False), "--tcp")
    (tmp_path / "plain").write_text("x")
    assert_cli_error(run_vmbak("track", "status", tmp_path / "plain", check=False), "no tracker")
    assert_cli_error(run_vmbak("track", "log", tmp_path / "nothing", check=False), "no such socket or disk")


def test_cli_foreground_and_sigterm_stop_cleanly(popen_vmbak, tmp_path, sockdir) -> None:
    disk = tmp_path / "fg.raw"
    disk.write_bytes(bytes(4 * MiB))
    sock = str(sockdir / "fg.sock")
    proc = popen_vmbak("track", "start", disk, "--socket", sock, "--foreground")
    try:
        wait_for(lambda: os.path.exists(sock + ".ctl"), 30, "the foreground tracker")
        wait_for(lambda: _ping(sock), 10, "the control socket")
        with TrackerClient(sock) as c:
            assert c.pid == proc.pid  # nbdkit runs in the vmbak process itself
        h = nbd.NBD()
        h.connect_unix(sock)
        h.pwrite(b"q" * 4096, 0)
        h.shutdown()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "fg.raw.vmbak.log").read_text().strip().splitlines()
    stop = json.loads(log[-1])
    assert stop["event"] == "stop" and stop["clean"] is True and stop["dirty_blocks"] == 1


def _ping(sock: str) -> bool:
    try:
        TrackerClient(sock).close()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_qemu_tools_and_libnbd_tools_work(track_disk, tmp_path) -> None:
    t = track_disk("tools.raw", 16 * MiB)
    uri = t.uri
    with TrackerClient(t.sock) as c:
        c.checkpoint(None, BS).commit()
        base_id = c.status()["committed_change_id"]
    before = t.disk_bytes()
    info = json.loads(_run("nbdinfo", "--json", uri).stdout)
    assert info["exports"][0]["export-size"] == 16 * MiB
    assert info["exports"][0]["can_trim"] and info["exports"][0]["can_zero"]
    qinfo = json.loads(_run("qemu-img", "info", "--output=json", uri).stdout)
    assert qinfo["virtual-size"] == 16 * MiB
    _run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "aio_write -P 0x5b 3M 128k", "-c", "aio_flush",
         "-c", "discard 5M 64k", "-c", "write -z 7M 64k", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 5M 64k",
         uri)
    src = tmp_path / "src.raw"
    src.write_bytes(np.random.default_rng(9).bytes(MiB) + bytes(MiB))
    _run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), f"nbd+unix:///?socket={t.sock}")
    copy = tmp_path / "copy.raw"
    _run("nbdcopy", uri, str(copy))
    assert copy.read_bytes() == t.disk_bytes()
    _run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy), uri)
    # nbdcopy into the tracker (multi-conn, several requests in flight)
    incoming = tmp_path / "incoming.raw"
    incoming.write_bytes(np.random.default_rng(10).bytes(2 * MiB))
    _run("nbdcopy", str(incoming), uri)
    mapping = _run("nbdinfo", "--map", uri).stdout
    assert "data" in mapping
    now = t.disk_bytes()
    assert now[:2 * MiB] == incoming.read_bytes()
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(base_id, BS)
        actual = changed_blocks(before, now)
        assert not (actual & ~cp.change_map.bitmap).any()
        expect = np.zeros(16 * MiB // BS, bool)
        expect[:2 * MiB // BS] = True  # convert and nbdcopy
        for off, ln in ((1 * MiB, BS), (3 * MiB, 2 * BS), (5 * MiB, BS), (7 * MiB, BS)):
            expect[off // BS:(off + ln) // BS] = True
        assert np.array_equal(cp.change_map.bitmap, expect)
        cp.abort()


def test_several_clients_at_once(track_disk) -> None:
    t = track_disk("multi.raw", 32 * MiB, fill="zero")
    n_threads, per = 6, 40
    errors: list[BaseException] = []
    expect = np.zeros(32 * MiB // BS, bool)

    def client(k: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_unix(t.sock)
            for i in range(per):
                b = k * per + i
                h.pwrite(bytes([k + 1]) * BS, b * BS)
            h.flush()
            h.shutdown()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    for k in range(n_threads):
        expect[k * per:(k + 1) * per] = True
    qio = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x77 30M 1M", t.uri],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    expect[30 * MiB // BS:31 * MiB // BS] = True
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    reader = subprocess.Popen(["nbdcopy", t.uri, "null:"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for th in threads:
        th.join()
    assert qio.wait(60) == 0, qio.stderr.read()
    assert reader.wait(60) == 0
    assert not errors, errors
    data = t.disk_bytes()
    for k in range(n_threads):
        assert data[k * per * BS:(k + 1) * per * BS] == bytes([k + 1]) * (per * BS)
    with TrackerClient(t.sock) as c:
        cp = c.checkpoint(None, BS)
        cp.abort()
        st = c.status()
        assert st["dirty_blocks"] == int(expect.sum())


def test_tcp_listener_on_loopback(track_disk) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = track_disk("tcp.raw", 8 * MiB, tcp=str(port))
    assert t.last_status["tcp"] == f"127.0.0.1:{port}"
    _run("qemu-io", "-f", "raw", "-c", "write -P 0x33 2M 64k", f"nbd://127.0.0.1:{port}")
    assert t.disk_bytes()[2 * MiB:2 * MiB + BS] == b"\x33" * BS
    assert t.status()["dirty_blocks"] == 1
    out = _run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}").stdout
    assert int(out) == 8 * MiB
    time.sleep(0.1)
