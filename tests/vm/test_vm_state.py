"""The complete state of a UEFI guest with a TPM, through the real command line: the test
guest booted by OVMF (Debian's ovmf; direct kernel boot of its EFI-stub kernel) with an
NVRAM variable store and an swtpm TPM 2.0, as a persistent libvirt domain.

One boot of the guest and one of its restored copy, in one test (they are slow under TCG):
a frozen backup that keeps the NVRAM, the TPM state, the kernel and the initrd (and records
the package's OVMF code by path and sha256); a guest agent that answers garbage (one line,
no checkpoint, the guest thawed); the guest shut down and backed up shut off; and
``restore --libvirt --define`` whose domain shares no file with the original, has its own
UUID, MAC address and TPM directory, holds the same NVRAM and TPM state, and boots.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest
from conftest import MARKER, Guest, booted_guest

pytestmark = [pytest.mark.xdist_group("vm-state-guest"), pytest.mark.timeout(4800)]

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SWTPM = Path("/var/lib/libvirt/swtpm")

UEFI_XML = """<domain type='{virt}'>
  <name>{name}</name>
  <memory unit='MiB'>384</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{code}</loader>
    <nvram template='{vars}'/>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>root=/dev/vda1 rw console=ttyS0 panic=10</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>"""

# Run in the guest by systemd-run: the real agent stops (after the guest-exec that started
# this has reported back), and for a while the agent's port answers every command with
# lines that are not JSON; then the real agent starts again.
GARBAGE = """sleep 3
systemctl stop qemu-guest-agent
timeout {secs} sh -c 'while :; do echo "{{\\"return\\": garbage"; echo "nonsense ]]"; sleep 0.1; done' \
  > /dev/virtio-ports/org.qemu.guest_agent.0
systemctl start qemu-guest-agent
"""


class UefiGuest(Guest):
    """The test guest as a persistent UEFI domain with a TPM; its kernel and initrd are
    files of the domain's own (copies in its directory)."""

    def __init__(self, conn, image: Path, workdir: Path) -> None:  # noqa: ANN001
        super().__init__(conn, image, workdir)
        self.name = f"vmbak-uefi-{os.getpid()}-{secrets.token_hex(3)}"
        self.kernel = workdir / "vmlinuz"
        self.initrd = workdir / "initrd.img"
        shutil.copyfile(image / "vmlinuz", self.kernel)
        shutil.copyfile(image / "initrd.img", self.initrd)

    def _create(self) -> None:
        xml = UEFI_XML.format(virt=self.virt, name=self.name, code=OVMF_CODE, vars=OVMF_VARS, kernel=self.kernel,
                              initrd=self.initrd, disk=self.disk, console=self.console)
        self.dom = self.conn.defineXML(xml)
        self.dom.create()

    def agent_state(self) -> str:
        for ch in ET.fromstring(self.dom.XMLDesc(0)).findall("./devices/channel"):
            t = ch.find("target")
            if t is not None and t.get("name") == "org.qemu.guest_agent.0":
                return t.get("state", "")
        return ""

    def destroy(self) -> None:
        remove_domain(self.dom)


def remove_domain(dom) -> None:  # noqa: ANN001
    if dom is None:
        return
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:  # the NVRAM file and (by default) the TPM state go with the definition
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass


@pytest.fixture(scope="module")
def uefi_guest(guest_image: Path) -> Iterator[UefiGuest]:
    with booted_guest(UefiGuest, guest_image, "state") as g:
        yield g  # type: ignore[misc]


def _sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _file_paths(xml: str) -> set[str]:
    """Every host file path a domain definition names (os files, disk sources, char devices, logs)."""
    root = ET.fromstring(xml)
    out = set()
    for tag in ("loader", "nvram", "kernel", "initrd", "dtb"):
        el = root.find(f"./os/{tag}")
        if el is not None and (el.text or "").strip():
            out.add(el.text.strip())  # type: ignore[union-attr]
    for src in root.iter("source"):
        for a in ("file", "path", "dev"):
            if src.get(a):
                out.add(src.get(a))  # type: ignore[arg-type]
    for lg in root.iter("log"):
        if lg.get("file"):
            out.add(lg.get("file"))  # type: ignore[arg-type]
    return out


def _wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} (after {timeout:.0f} s)"
        time.sleep(0.5)


def _ping(dom) -> bool:  # noqa: ANN001
    try:
        libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), 5, 0)
        return True
    except libvirt.libvirtError:
        return False


def test_uefi_tpm_guest_state_backup_restore_boots(uefi_guest: UefiGuest, repo, json_result,
                                                   assert_cli_error) -> None:
    g = uefi_guest
    nvram = Path(ET.fromstring(g.dom.XMLDesc(0)).find("./os/nvram").text)  # type: ignore[union-attr,arg-type]
    tpm_dir = SWTPM / g.dom.UUIDString()
    assert nvram.exists() and (tpm_dir / "tpm2" / "tpm2-00.permall").exists()

    # 1. a frozen backup of the running guest keeps its state files
    r1 = repo.json("backup", "--libvirt", g.name)
    assert r1["guest_consistency"]["level"] == "frozen"
    names = {s["name"] for s in r1["snapshots"]}
    assert names == {f"{g.name}-{x}" for x in ("vda", "nvram", "tpm", "kernel", "initrd")}
    vda1 = next(s for s in r1["snapshots"] if s["name"] == f"{g.name}-vda")
    state = {r["role"]: r for r in repo.open().find(vda1["id"]).extra["libvirt"]["state"]}
    st = os.stat(OVMF_CODE)  # the package's file, old: its stat is kept, so the next backup need not read it
    assert state["loader"] == {"role": "loader", "path": OVMF_CODE, "stored": False, "size": os.path.getsize(OVMF_CODE),
                               "sha256": _sha(OVMF_CODE), "why": state["loader"]["why"],
                               "stat": {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                                        "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}}
    assert state["nvram"]["stored"] and state["nvram"]["template"] == OVMF_VARS
    assert state["kernel"]["sha256"] == _sha(g.kernel) and state["initrd"]["sha256"] == _sha(g.initrd)
    assert [m["name"] for m in state["tpm"]["members"]] == ["tpm2/tpm2-00.permall"]

    # 2. a guest agent that answers garbage: one line, no checkpoint left, never left frozen
    script = base64.b64encode(GARBAGE.format(secs=45).encode()).decode()
    g.exec("/bin/sh", "-c", f"echo {script} | base64 -d > /run/vmbak-garbage.sh && "
           "systemd-run --unit=vmbak-garbage /bin/sh /run/vmbak-garbage.sh")
    _wait(lambda: g.agent_state() == "disconnected", 60, "the real agent did not stop")
    _wait(lambda: g.agent_state() == "connected", 60, "the garbage writer did not open the agent's port")
    p = repo.run("backup", "--libvirt", g.name, "--freeze", "always", check=False)
    assert_cli_error(p, "guest agent", "no backup taken")
    assert sorted(c.getName() for c in g.dom.listAllCheckpoints()) == [r1["checkpoint"]]
    p = repo.run("backup", "--libvirt", g.name, "--json")
    r2 = json_result(p.stdout)
    assert r2["guest_consistency"]["level"] == "crash" and "guest agent" in r2["guest_consistency"]["error"]
    assert "crash-consistent" in p.stderr and "Traceback" not in p.stderr
    assert sorted(c.getName() for c in g.dom.listAllCheckpoints()) == [r2["checkpoint"]]
    _wait(lambda: _ping(g.dom), 120, "the real agent did not come back")
    g.assert_thawed()

    # 3. shut down, then backed up shut off (a paused start; no guest code runs)
    g.agent("guest-exec", path="/bin/systemctl", arg=["poweroff", "--no-block"])
    _wait(lambda: not g.dom.isActive(), 300, "the guest did not shut down")
    nvram_off, permall_off = nvram.read_bytes(), (tpm_dir / "tpm2" / "tpm2-00.permall").read_bytes()
    assert nvram_off != Path(OVMF_VARS).read_bytes()  # the firmware wrote its variables
    p = repo.run("backup", "--libvirt", g.name, "--json")
    r3 = json_result(p.stdout)
    assert "is shut off: started it paused" in p.stderr
    assert r3["guest_consistency"]["level"] == "offline" and not g.dom.isActive()
    s3 = {s["name"]: s for s in r3["snapshots"]}
    assert s3[f"{g.name}-vda"]["change_source"] == "libvirt-checkpoint"
    assert nvram.read_bytes() == nvram_off  # the paused start changed nothing

    # 4. restored as a new domain: its own files, UUID, MAC and TPM directory, the same state
    out = g.workdir / "restored"
    out.mkdir(mode=0o755)
    new = f"{g.name}-r"
    rr = repo.json("restore", "--libvirt", f"{g.name}:latest", out, "--define", new)
    dom2 = g.conn.lookupByName(new)
    try:
        x1, x2 = g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), dom2.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert dom2.UUIDString() == rr["uuid"] != g.dom.UUIDString()
        macs = [ET.fromstring(x).find("./devices/interface/mac").get("address") for x in (x1, x2)]  # type: ignore[union-attr]
        assert macs[0] != macs[1]
        shared = _file_paths(x1) & _file_paths(x2)
        assert shared == {OVMF_CODE}, shared  # only the package's read-only firmware code
        for path in _file_paths(x2) - {OVMF_CODE}:
            assert os.path.dirname(path) == str(out), path
        nvram2 = Path(ET.fromstring(x2).find("./os/nvram").text)  # type: ignore[union-attr,arg-type]
        assert nvram2.read_bytes() == nvram_off
        assert ET.fromstring(x2).find("./os/nvram").get("template") == OVMF_VARS  # type: ignore[union-attr]
        tpm2 = SWTPM / rr["uuid"] / "tpm2" / "tpm2-00.permall"
        assert tpm2.read_bytes() == permall_off
        assert _sha(ET.fromstring(x2).find("./os/kernel").text) == _sha(g.kernel)  # type: ignore[union-attr,arg-type]
        console2 = Path(ET.fromstring(x2).find("./devices/serial/source").get("path"))  # type: ignore[union-attr,arg-type]

        # 5. ... and boots: the guest's marker on its own console, its agent answers
        console1 = g.console_text()
        t0 = time.monotonic()
        dom2.create()
        _wait(lambda: console2.exists() and MARKER in console2.read_text(errors="replace"), 900,
              "the restored UEFI guest did not boot to its marker")
        _wait(lambda: _ping(dom2), 300, "the restored guest's agent does not answer")
        print(f"\nrestored UEFI guest booted in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        assert g.console_text() == console1  # the copy writes its own console, not the original's
    finally:
        remove_domain(dom2)
    assert not (SWTPM / rr["uuid"]).exists()
