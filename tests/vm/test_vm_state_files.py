"""A direct-boot domain's kernel and initrd that did not change since the last backup are
not read again (vmbak.domain.state: their stat equals the parent's record), and a kernel
whose content changed with its size and modification time put back is read and stored
again (its change time differs). The domain is the test guest's real kernel and initrd
(copies in its directory) with a small disk, started paused under TCG: QEMU loads the
kernel, and no guest code runs."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from conftest import URI, _fix_kvm, _start_libvirtd

from vmbak.domain.state import SETTLED_NS

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{d}/vmlinuz</kernel>
    <initrd>{d}/initrd.img</initrd>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{d}/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>"""


class PausedDomain:
    def __init__(self, conn, image: Path, workdir: Path) -> None:  # noqa: ANN001
        self.name = f"vmbak-sf-{os.getpid()}-{secrets.token_hex(3)}"
        self.kernel = workdir / "vmlinuz"
        self.initrd = workdir / "initrd.img"
        shutil.copyfile(image / "vmlinuz", self.kernel)
        shutil.copyfile(image / "initrd.img", self.initrd)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / "vda.qcow2"), "16M"], check=True)
        os.chmod(workdir / "vda.qcow2", 0o666)
        self.dom = conn.createXML(DOMAIN_XML.format(name=self.name, d=workdir), libvirt.VIR_DOMAIN_START_PAUSED)


@pytest.fixture
def paused(guest_image: Path) -> Iterator[PausedDomain]:
    _fix_kvm()
    _start_libvirtd()
    libvirt.registerErrorHandler(lambda *a: None, None)
    workdir = Path(f"/var/tmp/vmbak-test-sf-{os.getpid()}-{secrets.token_hex(3)}")
    workdir.mkdir(mode=0o755)
    conn = libvirt.open(URI)
    d = None
    try:
        d = PausedDomain(conn, guest_image, workdir)
        yield d
    finally:
        if d is not None:
            try:
                d.dom.destroy()
            except libvirt.libvirtError:
                pass
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _settle(*paths: Path) -> None:
    """Wait until the files' times are SETTLED_NS old, so that a backup keeps their stat.
    Counted from the files' own times: starting the domain changes them too (libvirt hands
    the kernel and initrd to the qemu user, a new ctime), and under load that came more
    than the 0.2 s of slack after the copies' end, which the test once waited from."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    time.sleep(max(0.0, (newest + SETTLED_NS) / 1e9 - time.time()) + 0.2)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _backup_traced(repo, d: PausedDomain, trace: Path) -> tuple[dict, int]:  # noqa: ANN001
    """``backup --libvirt`` under strace: its result, and the read calls on the kernel file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update({k: v for k, v in repo.env().items() if v is not None})
    p = subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=read,pread64,readv,preadv,preadv2,mmap",
                        "-o", str(trace), sys.executable, "-m", "vmbak.cli.main", "backup", "--libvirt", d.name,
                        "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads([x for x in p.stdout.splitlines() if x.startswith("{")][-1])
    reads = sum(1 for line in trace.read_text().splitlines() if f"<{d.kernel}>" in line)
    return out, reads


def _state(out: dict, role: str) -> dict:
    return next(s for s in out["snapshots"] if s["name"].endswith(f"-{role}"))


def _record(repo, out: dict, role: str) -> dict:  # noqa: ANN001
    vda = next(s for s in out["snapshots"] if s["name"].endswith("-vda"))
    return next(r for r in repo.open().find(vda["id"]).extra["libvirt"]["state"] if r["role"] == role)


def test_unchanged_kernel_is_not_read_and_a_changed_one_with_its_mtime_put_back_is(paused: PausedDomain, repo,
                                                                                    tmp_path: Path) -> None:
    d = paused
    size, sha1 = d.kernel.stat().st_size, _sha(d.kernel)
    _settle(d.kernel, d.initrd)
    # 1. the first backup reads them and keeps their stat
    r1, reads = _backup_traced(repo, d, tmp_path / "t1")
    assert reads > 0 and _state(r1, "kernel")["stats"]["read_bytes"] == size
    st = d.kernel.stat()
    assert _record(repo, r1, "kernel")["stat"] == {"dev": st.st_dev, "ino": st.st_ino, "size": size,
                                                   "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    # 2. unchanged: no read of the kernel at all; the record carries over
    r2, reads = _backup_traced(repo, d, tmp_path / "t2")
    assert reads == 0
    for role in ("kernel", "initrd"):
        s = _state(r2, role)
        assert s["change_source"] == "file-unchanged" and s["type"] == "incremental", s
        assert s["stats"]["read_bytes"] == 0 and s["stats"]["new_stored_bytes"] == 0
    assert _record(repo, r2, "kernel") == _record(repo, r1, "kernel")
    assert _record(repo, r2, "kernel")["sha256"] == sha1
    # 3. new content, same size, the modification time put back: only the change time differs
    data = bytearray(d.kernel.read_bytes())
    data[size // 2:size // 2 + 4096] = os.urandom(4096)
    with open(d.kernel, "r+b") as f:
        f.write(data)
    os.utime(d.kernel, ns=(st.st_atime_ns, st.st_mtime_ns))
    st3 = d.kernel.stat()
    assert (st3.st_size, st3.st_mtime_ns, st3.st_ino) == (size, st.st_mtime_ns, st.st_ino)
    assert st3.st_ctime_ns != st.st_ctime_ns
    r3, reads = _backup_traced(repo, d, tmp_path / "t3")
    k3 = _state(r3, "kernel")
    assert reads > 0 and k3["change_source"] == "scan" and k3["stats"]["changed_bytes"] > 0, k3
    assert _record(repo, r3, "kernel")["sha256"] == hashlib.sha256(data).hexdigest() != sha1
    assert _state(r3, "initrd")["change_source"] == "file-unchanged"
    # the restored kernel is the new one
    out = tmp_path / "restored"
    out.mkdir()
    rr = repo.json("restore", "--libvirt", f"{d.name}:latest", out)
    kernel = next(s for s in rr["state"] if s["role"] == "kernel")
    assert _sha(Path(kernel["target"])) == hashlib.sha256(data).hexdigest()
