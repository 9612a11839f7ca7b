"""`vmbak backup --libvirt DOMAIN` and `vmbak restore --libvirt SNAP --define NEW` through the
real command line, against a real libvirtd running a small TCG domain.

The fixture starts ``virtlogd -d`` and ``libvirtd -d`` when their sockets do not answer
(they are left running: other test sessions may be using them), gives /dev/kvm the usual
``root:kvm 0660`` (without it libvirt probes QEMU again on every domain start), and
defines and starts a domain with a qcow2 disk (vda) and a raw disk (vdb). The guest has no
OS: its firmware finds nothing to boot and leaves the disks alone, and the test writes them
through QEMU's monitor (``qemu-io`` on the device), exactly as a guest's writes would go.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt  # Debian's python3-libvirt (scripts/setup.sh installs it)
import libvirt_qemu
import pytest
from hvutil import B, MiB, create, listening, write_random

URI = "qemu:///system"
SIZE_A = 16 * MiB
SIZE_B = 8 * MiB

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{a}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{b}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <console type='pty'/>
  </devices>
</domain>"""


def _start_libvirtd() -> None:
    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"), ("libvirtd", "/run/libvirt/libvirt-sock")):
        if listening(sock):
            continue
        exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
        assert os.access(exe, os.X_OK), f"{daemon} is missing: scripts/setup.sh installs libvirt-daemon-system"
        subprocess.run([exe, "-d"], check=True, timeout=60)
        deadline = time.monotonic() + 60
        while not listening(sock):
            assert time.monotonic() < deadline, f"{daemon} did not start"
            time.sleep(0.05)


def _fix_kvm() -> None:
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


class Domain:
    def __init__(self, conn, workdir: Path) -> None:  # noqa: ANN001
        self.conn = conn
        self.workdir = workdir
        self.name = f"vmbak-t-{os.getpid()}-{secrets.token_hex(3)}"
        self.defined: list[str] = []  # domains the test defines; undefined at the end
        self.a = create(workdir / "a.qcow2", "qcow2", SIZE_A)
        write_random(self.a, "qcow2", 0, 3 * MiB, 1, workdir)
        write_random(self.a, "qcow2", 12 * MiB, 1 * MiB, 2, workdir)
        self.b = workdir / "b.raw"
        with open(self.b, "wb") as f:
            f.truncate(SIZE_B)
            f.seek(1 * MiB)
            f.write(os.urandom(2 * MiB))
        self.dom = conn.defineXML(DOMAIN_XML.format(name=self.name, a=self.a, b=self.b))
        self.dom.create()

    def hmp(self, cmd: str) -> str:
        return libvirt_qemu.qemuMonitorCommand(self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def write(self, disk: int, offset: int, length: int, pattern: int) -> None:
        out = self.hmp(f'qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend '
                       f'"write -P {pattern} {offset} {length}"')
        assert "error" not in out.lower(), out

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.dom.listAllCheckpoints())

    def has_job(self) -> bool:
        try:
            self.dom.backupGetXMLDesc()
            return True
        except libvirt.libvirtError:
            return False

    def qemu_pid(self) -> int:
        return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())

    def snapshot_disks(self, label: str) -> tuple[Path, Path]:
        """Raw copies of both disks as they are now (the guest is idle)."""
        out = []
        for src, fmt in ((self.a, "qcow2"), (self.b, "raw")):
            dest = self.workdir / f"{label}-{src.stem}.raw"
            subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", src, dest], check=True)
            out.append(dest)
        return out[0], out[1]

    def remove(self) -> None:
        try:
            if self.dom.isActive():
                self.dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        except libvirt.libvirtError:
            pass


@pytest.fixture
def domain() -> Iterator[Domain]:
    _fix_kvm()
    _start_libvirtd()
    # libvirt's QEMU runs as another user: the images need a directory it can traverse
    workdir = Path(f"/var/tmp/vmbak-test-lv-{os.getpid()}-{secrets.token_hex(3)}")
    workdir.mkdir(mode=0o755)
    os.chmod(workdir, 0o755)
    libvirt.registerErrorHandler(lambda *a: None, None)  # errors come back as exceptions only
    conn = libvirt.open(URI)
    d = None
    try:
        d = Domain(conn, workdir)
        yield d
    finally:
        if d is not None:
            d.remove()
        for n in d.defined if d is not None else []:
            try:
                conn.lookupByName(n).undefine()
            except libvirt.libvirtError:
                pass
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def qcompare(a: Path, b: Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    assert p.returncode == 0, f"qemu-img compare {a} {b}: {p.stdout} {p.stderr}"


def by_name(res: dict) -> dict[str, dict]:
    return {s["name"]: s for s in res["snapshots"]}


def test_libvirt_domain_backup_and_restore(domain, repo, assert_cli_error) -> None:
    d = domain
    va, vb = f"{d.name}-vda", f"{d.name}-vdb"
    r1 = repo.json("backup", "--libvirt", d.name)
    s1 = by_name(r1)
    assert set(s1) == {va, vb} and all(s["type"] == "full" for s in s1.values())
    assert r1["checkpoint"].startswith("vmbak-") and s1[va]["change_id"] == r1["checkpoint"]
    assert d.checkpoints() == [r1["checkpoint"]] and not d.has_job()
    t1 = d.snapshot_disks("t1")

    d.write(0, 1 * MiB, 2 * B, 0x11)
    d.write(0, 8 * MiB + 4096, 4096, 0x12)
    d.write(1, 5 * MiB, B, 0x13)
    p = repo.run("backup", "--libvirt", d.name)
    assert f"{va}: snapshot" in p.stdout and "checkpoint" in p.stdout
    snaps = {m["name"]: m for m in repo.snapshots()}  # the newest of each name
    s2 = {va: snaps[va], vb: snaps[vb]}
    assert s2[va]["type"] == "incremental" and s2[va]["change_source"] == "libvirt-checkpoint"
    assert s2[va]["stats"]["considered_bytes"] == 3 * B  # exactly the blocks written
    assert s2[vb]["change_source"] == "scan" and s2[vb]["stats"]["changed_bytes"] == B  # raw: no bitmap
    assert d.checkpoints() == [s2[va]["change_id"]]
    t2 = d.snapshot_disks("t2")

    # a backup that fails after libvirt started the job: the job ends, the new checkpoint
    # goes, the older one keeps recording
    d.write(0, 2 * MiB, B, 0x21)
    lib = repo.open()
    with lib.lock(exclusive=True, purpose="prune"):
        assert_cli_error(repo.run("backup", "--libvirt", d.name, "-q", check=False), "locked")
    assert d.checkpoints() == [s2[va]["change_id"]] and not d.has_job()
    r3 = repo.json("backup", "--libvirt", d.name, "--verify-changes")
    s3 = by_name(r3)
    assert s3[va]["change_source"] == "libvirt-checkpoint" and s3[va]["stats"]["verify_missed_blocks"] == 0
    assert s3[va]["stats"]["changed_bytes"] == B and s3[vb]["stats"]["changed_bytes"] == 0
    t3 = d.snapshot_disks("t3")

    # restore the newest backup and define it as a new domain
    out = d.workdir / "restored"
    out.mkdir(mode=0o755)
    new = f"{d.name}-r"
    d.defined.append(new)
    rr = repo.json("restore", "--libvirt", f"{d.name}:latest", out, "--define", new)
    assert rr["defined"] == new and rr["checkpoint"] == r3["checkpoint"]
    ra, rb = out / f"{new}-vda.qcow2", out / f"{new}-vdb.raw"
    qcompare(ra, t3[0])
    qcompare(rb, t3[1])
    qcompare(ra, d.a)
    xml = d.conn.lookupByName(new).XMLDesc(0)
    assert str(ra) in xml and str(rb) in xml and d.dom.UUIDString() not in xml
    assert Path(rr["xml"]).read_text().count("<disk") == 2
    # an older backup, named by the id of one of its disks' snapshots; other formats
    older = repo.json("restore", "--libvirt", s2[vb]["short_id"], out, "--format", "vmdk")
    assert older["name"] == f"{d.name}-restored" and older["defined"] is None
    qcompare(out / f"{d.name}-restored-vda.vmdk", t2[0])
    qcompare(out / f"{d.name}-restored-vdb.vmdk", t2[1])
    first = repo.json("restore", "--libvirt", s1[va]["id"][:12], out / "..", "--define", f"{new}2", "--format", "raw",
                      "--overwrite")
    d.defined.append(f"{new}2")
    qcompare(Path(first["disks"][0]["target"]), t1[0])

    assert_cli_error(repo.run("restore", "--libvirt", f"{d.name}:latest", out, "--define", d.name, check=False),
                     "already has a domain")
    assert_cli_error(repo.run("restore", "--libvirt", "nosuch:latest", out, check=False), "no complete libvirt backup")
    assert_cli_error(repo.run("backup", "--libvirt", "nosuch-domain", check=False), "no libvirt domain named",
                     d.name)
    assert_cli_error(repo.run("backup", "--libvirt", d.name, "--changes", "track:/x.sock", check=False),
                     "--libvirt")
    assert d.checkpoints() == [r3["checkpoint"]] and not d.has_job()

    # QEMU killed with -9: the checkpoint's bitmap is left inconsistent; the next backup
    # says so, drops it, scans, and the chain stays restorable
    d.write(0, 512 * 1024, B, 0x31)  # an allocated cluster: no qcow2 metadata to lose
    os.kill(d.qemu_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while d.dom.isActive():
        assert time.monotonic() < deadline, "libvirt did not notice that QEMU died"
        time.sleep(0.05)
    d.dom.create()
    p = repo.run("backup", "--libvirt", d.name, "--json")
    s5 = by_name(json.loads(p.stdout.splitlines()[-1]))
    assert "scan" in p.stderr and r3["checkpoint"] in p.stderr
    assert s5[va]["change_source"] == "scan" and s5[va]["stats"]["changed_bytes"] == B
    assert d.checkpoints() == [s5[va]["change_id"]]
    # as issue 4 types it: no directory (the disks go beside the originals)
    d.defined.append(f"{new}3")
    rr = repo.json("restore", "--libvirt", f"{d.name}:latest", "--define", f"{new}3")
    assert rr["defined"] == f"{new}3" and rr["xml"] == str(d.workdir / f"{new}3.xml")
    qcompare(d.workdir / f"{new}3-vda.qcow2", d.a)
    qcompare(d.workdir / f"{new}3-vdb.raw", d.b)


def test_early_job_only_for_a_plain_command_line(tmp_path) -> None:  # noqa: ANN001
    """vmbak.changes.libvirt_early begins the job before the command line is parsed for real:
    only for a plain ``backup --libvirt DOMAIN``, never where the options change what the job
    must be (hooks, mountpoints, --freeze always, a block size, a pattern, ...)."""
    from vmbak.changes.libvirt_early import parse

    repo = str(tmp_path)
    plain = {"domain": "db", "uri": "qemu:///system", "freeze": "auto", "mode": "auto"}
    assert parse(["-r", repo, "backup", "--libvirt", "db"]) == plain
    assert parse(["backup", "--libvirt=db", "--json", "-q", "--tag", "a,b", "--name", "x", "--workers", "3"]) == plain
    assert parse(["backup", "--libvirt", "db", "--libvirt-uri", "qemu:///session", "--freeze", "never",
                  "--mode", "incremental"]) == {"domain": "db", "uri": "qemu:///session", "freeze": "never",
                                                "mode": "incremental"}
    for mode in ("full", "differential"):  # the repository decides the reference afterwards
        assert parse(["backup", "--libvirt", "db", "--mode", mode]) == plain | {"mode": mode}
    for argv in (["backup", "--libvirt", "db", "--freeze", "always"],
                 ["backup", "--libvirt", "db", "--mode", "mirror"],
                 ["backup", "--libvirt", "db", "--hook-pre", "/bin/true"],
                 ["backup", "--libvirt", "db", "--freeze-mountpoint", "/"],
                 ["backup", "--libvirt", "db", "--block-size", "1M"],
                 ["backup", "--libvirt", "db", "--changes", "scan"],
                 ["backup", "--libvirt", "web-*"],
                 ["backup", "--libvirt", "db", "--libvirt", "other"],
                 ["backup", "disk.img", "--libvirt", "db"],
                 ["backup", "--libvirt"],
                 ["backup", "--name", "db"],
                 ["snapshots", "--libvirt", "db"],
                 ["-r", str(tmp_path / "missing"), "backup", "--libvirt", "db"],
                 ["backup", "--libvirt", "db", "--help"]):
        assert parse(argv) is None, argv


def _nbd_clients(sock: str) -> int:
    """Established connections to the unix socket ``sock`` (QEMU's accepted ends carry its path)."""
    out = subprocess.run(["ss", "-xHn", "state", "established"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if sock in line.split())


def test_the_export_is_connected_while_the_guest_thaws(domain) -> None:
    """begin_backup connects to the job's export and reads its dirty bitmap while the guest
    thaws, not after: the thaw (``quiesce`` leaving its block) sees the connection made.
    A thaw that fails still ends the job, removes the new checkpoint and every connection."""
    import contextlib
    import xml.etree.ElementTree as ET

    from vmbak.changes.libvirt import begin_backup
    from vmbak.errors import VmbakError

    d = domain
    first = begin_backup(d.name, None, B, uri=URI)
    first.commit()
    d.write(0, 2 * MiB, B, 0x41)
    seen: dict = {}

    @contextlib.contextmanager
    def quiesce(fail: bool = False) -> Iterator[None]:
        yield  # the checkpoint and the job are made inside
        sock = ET.fromstring(d.dom.backupGetXMLDesc()).find("server").get("socket")  # type: ignore[union-attr]
        seen["socket"] = sock
        deadline = time.monotonic() + 20
        while not _nbd_clients(sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["clients while thawing"] = _nbd_clients(sock)
        if fail:
            raise VmbakError("the thaw failed")

    b = begin_backup(d.name, first.change_id, B, uri=URI, quiesce=quiesce)
    try:
        assert seen["clients while thawing"] >= 1
        v = b.disks["vda"]
        assert v.change_map is not None and v.change_map.bitmap.nonzero()[0].tolist() == [2 * MiB // B]
        assert v.reader.pread(B, 2 * MiB) == bytes([0x41]) * B
    finally:
        b.commit()
    assert d.checkpoints() == [b.change_id] and not d.has_job()

    seen.clear()
    with pytest.raises(VmbakError, match="the thaw failed"):
        begin_backup(d.name, b.change_id, B, uri=URI, quiesce=lambda: quiesce(fail=True))
    assert seen["clients while thawing"] >= 1
    assert d.checkpoints() == [b.change_id] and not d.has_job()  # the older one still records
    assert _nbd_clients(seen["socket"]) == 0 and not os.path.exists(seen["socket"])
