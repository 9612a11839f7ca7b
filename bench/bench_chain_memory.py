#!/usr/bin/env python3
"""Peak RSS of vmbak's commands on a long chain of a large sparse disk (issue 16: peak RSS
under 512 MiB at any disk size, 2 TiB sparse included).

A sparse file of ``--size`` GiB gets a few MiB of random data; a full backup is taken, then
``--chain`` incrementals, each after changing ``--change`` MiB at a few places. At each
checkpoint of ``--at`` (a number of incrementals), the peak RSS (os.wait4: the child alone)
of ``restore`` of the latest snapshot, of ``check``, ``diff`` (first against latest) and
``snapshots`` is measured; the backups themselves are measured at every step.

    .venv/bin/python bench/bench_chain_memory.py [--size 2048] [--chain 30] [--at 1,10,20,30]
        [--src src] [--workdir bench/work/chainmem] [--json FILE]

``--src`` picks the vmbak sources to run (PYTHONPATH), so that two trees can be compared
on the same machine. The work directory is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GIB = 1 << 30


def run(src: Path, *args: object) -> tuple[int, float]:
    """Run vmbak; return (peak RSS in bytes, wall seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env["PYTHONPATH"] = str(src)
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "vmbak.cli.main", *map(str, args)], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):  # diff exits 1 when the snapshots differ
        raise SystemExit(f"vmbak {' '.join(map(str, args))} exited {rc}: {err}")
    return usage.ru_maxrss * 1024, time.monotonic() - t0


def write_random(path: Path, off: int, length: int, rng: random.Random) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(rng.randbytes(length))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="disk size in GiB (default 2048)")
    ap.add_argument("--chain", type=int, default=30, help="incrementals after the full (default 30)")
    ap.add_argument("--at", default="1,10,20,30", help="checkpoints (numbers of incrementals)")
    ap.add_argument("--change", type=int, default=4, help="MiB changed per incremental (default 4)")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="vmbak sources (PYTHONPATH)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work" / "chainmem")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    at = sorted({int(x) for x in a.at.split(",") if x})
    src = a.src.resolve()
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    repo, disk, out = a.workdir / "repo", a.workdir / "disk.raw", a.workdir / "restored.raw"
    size = a.size * GIB
    rng = random.Random(16)
    with open(disk, "wb") as f:
        f.truncate(size)
    for off in (0, size // 5, size // 2, size - 8 * MIB):
        write_random(disk, off, 4 * MIB, rng)
    r = ("-q", "-r", repo)
    run(src, *r, "init", "--encryption", "none")
    rows: list[dict] = []

    def show(row: dict) -> None:
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    rss, t = run(src, *r, "backup", "--name", "big", disk)
    show({"step": 0, "cmd": "backup-full", "rss_mib": rss // MIB, "s": round(t, 1)})
    for i in range(1, a.chain + 1):
        for _ in range(2):
            off = rng.randrange(0, size // MIB - a.change) * MIB
            write_random(disk, off, a.change * MIB // 2, rng)
        rss, t = run(src, *r, "backup", "--name", "big", disk)
        show({"step": i, "cmd": "backup-incr", "rss_mib": rss // MIB, "s": round(t, 1)})
        if i in at:
            for name, args in (("restore", ("restore", "--overwrite", "big:latest", out)),
                               ("check", ("check",)),
                               ("diff", ("diff", "big@2000-01-01T00:00:00", "big:latest")),
                               ("snapshots", ("snapshots",))):
                if name == "diff":
                    first = json.loads(subprocess.run(
                        [sys.executable, "-m", "vmbak.cli.main", "-r", str(repo), "snapshots", "--json"],
                        env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, check=True,
                        text=True).stdout)
                    snaps = first["snapshots"] if isinstance(first, dict) else first
                    args = ("diff", snaps[0]["id"], "big:latest")
                rss, t = run(src, *r, *args)
                show({"step": i, "cmd": name, "rss_mib": rss // MIB, "s": round(t, 1)})
            out.unlink(missing_ok=True)
    if a.json:
        a.json.write_text(json.dumps({"size_gib": a.size, "src": str(src), "rows": rows}, indent=1))
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
