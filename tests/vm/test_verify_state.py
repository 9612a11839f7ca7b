"""`vmbak verify --boot` of a libvirt backup boots it with the backup's own state: one short
real boot (TCG) of a persistent UEFI domain with a TPM, two disks and direct kernel boot,
backed up shut off (a paused start: no guest code runs, so no full guest boot is needed).

The host's kernel and initrd are deleted after the backup: the boot must reach the
initramfs's /init with the stored ones. QEMU itself reports (QMP ``query-block`` and
``query-tpm``) that both disks and the TPM are attached; the result says that the NVRAM,
kernel, initrd and TPM state came from the backup; nothing is left behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from conftest import URI, _fix_kvm, _start_libvirtd

pytestmark = [pytest.mark.xdist_group("vm-verify-state"), pytest.mark.timeout(900)]

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"

XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{code}</loader>
    <nvram template='{vars}'/>
    <kernel>{d}/vmlinuz</kernel>
    <initrd>{d}/initrd.img</initrd>
    <cmdline>console=ttyS0 root=/dev/vdz1 rootdelay=300 vmbak.stored-kernel=1</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}/a.qcow2'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{d}/b.raw'/>
      <target dev='vdb' bus='virtio'/></disk>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <memballoon model='none'/>
  </devices>
</domain>"""


@pytest.fixture
def domain(guest_image: Path) -> Iterator[tuple[libvirt.virDomain, Path]]:
    _fix_kvm()
    _start_libvirtd()
    libvirt.registerErrorHandler(lambda *a: None, None)
    d = Path(f"/var/tmp/vmbak-test-vstate-{os.getpid()}-{secrets.token_hex(3)}")
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    shutil.copyfile(guest_image / "vmlinuz", d / "vmlinuz")
    shutil.copyfile(guest_image / "initrd.img", d / "initrd.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "16M"], check=True)
    with open(d / "b.raw", "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    conn = libvirt.open(URI)
    dom = None
    try:
        dom = conn.defineXML(XML.format(name=f"vmbak-vs-{os.getpid()}-{secrets.token_hex(3)}", code=OVMF_CODE,
                                        vars=OVMF_VARS, d=d))
        yield dom, d
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                                  | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        conn.close()
        shutil.rmtree(d, ignore_errors=True)


def test_boot_uses_the_backups_disks_nvram_kernel_and_tpm(domain, repo, json_result, tmp_path: Path) -> None:
    dom, d = domain
    name = dom.name()
    r = repo.json("backup", "--libvirt", name)
    snaps = {s["name"]: s["id"] for s in r["snapshots"]}
    assert set(snaps) == {f"{name}-{x}" for x in ("vda", "vdb", "nvram", "tpm", "kernel", "initrd")}, snaps
    (d / "vmlinuz").unlink()  # only the backup has them now
    (d / "initrd.img").unlink()
    base = Path(f"/tmp/vmbak-vm-vs-{os.getpid()}")
    env = {"VMBAK_VERIFY_DIR": str(base)}
    try:
        # the data disk named: the machine still boots as the domain did, with both disks
        p = repo.run("verify", f"{name}-vdb:latest", "--boot", "--accel", "tcg", "--timeout", "240",
                     "--expect-serial", "Run /init as init process", "--no-screenshot", "--output", tmp_path / "out",
                     "--json", env=env, check=False)
        s = json_result(p.stdout)
        res = s["results"][0]
        assert p.returncode == 0 and s["ok"], p.stdout + p.stderr
        # in the XML's order, the first disk boots (not the one named); QEMU reports both attached
        assert [(x["target"], x["snapshot"], x["bootindex"], x["attached"]) for x in res["disks"]] == \
            [("vda", snaps[f"{name}-vda"], 1, True), ("vdb", snaps[f"{name}-vdb"], None, True)]
        st = res["state"]
        for role in ("nvram", "kernel", "initrd", "tpm"):
            assert st[role]["from"] == "backup" and st[role]["snapshot"] == snaps[f"{name}-{role}"], (role, st)
        assert st["tpm"]["attached"] is True and st["loader"] == {"from": "host", "path": OVMF_CODE}
        assert st["kernel"]["path"] == str(d / "vmlinuz")
        serial = Path(res["serial_log"]).read_text(errors="replace")
        assert "vmbak.stored-kernel=1" in serial and "Run /init as init process" in serial
        assert res["machine"]["firmware"] == "uefi"
        assert not any("NVRAM is not in the backup" in n for n in res["notes"])
        assert list(base.iterdir()) == []  # the run directory with its copies and overlays is gone
        # --kernel wins over the stored one (and a missing file is one line before anything starts)
        p = repo.run("verify", f"{name}-vda:latest", "--boot", "--kernel", d / "vmlinuz", env=env, check=False)
        assert p.returncode != 0 and "--kernel" in p.stderr and "no such file" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    # nothing was written to the repository by the verify
    assert {x["id"] for x in repo.json("snapshots")} == set(snaps.values())
