"""A libvirt backup chain that evolves with the domain, through the real command line and a
real libvirtd running the small TCG domain of test_hv_libvirt.py (no OS; its disks are
written through QEMU's monitor): a disk added mid-chain, a disk resized, a disk removed,
the domain shut off, and a domain with a disk vmbak cannot read."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from hvutil import B, MiB, create, qemu_io, write_random
from test_hv_libvirt import DOMAIN_XML, URI, Domain, _fix_kvm, _start_libvirtd, by_name, qcompare


class AcpiDomain(Domain):
    """test_hv_libvirt's domain with ACPI, so that disks can be hot-plugged and unplugged."""

    def __init__(self, conn, workdir: Path) -> None:  # noqa: ANN001
        import os
        import secrets

        self.conn = conn
        self.workdir = workdir
        self.name = f"vmbak-tc-{os.getpid()}-{secrets.token_hex(3)}"
        self.defined: list[str] = []
        self.a = create(workdir / "a.qcow2", "qcow2", 16 * MiB)
        write_random(self.a, "qcow2", 0, 3 * MiB, 1, workdir)
        self.b = workdir / "b.raw"
        with open(self.b, "wb") as f:
            f.truncate(8 * MiB)
        xml = DOMAIN_XML.format(name=self.name, a=self.a, b=self.b).replace("<devices>",
                                                                            "<features><acpi/></features><devices>")
        self.dom = conn.defineXML(xml)
        self.dom.create()


@pytest.fixture
def domain() -> Iterator[Domain]:
    import os
    import secrets
    import shutil

    _fix_kvm()
    _start_libvirtd()
    workdir = Path(f"/var/tmp/vmbak-test-lvc-{os.getpid()}-{secrets.token_hex(3)}")
    workdir.mkdir(mode=0o755)
    os.chmod(workdir, 0o755)
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open(URI)
    d = None
    try:
        d = AcpiDomain(conn, workdir)
        yield d
    finally:
        if d is not None:
            d.remove()
            for n in d.defined:
                try:
                    dom = conn.lookupByName(n)
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
                except libvirt.libvirtError:
                    pass
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _disk_xml(path: Path, fmt: str, target: str) -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{path}'/>"
            f"<target dev='{target}' bus='virtio'/></disk>")


def _live_disk_xml(d: Domain, target: str) -> str:
    for disk in ET.fromstring(d.dom.XMLDesc(0)).findall("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return ET.tostring(disk, encoding="unicode")
    raise AssertionError(f"no disk {target}")


def _alias(d: Domain, target: str) -> str:
    for disk in ET.fromstring(d.dom.XMLDesc(0)).findall("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return disk.find("alias").get("name")  # type: ignore[union-attr]
    raise AssertionError(f"no disk {target}")


def _write(d: Domain, target: str, offset: int, length: int, pattern: int) -> None:
    out = d.hmp(f'qemu-io -d /machine/peripheral/{_alias(d, target)}/virtio-backend '
                f'"write -P {pattern} {offset} {length}"')
    assert "error" not in out.lower(), out


def test_chain_follows_added_resized_removed_disks_and_a_shut_off_domain(domain, repo, json_result) -> None:
    d = domain
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    va, vb, vc = (f"{d.name}-{t}" for t in ("vda", "vdb", "vdc"))
    r1 = repo.json("backup", "--libvirt", d.name)
    assert set(by_name(r1)) == {va, vb}

    # a disk added mid-chain: its own full; the others stay incremental on the checkpoint
    c = create(d.workdir / "c.qcow2", "qcow2", 8 * MiB)
    write_random(c, "qcow2", 1 * MiB, 2 * MiB, 7, d.workdir)
    d.dom.attachDeviceFlags(_disk_xml(c, "qcow2", "vdc"), flags)
    _write(d, "vda", 4 * MiB, B, 0x41)
    p = repo.run("backup", "--libvirt", d.name, "--json")
    s2 = by_name(json_result(p.stdout))
    assert "disk vdc" in p.stderr and "new since the last backup" in p.stderr
    assert s2[vc]["type"] == "full" and s2[vc]["stats"]["read_bytes"] == 2 * MiB
    assert s2[va]["type"] == "incremental" and s2[va]["change_source"] == "libvirt-checkpoint"
    assert s2[va]["stats"]["considered_bytes"] == B
    assert any("new since the last backup" in n for n in repo.json("snapshots", "--name", vc)[0]["notes"])

    # the added disk now has a bitmap of its own: the next backup is incremental for it too
    _write(d, "vdc", 5 * MiB, B, 0x42)
    s3 = by_name(repo.json("backup", "--libvirt", d.name))
    assert s3[vc]["type"] == "incremental" and s3[vc]["change_source"] == "libvirt-checkpoint"
    assert s3[vc]["stats"]["considered_bytes"] == B and s3[va]["stats"]["considered_bytes"] == 0

    # a disk resized: a full of that disk, with a message; the others are untouched
    d.dom.blockResize("vdc", 16 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    _write(d, "vdc", 12 * MiB, B, 0x43)
    p = repo.run("backup", "--libvirt", d.name, "--json")
    s4 = by_name(json_result(p.stdout))
    assert "disk size changed" in p.stderr and "16777216" in p.stderr
    assert s4[vc]["type"] == "full" and s4[vc]["disk_size"] == 16 * MiB
    assert s4[va]["type"] == "incremental" and s4[va]["change_source"] == "libvirt-checkpoint"

    # a disk removed: reported, and the backups without it are complete
    # (a guest without an OS never acknowledges an unplug: change the definition and restart)
    d.dom.detachDeviceFlags(_live_disk_xml(d, "vdb"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    d.dom.destroy()
    d.dom.create()
    p = repo.run("backup", "--libvirt", d.name, "--json")
    s5 = by_name(json_result(p.stdout))
    assert set(s5) == {va, vc}
    assert "disk vdb" in p.stderr and "was removed from the domain" in p.stderr and s2[vb]["short_id"] not in p.stderr
    assert s5[vc]["type"] == "incremental" and s5[vc]["stats"]["considered_bytes"] == 0

    # shut off: started paused (no guest code runs) for the backup, shut off again after it;
    # writes made to the image while it was off (qemu-io keeps the persistent bitmap) are seen
    d.dom.destroy()
    qemu_io(d.a, "qcow2", "write -P 0x51 6M 64k", "write -P 0x52 14M 128k")
    p = repo.run("backup", "--libvirt", d.name, "--json", "--verify-changes")
    r6 = json_result(p.stdout)
    s6 = by_name(r6)
    assert "is shut off: started it paused" in p.stderr
    assert r6["guest_consistency"]["level"] == "offline"
    assert s6[va]["change_source"] == "libvirt-checkpoint" and s6[va]["stats"]["changed_bytes"] == 3 * B
    assert s6[va]["stats"]["verify_missed_blocks"] == 0 and s6[vc]["stats"]["verify_missed_blocks"] == 0
    assert not d.dom.isActive(), "the domain must be shut off again after the backup"
    assert d.checkpoints() == [r6["checkpoint"]]
    # the next backup of the shut-off domain builds on that checkpoint again
    s7 = by_name(repo.json("backup", "--libvirt", d.name))
    assert s7[va]["change_source"] == "libvirt-checkpoint" and s7[va]["stats"]["considered_bytes"] == 0
    assert not d.dom.isActive()

    out = d.workdir / "restored"
    out.mkdir()
    rr = repo.json("restore", "--libvirt", s4[va]["short_id"], out)
    assert {x["target_disk"] for x in rr["disks"]} == {"vda", "vdb", "vdc"}
    qcompare(out / f"{d.name}-restored-vdc.qcow2", c)  # (vdc was not written after that backup)
    rr = repo.json("restore", "--libvirt", f"{d.name}:latest", out, "--overwrite")
    assert {x["target_disk"] for x in rr["disks"]} == {"vda", "vdc"}
    qcompare(out / f"{d.name}-restored-vda.qcow2", d.a)
    qcompare(out / f"{d.name}-restored-vdc.qcow2", c)

    # Retention counts libvirt backups, not disk names: --keep-last 1 keeps the newest backup
    # whole and forgets every snapshot of the older ones, the removed disk's last one too
    # (counted by name, vdb's snapshot of backup 4 was kept: half a backup).
    plan = repo.json("forget", "--keep-last", "1", "--dry-run")
    kept = {n: [r["short_id"] for r in rows if r["action"] == "keep"] for n, rows in plan["names"].items()}
    assert kept == {va: [s7[va]["short_id"]], vb: [], vc: [s7[vc]["short_id"]]}, kept
    assert all(r["reasons"] == ["last snapshot"] for n in (va, vc) for r in plan["names"][n][:1])
    repo.run("forget", "--keep-last", "1")
    assert sorted(x["name"] for x in repo.json("snapshots")) == [va, vc]
    rr = repo.json("restore", "--libvirt", f"{d.name}:latest", out, "--overwrite")
    assert {x["target_disk"] for x in rr["disks"]} == {"vda", "vdc"}
    qcompare(out / f"{d.name}-restored-vda.qcow2", d.a)
    qcompare(out / f"{d.name}-restored-vdc.qcow2", c)


VHOST_DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{a}'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>
      <source type='unix' path='{sock}'><reconnect enabled='yes' timeout='10'/></source>
      <target dev='vdb' bus='virtio'/></disk>
  </devices>
</domain>"""


def test_unknown_domain_and_unreadable_disk_are_one_line_errors(domain, repo, assert_cli_error) -> None:
    d = domain
    assert_cli_error(repo.run("backup", "--libvirt", "no-such-domain-here", check=False),
                     "no libvirt domain named 'no-such-domain-here'")
    name = f"{d.name}-vhost"
    d.defined.append(name)
    d.conn.defineXML(VHOST_DOMAIN.format(name=name, a=d.a, sock=d.workdir / "vhost.sock"))
    line = assert_cli_error(repo.run("backup", "--libvirt", name, check=False),
                            "disk vdb cannot be backed up", "vhost-user")
    assert name in line
    dom = d.conn.lookupByName(name)
    assert not dom.isActive() and dom.listAllCheckpoints() == []
    assert repo.snapshots() == []


def test_pattern_backs_up_every_matching_domain_with_one_summary(domain, repo, json_result) -> None:
    d = domain
    off = f"{d.name}-off"  # a second domain, shut off, on a disk of its own
    d.defined.append(off)
    e = create(d.workdir / "e.qcow2", "qcow2", 4 * MiB)
    write_random(e, "qcow2", 0, 1 * MiB, 9, d.workdir)
    d.conn.defineXML(VHOST_DOMAIN.format(name=off, a=e, sock="").split("<disk type='vhostuser'")[0]
                     + "</devices></domain>")
    bad = f"{d.name}-vhost"  # and one vmbak cannot back up
    d.defined.append(bad)
    d.conn.defineXML(VHOST_DOMAIN.format(name=bad, a=e, sock=d.workdir / "vhost.sock"))
    p = repo.run("backup", "--libvirt", f"{d.name}*", "--json", check=False)
    assert p.returncode == 3, p.stderr  # partial: some domains failed
    res = json_result(p.stdout)
    assert res["pattern"] == f"{d.name}*"
    assert [x["domain"] for x in res["domains"]] == [d.name, off]
    assert [f["domain"] for f in res["failed"]] == [bad] and "vhost-user" in res["failed"][0]["error"]
    assert {s["name"] for s in res["domains"][1]["snapshots"]} == {f"{off}-vda"}
    assert res["domains"][1]["guest_consistency"]["level"] == "offline"
    assert f"error: libvirt domain {bad}:" in p.stderr and "Traceback" not in p.stderr
    assert not d.conn.lookupByName(off).isActive()
    p = repo.run("backup", "--libvirt", f"{d.name}-o?f", "--name", "x", check=False)
    assert p.returncode != 0 and "--name does not go with a domain pattern" in p.stderr
    p = repo.run("backup", "--libvirt", "no-such-*", check=False)
    assert p.returncode == 1 and "no libvirt domain matches 'no-such-*'" in p.stderr
    p = repo.run("backup", "--libvirt", f"{d.name}-o?f")
    assert f"libvirt domains matching '{d.name}-o?f': 1 of 1 backed up" in p.stdout


UEFI_DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{a}'/>
      <target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""


def test_a_state_file_that_cannot_be_read_fails_the_backup_and_leaves_no_checkpoint(
        domain, repo, assert_cli_error) -> None:
    d = domain
    name = f"{d.name}-uefi"
    d.defined.append(name)
    nvram = d.workdir / "uefi_VARS.fd"
    a = create(d.workdir / "u.qcow2", "qcow2", 4 * MiB)
    dom = d.conn.defineXML(UEFI_DOMAIN.format(name=name, nvram=nvram, a=a))
    dom.create()
    r1 = repo.json("backup", "--libvirt", name)
    assert {s["name"] for s in r1["snapshots"]} == {f"{name}-vda", f"{name}-nvram"}
    nvram.unlink()  # QEMU keeps its open file; the path is gone
    assert_cli_error(repo.run("backup", "--libvirt", name, "-q", check=False),
                     f"libvirt domain '{name}': NVRAM file {nvram} does not exist; no backup taken")
    assert [c.getName() for c in dom.listAllCheckpoints()] == [r1["checkpoint"]]
    try:
        dom.backupGetXMLDesc()
        raise AssertionError("a backup job was left behind")
    except libvirt.libvirtError:
        pass
    assert len(repo.snapshots()) == 2
    # a state file's snapshot is no disk to boot
    assert_cli_error(repo.run("verify", "--boot", f"{name}-nvram:latest", check=False),
                     "is the nvram of a libvirt domain, not a disk")


def test_a_killed_backup_of_a_shut_off_domain_leaves_it_shut_off(domain, repo, popen_vmbak, json_result) -> None:
    import os
    import signal
    import time

    d = domain
    va = f"{d.name}-vda"
    repo.json("backup", "--libvirt", d.name)
    d.dom.destroy()
    qemu_io(d.a, "qcow2", "write -P 0x61 2M 64k")
    # vmbak killed with -9 while the domain runs paused for it: libvirt stops the domain
    # when vmbak's connection goes (VIR_DOMAIN_START_AUTODESTROY)
    p = popen_vmbak("backup", "--libvirt", d.name, env=repo.env())
    seen = ""
    while "started it paused" not in seen:
        line = p.stderr.readline()  # type: ignore[union-attr]
        assert line, f"vmbak ended before the paused start: {seen}"
        seen += line
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 60
    while d.dom.isActive():
        assert time.monotonic() < deadline, "the domain vmbak started paused is still running"
        time.sleep(0.2)
    # the next backup cleans up after it and finds the write (from the bitmap, or by a scan)
    p2 = repo.run("backup", "--libvirt", d.name, "--json", "--verify-changes")
    s = by_name(json_result(p2.stdout))
    assert s[va]["stats"]["changed_bytes"] == B and s[va]["stats"]["verify_missed_blocks"] == 0
    assert not d.dom.isActive() and len(d.checkpoints()) == 1
    assert not [n for n in os.listdir("/tmp") if n.startswith((f"vmbak-state-{p.pid}-", f"vmbak-libvirt-{p.pid}-"))]
