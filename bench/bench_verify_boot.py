#!/usr/bin/env python3
"""Boot verification benchmark: `vmbak verify SNAP --boot` of the test guest against the
same guest booted by QEMU straight from its image file.

The peer is the floor: the same QEMU machine (TCG or KVM as asked, the same memory, kernel,
initrd and command line) booting a qcow2 overlay of the cached test guest's disk, timed
until the serial console shows VMBAK-GUEST-READY and the guest agent answers guest-ping.
vmbak's run is timed the same way (--expect-serial VMBAK-GUEST-READY --expect-agent), plus
its export (nbdkit reading the repository, qemu-storage-daemon's overlay), screenshot and
clean-up; both numbers are reported (vmbak's boot_s and total_s). Runs alternate, so that
the load of the machine weighs on both alike.

    PYTHONPATH=src .venv/bin/python bench/bench_verify_boot.py [--runs 3] [--accel tcg]

Needs the cached test guest (scripts/build-test-guest.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "VMBAK-GUEST-READY"
APPEND = "root=/dev/vda1 rw console=ttyS0 panic=10"


def vmbak(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "vmbak.cli.main", *args], capture_output=True, text=True, env=e)


def direct_boot(guest: Path, work: Path, accel: str, memory: str) -> float:
    """Seconds until the marker and the agent's answer, QEMU booting the image itself."""
    sys.path.insert(0, str(ROOT / "src"))
    from vmbak.guest.agent import AgentError, SocketAgent

    d = Path(tempfile.mkdtemp(dir=work, prefix="direct-"))
    disk, serial, qga = d / "vda.qcow2", d / "serial.log", d / "qga.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(guest / "disk.qcow2"),
                    str(disk)], check=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([
        "qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", memory.rstrip("M"), "-smp", "1",
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-vga", "std",
        "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.img"), "-append", APPEND,
        "-blockdev", json.dumps({"driver": "qcow2", "node-name": "d0",
                                 "file": {"driver": "file", "filename": str(disk)}}),
        "-device", "virtio-blk-pci,drive=d0", "-serial", f"file:{serial}", "-nic", "none",
        "-chardev", f"socket,id=qga0,path={qga},server=on,wait=off", "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while MARKER not in (serial.read_text(errors="replace") if serial.exists() else ""):
            assert proc.poll() is None and time.monotonic() - t0 < 900
            time.sleep(0.25)
        while True:
            try:
                a = SocketAgent(str(qga), timeout=2)
                a.execute("guest-ping")
                a.close()
                break
            except AgentError:
                time.sleep(0.5)
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    ap.add_argument("--memory", default="384M")
    ap.add_argument("--workdir", default="/var/tmp/vmbak-bench-verify-boot")
    a = ap.parse_args()
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build-test-guest.sh")], capture_output=True, text=True,
                         check=True).stdout
    guest = Path(out.strip().splitlines()[-1])
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = work / "repo"
    vmbak("init", "-r", str(repo), "--encryption", "none", "-q")
    p = vmbak("-r", str(repo), "backup", str(guest / "disk.qcow2"), "--name", "guest", "--json")
    assert p.returncode == 0, p.stderr
    rows: dict[str, list[float]] = {"direct": [], "vmbak_boot": [], "vmbak_total": []}
    for i in range(a.runs):
        rows["direct"].append(direct_boot(guest, work, a.accel, a.memory))
        p = vmbak("-r", str(repo), "verify", "guest:latest", "--boot", "--accel", a.accel, "--memory", a.memory,
                  "--kernel", str(guest / "vmlinuz"), "--initrd", str(guest / "initrd.img"), "--append", APPEND,
                  "--expect-serial", MARKER, "--expect-agent", "--output", str(work / "out"), "--json",
                  env={"VMBAK_VERIFY_DIR": str(work / "runs")})
        r = json.loads(p.stdout.strip().splitlines()[-1])["results"][0]
        assert r["ok"], r
        rows["vmbak_boot"].append(r["timings"]["boot_s"])
        rows["vmbak_total"].append(r["timings"]["total_s"])
        print(f"run {i + 1}: direct {rows['direct'][-1]:.1f} s, vmbak verify boot {r['timings']['boot_s']:.1f} s "
              f"total {r['timings']['total_s']:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(json.dumps({"accel": a.accel, "runs": a.runs, "median_s": {k: round(v, 1) for k, v in med.items()},
                      "ratio_total_to_direct": round(med["vmbak_total"] / med["direct"], 2),
                      "ratio_boot_to_direct": round(med["vmbak_boot"] / med["direct"], 2),
                      "loadavg": os.getloadavg()}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
