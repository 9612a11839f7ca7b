"""Fixtures for the tests that run a real guest: a Debian system booted under libvirt.

* ``guest_image`` (session): the cached guest built by ``scripts/build-test-guest.sh``
  (``$VMBAK_TEST_GUEST_DIR``, default /var/cache/vmbak-test-guest): built when absent,
  under a file lock, so concurrent pytest-xdist workers build it once.
* ``guest`` (module): a transient libvirt domain on a copy-on-write overlay of the cached
  disk, booted by direct kernel boot (KVM when libvirt offers it, else TCG), with the
  agent channel ``org.qemu.guest_agent.0`` and the serial console in a file. Ready once
  the console shows VMBAK-GUEST-READY (the guest's writer logged its first file) and
  the agent answers ``guest-ping``. Destroyed at the end of the module.

The guest is real: its writes come from its own vmbak-writer service, and the tests talk
to its qemu-guest-agent through libvirt (``Guest.agent``, ``Guest.exec``). Use
``@pytest.mark.xdist_group("vm-guest")`` so that the tests of one guest run on one worker
(``--dist loadgroup``) and boot it once.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt  # Debian's python3-libvirt (scripts/setup.sh installs it)
import libvirt_qemu
import pytest
from guest_ready import writer_started

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-test-guest.sh"
URI = "qemu:///system"
MARKER = "VMBAK-GUEST-READY"
PART_OFFSET = 1 << 20  # partition 1 (the root filesystem) starts at 1 MiB
WRITER_DIR = "/var/lib/vmbak-writer"

DOMAIN_XML = """<domain type='{virt}'>
  <name>{name}</name>
  <memory unit='MiB'>384</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>root=/dev/vda1 rw console=ttyS0 panic=10 systemd.show_status=1</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>"""


def build_guest_image() -> tuple[Path, float]:
    """The cached guest's directory (built now when absent) and the seconds spent here."""
    t0 = time.monotonic()
    base = Path(os.environ.get("VMBAK_TEST_GUEST_DIR") or "/var/cache/vmbak-test-guest")
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".fixture-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the script locks too; this keeps workers quiet meanwhile
        p = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, f"{BUILD_SCRIPT} failed:\n{p.stdout}\n{p.stderr}"
    return Path(p.stdout.strip().splitlines()[-1]), time.monotonic() - t0


@pytest.fixture(scope="session")
def guest_image() -> Path:
    out, took = build_guest_image()
    if took > 30:
        print(f"\nbuilt the test guest in {took:.0f} s: {out}", file=sys.stderr)
    return out


class Guest:
    """A booted test guest (a transient libvirt domain)."""

    def __init__(self, conn, image: Path, workdir: Path) -> None:  # noqa: ANN001
        self.conn = conn
        self.image = image
        self.workdir = workdir
        self.name = f"vmbak-vm-{os.getpid()}-{secrets.token_hex(3)}"
        self.disk = workdir / "vda.qcow2"
        self.console = workdir / "console.log"
        self.boot_s: float | None = None
        # a KVM that ran nothing once is not tried again (delete the file to try again)
        self.kvm_broken = image.parent / "kvm-runs-nothing"
        self.virt = os.environ.get("VMBAK_TEST_GUEST_VIRT") or (
            "kvm" if _kvm_ok(conn) and not self.kvm_broken.exists() else "qemu")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(image / "disk.qcow2"), str(self.disk)], check=True)
        os.chmod(self.disk, 0o666)
        self.dom = None

    def _create(self) -> None:
        xml = DOMAIN_XML.format(virt=self.virt, name=self.name, kernel=self.image / "vmlinuz",
                                initrd=self.image / "initrd.img", disk=self.disk, console=self.console)
        self.dom = self.conn.createXML(xml, 0)

    def start(self, timeout: float = 900) -> None:
        t0 = time.monotonic()
        self._create()
        if self.virt == "kvm":
            # A /dev/kvm that opens is not always a KVM that runs a guest (nested
            # virtualisation): without a word on the console soon, boot with TCG instead.
            while not self.console_text() and time.monotonic() < t0 + 45:
                time.sleep(0.5)
            if not self.console_text():
                self.dom.destroy()
                self.kvm_broken.touch()
                self.virt = "qemu"
                t0 = time.monotonic()
                self._create()
        deadline = t0 + timeout
        probe = t0
        while MARKER not in self.console_text():
            assert self.dom.isActive(), f"the guest stopped while booting:\n{self.console_tail()}"
            assert time.monotonic() < deadline, f"no {MARKER} after {timeout} s:\n{self.console_tail()}"
            if time.monotonic() >= probe:  # the line can be lost: see guest_ready.py
                probe = time.monotonic() + 10
                if self.ping() and writer_started(lambda c, **a: self.agent(c, timeout=10, **a)):
                    break
            time.sleep(0.5)
        while not self.ping():
            assert time.monotonic() < deadline, f"the guest agent does not answer:\n{self.console_tail()}"
            time.sleep(0.5)
        self.boot_s = time.monotonic() - t0

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, n: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-n:])

    # -- the agent, through libvirt
    def agent(self, command: str, timeout: int = 30, **arguments: object) -> object:
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        out = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), timeout, 0)
        return json.loads(out)["return"]

    def ping(self) -> bool:
        try:
            self.agent("guest-ping", timeout=5)
            return True
        except libvirt.libvirtError:
            return False

    def freeze_status(self) -> str:
        return str(self.agent("guest-fsfreeze-status"))

    def exec(self, *argv: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run a program in the guest (guest-exec); its exit status, stdout and stderr."""
        pid = self.agent("guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True})["pid"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent("guest-exec-status", pid=pid)
            if st["exited"]:  # type: ignore[index]
                out, err = (base64.b64decode(st.get(k, "")).decode(errors="replace")  # type: ignore[union-attr]
                            for k in ("out-data", "err-data"))
                return int(st.get("exitcode", -1)), out, err  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"guest-exec {argv} did not finish in {timeout} s"
            time.sleep(0.2)

    def assert_thawed(self) -> None:
        """Not frozen: the agent says "thawed" and a write inside the guest goes through."""
        assert self.freeze_status() == "thawed"
        probe = f"/root/probe-{secrets.token_hex(4)}"
        rc, out, err = self.exec("/bin/sh", "-c", f"echo ok > {probe} && sync {probe} && cat {probe} && rm {probe}",
                                 timeout=60)
        assert rc == 0 and out.strip() == "ok", (rc, out, err)

    def logged_seq(self) -> int:
        """The newest sequence number in the guest's writer log (read inside the guest)."""
        rc, out, _ = self.exec("/bin/sh", "-c", f"grep -v '^rm' {WRITER_DIR}/sums.log | tail -n 1")
        assert rc == 0
        return int(out.split()[0])

    # -- the agent channel, unplugged and plugged again
    def channel_xml(self) -> str:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(self.dom.XMLDesc(0))
        for ch in root.findall("./devices/channel"):
            t = ch.find("target")
            if t is not None and t.get("name") == "org.qemu.guest_agent.0":
                return ET.tostring(ch, encoding="unicode")
        raise AssertionError("the guest has no agent channel")

    def destroy(self) -> None:
        if self.dom is not None:
            try:
                self.dom.destroy()
            except libvirt.libvirtError:
                pass


def _fs(image: Path) -> str:
    return f"{image}?offset={PART_OFFSET}"


def check_restored_root(image: Path, workdir: Path) -> dict:
    """What the restored root filesystem looks like, read without mounting: e2fsck -fn,
    dumpe2fs -h, and every logged file compared with its logged sum (debugfs rdump)."""
    fsck = subprocess.run(["e2fsck", "-fn", _fs(image)], capture_output=True, text=True)
    head = subprocess.run(["dumpe2fs", "-h", _fs(image)], capture_output=True, text=True).stdout
    features = next((ln.split(":", 1)[1].split() for ln in head.splitlines()
                     if ln.startswith("Filesystem features:")), [])
    state = next((ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.startswith("Filesystem state:")), "")
    dump = workdir / f"rdump-{image.stem}"
    dump.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump {WRITER_DIR} {dump}", _fs(image)], capture_output=True, check=True)
    log = dump / "vmbak-writer" / "sums.log"
    # A crash-consistent root may not show the log at all until its journal is replayed:
    # that is reported (no files logged), and the frozen tests fail on it.
    log_lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    logged: dict[str, str] = {}
    torn_lines = 0
    for ln in log_lines:
        f = ln.split()
        if len(f) == 2 and f[0] == "rm":
            logged.pop(f"data/{f[1]}", None)
        elif len(f) == 3 and len(f[1]) == 64:
            logged[f[2]] = f[1]
        else:
            torn_lines += 1
    missing, wrong = [], []
    for rel, want in logged.items():
        p = dump / "vmbak-writer" / rel
        if not p.exists():
            missing.append(rel)
        elif hashlib.sha256(p.read_bytes()).hexdigest() != want:
            wrong.append(rel)
    newest = max((int(r.split("/")[1]) for r in logged), default=-1)
    return {"fsck_rc": fsck.returncode, "fsck": fsck.stdout + fsck.stderr, "features": features, "state": state,
            "log_found": log.exists(), "log_lines": len(log_lines), "torn_lines": torn_lines, "logged_files": len(logged),
            "missing": missing, "wrong": wrong, "newest": newest}


@pytest.fixture(name="check_restored_root")
def _check_restored_root_fixture():  # noqa: ANN202
    """``check_restored_root(raw_image, workdir)`` -> dict (see the function)."""
    return check_restored_root


def _listening(path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _start_libvirtd() -> None:
    """virtlogd and libvirtd, started by hand when their sockets do not answer (and left
    running: other test sessions may use them), as tests/hypervisor does."""
    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"), ("libvirtd", "/run/libvirt/libvirt-sock")):
        if _listening(sock):
            continue
        exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
        assert os.access(exe, os.X_OK), f"{daemon} is missing: scripts/setup.sh installs libvirt-daemon-system"
        subprocess.run([exe, "-d"], check=True, timeout=60)
        deadline = time.monotonic() + 60
        while not _listening(sock):
            assert time.monotonic() < deadline, f"{daemon} did not start"
            time.sleep(0.05)


def _fix_kvm() -> None:
    """/dev/kvm as root:kvm 0660 (without udev it stays 0600 and libvirt probes QEMU again
    on every domain start)."""
    import grp

    if not os.path.exists("/dev/kvm"):
        return
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    st = os.stat("/dev/kvm")
    if st.st_gid != gid or st.st_mode & 0o777 != 0o660:
        os.chown("/dev/kvm", 0, gid)
        os.chmod("/dev/kvm", 0o660)


def _kvm_ok(conn) -> bool:  # noqa: ANN001
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm")
        return True
    except libvirt.libvirtError:
        return False


@contextlib.contextmanager
def booted_guest(cls: type[Guest], guest_image: Path, kind: str) -> Iterator[Guest]:
    """A guest of ``cls`` (Guest or a subclass) with a fresh work directory
    /var/tmp/vmbak-test-KIND-..., booted; destroyed and its directory removed after."""
    _fix_kvm()
    _start_libvirtd()
    libvirt.registerErrorHandler(lambda *a: None, None)
    workdir = Path(f"/var/tmp/vmbak-test-{kind}-{os.getpid()}-{secrets.token_hex(3)}")
    workdir.mkdir(mode=0o755)
    os.chmod(workdir, 0o755)
    conn = libvirt.open(URI)
    g = cls(conn, guest_image, workdir)
    try:
        g.start()
        print(f"\n{kind} guest {g.name} ({g.virt}) booted in {g.boot_s:.1f} s", file=sys.stderr)
        yield g
    finally:
        g.destroy()
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(guest_image: Path) -> Iterator[Guest]:
    with booted_guest(Guest, guest_image, "vm") as g:
        with open(guest_image.parent / "boot-times.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {g.virt} {g.boot_s:.1f}\n")
        yield g
