#!/usr/bin/env python3
"""vmbak and virtnbdbackup backing up the same running, writing guest, side by side.

The guest is the tests' bootable Debian guest (``scripts/build-test-guest.sh``, cached in
/var/cache/vmbak-test-guest): booted under libvirt (TCG unless KVM works) from a
copy-on-write overlay, with its vmbak-writer service writing files the whole time. Both
tools back up that one domain, each with its own checkpoints (vmbak's are ``vmbak-*``,
virtnbdbackup's ``virtnbdbackup.N``). virtnbdbackup refuses to run beside a checkpoint it
did not make, so while it runs libvirt's record of vmbak's checkpoint is set aside
(``delete`` with METADATA_ONLY: QEMU's bitmap stays and goes on recording) and defined
again afterwards (REDEFINE); vmbak leaves checkpoints that are not its own alone. Each
round, with each tool going first in turn:

1. **full**: ``vmbak backup --libvirt DOMAIN --mode full`` into a fresh encrypted
   repository (``vmbak init``, default settings), and ``virtnbdbackup -l full`` into a
   fresh directory;
2. ``--pause`` seconds of guest writes, then an **incremental** of each
   (``vmbak backup --libvirt DOMAIN``, ``virtnbdbackup -l inc``), twice.

Both tools use the guest agent to freeze the guest's filesystems around the checkpoint
(their defaults). Measured per step: wall time of the command, and bytes stored
(``du -sb`` of the repository or output directory, the growth for an incremental).

**Stage breakdown**: one more round at the end (``--no-profile`` leaves it out) runs the
vmbak commands under ``py-spy record --idle`` (100 samples/s); the main thread's samples
are sorted into stages by the functions on their stack (STAGES below); what py-spy did not
sample is process start-up and exit. py-spy slows a run down, so the profiled round is
not part of the medians.

**Before and after**: ``--baseline-src DIR`` also runs another vmbak (its ``src/``
directory, e.g. ``git archive COMMIT src | tar -x -C DIR``) as ``vmbak-baseline``, in
the same rounds, interleaved, with its own repositories.

**After a crash** (``--crash``, part 5 of issue 12): QEMU is killed with SIGKILL (the
dirty bitmap of vmbak's checkpoint is lost), the domain is created and boots again, and
the next vmbak backup must fall back to reading the used blocks (a scan against the
parent) and keep the chain; its time is reported beside a vmbak full of the same guest,
and virtnbdbackup's incremental is tried too.

Also reported: each command's CPU time (user + system, with the children it waited for),
which depends less on the machine's load than the wall time does.

    .venv/bin/python bench/bench_vm.py [--rounds 5] [--incrementals 2] [--pause 10] [--crash]
                                       [--baseline-src DIR] [--no-profile] [--workdir bench/work/vm]

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
import resource
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

# Stages of a vmbak backup: a main-thread stack sample belongs to the first stage (in this
# order) one of whose keys occurs in one of its frames ("function (file:line)").
STAGES = [
    ("imports", ("_find_and_load",)),
    ("guest freeze/thaw (agent)", ("Quiescer.", "LibvirtAgent.")),
    ("commit: end job, drop old checkpoint", ("LibvirtJob.commit", "LibvirtBackup.commit")),
    ("NBD connect", ("NbdDisk.__init__", "NbdDisk._connect")),
    ("block status: dirty bitmap", ("change_map (",)),
    ("usage analysis over NBD", ("used_map (",)),
    ("block status: allocation", ("NbdDisk.data_extents",)),
    ("parent hash table", ("resolve_bht (",)),
    ("read/hash/compress/store", ("bounded_map (", "store_bht (", "ChunkWriter.", "_Pipeline.")),
    ("manifest, lock, parent lookup", ("save_manifest", "Repository.lock", "choose_parent", "libvirt_groups")),
    ("open repository (wait for the KDF)", ("open_repo", "Repository.open")),
    ("libvirt: checkpoint + backup job", ("begin_backup (", "libvirt_disk_targets (", "open_libvirt (")),
    ("argument parsing", ("build_parser", "parse_args", "parse_known_args")),
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


VMBAK = [sys.executable, "-m", "vmbak.cli.main"]


class Runner:
    def __init__(self, work: Path, pyspy: str | None) -> None:
        self.work = work
        self.pyspy = pyspy
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    @staticmethod
    def env(src: str | None = None) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
        e["VMBAK_PASSWORD"] = PASSWORD
        if src:
            e["PYTHONPATH"] = src
        return e

    def run(self, label: str, argv: list[str], src: str | None = None,
            profile: bool = False) -> tuple[float, subprocess.CompletedProcess, float]:
        """Run a command; its wall time, the process, and its CPU time (user + system)."""
        self.n += 1
        prof = None
        if profile and self.pyspy:
            prof = self.logs / f"{self.n:03d}-{label}.pyspy.txt"
            argv = [self.pyspy, "record", "--idle", "--threads", "--rate", "100", "--format", "raw", "-o",
                    str(prof), "--", *argv]
        subprocess.run(["sync"], check=True)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = ru.ru_utime + ru.ru_stime
        t = time.perf_counter()
        proc = subprocess.Popen(argv, env=self.env(src) if src else None, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate()
        took = time.perf_counter() - t
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = ru.ru_utime + ru.ru_stime - cpu0  # this command and the children it waited for
        p = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        (self.logs / f"{self.n:03d}-{label}.log").write_text(
            f"$ {' '.join(argv)}\nexit {p.returncode} in {took:.2f} s, CPU {used:.2f} s\n--- stdout\n{p.stdout}"
            f"\n--- stderr\n{p.stderr}")
        if p.returncode != 0:
            raise SystemExit(f"{label} failed (exit {p.returncode}), see {self.logs}:\n{p.stderr[-2000:]}")
        p.profile = prof  # type: ignore[attr-defined]
        return took, p, used

    def vm(self, label: str, src: str, repo: Path, *args: str,
           profile: bool = False) -> tuple[float, dict, Path | None, float]:
        took, p, used = self.run(label, [*VMBAK, "-r", str(repo), *args, "--json"], src, profile)
        line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
        return took, json.loads(line), p.profile, used  # type: ignore[attr-defined]


def hide_checkpoints(dom, keep: set[str] | None = None, prefix: str = "vmbak-") -> list[str]:  # noqa: ANN001
    """Remove libvirt's record of vmbak's checkpoints, except those named in ``keep`` (their
    bitmaps stay in QEMU and go on recording): virtnbdbackup refuses to run beside a
    checkpoint it did not make, and a vmbak removes any other vmbak checkpoint."""
    import libvirt

    xmls = []
    for cp in dom.listAllCheckpoints():
        if cp.getName().startswith(prefix) and cp.getName() not in (keep or set()):
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


def _active(dom) -> bool:  # noqa: ANN001
    import libvirt

    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:  # a transient domain is gone once its QEMU is
        return False


EARLY = "early thread: "  # vmbak.changes.libvirt_early's thread, beside the main thread's imports


def stage_breakdown(raw: Path) -> dict[str, float]:
    """Seconds per stage from a py-spy raw (collapsed) profile: the main thread's, and (as
    EARLY + stage) those of the thread that begins the libvirt job early."""
    out: dict[str, float] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        early = any(f.startswith("_run (") and "libvirt_early" in f for f in frames)
        if not early and not any(f.startswith("_run_module_as_main") for f in frames):
            continue  # not the main thread
        where = "other"
        for name, keys in STAGES:
            if any(k in f for f in frames for k in keys):
                where = name
                break
        out[EARLY + where if early else where] += int(count) / 100
    return dict(out)


def main() -> int:  # noqa: C901, PLR0915
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--incrementals", type=int, default=2, help="incrementals per round (default 2)")
    ap.add_argument("--pause", type=float, default=10, help="seconds of guest writes before each incremental")
    ap.add_argument("--crash", action="store_true", help="also kill QEMU and measure the fallback")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="also measure the vmbak whose src/ directory this is (e.g. an older commit, "
                    "from git archive), as 'vmbak-baseline', interleaved with the others")
    ap.add_argument("--no-profile", action="store_true", help="no extra py-spy round at the end")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "vm"))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    vnb = shutil.which("virtnbdbackup")
    if vnb is None:
        raise SystemExit("virtnbdbackup is missing: VMBAK_BENCH_DEPS=1 scripts/setup.sh installs it")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.no_profile or not os.access(pyspy, os.X_OK):
        pyspy = None
    r = Runner(work, pyspy)
    vmbaks = {"vmbak": str(ROOT / "src")}
    if args.baseline_src:
        vmbaks["vmbak-baseline"] = str(Path(args.baseline_src).resolve())
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
    cpu: dict[str, list[float]] = collections.defaultdict(list)
    extra: dict = {"versions": {}, "load": [], "stages": {}}
    extra["versions"]["virtnbdbackup"] = subprocess.run([vnb, "--version"], capture_output=True,
                                                        text=True).stdout.strip()
    extra["versions"]["vmbak"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                                capture_output=True, text=True).stdout.strip()
    try:
        log("booting the guest")
        g.start()
        log(f"guest {g.name} ({g.virt}) booted in {g.boot_s:.0f} s")
        extra["guest"] = {"virt": g.virt, "boot_s": g.boot_s}
        dom = g.name
        vnb_cmd = [vnb, "-d", dom, "-n"]
        profiles: dict[str, list[dict[str, float]]] = collections.defaultdict(list)

        owned: dict[str, set[str]] = collections.defaultdict(set)  # each vmbak's checkpoint

        def vmbak_step(tool: str, kind: str, repo: Path, profile: bool, *extra_args: str) -> dict:
            before = du(repo)
            hidden = hide_checkpoints(g.dom, keep=owned[tool])  # the other vmbak's
            try:
                took, out, prof, used_cpu = r.vm(f"{tool}-{kind}", vmbaks[tool], repo, "backup", "--libvirt", dom,
                                                 *extra_args, profile=profile)
            finally:
                show_checkpoints(g.dom, hidden)
            snap = out["snapshots"][0]
            owned[tool] = {snap["change_id"]}
            if prof is not None:
                st = stage_breakdown(prof)
                main = sum(v for k, v in st.items() if not k.startswith(EARLY))
                st["process start-up and exit (not sampled)"] = max(0.0, took - main)
                profiles[f"{tool} {kind}"].append(st | {"total (wall, under py-spy)": took})
            else:
                res[f"{tool} {kind}"].append(took)
                cpu[f"{tool} {kind}"].append(used_cpu)
                stored[f"{tool} {kind}"].append(du(repo) - before)
                res[f"{tool} {kind} read MiB"].append(snap["stats"]["read_bytes"] / MiB)
            return snap

        def vnb_step(kind: str, out: Path, key: str = "") -> None:
            before = du(out) if out.exists() else 0
            hidden = hide_checkpoints(g.dom)
            try:
                took, _, used_cpu = r.run(f"virtnbdbackup-{kind}",
                                          [*vnb_cmd, "-l", "full" if kind == "full" else "inc", "-o", str(out)])
            finally:
                show_checkpoints(g.dom, hidden)
            key = key or f"virtnbdbackup {kind}"
            res[key].append(took)
            cpu[key].append(used_cpu)
            stored[key].append(du(out) - before)

        tools = [*vmbaks, "virtnbdbackup"]
        total_rounds = args.rounds + (1 if pyspy else 0)
        for rnd in range(total_rounds):
            profile = pyspy is not None and rnd == args.rounds
            extra["load"].append(os.getloadavg()[0])
            log(f"round {rnd + 1}/{total_rounds}{' (profiled)' if profile else ''}, load {os.getloadavg()[0]:.1f}")
            repos = {t: work / f"repo-{t}-{rnd}" for t in vmbaks}
            out = work / f"vnb-{rnd}"
            for t, repo in repos.items():
                subprocess.run([*VMBAK, "-r", str(repo), "init"], env=r.env(vmbaks[t]), check=True,
                               capture_output=True)
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]  # each tool goes first in turn
            for t in order:
                if t in vmbaks:
                    vmbak_step(t, "full", repos[t], profile, "--mode", "full")
                elif not profile:
                    vnb_step("full", out)
            for i in range(args.incrementals):
                time.sleep(args.pause)
                for t in (order if i % 2 == 0 else order[::-1]):
                    if t in vmbaks:
                        snap = vmbak_step(t, "incremental", repos[t], profile)
                        assert snap["type"] == "incremental", snap
                        assert snap["change_source"] == "libvirt-checkpoint", snap
                    elif not profile:
                        vnb_step("incremental", out)
            shutil.rmtree(out, ignore_errors=True)
            for t, repo in repos.items():
                if not (args.crash and t == "vmbak" and rnd == total_rounds - 1):
                    shutil.rmtree(repo, ignore_errors=True)
        extra["stages"] = {k: {s: round(statistics.median([p.get(s, 0.0) for p in v]), 3)
                               for s in sorted({s for p in v for s in p})} for k, v in profiles.items()}

        if args.crash:
            # the last round's vmbak repository and checkpoint; a fresh virtnbdbackup chain
            repo = work / f"repo-vmbak-{total_rounds - 1}"
            out = work / "vnb-crash"
            vnb_step("full", out, "virtnbdbackup full before the crash")
            time.sleep(args.pause)
            log("crash: kill -9 of QEMU, then boot again")
            os.kill(int(Path(f"/run/libvirt/qemu/{dom}.pid").read_text().strip()), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while _active(g.dom):
                if time.monotonic() > deadline:
                    raise SystemExit("libvirt did not notice that QEMU died")
                time.sleep(0.1)
            g.console.write_text("")
            g.start()  # the transient domain is gone with its QEMU: the same one is created and booted again
            time.sleep(args.pause)
            snap = vmbak_step("vmbak", "after crash (fallback)", repo, False)
            extra["crash"] = {"change_source": snap["change_source"], "type": snap["type"],
                              "read_MiB": round(snap["stats"]["read_bytes"] / MiB, 1),
                              "used_MiB": round(snap["stats"]["used_bytes"] / MiB, 1),
                              "notes": [n for n in snap.get("notes", []) if "libvirt:" in n]}
            vfull = work / "repo-crash-full"
            subprocess.run([*VMBAK, "-r", str(vfull), "init"], env=r.env(vmbaks["vmbak"]), check=True,
                           capture_output=True)
            vmbak_step("vmbak", "full after crash", vfull, False, "--mode", "full")
            hidden = hide_checkpoints(g.dom)
            t = time.perf_counter()
            p = subprocess.run([*vnb_cmd, "-l", "inc", "-o", str(out)], capture_output=True, text=True)
            show_checkpoints(g.dom, hidden)
            extra["crash"]["virtnbdbackup_inc"] = {"exit": p.returncode, "s": round(time.perf_counter() - t, 2),
                                                   "last_lines": p.stderr.strip().splitlines()[-2:]}
    finally:
        g.destroy()
        conn.close()
        shutil.rmtree(gdir, ignore_errors=True)

    med = {k: round(statistics.median(v), 3) for k, v in res.items()}
    summary = {"results": dict(res), "stored": dict(stored), "cpu": dict(cpu), **extra, "rounds": args.rounds,
               "incrementals": args.incrementals, "pause": args.pause, "cpus": os.cpu_count(), "medians": med,
               "cpu_medians": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
               "stored_medians": {k: int(statistics.median(v)) for k, v in stored.items()}}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    (work / f"results-{stamp}.json").write_text(json.dumps(summary, indent=2))
    print(f"\nrunning guest ({extra['guest']['virt']}), writer active; medians of {args.rounds} rounds "
          f"({args.incrementals} incrementals each, {args.pause:g} s of writes before each); "
          f"load average {min(extra['load']):.1f}-{max(extra['load']):.1f} on {os.cpu_count()} CPUs\n")
    print(f"{'step':40} {'wall s':>7} {'CPU s':>6} {'stored MiB':>11}  every run (wall s)")
    for k in sorted(res):
        if k.endswith("MiB"):
            continue
        st = summary["stored_medians"].get(k)
        print(f"{k:40} {med[k]:7.2f} {summary['cpu_medians'][k]:6.2f} {'' if st is None else f'{st / MiB:11.1f}'}"
              f"  {' '.join(f'{x:.2f}' for x in res[k])}")
    for kind in ("full", "incremental"):
        b = med.get(f"virtnbdbackup {kind}")
        for t in vmbaks:
            a = med.get(f"{t} {kind}")
            if a and b:
                sa, sb = summary["stored_medians"][f"{t} {kind}"], summary["stored_medians"][f"virtnbdbackup {kind}"]
                print(f"{kind}: virtnbdbackup wall / {t} wall = {b / a:.2f}; "
                      f"{t} stored / virtnbdbackup stored = {sa / max(sb, 1):.2f}")
    for kind, stages in extra["stages"].items():
        print(f"\n{kind}: stage breakdown (py-spy, main thread, seconds of one profiled run)")
        for s_, v in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {s_:44} {v:6.2f}")
    if "crash" in extra:
        c = extra["crash"]
        print(f"\nafter kill -9 of QEMU: vmbak {c['type']} ({c['change_source']}, read {c['read_MiB']} MiB of "
              f"{c['used_MiB']} MiB used) {med['vmbak after crash (fallback)']:.2f} s vs a vmbak full "
              f"{med['vmbak full after crash']:.2f} s; virtnbdbackup -l inc: exit {c['virtnbdbackup_inc']['exit']} "
              f"({' '.join(c['virtnbdbackup_inc']['last_lines'])[:200]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
