"""Boot verification without a boot: the machine taken from a stored domain XML, and the
reaping of what a dead run left (real processes, real lock files)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

from vmbak.guest.boot import BootOptions, RunDir, machine_for, reap_dead_runs
from vmbak.repo.manifest import Manifest

DOMAIN_XML = """<domain type='kvm'>
  <name>web</name>
  <memory unit='GiB'>2</memory>
  <vcpu placement='static'>2</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/nonexistent/OVMF_CODE.fd</loader>
    <nvram template='/nonexistent/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
    <kernel>{kernel}</kernel>
    <initrd>/nonexistent/initrd.img</initrd>
    <cmdline>root=/dev/sda1 console=ttyS0</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web-sda.qcow2'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web-vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def manifest(extra: dict) -> Manifest:
    return Manifest(name="web-sda", kind="full", time="2026-12-02T00:00:00Z", disk_size=1 << 30, block_size=65536,
                    chunk_blocks=16, source="libvirt:web:sda", hostname="h", change_source="libvirt", extra=extra)


def test_machine_from_the_stored_domain_xml(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    m = manifest({"libvirt": {"domain": "web", "target": "sda", "domain_xml": DOMAIN_XML.format(kernel=kernel)}})
    mach = machine_for(m, BootOptions())
    assert (mach.memory_mib, mach.cpus, mach.machine, mach.bus, mach.source) == (2048, 2, "q35", "sata", "domain XML")
    # UEFI: the XML's firmware files are not on this host, so Debian's OVMF is used
    assert mach.firmware == "uefi" and mach.loader and mach.loader.startswith("/usr/share/OVMF/")
    assert mach.nvram_template and os.path.isfile(mach.nvram_template)
    assert mach.kernel == str(kernel) and mach.append == "root=/dev/sda1 console=ttyS0" and mach.initrd is None
    assert any("initrd /nonexistent/initrd.img is not on this host" in n for n in mach.notes)
    assert any("NVRAM is not in the backup" in n for n in mach.notes)
    # what the backup stored is used instead of the host's files (which may be gone)
    kept = machine_for(m, BootOptions(), frozenset({"nvram", "kernel", "initrd"}))
    assert kept.from_backup == {"nvram": "/var/lib/libvirt/qemu/nvram/web_VARS.fd", "kernel": str(kernel),
                                "initrd": "/nonexistent/initrd.img"}
    assert kept.initrd == "/nonexistent/initrd.img" and not any("not on this host" in n for n in kept.notes)
    assert not any("NVRAM" in n for n in kept.notes)
    assert machine_for(m, BootOptions(firmware="bios", kernel=str(kernel)), frozenset({"nvram", "kernel"})) \
        .from_backup == {}
    # options win
    over = machine_for(m, BootOptions(memory_mib=512, cpus=1, firmware="bios"))
    assert (over.memory_mib, over.cpus, over.firmware, over.loader) == (512, 1, "bios", None)
    # no XML: defaults
    plain = machine_for(manifest({}), BootOptions())
    assert (plain.memory_mib, plain.cpus, plain.machine, plain.firmware, plain.kernel, plain.source) == \
        (1024, 1, "pc", "bios", None, "defaults")
    # an XML that does not parse: defaults, and a note
    bad = machine_for(manifest({"libvirt": {"domain_xml": "<domain"}}), BootOptions())
    assert bad.source == "defaults" and "cannot be read" in bad.notes[0]


def _lock_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_reaper_kills_what_a_dead_run_left_and_spares_live_runs(tmp_path: Path) -> None:
    base = Path(f"/tmp/vmbak-vm-reap-{os.getpid()}")
    base.mkdir(mode=0o700)
    procs = []
    try:
        live = RunDir(str(base))  # a run that lives (this process holds its lock)
        assert _lock_held(Path(live.file("lock")))
        dead = base / "run-deaddeaddead"
        dead.mkdir()
        (dead / "lock").write_text("1\n")  # nobody holds it
        (dead / "serve").mkdir()
        # a "QEMU" of the dead run (its command line names the run directory), and a process
        # whose pid a pid file names but which belongs to nobody (pid reused): spared
        orphan = subprocess.Popen(["sh", "-c", "sleep 300", str(dead / "qemu")], start_new_session=True)
        stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
        procs += [orphan, stranger]
        # Popen returns once the exec has begun; the new command line shows in /proc a moment
        # later (read at once, it was empty 261 times in 300); a dead run's QEMU has long been up
        deadline = time.monotonic() + 10
        while str(dead) not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes().decode(errors="replace"):
            assert time.monotonic() < deadline, "the orphan's command line never named the run"
            time.sleep(0.01)
        (dead / "qemu.pid").write_text(f"{orphan.pid}\n")
        (dead / "serve" / "qsd.pid").write_text(f"{stranger.pid}\n")
        (dead / "overlay.qcow2").write_bytes(b"QFI\xfb")
        old_new = base / ".new-0123456789ab"  # died between mkdir and rename, long ago
        old_new.mkdir()
        os.utime(old_new, (time.time() - 3600, time.time() - 3600))

        reaped = reap_dead_runs(str(base))
        assert [r["run"] for r in reaped] == [str(dead)] and reaped[0]["killed_pids"] == [orphan.pid]
        assert orphan.wait(10) == -9
        assert stranger.poll() is None
        assert sorted(p.name for p in base.iterdir()) == [Path(live.path).name]
        live.remove()
        assert list(base.iterdir()) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for p in base.glob("*"):
            subprocess.run(["rm", "-rf", str(p)], check=False)
        base.rmdir()


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"expect_serial": "("}, {"expect_port": 0}, {"cpus": 0},
                                 {"exec_command": "'"}, {"firmware": "coreboot"}, {"accel": "hvf"}])
def test_options_are_checked(bad: dict) -> None:
    from vmbak.errors import VmbakError

    with pytest.raises(VmbakError):
        BootOptions(**bad).validate()


def test_encrypted_repository_disk_without_boot_loader(make_repo, make_disk, tmp_path: Path, json_result,  # noqa: ANN001
                                                       assert_cli_error) -> None:
    """A short real boot (BIOS, TCG) of a disk of random bytes from an encrypted repository:
    the export opens the repository with the password, the guest shows no sign of life, and
    the run says so; a wrong password is exit 12 before anything starts."""
    repo = make_repo("aes-256-gcm")
    disk = make_disk("d.raw", 8 << 20, seed=3)
    repo.backup(disk, "d")
    base = Path(f"/tmp/vmbak-vm-enc-{os.getpid()}")
    env = {"VMBAK_VERIFY_DIR": str(base)}
    try:
        p = repo.run("verify", "d:latest", "--boot", "--accel", "tcg", "--timeout", "3", "--memory", "128M",
                     "--output", tmp_path / "out", "--json", env=env, check=False)
        s = json_result(p.stdout)
        r = s["results"][0]
        assert p.returncode == 1 and not s["ok"], p.stdout + p.stderr
        assert r["reason"].startswith("no sign of life within the timeout"), r["reason"]
        assert any("booting the disk's own boot loader" in n for n in r["notes"])
        assert Path(r["screenshot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [x.name for x in base.iterdir()] == []
        p = repo.run("verify", "d:latest", "--boot", "--accel", "tcg", "--timeout", "3",
                     env={**env, "VMBAK_PASSWORD": "wrong"}, check=False)
        assert_cli_error(p, "password")
        assert p.returncode == 12
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
