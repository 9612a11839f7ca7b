#!/usr/bin/env python3
"""What keeping a domain's state and backing up shut-off domains cost, measured in one run.

Two small libvirt domains (TCG, no OS: nothing writes their disks), each with a 256 MiB
qcow2 disk holding 64 MiB of random data, backed up through the command line:

* ``plain``: SeaBIOS, no state files (the peer);
* ``uefi``: OVMF with an NVRAM store, an swtpm TPM 2.0 and direct-boot kernel and initrd
  (the test guest's, from ``$VMBAK_TEST_GUEST_DIR/v2``; build it with
  scripts/build-test-guest.sh), so each backup also reads and stores 4 state files.

After a full of each, it times, interleaved, ``--runs`` incrementals (nothing changed) of
each running domain, then of each shut off (a paused start, the backup, the stop), and
prints the medians and the ratios against the plain running domain.

    .venv/bin/python bench/bench_vm_state.py [--runs 5] [--workdir /var/tmp/vmbak-bench-state]

Runs as root with libvirtd running (qemu:///system).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import libvirt

GUEST = Path(os.environ.get("VMBAK_TEST_GUEST_DIR") or "/var/cache/vmbak-test-guest") / "v2"
ROOT = Path(__file__).resolve().parents[1]
PLAIN = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
  <target dev='vda' bus='virtio'/></disk></devices></domain>"""
UEFI = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{dir}/{name}_VARS.fd</nvram>
    <kernel>{dir}/vmlinuz</kernel><initrd>{dir}/initrd.img</initrd><cmdline>console=ttyS0</cmdline></os>
  <features><acpi/></features>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
  <target dev='vda' bus='virtio'/></disk>
  <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>"""


def vmbak(repo: Path, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update(VMBAK_REPOSITORY=str(repo), PYTHONPATH=str(ROOT / "src"))
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "vmbak.cli.main", *args, "-q"], env=env, check=True)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp/vmbak-bench-state")
    a = ap.parse_args()
    if not (GUEST / "vmlinuz").exists():
        sys.exit(f"no test guest kernel in {GUEST}: run scripts/build-test-guest.sh first")
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755, parents=True)
    for f in ("vmlinuz", "initrd.img"):
        shutil.copyfile(GUEST / f, work / f)
    libvirt.registerErrorHandler(lambda *x: None, None)
    conn = libvirt.open("qemu:///system")
    doms = {}
    repo = work / "repo"
    subprocess.run([sys.executable, "-m", "vmbak.cli.main", "-r", str(repo), "init", "--encryption", "none", "-q"],
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=True)
    try:
        for kind, tmpl in (("plain", PLAIN), ("uefi", UEFI)):
            disk = work / f"{kind}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "256M"], check=True)
            data = work / "rand"
            data.write_bytes(os.urandom(64 << 20))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 64M", disk], check=True,
                           capture_output=True)
            name = f"vmbak-bench-{kind}-{os.getpid()}"
            doms[kind] = conn.defineXML(tmpl.format(name=name, disk=disk, dir=work))
            doms[kind].create()
            vmbak(repo, "backup", "--libvirt", name, "--freeze", "never")
        times: dict[str, list[float]] = {k: [] for k in ("plain", "uefi", "plain-off", "uefi-off")}
        for _ in range(a.runs):
            for kind in ("plain", "uefi"):
                times[kind].append(vmbak(repo, "backup", "--libvirt", doms[kind].name(), "--freeze", "never"))
        for kind in ("plain", "uefi"):
            doms[kind].destroy()
        for _ in range(a.runs):
            for kind in ("plain", "uefi"):
                times[f"{kind}-off"].append(vmbak(repo, "backup", "--libvirt", doms[kind].name()))
                assert not doms[kind].isActive()
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["plain"]
        print(f"load before: {os.getloadavg()[0]:.1f}; {a.runs} runs each; medians (s), ratio to plain running")
        for k, v in med.items():
            print(f"  {k:10s} {v:7.2f}  x{v / base:.2f}   runs: {', '.join(f'{t:.2f}' for t in times[k])}")
        (work / "results.json").write_text(json.dumps({"times": times, "medians": med}, indent=1))
    finally:
        for d in doms.values():
            try:
                if d.isActive():
                    d.destroy()
                d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        conn.close()


if __name__ == "__main__":
    main()
