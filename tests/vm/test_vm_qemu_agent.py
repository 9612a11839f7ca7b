"""`vmbak backup --changes qemu:QMP:NODE --guest-agent SOCKET`: the test guest run by QEMU
itself (no libvirt), with QMP and the guest agent's chardev on unix sockets. vmbak freezes
the guest through the agent's own protocol around the QMP transaction that makes the
point-in-time view.

QEMU's chardev socket serves one client at a time, so the test connects to the agent only
between vmbak runs, and closes the connection each time.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_ready import writer_started

from vmbak.guest.agent import AgentError, SocketAgent

# the first test also builds the guest (once) and boots it
pytestmark = [pytest.mark.xdist_group("vm-qemu-guest"), pytest.mark.timeout(4800)]
MARKER = "VMBAK-GUEST-READY"


class QemuGuest:
    def __init__(self, image: Path, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.disk = workdir / "vda.qcow2"
        self.qmp = workdir / "qmp.sock"
        self.qga = workdir / "qga.sock"
        self.console = workdir / "console.log"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(image / "disk.qcow2"), str(self.disk)], check=True)
        accel = os.environ.get("VMBAK_TEST_GUEST_VIRT") == "kvm" and "kvm" or "tcg"
        node = {"driver": "qcow2", "node-name": "vda", "file": {"driver": "file", "filename": str(self.disk)}}
        self.proc = subprocess.Popen([
            "qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", "384", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", "root=/dev/vda1 rw console=ttyS0 panic=10",
            "-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=vda,id=vda0",
            "-serial", f"file:{self.console}",
            "-chardev", f"socket,path={self.qga},server=on,wait=off,id=qga0",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.boot_s: float | None = None

    def wait_ready(self, timeout: float = 900) -> None:
        t0 = probe = time.monotonic()
        while MARKER not in self.console_text():
            assert self.proc.poll() is None, f"QEMU exited: {self.proc.stderr.read().decode()}"
            assert time.monotonic() < t0 + timeout, f"no {MARKER}:\n{self.console_text()[-3000:]}"
            if time.monotonic() >= probe:  # the line can be lost: see guest_ready.py
                probe = time.monotonic() + 10
                if writer_started(self.agent):
                    break
            time.sleep(0.5)
        while True:
            try:
                self.agent("guest-ping")
                break
            except AgentError:
                assert time.monotonic() < t0 + timeout, "the guest agent does not answer"
                time.sleep(0.5)
        self.boot_s = time.monotonic() - t0

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def agent(self, command: str, **arguments: object) -> object:
        a = SocketAgent(str(self.qga))
        try:
            return a.execute(command, arguments or None)
        finally:
            a.close()

    def assert_thawed(self) -> None:
        assert self.agent("guest-fsfreeze-status") == "thawed"
        pid = self.agent("guest-exec", path="/bin/sh", arg=["-c", "echo ok > /root/probe && sync /root/probe"],
                         **{"capture-output": True})["pid"]  # type: ignore[index]
        deadline = time.monotonic() + 60
        while not (st := self.agent("guest-exec-status", pid=pid))["exited"]:  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert st.get("exitcode") == 0, (st, base64.b64decode(st.get("err-data", "")))  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def qguest(guest_image: Path) -> Iterator[QemuGuest]:
    workdir = Path(f"/tmp/vmbak-vmq-{os.getpid()}-{secrets.token_hex(3)}")
    workdir.mkdir()
    g = QemuGuest(guest_image, workdir)
    try:
        g.wait_ready()
        print(f"\nQEMU guest booted in {g.boot_s:.1f} s", file=sys.stderr)
        yield g
    finally:
        g.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_qemu_source_frozen_through_the_agent_socket(qguest, repo, tmp_path, check_restored_root,  # noqa: ANN001
                                                     assert_cli_error) -> None:
    spec = f"qemu:{qguest.qmp}:vda"
    r = repo.json("backup", "--name", "q", "--changes", spec, "--guest-agent", qguest.qga, "--freeze", "always",
                  "--hook-pre", "/bin/true")
    c = r["guest_consistency"]
    assert c["level"] == "frozen" and c["filesystems"] >= 1 and c["hooks"] == ["pre"], c
    print(f"\nqemu: frozen {c['frozen_s']:.3f} s", file=sys.stderr)
    qguest.assert_thawed()
    img = tmp_path / "q.raw"
    repo.run("restore", "q:latest", img)
    res = check_restored_root(img, tmp_path)
    assert res["state"] == "clean" and "needs_recovery" not in res["features"] and res["fsck_rc"] == 0, res
    assert not res["missing"] and not res["wrong"] and res["logged_files"] > 0, res

    # an incremental through the bitmap, frozen again
    r2 = repo.json("backup", "--name", "q", "--changes", spec, "--guest-agent", qguest.qga)
    assert r2["guest_consistency"]["level"] == "frozen" and r2["change_source"] == "qemu-dirty-bitmap", r2
    qguest.assert_thawed()

    # no agent on that socket: always fails with one line and leaves nothing in QEMU; auto is crash
    nosock = tmp_path / "nosuch.sock"
    assert_cli_error(repo.run("backup", "--name", "q", "--changes", spec, "--guest-agent", nosock,
                              "--freeze", "always", check=False), "no backup", "guest agent")
    p = repo.run("backup", "--name", "q", "--changes", spec, "--guest-agent", nosock, "--json")
    assert json.loads(p.stdout.splitlines()[-1])["guest_consistency"]["level"] == "crash" and "crash-consistent" in p.stderr
    assert_cli_error(repo.run("backup", "--name", "q", "--changes", spec, "--freeze", "always", check=False),
                     "--freeze always", "guest agent")
    qguest.assert_thawed()


    # The writer says it is ready again every 25 files: one line on the console can be lost
    # (scripts/build-test-guest.sh), and a boot test that waits for it would wait in vain.
    deadline = time.monotonic() + 60
    while qguest.console_text().count(MARKER) < 2:
        assert time.monotonic() < deadline, f"{MARKER} printed only once:\n{qguest.console_text()[-2000:]}"
        time.sleep(0.5)
