#!/usr/bin/env python3
"""Index memory at scale: bytes per chunk, and a backup's peak RSS and start-up time in a
repository whose index holds N chunks (docs/index-memory.md).

A synthetic repository (unencrypted, so that only the index is measured) gets index files
naming N random chunk ids in packs of 64 chunks (a 32 MiB pack of ~0.5 MiB stored chunks);
the packs themselves are not written: loading the index does not open them. Then, for each
implementation given (this tree's src/ and a peer's, e.g. /work/main/src before the compact
index) and each index mode given (``--mode memory``: the table in memory, whatever its size;
``--mode paged``: the table in a temporary file, $VMBAK_INDEX_PAGED_ROWS=0; ``--mode default``:
the default threshold), in child processes, RUNS times, alternating:

* load: a fresh process opens the repository and loads the index; reported: wall time of
  the load, the RSS the index added (after minus before) / N = bytes per chunk, and peak RSS;
  then the mean time of a lookup (``usable``) of 20 000 ids the index holds and of 20 000 it
  does not;
* backup: `vmbak backup` of a 64 MiB random disk into that repository (a full: its chunks are
  new), with its wall time, CPU time (user + system) and peak RSS (GNU time's %U, %S, %M).

The load's CPU time is given too (time.process_time, all threads): on a shared machine it
varies much less than the wall time.

    .venv/bin/python bench/bench_index.py --chunks 10000000 --impl src --impl /work/main/src [--runs 3]
    .venv/bin/python bench/bench_index.py --chunks 10000000 --mode memory --mode paged [--runs 3]

Prints one JSON object per measurement and a summary (medians) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PER_PACK = 64
PER_FILE = 200_000

LOAD_CHILD = r"""
import json, os, resource, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from vmbak.repo.repository import Repository
r = Repository.open(sys.argv[1], None)
before = rss()
t = time.perf_counter()
c = time.process_time()
n = len(r.index)
dt = time.perf_counter() - t
cpu = time.process_time() - c
after = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
idx = r.index
_, entries = r.read_index_file_flat(sorted(n for n, _ in r.backend.list("index"))[0])
present = entries["id"][:20000].tolist()
del entries
missing = [os.urandom(32) for _ in range(20000)]
look = {}
for what, ids in (("present", present), ("missing", missing)):
    t = time.perf_counter()
    found = sum(map(idx.usable, ids))
    look[what] = (time.perf_counter() - t) / len(ids)
    assert found == (len(ids) if what == "present" else 0), (what, found)
print(json.dumps({"chunks": n, "load_s": dt, "load_cpu_s": cpu, "index_bytes": after - before, "peak_rss": peak,
                  "paged": getattr(idx, "paged", False), "lookup_present_us": look["present"] * 1e6,
                  "lookup_missing_us": look["missing"] * 1e6}))
"""
MODES = {"memory": str(10**15), "paged": "0", "default": None}


def build(repo: Path, n: int, seed: int) -> None:
    """A repository with index files naming ``n`` chunks (no pack files)."""
    sys.path.insert(0, str(ROOT / "src"))
    from vmbak.repo.pack import PACK_ENTRY
    from vmbak.repo.repository import Repository

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "vmbak.cli.main", "-r", str(repo), "init", "--encryption", "none"],
                   check=True, env=env, capture_output=True)
    r = Repository.open(str(repo), None)
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        k = min(PER_FILE, n - done)
        ids = rng.integers(0, 1 << 63, size=(k, 4), dtype=np.int64).view("V32").reshape(-1)
        packs = []
        for s in range(0, k, PER_PACK):
            e = np.zeros(min(PER_PACK, k - s), PACK_ENTRY)
            e["id"] = ids[s:s + len(e)]
            e["len"] = 500_000
            e["raw"] = 1 << 20
            e["off"] = np.arange(len(e)) * 500_000
            packs.append((rng.bytes(32).hex(), e))
        r.write_index(packs)
        done += k


def run_child(impl: str, args: list[str], code: str | None = None,
              mode: str = "default") -> tuple[float, int, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    if MODES[mode] is not None:
        env["VMBAK_INDEX_PAGED_ROWS"] = MODES[mode]
    env["PYTHONPATH"] = str((ROOT / impl).resolve()) if not os.path.isabs(impl) else impl
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "vmbak.cli.main", *args]
    # GNU time reports the child's own peak RSS (a child forked from this process would
    # inherit this process's high-water mark, e.g. after it built the repository)
    rss_file = Path(tempfile.mkstemp(prefix="vmbak-bench-rss-")[1])
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *cmd], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    kib, user, system = rss_file.read_text().split()[-3:]
    peak = int(kib) * 1024
    cpu = float(user) + float(system)
    rss_file.unlink()
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
    return wall, peak, p.stdout, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=10_000_000)
    ap.add_argument("--impl", action="append", help="a src/ directory to measure (repeatable)")
    ap.add_argument("--mode", action="append", choices=sorted(MODES),
                    help="index mode (repeatable; default: default): memory, paged or the default threshold")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "index"))
    ap.add_argument("--no-backup", action="store_true", help="measure the index load only")
    a = ap.parse_args()
    impls = [(i, m) for i in (a.impl or ["src"]) for m in (a.mode or ["default"])]
    work = Path(a.workdir)
    repo = work / f"repo-{a.chunks}"
    if not (repo / ".built").exists():
        shutil.rmtree(repo, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        build(repo, a.chunks, 1)
        (repo / ".built").touch()
        print(json.dumps({"built": str(repo), "chunks": a.chunks, "s": round(time.perf_counter() - t, 1)}))
    disk = work / "disk-64m.raw"
    if not disk.exists():
        disk.write_bytes(np.random.default_rng(2).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes())
    res: dict[str, dict[str, list[float]]] = {f"{i}:{m}": {} for i, m in impls}
    with open("/proc/loadavg") as f:
        print(json.dumps({"loadavg": f.read().split()[:3]}))
    for run in range(a.runs):
        order = impls if run % 2 == 0 else impls[::-1]
        for impl, mode in order:
            name = f"{impl}:{mode}"
            _, peak, out, _ = run_child(impl, [str(repo)], LOAD_CHILD, mode)
            m = json.loads(out)
            rec = {"impl": name, "what": "load", "run": run, "paged": m.get("paged"), "load_s": round(m["load_s"], 2),
                   "load_cpu_s": round(m.get("load_cpu_s", 0), 2),
                   "bytes_per_chunk": round(m["index_bytes"] / a.chunks, 1), "peak_rss_mib": peak >> 20,
                   "lookup_present_us": round(m.get("lookup_present_us", 0), 2),
                   "lookup_missing_us": round(m.get("lookup_missing_us", 0), 2)}
            print(json.dumps(rec), flush=True)
            for k in ("load_s", "load_cpu_s", "bytes_per_chunk", "peak_rss_mib", "lookup_present_us", "lookup_missing_us"):
                res[name].setdefault("load_" + k, []).append(rec[k])
            if a.no_backup:
                continue
            tmp = work / "bk-repo"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(repo, tmp, symlinks=True)
            wall, peak, _, cpu = run_child(impl, ["-r", str(tmp), "backup", str(disk), "--name", f"b{run}",
                                             "--mode", "full", "-q"], None, mode)
            rec = {"impl": name, "what": "backup", "run": run, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                   "peak_rss_mib": peak >> 20}
            print(json.dumps(rec), flush=True)
            res[name].setdefault("backup_cpu_s", []).append(rec["cpu_s"])
            res[name].setdefault("backup_wall_s", []).append(rec["wall_s"])
            res[name].setdefault("backup_peak_rss_mib", []).append(rec["peak_rss_mib"])
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {i: {k: statistics.median(v) for k, v in d.items()} for i, d in res.items()}
    print(json.dumps({"summary": summary, "chunks": a.chunks, "runs": a.runs,
                      "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}))


if __name__ == "__main__":
    main()
