"""`vmbak verify SNAP --boot`: real boots (QEMU, TCG here) of the cached test guest from a
repository, through the copy-on-write export.

One repository is shared by the module; it holds three snapshots of the test guest's disk:

* ``good``: the guest as built (agent, writer, serial getty);
* ``noagent``: the same with qemu-guest-agent.service masked (a symlink to /dev/null made
  with debugfs), so no agent answers, and with a network: the virtio-net modules of the
  guest's kernel (scripts/test-guest-net-modules.sh) loaded by a unit, systemd-networkd
  with the address user-mode networking forwards to, and a systemd socket on port 22
  that accepts connections and says nothing (so the port check must see the handshake);
* ``damaged``: ``noagent`` with the root file system's first 64 KiB (its superblock) zeroed:
  the initramfs cannot mount it and reboots (``panic=10``).

Boots under TCG take tens of seconds each, so checks are combined: the kill -9 run is
cleaned up by the next run, which is also the timeout and ``--all-latest`` test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.xdist_group("vm-verify-boot"), pytest.mark.timeout(1800)]
MARKER = "VMBAK-GUEST-READY"
PART_OFFSET = 1 << 20
NET_MODULES = Path(__file__).resolve().parents[2] / "scripts" / "test-guest-net-modules.sh"
UNITS = {
    "vmbak-net.service": """[Unit]
Description=vmbak test: the virtio-net driver
DefaultDependencies=no
Before=systemd-networkd.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/insmod /usr/local/lib/vmbak-net/failover.ko
ExecStart=/sbin/insmod /usr/local/lib/vmbak-net/net_failover.ko
ExecStart=/sbin/insmod /usr/local/lib/vmbak-net/virtio_net.ko
""",
    "10-vmbak.network": "[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nLinkLocalAddressing=no\n",
    "vmbak-port.socket": "[Socket]\nListenStream=22\nAccept=yes\n",
    "vmbak-port@.service": "[Service]\nExecStart=/usr/bin/sleep 30\nStandardInput=socket\n",
}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking every chunk's CRC and that the image data
    inflates to exactly the size its header announces (8-bit RGB or RGBA)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
        if kind == b"IEND":
            break
    assert ihdr is not None and kind == b"IEND"
    w, h, depth, color = ihdr[:4]
    assert depth == 8 and color in (2, 6), ihdr
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + w * (3 if color == 2 else 4))
    return w, h


def qemu_pids(base: Path) -> list[int]:
    """Processes whose command line names the run base directory (QEMU, nbdkit, qsd)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(base) in cmd and state != "Z":
            out.append(int(p.name))
    return out


def leftovers(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.iterdir() if p.name.startswith(("run-", ".new-")))


def repo_files(repo: Path) -> dict[str, int]:
    """Every file of the repository but its locks, with sizes."""
    return {str(p.relative_to(repo)): p.stat().st_size for p in repo.rglob("*")
            if p.is_file() and p.relative_to(repo).parts[0] != "locks"}


class BootRepo:
    def __init__(self, repo, image: Path, base: Path, out: Path) -> None:  # noqa: ANN001
        self.repo = repo
        self.image = image
        self.base = base
        self.out = out

    def boot_args(self) -> list[str]:
        return ["--accel", "tcg", "--kernel", str(self.image / "vmlinuz"), "--initrd", str(self.image / "initrd.img"),
                "--append", "root=/dev/vda1 rw console=ttyS0 panic=10", "--memory", "384M", "--output", str(self.out)]

    def env(self) -> dict[str, str | None]:
        return {"VMBAK_VERIFY_DIR": str(self.base)}

    def verify(self, *args: object, timeout: float = 900) -> tuple[int, dict, str]:
        p = self.repo.run("verify", "--boot", *self.boot_args(), *args, "--json", env=self.env(), check=False,
                          timeout=timeout)
        assert "Traceback" not in p.stderr, p.stderr
        lines = p.stdout.strip().splitlines()
        last = json.loads(lines[-1])
        assert last["message_type"] == "summary", p.stdout[-2000:] + p.stderr
        assert all(json.loads(ln)["message_type"] == "status" for ln in lines[:-1])
        return p.returncode, last, p.stderr


@pytest.fixture(scope="module")
def boot_repo(guest_image: Path, init_repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootRepo]:  # noqa: ANN001
    work = tmp_path_factory.mktemp("verify-boot")
    repo = init_repo(work / "repo")
    t0 = time.monotonic()
    repo.backup(guest_image / "disk.qcow2", "good")
    raw = work / "variant.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest_image / "disk.qcow2"), str(raw)], check=True)
    fs = f"{raw}?offset={PART_OFFSET}"
    p = subprocess.run(["bash", str(NET_MODULES)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{NET_MODULES} failed:\n{p.stdout}\n{p.stderr}"
    mods = Path(p.stdout.strip().splitlines()[-1])
    for name, text in UNITS.items():
        (work / name).write_text(text)
    etc = "/etc/systemd/system"
    script = ["mkdir /usr/local/lib/vmbak-net",
              *(f"write {mods / m} /usr/local/lib/vmbak-net/{m}" for m in ("failover.ko", "net_failover.ko",
                                                                          "virtio_net.ko")),
              f"write {work / 'vmbak-net.service'} {etc}/vmbak-net.service",
              f"write {work / '10-vmbak.network'} /etc/systemd/network/10-vmbak.network",
              f"write {work / 'vmbak-port.socket'} {etc}/vmbak-port.socket",
              f"write {work / 'vmbak-port@.service'} {etc}/vmbak-port@.service",
              f"symlink {etc}/multi-user.target.wants/vmbak-net.service {etc}/vmbak-net.service",
              f"symlink {etc}/multi-user.target.wants/systemd-networkd.service "
              "/lib/systemd/system/systemd-networkd.service",
              f"mkdir {etc}/sockets.target.wants",
              f"symlink {etc}/sockets.target.wants/vmbak-port.socket {etc}/vmbak-port.socket",
              f"symlink {etc}/qemu-guest-agent.service /dev/null"]
    (work / "variant.debugfs").write_text("\n".join(script) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(work / "variant.debugfs"), fs], check=True, capture_output=True)
    for path, kind in ((f"{etc}/qemu-guest-agent.service", "symlink"), (f"{etc}/sockets.target.wants/vmbak-port.socket",
                       "symlink"), ("/usr/local/lib/vmbak-net/virtio_net.ko", "regular")):
        st = subprocess.run(["debugfs", "-R", f"stat {path}", fs], check=True, capture_output=True, text=True).stdout
        assert f"Type: {kind}" in st, (path, st)
    fsck = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    repo.backup(raw, "noagent")
    with open(raw, "r+b") as f:  # the root file system's superblock and group descriptors
        f.seek(PART_OFFSET)
        f.write(bytes(65536))
    repo.backup(raw, "damaged")
    raw.unlink()
    print(f"\nverify-boot repository ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    base = Path(f"/tmp/vmbak-vb-{os.getpid()}")  # short: unix socket paths
    base.mkdir(mode=0o700)
    try:
        yield BootRepo(repo, guest_image, base, work / "out")
    finally:
        for pid in qemu_pids(base):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def test_good_snapshot_passes_with_screenshot_and_serial_log(boot_repo: BootRepo) -> None:
    before = repo_files(boot_repo.repo.path)
    rc, s, err = boot_repo.verify("good:latest", "--expect-serial", MARKER, "--expect-agent",
                                  "--exec", "/bin/grep -qx vmbak-guest /etc/hostname")
    r = s["results"][0]
    assert rc == 0 and s["ok"] and r["ok"] and s["passed"] == 1, json.dumps(s, indent=1) + err
    assert r["name"] == "good" and r["reason"] is None and r["accel"] == "tcg"
    c = r["checks"]
    assert c["agent"]["status"] == "passed" and "guest-ping" in c["agent"]["detail"]
    assert c["serial"]["status"] == "passed" and c["serial"]["detail"].startswith(MARKER)
    assert c["exec"]["status"] == "passed" and c["exec"]["detail"]["exit_code"] == 0
    assert c["port"]["status"] == "not requested" and c["console"]["status"] == "passed"
    w, h = png_size(Path(r["screenshot"]))
    assert w >= 320 and h >= 200
    assert MARKER in Path(r["serial_log"]).read_text(errors="replace")
    assert r["machine"]["memory_mib"] == 384 and r["machine"]["kernel"].endswith("vmlinuz")
    e = r["export"]
    assert 10 << 20 < e["read_bytes"] < 1 << 30 and 0 < e["fetched_bytes"] and e["fetched_chunks"] > 0, e
    t = r["timings"]
    assert 0 < t["export_s"] < t["total_s"] and 0 < t["first_console_s"] <= t["boot_s"] < t["total_s"]
    print(f"\nboot verification of a good snapshot: {t['total_s']:.1f} s (boot {t['boot_s']:.1f} s, "
          f"export {t['export_s']:.2f} s; the guest read {e['read_bytes'] >> 20} MiB, "
          f"{e['fetched_bytes'] >> 20} MiB fetched)", file=sys.stderr)
    # nothing written to the repository; nothing left behind
    assert repo_files(boot_repo.repo.path) == before
    assert not list((boot_repo.repo.path / "locks").iterdir())
    assert leftovers(boot_repo.base) == [] and qemu_pids(boot_repo.base) == []


def test_damaged_root_fails(boot_repo: BootRepo) -> None:
    rc, s, err = boot_repo.verify("damaged:latest", "--expect-serial", MARKER)
    r = s["results"][0]
    assert rc == 1 and not s["ok"] and not r["ok"] and s["failed"] == 1, json.dumps(s, indent=1) + err
    assert "root file system" in r["reason"], r["reason"]
    assert r["checks"]["console"]["status"] == "failed"
    assert r["checks"]["serial"]["status"] == "not reached"
    assert MARKER not in Path(r["serial_log"]).read_text(errors="replace")
    assert leftovers(boot_repo.base) == [] and qemu_pids(boot_repo.base) == []


def test_guest_without_agent_is_no_agent_not_failure_and_its_port_answers(boot_repo: BootRepo) -> None:
    rc, s, err = boot_repo.verify("noagent:latest", "--expect-serial", MARKER, "--expect-port", "22",
                                  "--no-screenshot")
    r = s["results"][0]
    assert rc == 0 and r["ok"], json.dumps(s, indent=1) + err
    assert r["checks"]["agent"]["status"] == "no agent" and not r["checks"]["agent"]["requested"]
    assert r["checks"]["serial"]["status"] == "passed"
    assert r["checks"]["port"]["status"] == "passed" and "port 22" in r["checks"]["port"]["detail"]
    assert r["screenshot"] is None
    assert leftovers(boot_repo.base) == [] and qemu_pids(boot_repo.base) == []


def test_sigterm_cleans_up_kill9_is_reaped_by_the_next_run_which_times_out(boot_repo: BootRepo, popen_vmbak) -> None:  # noqa: ANN001
    """SIGTERM of vmbak verify while the guest boots: everything is cleaned up at once.
    kill -9 leaves a run directory (QEMU itself dies with its parent); the next run reaps
    it. That run (--all-latest, --expect-agent, --expect-port, a short --timeout) fails on
    every snapshot by timeout, and leaves nothing either."""
    def start_and_wait_for_boot() -> tuple[subprocess.Popen, Path]:
        proc = popen_vmbak("verify", "--boot", "noagent:latest", *boot_repo.boot_args(), "--expect-agent",
                           "--timeout", "600", "--json", env={**boot_repo.repo.env(), **boot_repo.env()})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [p for p in boot_repo.base.glob("run-*") if (p / "qemu.pid").exists()
                    and (p / "serial.log").exists() and (p / "serial.log").stat().st_size > 0]
            if runs:
                return proc, runs[0]
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        raise AssertionError("the guest did not start booting")

    # SIGTERM: vmbak cleans up itself (exit 143, an error line, nothing left, no lock)
    proc, run = start_and_wait_for_boot()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "vmbak: error: interrupted (SIGTERM)", (out, err)
    assert json.loads(out.strip().splitlines()[-1])["exit_class"] == "interrupted"
    assert leftovers(boot_repo.base) == [] and qemu_pids(boot_repo.base) == []
    assert not list((boot_repo.repo.path / "locks").iterdir())

    # kill -9: the run directory stays until the next run
    proc, run = start_and_wait_for_boot()
    qemu_pid = int((run / "qemu.pid").read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert run.exists() and (run / "overlay.qcow2").exists()  # what the dead run left
    t0 = time.monotonic()
    # --expect-port: QEMU's user-mode network accepts the host side of the forwarded port at
    # once; that must not count ("good" has no NIC driver at all and "damaged" never gets
    # that far; "noagent" may answer for real on a fast machine)
    rc, s, err = boot_repo.verify("--all-latest", "--expect-agent", "--expect-port", "22", "--timeout", "8",
                                  "--no-screenshot")
    took = time.monotonic() - t0
    assert rc == 1 and not s["ok"] and s["failed"] == 3, json.dumps(s, indent=1) + err
    assert [r["name"] for r in s["results"]] == ["damaged", "good", "noagent"]
    for r in s["results"]:
        if r["name"] == "damaged" and r["reason"].startswith("the console shows a fatal error: Failed to mount"):
            continue  # with KVM the damaged guest gets to its failed mount within the 8 s
        # with KVM "good"'s agent may answer within the 8 s; its port never does. "noagent"
        # has a real listener on port 22: on a fast machine it may answer in time, and then
        # the port check rightly passes ("good" and "damaged" show the host side of the
        # forwarded port is not counted)
        if r["name"] == "noagent" and r["checks"]["port"]["status"] == "passed":
            assert r["reason"] == "timed out after 8 s waiting for: agent", r["reason"]
            continue
        assert r["reason"] in ("timed out after 8 s waiting for: agent, port", "timed out after 8 s waiting for: port"), \
            r["reason"]
        assert r["checks"]["port"]["status"] == "failed", r["checks"]
        assert r["name"] == "good" or r["checks"]["agent"]["status"] == "failed", r["checks"]
    reaped = s["results"][0]["reaped"]
    assert [x["run"] for x in reaped] == [str(run)], reaped
    assert not run.exists() and qemu_pid not in qemu_pids(boot_repo.base)
    assert leftovers(boot_repo.base) == [] and qemu_pids(boot_repo.base) == []
    assert not list((boot_repo.repo.path / "locks").iterdir())  # the killed run's lock: stale, removed
    assert took < 3 * (8 + 30), took


def test_bad_input_is_one_line_error(boot_repo: BootRepo, assert_cli_error) -> None:  # noqa: ANN001
    run = boot_repo.repo.run
    p = run("verify", "good:latest", check=False)
    assert_cli_error(p, "--boot")
    assert p.returncode == 2
    assert_cli_error(run("verify", "--boot", check=False), "snapshot or --all-latest")
    assert_cli_error(run("verify", "--boot", "good:latest", "--all-latest", check=False), "not both")
    assert_cli_error(run("verify", "--boot", "good:latest", "--expect-serial", "(", check=False),
                     "not a regular expression")
    assert_cli_error(run("verify", "--boot", "good:latest", "--expect-port", "70000", check=False), "TCP port")
    assert_cli_error(run("verify", "--boot", "good:latest", "--kernel", "/nonexistent/vmlinuz", check=False),
                     "no such file")
    assert_cli_error(run("verify", "--boot", "good:latest", "--initrd", str(boot_repo.image / "initrd.img"),
                         check=False), "go with --kernel")
    assert_cli_error(run("verify", "--boot", "nosuch:latest", check=False), "nosuch")
    p = run("verify", "--help")
    assert "examples:" in p.stdout and "--all-latest" in p.stdout


def test_accel_auto_falls_back_to_tcg_when_kvm_does_not_run(boot_repo: BootRepo) -> None:
    """--accel auto: KVM when it runs a guest, else TCG (here /dev/kvm opens but QEMU cannot
    run a vCPU with it); a fallback is remembered by a marker file and noted."""
    marker = boot_repo.base / "kvm-runs-nothing"
    marker.unlink(missing_ok=True)
    rc, s, err = boot_repo.verify("damaged:latest", "--accel", "auto", "--timeout", "5", "--no-screenshot")
    r = s["results"][0]
    # a fast machine gets the damaged guest to its failed mount within the 5 s (as in
    # test_sigterm_cleans_up_kill9_is_reaped_by_the_next_run_which_times_out with KVM)
    assert rc == 1 and r["reason"].startswith(("no sign of life within the timeout",
                                               "the console shows a fatal error: Failed to mount")), \
        json.dumps(s, indent=1) + err
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if r["accel"] == "tcg":
        assert not usable or (marker.exists() and any("booted again with TCG" in n for n in r["notes"])), r["notes"]
    else:
        assert usable and r["accel"] == "kvm" and not marker.exists()
    assert leftovers(boot_repo.base) == [] and qemu_pids(boot_repo.base) == []
