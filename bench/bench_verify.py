#!/usr/bin/env python3
"""Verify benchmark: throughput of `vmbak check --read-data` on a local repository.

Builds (once, kept in WORKDIR/verify) a disk image of SIZE MiB, half random bytes
(incompressible) and half log-like text (compresses about 3:1), backs it up into an
encrypted repository (AES-256-GCM, zstd level 1) and an unencrypted one, then runs
`vmbak check --read-data --json` N times per repository and per worker count,
interleaved. Reported: medians of the verify rate in GiB/s of *stored* bytes (pack
bytes read and verified per second of reading, the `read_bytes_per_s` the command
reports) and of the command's wall time. The repository is in the page cache after
the first run (the figure is CPU-bound, as with PBS's `verify` on a warm cache).

The peer: the same image backed up by restic into its own repository, and `restic check
--read-data` run once per round beside vmbak's; its wall time is compared with vmbak's
(encrypted repository, most workers) in the same rounds.

    .venv/bin/python bench/bench_verify.py [--size 1536] [--runs 5] [--workers 1,2,4]
        [--workdir bench/work] [--vmbak .venv/bin/vmbak] [--restic restic | --restic '']

See bench/README.md.
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench verify"
MiB = 1 << 20


def build_image(path: Path, size_mib: int, kind: str = "mixed", seed: int = 20261202) -> None:
    rng = np.random.default_rng(seed)
    words = [b"GET", b"/index.html", b"200", b"kernel:", b"eth0", b"link", b"up", b"user", b"session",
             b"opened", b"for", b"root", b"systemd[1]:", b"Started", b"daily", b"apt", b"upgrade", b"INFO"]
    with open(path, "wb") as f:
        for i in range(size_mib // 4):
            if kind == "random" or i % 2 == 0:
                f.write(rng.bytes(4 * MiB))
            else:
                idx = rng.integers(0, len(words), 4 * MiB // 5)
                line = b" ".join(words[j] for j in idx.tolist())
                f.write((line + b"\n" * (4 * MiB))[:4 * MiB])


def vmbak(args: argparse.Namespace, repo: Path, *cmd: str, password: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    if password:
        env["VMBAK_PASSWORD"] = PASSWORD
    out = subprocess.run([*args.vmbak, "-r", str(repo), *cmd, "--json"], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"vmbak {' '.join(cmd)} failed: {out.stderr.strip()}")
    # docs/json.md: a reporting command (init) prints one indented document; a long-running
    # one (backup, check) prints status lines, then its summary as the last line
    text = out.stdout.strip()
    if not text:
        return {}
    return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1536, help="image size in MiB (default 1536)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kind", choices=("mixed", "random"), default="mixed",
                    help="mixed: half random, half text (default); random: incompressible only")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "work"))
    ap.add_argument("--vmbak", default=None, help="vmbak executable (default: this Python's vmbak module)")
    ap.add_argument("--restic", default=shutil.which("restic") or "",
                    help="restic executable for the peer (default: the one on PATH; '' for none)")
    args = ap.parse_args(argv)
    args.vmbak = [args.vmbak] if args.vmbak else [sys.executable, "-m", "vmbak.cli.main"]
    work = Path(args.workdir) / "verify"
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.size}" if args.kind == "mixed" else f"{args.size}-random"
    img = work / f"disk-{tag}.raw"
    if not img.exists():
        print(f"building {img} ...", flush=True)
        build_image(img, args.size, args.kind)
    repos = {}
    for enc in ("aes-256-gcm", "none"):
        repo = work / f"repo-{tag}-{enc}"
        if not (repo / "config").exists():
            shutil.rmtree(repo, ignore_errors=True)
            pw = enc != "none"
            print(f"backing up into {repo} ...", flush=True)
            vmbak(args, repo, "init", "--encryption", enc, password=pw)
            vmbak(args, repo, "backup", str(img), "--name", "bench", password=pw)
        repos[enc] = repo
    renv = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")} | {"RESTIC_PASSWORD": PASSWORD}
    rrepo = work / f"restic-{tag}"
    if args.restic and not (rrepo / "config").exists():
        shutil.rmtree(rrepo, ignore_errors=True)
        print(f"backing up into {rrepo} (restic) ...", flush=True)
        for cmd in (["init"], ["backup", "--host", "bench", str(img)]):
            subprocess.run([args.restic, "-r", str(rrepo), "-q", *cmd], env=renv, check=True, capture_output=True)
    restic_walls: list[float] = []
    workers = [int(w) for w in args.workers.split(",")]
    rates: dict[tuple[str, int], list[float]] = {}
    walls: dict[tuple[str, int], list[float]] = {}
    cpus: dict[tuple[str, int], list[float]] = {}
    stored = {}
    for run in range(args.runs):
        for enc, repo in repos.items():
            for w in workers:
                t0 = time.monotonic()
                ru = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = vmbak(args, repo, "check", "--read-data", "--workers", str(w), password=enc != "none")
                ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
                walls.setdefault((enc, w), []).append(time.monotonic() - t0)
                cpu = (ru2.ru_utime + ru2.ru_stime) - (ru.ru_utime + ru.ru_stime)
                cpus.setdefault((enc, w), []).append(r["bytes_read"] / cpu / (1 << 30))
                rates.setdefault((enc, w), []).append(r["read_bytes_per_s"] / (1 << 30))
                stored[enc] = r["bytes_read"]
                print(f"run {run + 1}: {enc:12} workers={w}: {rates[(enc, w)][-1]:.2f} GiB/s "
                      f"(wall {walls[(enc, w)][-1]:.2f} s)", flush=True)
        if args.restic:
            t0 = time.monotonic()
            subprocess.run([args.restic, "-r", str(rrepo), "check", "--read-data"], env=renv, check=True,
                           capture_output=True)
            restic_walls.append(time.monotonic() - t0)
            print(f"run {run + 1}: restic check --read-data: wall {restic_walls[-1]:.2f} s", flush=True)
    print(f"\nimage {args.size} MiB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'repository':14} {'workers':>7} {'stored':>10} {'median GiB/s':>13} {'median wall s':>14} "
          f"{'GiB per CPU-s':>14}")
    result = []
    for (enc, w), rs in rates.items():
        med, wall, eff = statistics.median(rs), statistics.median(walls[(enc, w)]), statistics.median(cpus[(enc, w)])
        print(f"{enc:14} {w:7} {stored[enc] / (1 << 30):9.2f}G {med:13.2f} {wall:14.2f} {eff:14.2f}")
        result.append({"encryption": enc, "workers": w, "stored_bytes": stored[enc], "gib_per_s": rs,
                       "median_gib_per_s": med, "median_wall_s": wall, "median_gib_per_cpu_s": eff})
    if restic_walls:
        rstored = sum(f.stat().st_size for f in (rrepo / "data").rglob("*") if f.is_file())
        rwall = statistics.median(restic_walls)
        version = subprocess.run([args.restic, "version"], capture_output=True, text=True).stdout.split()[1]
        w = max(workers)
        print(f"{'restic ' + version:14} {'':>7} {rstored / (1 << 30):9.2f}G {rstored / rwall / (1 << 30):13.2f} "
              f"{rwall:14.2f}   (command wall; its GiB/s counts the whole command)")
        print(f"restic wall / vmbak wall (aes-256-gcm, {w} workers), median of the rounds' ratios: "
              f"{statistics.median(r / v for r, v in zip(restic_walls, walls[('aes-256-gcm', w)], strict=True)):.2f}")
        result.append({"peer": "restic", "version": version, "stored_bytes": rstored, "wall_s": restic_walls,
                       "median_wall_s": rwall})
    (work / "results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
