"""Throughput of `vmbak track` against nbdkit's plain `file` plugin on the same file.

Workloads (libnbd's Python bindings, asynchronous requests, one connection):
  * sequential 1 MiB writes (queue depth 4)
  * random 4 KiB writes over the whole disk (queue depth 16)
For the tracker, each workload runs on a fresh tracker (empty MRT: every first write into a
1 MiB region waits for the MRT's fdatasync), with the MRT's write-through off (the hidden
--no-mrt-write-through), and:
  * the same writes again on the same tracker (every region already marked)
  * the same writes while a checkpoint is open (copy-before-write of 64 KiB blocks)
Sequential 1 MiB writes into fresh regions are the worst case of the write-through: every
request enters a new 1 MiB MRT region and waits for an fdatasync of the MRT.

Each figure is the median of --runs runs. Usage:
    .venv/bin/python bench/bench_tracker.py [--size-gib 2] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nbd

from vmbak.tracker import daemon
from vmbak.tracker.client import TrackerClient

WORK = Path(__file__).resolve().parent / "work" / "tracker"
MiB = 1 << 20


def fresh_disk(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    os.sync()  # start every measurement without dirty pages from the previous one


def clear_state(path: Path) -> None:
    for ext in ("rct", "mrt", "log", "err"):
        try:
            os.unlink(f"{path}.vmbak.{ext}")
        except FileNotFoundError:
            pass


def run_writes(sock: str, offsets: list[int], length: int, depth: int) -> float:
    """Write ``length`` bytes at each offset with ``depth`` requests in flight; return MB/s."""
    h = nbd.NBD()
    h.connect_unix(sock)
    data = os.urandom(length)
    t0 = time.perf_counter()
    for off in offsets:
        while h.aio_in_flight() >= depth:
            h.poll(-1)
        h.aio_pwrite(data, off, completion=lambda err: 1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    dt = time.perf_counter() - t0
    h.shutdown()
    return len(offsets) * length / dt / 1e6


def start_file_plugin(disk: Path, sock: str) -> subprocess.Popen:
    p = subprocess.Popen(["nbdkit", "--foreground", "--unix", sock, "file", str(disk)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        if os.path.exists(sock):
            return p
        time.sleep(0.01)
    raise RuntimeError("nbdkit file did not start")


def stop_file_plugin(p: subprocess.Popen, sock: str) -> None:
    p.terminate()
    p.wait(30)
    if os.path.exists(sock):
        os.unlink(sock)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seq-mib", type=int, default=512, help="MiB written by the sequential workload")
    ap.add_argument("--random-ops", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not shutil.which("nbdkit"):
        print("nbdkit is not installed (run scripts/setup.sh)", file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // MiB * MiB
    disk = WORK / "bench.raw"
    sock = f"/tmp/vmbak-bench-{os.getpid()}.sock"
    rng = random.Random(1)
    seq = [i * MiB for i in range(min(args.seq_mib, size // MiB))]
    rnd = [rng.randrange(0, size // 4096) * 4096 for _ in range(args.random_ops)]
    results: dict[str, dict[str, list[float]]] = {}

    def record(workload: str, server: str, mbps: float) -> None:
        results.setdefault(workload, {}).setdefault(server, []).append(mbps)

    for _run in range(args.runs):
        for workload, offsets, length, depth in (("sequential 1 MiB writes", seq, MiB, 4),
                                                 ("random 4 KiB writes", rnd, 4096, 16)):
            fresh_disk(disk, size)
            p = start_file_plugin(disk, sock)
            try:
                record(workload, "nbdkit file", run_writes(sock, offsets, length, depth))
            finally:
                stop_file_plugin(p, sock)
            for sync in (True, False):
                fresh_disk(disk, size)
                clear_state(disk)
                daemon.start(str(disk), sock, mrt_sync=sync, rct_interval=5.0)
                try:
                    if not sync:
                        record(workload, "vmbak track, MRT write-through off",
                               run_writes(sock, offsets, length, depth))
                        continue
                    record(workload, "vmbak track, MRT write-through on (cold MRT)",
                           run_writes(sock, offsets, length, depth))
                    os.sync()
                    record(workload, "vmbak track, same writes again (MRT marked)",
                           run_writes(sock, offsets, length, depth))
                    os.sync()
                    with TrackerClient(sock) as c:
                        cp = c.checkpoint(None, 65536)
                        record(workload, "vmbak track, checkpoint open (copy-before-write)",
                               run_writes(sock, offsets, length, depth))
                        cp.abort()
                finally:
                    daemon.stop(sock)
    os.unlink(disk)
    clear_state(disk)
    summary = {w: {s: round(statistics.median(v), 1) for s, v in servers.items()} for w, servers in results.items()}
    if args.json:
        print(json.dumps({"size_bytes": size, "runs": args.runs, "median_MBps": summary,
                          "iops_4k": {s: round(v * 1e6 / 4096) for s, v in summary["random 4 KiB writes"].items()}},
                         indent=2))
        return 0
    print(f"disk {size >> 20} MiB (sparse file), medians of {args.runs} runs, MB/s (and IOPS for 4 KiB)")
    for w, servers in summary.items():
        print(f"\n{w}:")
        base = servers.get("nbdkit file")
        for s, v in servers.items():
            extra = f"  {v * 1e6 / 4096:8.0f} IOPS" if "4 KiB" in w else ""
            rel = f"  ({v / base:.2f}x of nbdkit file)" if base else ""
            print(f"  {s:<52} {v:8.1f} MB/s{extra}{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
