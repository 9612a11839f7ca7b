"""vmbak.domain without a hypervisor: which files a domain definition names, which disks
vmbak refuses (and why), the definition rewritten for a restored copy, and the TPM state
tar unpacked only inside its new directory (real files, real tar archives)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmbak.domain.state import SETTLED_NS, StateItem, capture, place_tpm, state_items
from vmbak.domain.xml import check_disks, rewrite_for_restore
from vmbak.errors import DiskError, RepositoryError

XML = """<domain type='kvm'>
  <name>db</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{d}/db_VARS.fd</nvram>
    <kernel>{d}/vmlinuz</kernel>
    <initrd>{d}/initrd.img</initrd>
  </os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}/db.qcow2'/>
      <backingStore type='file'><format type='raw'/><source file='{d}/base.raw'/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='{d}/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
    <serial type='file'><source path='{d}/console.log'/><target port='0'/></serial>
    <console type='file'><source path='{d}/console.log'/><target type='serial' port='0'/></console>
    <serial type='pty'><log file='/var/log/libvirt/qemu/db-serial1.log' append='on'/><target port='1'/></serial>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/db.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='unix'><source mode='bind' path='{d}/serial2.sock'/><target port='2'/></serial>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"""


def test_state_items_and_capture(tmp_path: Path) -> None:
    xml = XML.format(d=tmp_path)
    (tmp_path / "db_VARS.fd").write_bytes(b"\x01" * 8192)
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    items = {it.role: it for it in state_items(xml, "qemu:///system")}
    assert set(items) == {"loader", "nvram", "kernel", "initrd", "tpm"}
    assert not items["loader"].stored and "package" in items["loader"].why
    assert items["nvram"].template == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert items["tpm"].path == "/var/lib/libvirt/swtpm/11111111-2222-3333-4444-555555555555"
    assert not state_items(xml, "qemu:///session")[-1].stored  # swtpm's directory unknown there
    # a stored file that is missing fails the capture (the backup would not be complete)
    with pytest.raises(DiskError, match="initrd .*initrd.img does not exist"):
        capture([items["nvram"], items["initrd"]], str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    notes = capture([items["nvram"], items["kernel"]], str(work))
    assert notes == []
    assert items["nvram"].sha256 == hashlib.sha256(b"\x01" * 8192).hexdigest()
    assert Path(items["kernel"].copy).read_bytes() == b"kernel"


def test_a_file_whose_stat_equals_the_record_is_not_read(tmp_path: Path) -> None:
    import os
    import time

    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel one")
    work = tmp_path / "work"
    work.mkdir()

    def item() -> StateItem:
        return StateItem("kernel", str(k), stored=True)

    # just written: read, and its stat not kept (a write in the same timestamp tick could follow)
    first = item()
    capture([first], str(work))
    assert first.stat is None and first.copy and not first.unchanged
    time.sleep(SETTLED_NS / 1e9 + 0.1)
    second = item()
    capture([second], str(work), {"kernel": first.record()})  # a record without a stat: read
    st = k.stat()
    assert second.stat == {"dev": st.st_dev, "ino": st.st_ino, "size": 10, "mtime_ns": st.st_mtime_ns,
                           "ctime_ns": st.st_ctime_ns} and second.copy and not second.unchanged
    rec = second.record()
    assert rec["stat"] == second.stat
    # the same stat: not read (no copy), the record's size, sha256 and stat carried over
    os.unlink(second.copy)
    third = item()
    capture([third], str(work), {"kernel": rec})
    assert third.unchanged and not third.copy and third.record() == rec
    assert not any(work.iterdir())
    # another path, or a record that is not stored: read
    other = StateItem("kernel", str(tmp_path / "vmlinuz2"), stored=True)
    (tmp_path / "vmlinuz2").write_bytes(b"kernel one")
    capture([other], str(work), {"kernel": rec})
    assert not other.unchanged and other.copy
    # new content, same size, the modification time put back: the change time differs
    k.write_bytes(b"kernel two")
    os.utime(k, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (k.stat().st_size, k.stat().st_mtime_ns, k.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    fourth = item()
    capture([fourth], str(work), {"kernel": rec})
    assert not fourth.unchanged and fourth.sha256 == hashlib.sha256(b"kernel two").hexdigest()
    assert Path(fourth.copy).read_bytes() == b"kernel two" and fourth.stat is None  # just changed


def test_unreadable_disks_are_named_with_the_reason() -> None:
    base = "<domain><name>db</name><devices>{}</devices></domain>"
    ok = "<disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vda'/></disk>"
    check_disks(base.format(ok), "db")
    cases = {
        "<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sdb'/></disk>": ("sdb", "SCSI passthrough"),
        "<disk type='file' device='disk'><source file='/b.qcow2'/><target dev='vdb'/><transient/></disk>": ("vdb", "transient"),
        "<disk type='file' device='disk'><target dev='vdc'/></disk>": ("vdc", "no source"),
        "<disk type='vhostuser' device='disk'><source type='unix' path='/s'/><target dev='vdd'/></disk>": ("vdd", "vhost-user"),
        "<disk type='weird' device='disk'><source file='/x'/><target dev='vde'/></disk>": ("vde", "type 'weird'"),
    }
    for disk, (tgt, why) in cases.items():
        with pytest.raises(DiskError) as e:
            check_disks(base.format(ok + disk), "db")
        assert f"disk {tgt} cannot be backed up" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    # read-only disks and removable media are not backed up, and not refused
    check_disks(base.format(ok + "<disk type='dir' device='disk'><source dir='/d'/><target dev='vdf'/>"
                                 "<readonly/></disk><disk type='file' device='cdrom'><target dev='sda'/></disk>"), "db")


def test_restored_definition_shares_no_file(tmp_path: Path) -> None:
    old = tmp_path / "old"
    new = tmp_path / "new"
    xml = XML.format(d=old)
    out = rewrite_for_restore(xml, "db2", "99999999-8888-7777-6666-555555555555",
                              {"vda": (f"{new}/db2-vda.qcow2", "qcow2")},
                              {"nvram": f"{new}/db2_VARS.fd", "kernel": f"{new}/db2-vmlinuz",
                               "initrd": f"{new}/db2-initrd.img"}, str(new))
    r = ET.fromstring(out)
    assert r.findtext("name") == "db2" and r.findtext("uuid") == "99999999-8888-7777-6666-555555555555"
    assert r.find("./devices/interface/mac") is None
    assert r.findtext("./os/nvram") == f"{new}/db2_VARS.fd"
    assert r.find("./os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"  # type: ignore[union-attr]
    assert r.findtext("./os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    disks = r.findall("./devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "sda"]  # type: ignore[union-attr]
    assert disks[0].find("source").get("file") == f"{new}/db2-vda.qcow2"  # type: ignore[union-attr]
    assert disks[0].find("backingStore") is None
    serials = r.findall("./devices/serial")
    console = r.find("./devices/console/source").get("path")  # type: ignore[union-attr]
    assert serials[0].find("source").get("path") == console == f"{new}/db2-console.log"  # type: ignore[union-attr]
    assert serials[1].find("log").get("file") == f"{new}/db2-db-serial1.log"  # type: ignore[union-attr]
    assert serials[2].find("source").get("path") == f"{new}/db2-serial2.sock"  # type: ignore[union-attr]
    assert r.find("./devices/channel/source").get("path") is None  # type: ignore[union-attr]
    assert str(old) not in out.replace(f"{old}/install.iso", "")  # read-only media stay shared


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.SYMTYPE
                ti.linkname = "/etc/passwd"
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_tpm_state_is_unpacked_only_inside_its_directory(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    good.write_bytes(_tar([("tpm2/tpm2-00.permall", b"state")]))
    rec = {"members": [{"name": "tpm2/tpm2-00.permall", "sha256": hashlib.sha256(b"state").hexdigest()}]}
    place_tpm(str(good), str(tmp_path / "swtpm" / "u1"), rec)
    assert (tmp_path / "swtpm" / "u1" / "tpm2" / "tpm2-00.permall").read_bytes() == b"state"
    with pytest.raises(DiskError, match="already exists"):
        place_tpm(str(good), str(tmp_path / "swtpm" / "u1"), rec)
    for members, why in (([("../../evil", b"x")], "bad name"), ([("/abs", b"x")], "bad name"),
                         ([("tpm2/link", None)], "not a regular file"),
                         ([("tpm2/tpm2-00.permall", b"other")], "does not match")):
        bad = tmp_path / "bad.tar"
        bad.write_bytes(_tar(members))
        with pytest.raises(RepositoryError, match=why):
            place_tpm(str(bad), str(tmp_path / "swtpm" / "u2"), rec)
        assert not (tmp_path / "swtpm" / "u2").exists() and not (tmp_path / "evil").exists()
