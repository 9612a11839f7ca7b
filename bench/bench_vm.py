#!/usr/bin/env python3
"""vmbak and virtnbdbackup backing up the same running, writing guest, side by side.

The guest is the tests' bootable Debian guest (``scripts/build-test-guest.sh``, cached in
/var/cache/vmbak-test-guest): booted under libvirt (TCG unless KVM works) from a
copy-on-write overlay, with its vmbak-writer service writing files the whole time. Both
tools back up that one domain, each with its own checkpoints (vmbak's are ``vmbak-*``,
virtnbdbackup's ``virtnbdbackup.N``; neither touches the other's). Each round, in
alternating order:

1. **full**: ``vmbak backup --libvirt DOMAIN --mode full`` into a fresh encrypted
   repository (``vmbak init``, default settings), and ``virtnbdbackup -l full`` into a
   fresh directory;
2. ``--pause`` seconds of guest writes, then an **incremental** of each
   (``vmbak backup --libvirt DOMAIN``, ``virtnbdbackup -l inc``), twice.

Both tools use the guest agent to freeze the guest's filesystems around the checkpoint
(their defaults). Measured per step: wall time of the command, and bytes stored
(``du -sb`` of the repository or output directory, the growth for an incremental).

**Stage breakdown**: every ``--profile-every``-th vmbak command runs under ``py-spy
record --idle`` (100 samples/s); the main thread's samples are sorted into stages by the
functions on their stack (see STAGES). py-spy slows the run a little, so profiled runs
are not used for the wall-time medians.

**After a crash** (``--crash``, part 5 of issue 12): QEMU is killed with SIGKILL (its
dirty bitmaps are lost), the domain is started again and boots, and the next vmbak
incremental must fall back to reading the used blocks (scan against the parent) and keep
the chain; its time is reported beside a vmbak full of the same guest, and
virtnbdbackup's incremental is tried too (it has no checkpoint bitmap left).

    .venv/bin/python bench/bench_vm.py [--rounds 5] [--pause 10] [--crash] [--workdir bench/work/vm]

Needs root, libvirt (``scripts/setup.sh``), virtnbdbackup (Debian package, installed by
``VMBAK_BENCH_DEPS=1 scripts/setup.sh``; it is not on PyPI) and py-spy (the dev extra).
Results go to WORKDIR/results.json and a table on standard output.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-vm-password"
MiB = 1 << 20

# Stages of a vmbak backup, by the first function (innermost first) on a main-thread
# stack sample that names one. Order matters: the first match wins.
STAGES = [
    ("freeze/thaw (guest agent)", ("guest/quiesce.py:", "guest/agent.py:", "Quiescer")),
    ("checkpoint + backup job (libvirt)", ("backupBegin", "_clear_old_job", "_delete_checkpoint", "_abort_job",
                                          "backupGetXMLDesc", "libvirt.py:connect", "lookup (")),
    ("block status: dirty bitmap", ("_change_map",)),
    ("NBD connect", ("_connect (vmbak/disks/nbd.py", "NbdDisk.__init__", "__init__ (vmbak/disks/nbd.py")),
    ("usage analysis over NBD", ("used_map", "vmbak/usage/")),
    ("block status: allocation", ("data_extents",)),
    ("parent hash table", ("resolve_bht", "load_bht")),
    ("read/compress/store", ("bounded_map", "_Pipeline", "ChunkWriter", "store_bht", "flush (vmbak/repo")),
    ("save manifest", ("save_manifest",)),
    ("commit (end job, drop old checkpoint)", ("commit (vmbak/changes/libvirt", "_finish")),
    ("open repository (KDF, lock)", ("open_repo", "Repository.open", "open (vmbak/repo", "lock (vmbak/repo",
                                     "scrypt", "derive")),
    ("imports", ("<module>", "_find_and_load")),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_vm_fixtures():  # noqa: ANN201 - the tests' conftest module, loaded by path
    spec = importlib.util.spec_from_file_location("vmbak_vm_fixtures", ROOT / "tests" / "vm" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


class Runner:
    def __init__(self, work: Path, vmbak: list[str], pyspy: str | None) -> None:
        self.work = work
        self.vmbak = vmbak
        self.pyspy = pyspy
        self.env = {**os.environ, "VMBAK_PASSWORD": PASSWORD, "PYTHONPATH": str(ROOT / "src")}
        self.env.pop("VMBAK_REPOSITORY", None)
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def run(self, label: str, argv: list[str], profile: bool = False) -> tuple[float, subprocess.CompletedProcess]:
        self.n += 1
        prof = None
        if profile and self.pyspy:
            prof = self.logs / f"{self.n:03d}-{label}.pyspy.txt"
            argv = [self.pyspy, "record", "--idle", "--threads", "--rate", "100", "--format", "raw", "-o",
                    str(prof), "--", *argv]
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        took = time.perf_counter() - t
        (self.logs / f"{self.n:03d}-{label}.log").write_text(
            f"$ {' '.join(argv)}\nexit {p.returncode} in {took:.2f} s\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
        if p.returncode != 0:
            raise SystemExit(f"{label} failed (exit {p.returncode}), see {self.logs}:\n{p.stderr[-2000:]}")
        p.profile = prof  # type: ignore[attr-defined]
        return took, p

    def vm(self, label: str, repo: Path, *args: str, profile: bool = False) -> tuple[float, dict, Path | None]:
        took, p = self.run(label, [*self.vmbak, "-r", str(repo), *args, "--json"], profile)
        line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
        return took, json.loads(line), p.profile  # type: ignore[attr-defined]


def hide_checkpoints(dom, prefix: str = "vmbak-") -> list[str]:  # noqa: ANN001
    """Remove libvirt's record of vmbak's checkpoints (their bitmaps stay in QEMU and go on
    recording): virtnbdbackup refuses to run beside a checkpoint it did not make."""
    import libvirt

    xmls = []
    for cp in dom.listAllCheckpoints():
        if cp.getName().startswith(prefix):
            xmls.append(cp.getXMLDesc(0))
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    return xmls


def show_checkpoints(dom, xmls: list[str]) -> None:  # noqa: ANN001
    """Define the hidden checkpoints again, over their bitmaps (libvirt checks that they exist)."""
    import xml.etree.ElementTree as ET

    import libvirt

    names = {c.getName() for c in dom.listAllCheckpoints()}
    for x in xmls:
        root = ET.fromstring(x)
        parent = root.find("parent")
        if parent is not None and parent.findtext("name") not in names:
            root.remove(parent)  # its parent was virtnbdbackup's, which it deleted meanwhile
        dom.checkpointCreateXML(ET.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)


def stage_breakdown(raw: Path) -> dict[str, float]:
    """Seconds per stage from a py-spy raw (collapsed) profile, main thread only."""
    out: dict[str, float] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not any(f.startswith("_run_module_as_main") for f in frames):
            continue  # not the main thread
        where = "other"
        for name, keys in STAGES:
            if any(k in f for f in frames for k in keys):
                where = name
                break
        out[where] += int(count) / 100
    return dict(out)


def main() -> int:  # noqa: C901, PLR0915
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--incrementals", type=int, default=2, help="incrementals per round (default 2)")
    ap.add_argument("--pause", type=float, default=10, help="seconds of guest writes before each incremental")
    ap.add_argument("--crash", action="store_true", help="also kill QEMU and measure the fallback")
    ap.add_argument("--profile-every", type=int, default=0,
                    help="profile every Nth round's vmbak commands with py-spy (0: only an extra round at the end)")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "vm"))
    ap.add_argument("--vmbak", default=f"{sys.executable} -m vmbak.cli.main",
                    help="the vmbak command (default: this Python with the tree's src/ first on the path)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    vnb = shutil.which("virtnbdbackup")
    if vnb is None:
        raise SystemExit("virtnbdbackup is missing: VMBAK_BENCH_DEPS=1 scripts/setup.sh installs it")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(pyspy, os.X_OK):
        pyspy = None
    r = Runner(work, args.vmbak.split(), pyspy)
    fx = load_vm_fixtures()
    import libvirt

    fx._fix_kvm()
    fx._start_libvirtd()
    libvirt.registerErrorHandler(lambda *a: None, None)
    image, _ = fx.build_guest_image()
    gdir = Path(f"/var/tmp/vmbak-bench-vm-{os.getpid()}")
    gdir.mkdir(mode=0o755)
    conn = libvirt.open(fx.URI)
    g = fx.Guest(conn, image, gdir)
    res: dict[str, list[float]] = collections.defaultdict(list)
    stored: dict[str, list[int]] = collections.defaultdict(list)
    extra: dict = {"versions": {}, "load": [], "stages": {}, "notes": []}
    extra["versions"]["virtnbdbackup"] = subprocess.run([vnb, "--version"], capture_output=True,
                                                        text=True).stdout.strip()
    try:
        log("booting the guest")
        g.start()
        log(f"guest {g.name} ({g.virt}) booted in {g.boot_s:.0f} s")
        extra["guest"] = {"virt": g.virt, "boot_s": g.boot_s}
        dom = g.name
        vnb_cmd = [vnb, "-d", dom, "-n"]
        profiles: dict[str, list[dict[str, float]]] = collections.defaultdict(list)

        def vmbak_step(kind: str, repo: Path, profile: bool, *extra_args: str) -> dict:
            before = du(repo)
            took, out, prof = r.vm(f"vmbak-{kind}", repo, "backup", "--libvirt", dom, *extra_args, profile=profile)
            snap = out["snapshots"][0]
            if prof is not None:
                profiles[kind].append(stage_breakdown(prof) | {"total": took})
            else:
                res[f"vmbak {kind}"].append(took)
                stored[f"vmbak {kind}"].append(du(repo) - before)
                res[f"vmbak {kind} read MiB"].append(snap["stats"]["read_bytes"] / MiB)
            return snap

        def vnb_step(kind: str, out: Path) -> None:
            before = du(out) if out.exists() else 0
            hidden = hide_checkpoints(g.dom)
            try:
                took, _ = r.run(f"virtnbdbackup-{kind}", [*vnb_cmd, "-l", "full" if kind == "full" else "inc",
                                                          "-o", str(out)])
            finally:
                show_checkpoints(g.dom, hidden)
            res[f"virtnbdbackup {kind}"].append(took)
            stored[f"virtnbdbackup {kind}"].append(du(out) - before)

        total_rounds = args.rounds + (1 if pyspy and not args.profile_every else 0)
        for rnd in range(total_rounds):
            profile = pyspy is not None and (rnd == args.rounds if not args.profile_every
                                             else rnd % args.profile_every == args.profile_every - 1)
            extra["load"].append(os.getloadavg()[0])
            log(f"round {rnd + 1}/{total_rounds}{' (profiled)' if profile else ''}, load {os.getloadavg()[0]:.1f}")
            repo = work / f"repo-{rnd}"
            out = work / f"vnb-{rnd}"
            subprocess.run([*r.vmbak, "-r", str(repo), "init"], env=r.env, check=True, capture_output=True)
            order = ("vmbak", "vnb") if rnd % 2 == 0 else ("vnb", "vmbak")
            for tool in order:
                if tool == "vmbak":
                    vmbak_step("full", repo, profile, "--mode", "full")
                elif not profile:
                    vnb_step("full", out)
            for i in range(args.incrementals):
                time.sleep(args.pause)
                for tool in (order if i % 2 == 0 else order[::-1]):
                    if tool == "vmbak":
                        snap = vmbak_step("incremental", repo, profile)
                        assert snap["type"] == "incremental", snap
                        assert snap["change_source"] == "libvirt-checkpoint", snap
                    elif not profile:
                        vnb_step("incremental", out)
            shutil.rmtree(out, ignore_errors=True)
            if rnd < total_rounds - 1 or not args.crash:
                shutil.rmtree(repo, ignore_errors=True)
        extra["stages"] = {k: {s: round(statistics.median([p.get(s, 0.0) for p in v]), 2)
                               for s in sorted({s for p in v for s in p})} for k, v in profiles.items()}

        if args.crash:
            repo = work / f"repo-{total_rounds - 1}"
            out = work / "vnb-crash"
            vnb_step("full", out)
            time.sleep(args.pause)
            log("crash: kill -9 of QEMU, then boot again")
            pid = int(Path(f"/run/libvirt/qemu/{dom}.pid").read_text().strip())
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while g.dom.isActive():
                assert time.monotonic() < deadline, "libvirt did not notice that QEMU died"
                time.sleep(0.1)
            g.console.write_text("")
            g.start()  # a transient domain is gone once QEMU dies: the fixture creates it again
            dom_after = g.name
            assert dom_after == dom
            time.sleep(args.pause)
            snap = vmbak_step("after crash", repo, False)
            extra["crash"] = {"change_source": snap["change_source"], "type": snap["type"],
                              "notes": [n for n in snap.get("notes", []) if "libvirt" in n or "scan" in n]}
            vfull = work / "repo-crash-full"
            subprocess.run([*r.vmbak, "-r", str(vfull), "init"], env=r.env, check=True, capture_output=True)
            vmbak_step("full after crash", vfull, False, "--mode", "full")
            t = time.perf_counter()
            p = subprocess.run([*vnb_cmd, "-l", "inc", "-o", str(out)], capture_output=True, text=True)
            extra["crash"]["virtnbdbackup_inc"] = {"exit": p.returncode, "s": round(time.perf_counter() - t, 2),
                                                   "stderr_tail": p.stderr.strip().splitlines()[-3:]}
    finally:
        g.destroy()
        conn.close()
        shutil.rmtree(gdir, ignore_errors=True)

    summary = {"results": {k: v for k, v in res.items()}, "stored": stored, **extra,
               "rounds": args.rounds, "pause": args.pause, "cpus": os.cpu_count()}
    summary["medians"] = {k: round(statistics.median(v), 3) for k, v in res.items()}
    summary["stored_medians"] = {k: int(statistics.median(v)) for k, v in stored.items()}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    (work / f"results-{stamp}.json").write_text(json.dumps(summary, indent=2))
    med = summary["medians"]
    print(f"\nrunning guest ({extra['guest']['virt']}), writer active; medians of {args.rounds} rounds "
          f"({args.incrementals} incrementals each, {args.pause:g} s of writes before each); "
          f"load average {min(extra['load']):.1f}-{max(extra['load']):.1f}\n")
    print(f"{'step':36} {'seconds':>8} {'stored MiB':>11}  runs")
    for k in sorted(res):
        if k.endswith("MiB"):
            continue
        st = summary["stored_medians"].get(k)
        print(f"{k:36} {med[k]:8.2f} {'' if st is None else f'{st / MiB:11.1f}'}  "
              f"{' '.join(f'{x:.2f}' for x in res[k])}")
    for kind in ("full", "incremental"):
        a, b = med.get(f"vmbak {kind}"), med.get(f"virtnbdbackup {kind}")
        if a and b:
            sa, sb = summary["stored_medians"][f"vmbak {kind}"], summary["stored_medians"][f"virtnbdbackup {kind}"]
            print(f"{kind}: virtnbdbackup / vmbak time {b / a:.2f}x; stored vmbak / virtnbdbackup {sa / max(sb, 1):.2f}")
    for kind, stages in extra["stages"].items():
        print(f"\nvmbak {kind}: stage breakdown (py-spy, main thread, median seconds)")
        for s, v in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {s:44} {v:6.2f}")
    if "crash" in extra:
        c = extra["crash"]
        print(f"\nafter kill -9 of QEMU: vmbak {c['type']} ({c['change_source']}) {med['vmbak after crash']:.2f} s vs "
              f"vmbak full {med['vmbak full after crash']:.2f} s; virtnbdbackup -l inc exit {c['virtnbdbackup_inc']['exit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
