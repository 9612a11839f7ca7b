"""Incremental backup through the change tracker against restic's incremental.

On the foundation benchmark's 4 GiB image (bench/bench_foundation.py builds it into
WORKDIR/images), each run:

* vmbak: copies v1.raw to a fresh disk, starts ``vmbak track start`` on it, makes the
  full backup through the tracker (``--changes track:SOCK``), then writes the 655
  scattered 64 KiB blocks in which v2.raw differs from v1.raw through the tracker's NBD
  socket (libnbd), and times the incremental backup ``--changes track:SOCK``;
* restic: backs up v1.raw, then v2.raw at the same path (a hard link), and times that
  second, incremental backup.

The table gives the medians of --runs runs, the ratio of the two incremental times, and
the bytes the tracker incremental added to the repository before compression
(``new_raw_bytes``) over the bytes really changed (target: at most 1.25).

Usage:
    .venv/bin/python bench/bench_track_incremental.py [--runs 3] [--workdir bench/work]
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

import nbd
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import (  # noqa: E402  (the shared harness of the foundation benchmark)
    Measure,
    build_images,
    make_tools,
    measured,
    relink,
    say,
)

ROOT = Path(__file__).resolve().parent.parent
BS = 64 * 1024


def changed_blocks(v1: Path, v2: Path, cache: Path) -> list[int]:
    """Offsets of the 64 KiB blocks in which the two images differ (cached in a file)."""
    key = f"{v1.stat().st_mtime_ns}-{v2.stat().st_mtime_ns}"
    if cache.exists():
        d = json.loads(cache.read_text())
        if d.get("key") == key:
            return d["offsets"]
    a = np.memmap(v1, np.uint8, "r")
    b = np.memmap(v2, np.uint8, "r")
    out = []
    step = 256 * BS
    for off in range(0, len(a), step):
        x = a[off:off + step].reshape(-1, BS)
        y = b[off:off + step].reshape(-1, BS)
        for i in np.nonzero((x != y).any(axis=1))[0].tolist():
            out.append(off + i * BS)
    cache.write_text(json.dumps({"key": key, "offsets": out}))
    return out


def write_changes(sock: Path, v2: Path, offsets: list[int]) -> None:
    h = nbd.NBD()
    h.connect_unix(str(sock))
    try:
        with open(v2, "rb") as f:
            for off in offsets:
                h.pwrite(os.pread(f.fileno(), BS, off), off)
        h.flush()
    finally:
        h.shutdown()


def vmbak_run(vmbak: str, env: dict[str, str], work: Path, v1: Path, v2: Path, offsets: list[int],
              run: int) -> Measure:
    d = work / "track"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    disk, repo, sock, log = d / "disk.raw", d / "repo", d / "t.sock", d / f"run{run}.log"
    subprocess.run(["cp", "--sparse=always", str(v1), str(disk)], check=True)
    r = ["-r", str(repo)]
    subprocess.run([vmbak, *r, "init"], env=env, check=True, capture_output=True)
    subprocess.run([vmbak, "track", "start", str(disk), "--socket", str(sock)], env=env, check=True,
                   capture_output=True)
    try:
        full = measured(Measure("vmbak-track", "full", run),
                        [vmbak, *r, "--json", "backup", "--name", "t", "--changes", f"track:{sock}"], env, log)
        if full.rc:
            raise SystemExit(f"full backup through the tracker failed: {full.error}")
        write_changes(sock, v2, offsets)
        m = measured(Measure("vmbak-track", "incremental", run),
                     [vmbak, *r, "--json", "backup", "--name", "t", "--changes", f"track:{sock}"], env, log,
                     repo=repo)
        if m.rc:
            raise SystemExit(f"incremental through the tracker failed: {m.error}")
        return m
    finally:
        subprocess.run([vmbak, "track", "stop", str(sock)], env=env, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def restic_run(tool, work: Path, v1: Path, v2: Path, run: int) -> Measure:  # noqa: ANN001
    d = work / "restic"
    shutil.rmtree(d, ignore_errors=True)
    (d / "disk").mkdir(parents=True)
    repo, disk, log = d / "repo", d / "disk" / "disk.raw", d / f"run{run}.log"
    subprocess.run(tool.init(repo), env=tool.env, check=True, capture_output=True)
    relink(v1, disk)
    full = measured(Measure("restic", "full", run), tool.backup(repo, disk, "full"), tool.env, log)
    if full.rc:
        raise SystemExit(f"restic full failed: {full.error}")
    relink(v2, disk)
    m = measured(Measure("restic", "incremental", run), tool.backup(repo, disk, "incremental"), tool.env, log,
                 repo=repo)
    shutil.rmtree(d, ignore_errors=True)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--vmbak", default=str(ROOT / ".venv" / "bin" / "vmbak"))
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    meta = build_images(workdir / "images", rebuild=False)
    v1, v2 = workdir / "images" / "v1.raw", workdir / "images" / "v2.raw"
    work = workdir / "track-incremental"
    work.mkdir(parents=True, exist_ok=True)
    offsets = changed_blocks(v1, v2, work / "changed.json")
    changed = len(offsets) * BS
    say(f"{len(offsets)} changed 64 KiB blocks ({changed / 2**20:.1f} MiB) of {meta['image_size'] / 2**30:.0f} GiB")
    tools = make_tools(args.vmbak, workdir)
    if "restic" not in tools:
        raise SystemExit("restic is not installed (make bench installs it)")
    vm: list[Measure] = []
    rs: list[Measure] = []
    for run in range(1, args.runs + 1):
        vm.append(vmbak_run(args.vmbak, tools["vmbak"].env, work, v1, v2, offsets, run))
        rs.append(restic_run(tools["restic"], work, v1, v2, run))
        raw = vm[-1].output["stats"].get("new_raw_bytes", 0)
        say(f"  run {run}: vmbak-track incremental {vm[-1].wall_s:.2f} s (added {raw / 2**20:.1f} MiB raw), "
            f"restic incremental {rs[-1].wall_s:.2f} s")
    med = {name: statistics.median(m.wall_s for m in ms) for name, ms in (("vmbak", vm), ("restic", rs))}
    cpu = {name: statistics.median(m.cpu_s for m in ms) for name, ms in (("vmbak", vm), ("restic", rs))}
    raw = statistics.median(m.output["stats"].get("new_raw_bytes", 0) for m in vm)
    ratio = med["restic"] / med["vmbak"]
    amp = raw / changed
    lines = [
        f"Medians of {args.runs} runs, {os.cpu_count()} CPUs, warm page cache; "
        f"{len(offsets)} x 64 KiB changed ({changed / 2**20:.1f} MiB).",
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
        f"| vmbak incremental through the tracker | {med['vmbak']:.2f} | {cpu['vmbak']:.2f} |",
        f"| restic incremental | {med['restic']:.2f} | {cpu['restic']:.2f} |",
        "",
        f"- restic / vmbak-track incremental wall: {ratio:.1f} (target >= 15: {'PASS' if ratio >= 15 else 'FAIL'})",
        f"- added before compression / changed bytes: {amp:.3f} (target <= 1.25: {'PASS' if amp <= 1.25 else 'FAIL'})",
    ]
    print("\n".join(lines))
    out = work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"medians_wall_s": med, "medians_cpu_s": cpu, "new_raw_bytes": raw,
                               "changed_bytes": changed, "ratio": ratio, "amplification": amp,
                               "runs": [m.__dict__ for m in vm + rs]}, indent=1, default=str))
    say(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
