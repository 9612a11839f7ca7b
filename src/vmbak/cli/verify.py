"""The verify command: boot a snapshot in an isolated QEMU and report its signs of life."""

from __future__ import annotations

import argparse

from vmbak.cli.common import emit_summary, log, open_repo_and_password, parse_size, progress
from vmbak.errors import UsageError, VmbakError, printable

EPILOG = """examples:
  vmbak verify web:latest --boot                       # boot it, wait for the guest agent, report
  vmbak verify web:latest --boot --expect-port 22 --expect-serial 'login:' \\
        --exec 'systemctl is-system-running' --timeout 300
  vmbak verify --boot --all-latest --json              # every disk name's latest snapshot, one after another
  vmbak verify db:latest --boot --kernel /boot/vmlinuz-6.1.0-50-amd64 --initrd /boot/initrd.img-6.1.0-50-amd64 \\
        --append 'root=/dev/vda1 console=ttyS0' --expect-serial 'login:'   # direct kernel boot

The snapshot is exported copy-on-write (as 'vmbak serve --writable') with a throw-away
overlay and booted in QEMU (KVM when it works, else TCG) without a network, or, with
--expect-port, on a restricted user-mode network that reaches nothing outside the VM.
Checks: the guest agent answers guest-ping (without --expect-agent a guest without one is
reported as 'no agent', not as a failure), --expect-serial, --expect-port, --exec; the
console is watched for a kernel panic or a missing root file system. A screenshot (PNG)
and the serial log are kept in --output. Exit status 0 when every snapshot passed, 1 when
one failed. Nothing is written to the repository; a run killed with kill -9 is cleaned
up by the next one. See docs/verify.md.
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify", parents=[parent], help="boot a snapshot in an isolated VM and check signs of life",
        description="Prove that a backup restores: boot the snapshot in an isolated QEMU from a copy-on-write "
        "export (nothing is restored, nothing is written to the repository) and wait for the signs of life "
        "asked for. The machine (memory, vCPUs, firmware, kernel) comes from the domain XML stored by "
        "'backup --libvirt' when there is one, else from defaults; options override it. A snapshot of a "
        "'backup --libvirt' boots with every disk of that backup and its stored NVRAM, kernel, initrd and TPM "
        "state (throw-away copies).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", nargs="?", metavar="SNAP", help="snapshot id (prefix), NAME:latest or NAME@TIME")
    p.add_argument("--boot", action="store_true", help="boot the snapshot (the only kind of verify; "
                   "'vmbak check' verifies the stored data)")
    p.add_argument("--all-latest", action="store_true", help="verify the latest snapshot of every disk name, "
                   "one after another")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up waiting for the signs of life after this long (default 300)")
    p.add_argument("--expect-serial", metavar="REGEX", help="a serial-console line must match REGEX "
                   "(Python syntax; the kernel needs console=ttyS0)")
    p.add_argument("--expect-port", type=int, metavar="PORT",
                   help="guest TCP port PORT must answer (through a forwarded port of a restricted network)")
    p.add_argument("--exec", dest="exec_command", metavar="CMD",
                   help="run CMD in the guest with the guest agent (guest-exec); it must exit 0")
    p.add_argument("--expect-agent", action="store_true",
                   help="the guest agent must answer (otherwise a guest without one is reported as 'no agent')")
    p.add_argument("--kernel", metavar="FILE", help="boot this kernel directly (instead of the disk's boot loader)")
    p.add_argument("--initrd", metavar="FILE", help="initrd for --kernel")
    p.add_argument("--append", metavar="CMDLINE", help="kernel command line for --kernel "
                   "(e.g. 'root=/dev/vda1 console=ttyS0')")
    p.add_argument("--memory", type=parse_size, metavar="SIZE",
                   help="guest memory (e.g. 512M, 2G; default: the domain XML's, else 1G)")
    p.add_argument("--cpus", type=int, metavar="N", help="vCPUs (default: the domain XML's, else 1)")
    p.add_argument("--firmware", choices=("bios", "uefi"), help="firmware (default: the domain XML's, else bios)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="accelerator: auto (KVM when it works, else TCG; the default), kvm or tcg")
    p.add_argument("--output", metavar="DIR", help="directory for the screenshots and serial logs "
                   "(created if missing; default: a new one under $TMPDIR/vmbak-verify-UID/results)")
    p.add_argument("--no-screenshot", action="store_true", help="take no screenshot")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="N",
                   help="memory for decompressed chunks (default 256M)")
    p.set_defaults(func=cmd_verify)


def _options(args: argparse.Namespace):  # noqa: ANN202 - vmbak.guest.boot.BootOptions
    from vmbak.guest.boot import BootOptions, default_output_dir

    mem = None
    if args.memory is not None:
        if args.memory < 1 << 20:
            raise UsageError(f"--memory {args.memory} is less than 1 MiB (give e.g. 512M or 2G)")
        mem = args.memory >> 20
    opts = BootOptions(timeout=args.timeout, expect_serial=args.expect_serial, expect_port=args.expect_port,
                       exec_command=args.exec_command, expect_agent=args.expect_agent, kernel=args.kernel,
                       initrd=args.initrd, append=args.append, memory_mib=mem, cpus=args.cpus,
                       firmware=args.firmware, accel=args.accel,
                       output_dir=args.output or default_output_dir(), screenshot=not args.no_screenshot,
                       cache_bytes=args.cache_size)
    try:
        opts.validate()
    except VmbakError as e:
        raise UsageError(str(e)) from None
    return opts


def result_lines(r: dict) -> list[str]:
    head = (f"snapshot {r['short_id']} ({printable(r['name'])}, {r['time'][:19]}): "
            + ("PASSED" if r["ok"] else "FAILED") + f" in {r['timings'].get('total_s', 0):.1f} s"
            + (f" ({r['accel']})" if r.get("accel") else ""))
    lines = [head]
    if r.get("reason"):
        lines.append(f"  reason: {printable(r['reason'])}")
    for name, c in r.get("checks", {}).items():
        if not c.get("requested") and c.get("status") in ("not requested",):
            continue
        when = f" after {c['seconds']:.1f} s" if c.get("seconds") is not None else ""
        detail = c.get("detail")
        if isinstance(detail, dict):
            detail = ", ".join(f"{k} {v!r}" for k, v in detail.items() if v not in ("", None))
        lines.append(f"  {name:8} {c['status']}{when}" + (f": {printable(str(detail))}" if detail else ""))
    for k, label in (("screenshot", "screenshot"), ("serial_log", "serial log")):
        if r.get(k):
            lines.append(f"  {label}: {printable(r[k])}")
    for n in r.get("notes", []):
        lines.append(f"  note: {printable(n)}")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    from vmbak.guest.boot import verify_boot

    if not args.boot:
        raise UsageError("give --boot (boot verification is the only kind; 'vmbak check --read-data' verifies "
                         "the stored data)")
    if bool(args.snapshot) == bool(args.all_latest):
        raise UsageError("give a snapshot or --all-latest (not both)")
    from vmbak.engine.sources import state_role

    opts = _options(args)
    bar = progress(args)
    repo, pw = open_repo_and_password(args)
    if repo.encryption == "none":
        pw = None
    results = []
    with repo.lock(purpose="verify"):
        if args.all_latest:
            # a libvirt domain's NVRAM, TPM state, kernel, ... (vmbak.domain.state) are no disks
            names = sorted({m.name for m in repo.manifests() if state_role(m) is None})
            snaps = [repo.latest(n) for n in names]
            if not snaps:
                raise VmbakError("the repository has no snapshots")
        else:
            snaps = [repo.find(args.snapshot)]
            if role := state_role(snaps[0]):  # type: ignore[arg-type]
                raise VmbakError(f"snapshot {snaps[0].short_id} ({printable(snaps[0].name)}) is the {role} of a "
                                 "libvirt domain, not a disk; verify one of the domain's disk snapshots")
        for i, m in enumerate(snaps):
            assert m is not None
            prefix = f"{m.name} ({i + 1}/{len(snaps)}) " if len(snaps) > 1 else ""

            def phase(p: str, prefix: str = prefix) -> None:
                bar.phase(f"{prefix}{p}".strip())

            try:
                r = verify_boot(repo, m, pw, opts, log=log(args), phase=phase)
            except VmbakError as e:
                if len(snaps) == 1:
                    raise
                r = {"snapshot": m.id, "short_id": m.short_id, "name": m.name, "time": m.time, "ok": False,
                     "reason": f"could not be verified: {e}", "checks": {}, "timings": {}, "notes": []}
            results.append(r)
            if not args.json and not args.quiet and len(snaps) > 1:
                bar.close()
                print(printable("\n".join(result_lines(r)), keep_newlines=True), flush=True)
    ok = all(r["ok"] for r in results)
    summary = {"ok": ok, "results": results, "passed": sum(r["ok"] for r in results),
               "failed": sum(not r["ok"] for r in results)}
    if len(results) > 1:
        text = f"{summary['passed']} of {len(results)} snapshots passed"
    else:
        text = "\n".join(result_lines(results[0]))
    emit_summary(args, summary, text)
    return 0 if ok else 1
