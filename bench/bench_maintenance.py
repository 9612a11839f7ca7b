#!/usr/bin/env python3
"""Maintenance benchmark: what encryption costs, and what forget and prune cost.

Part "encryption": the foundation benchmark's full backup of v1.raw (4 GiB ext4) and
its restore (to /dev/shm when it has room, see restore_dir), each into a fresh repository,
with `--encryption aes-256-gcm` (the default) and with `--encryption none`, interleaved
(alternating which goes first), N runs each. Reported: medians of
wall time, CPU time and peak RSS, and the slowdown encryption adds.

Part "prune": a repository (encrypted) holding 50 snapshots of the benchmark image: a
full of v1.raw, then 49 incrementals, each after 655 random 64 KiB writes into the data
of the image's large files (about 1% of the disk, as v2.raw). Then `forget --keep-last
25` (which turns the oldest kept snapshot into a synthetic full) and `prune --grace 0`
are timed, with their peak RSS, N times each on copies of that repository
(`prune --dry-run` too). The 50-snapshot repository is built once and kept.

    .venv/bin/python bench/bench_maintenance.py [--runs 3] [--workdir bench/work]
        [--only encryption,prune] [--snapshots 50]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import (  # noqa: E402
    CHANGED_WRITES,
    PASSWORD,
    ROOT,
    WRITE_SIZE,
    Measure,
    _big_files,
    build_images,
    du_bytes,
    file_data_windows,
    fs_block_size,
    measured,
    say,
)

SEED = 20261124


def vmbak_cmd(args: argparse.Namespace) -> list[str]:
    return [args.vmbak] if args.vmbak else [sys.executable, "-m", "vmbak.cli.main"]


def env_for(repo: Path, password: bool = True) -> dict[str, str]:
    """The environment of a vmbak command on ``repo``; no password for an unencrypted
    repository, which vmbak refuses to open with one (its config could have been swapped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update(VMBAK_REPOSITORY=str(repo), LC_ALL="C.UTF-8")
    if password:
        env["VMBAK_PASSWORD"] = PASSWORD
    return env


def run(m: Measure, cmd: list[str], repo: Path, log: Path, password: bool = True) -> Measure:
    measured(m, cmd, env_for(repo, password), log, repo=repo)
    if m.rc != 0:
        raise SystemExit(f"failed: {m.cmd}: {m.error}")
    return m


def med(ms: list[Measure], attr: str) -> float:
    return statistics.median(getattr(m, attr) for m in ms)


# ---------------------------------------------------------------------------- encryption
def restore_dir(args: argparse.Namespace, work: Path, size: int) -> Path:
    """Where restores are written: --restore-dir, else /dev/shm when it has room (writing 4 GiB
    to the shared disk made restore times vary by 2x from run to run here), else WORKDIR."""
    if args.restore_dir:
        return Path(args.restore_dir)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > size + (1 << 30):
        return shm
    return work


def bench_encryption(args: argparse.Namespace, work: Path, v1: Path) -> dict[str, Any]:
    cmd = vmbak_cmd(args)
    logdir = work / "logs"
    res: dict[str, list[Measure]] = {}
    out_dir = restore_dir(args, work, v1.stat().st_size)
    say(f"restores go to {out_dir}")
    for r in range(1, args.runs + 1):
        # alternate which goes first, so neither always runs after the other's writes
        for enc in (("aes-256-gcm", "none") if r % 2 else ("none", "aes-256-gcm")):
            repo = work / f"enc-{enc}"
            out = out_dir / "vmbak-bench-restored.raw"
            shutil.rmtree(repo, ignore_errors=True)
            out.unlink(missing_ok=True)
            pw = enc != "none"
            run(Measure(enc, "init", r), [*cmd, "init", "--encryption", enc], repo, logdir / f"enc-{enc}.log", pw)
            say(f"run {r}: full backup, encryption {enc}")
            b = run(Measure(enc, "full", r), [*cmd, "backup", str(v1), "--name", "bench", "--json"], repo,
                    logdir / f"enc-{enc}.log", pw)
            say(f"run {r}: restore, encryption {enc}")
            s = run(Measure(enc, "restore", r), [*cmd, "restore", "bench:latest", str(out), "--json"], repo,
                    logdir / f"enc-{enc}.log", pw)
            res.setdefault(f"{enc}/full", []).append(b)
            res.setdefault(f"{enc}/restore", []).append(s)
            out.unlink(missing_ok=True)
            if r < args.runs:
                shutil.rmtree(repo, ignore_errors=True)
    summary: dict[str, Any] = {"in_process": per_chunk_costs(work)}
    for enc in ("aes-256-gcm", "none"):
        shutil.rmtree(work / f"enc-{enc}", ignore_errors=True)
    for step in ("full", "restore"):
        e, n = res[f"aes-256-gcm/{step}"], res[f"none/{step}"]
        summary[step] = {
            "encrypted": {"wall_s": round(med(e, "wall_s"), 2), "cpu_s": round(med(e, "cpu_s"), 2),
                          "max_rss_mib": round(med(e, "max_rss_kib") / 1024, 1),
                          "runs_wall_s": [round(m.wall_s, 2) for m in e]},
            "unencrypted": {"wall_s": round(med(n, "wall_s"), 2), "cpu_s": round(med(n, "cpu_s"), 2),
                            "max_rss_mib": round(med(n, "max_rss_kib") / 1024, 1),
                            "runs_wall_s": [round(m.wall_s, 2) for m in n]},
            "slowdown_wall_pct": round(100 * (med(e, "wall_s") / med(n, "wall_s") - 1), 1),
            "slowdown_cpu_pct": round(100 * (med(e, "cpu_s") / med(n, "cpu_s") - 1), 1),
        }
    return summary


def per_chunk_costs(work: Path, passes: int = 5) -> dict[str, Any]:
    """What encryption costs apart from process noise, in this process: opening the
    repository (the key derivation), and authenticating and decoding every chunk of the
    last run's backup, all blobs already in memory (medians of ``passes`` alternating passes).
    Whole-command timings of 2-4 s on a shared machine vary by more than the difference."""
    from vmbak.repo.pack import chunk_aad, pack_name
    from vmbak.repo.repository import Repository

    out: dict[str, Any] = {}
    blobs: dict[str, list[tuple[bytes, Any, bytes]]] = {}
    repos: dict[str, Repository] = {}
    opens: dict[str, list[float]] = {"aes-256-gcm": [], "none": []}
    for _ in range(passes):
        for enc in opens:
            t = time.perf_counter()
            repos[enc] = Repository.open(str(work / f"enc-{enc}"), PASSWORD if enc != "none" else None)
            opens[enc].append(time.perf_counter() - t)
    for enc, r in repos.items():
        blobs[enc] = [(cid, loc, r.backend.read_range(pack_name(loc.pack), loc.offset, loc.length))
                      for cid, loc in r.index.items()]
    auth: dict[str, list[float]] = {e: [] for e in repos}
    decode: dict[str, list[float]] = {e: [] for e in repos}
    for _ in range(passes):
        for enc, r in repos.items():
            t = time.perf_counter()
            for cid, _loc, b in blobs[enc]:
                r.sealer.open(b, chunk_aad(cid), "bench")
            auth[enc].append(time.perf_counter() - t)
            t = time.perf_counter()
            for cid, loc, b in blobs[enc]:
                r.decode_chunk(cid, b, loc.raw_length, check_id=False)
            decode[enc].append(time.perf_counter() - t)
    for enc in repos:
        gb = sum(len(b) for _, _, b in blobs[enc]) / 1e9
        out[enc] = {"open_s": round(statistics.median(opens[enc]), 3), "stored_gb": round(gb, 3),
                    "authenticate_s": round(statistics.median(auth[enc]), 3),
                    "decode_s": round(statistics.median(decode[enc]), 3)}
    e, n = out["aes-256-gcm"], out["none"]
    out["decode_slowdown_pct"] = round(100 * (e["decode_s"] / n["decode_s"] - 1), 1)
    out["open_extra_s"] = round(e["open_s"] - n["open_s"], 3)
    say(f"in-process: open {e['open_s']:.3f} s encrypted vs {n['open_s']:.3f} s; authenticate "
        f"{e['authenticate_s']:.2f} vs {n['authenticate_s']:.2f} s, decode {e['decode_s']:.2f} vs "
        f"{n['decode_s']:.2f} s for {e['stored_gb']:.2f} GB stored")
    return out


# ---------------------------------------------------------------------------- prune
def build_fifty(args: argparse.Namespace, work: Path, v1: Path) -> Path:
    """The repository with ``args.snapshots`` snapshots of the image (built once, kept)."""
    cmd = vmbak_cmd(args)
    repo = work / f"repo-{args.snapshots}"
    done = work / f"repo-{args.snapshots}.done"
    if done.exists() and repo.exists():
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    disk = work / "disk.raw"
    say(f"building a repository of {args.snapshots} snapshots in {repo} (once) ...")
    shutil.copyfile(v1, disk)
    bs = fs_block_size(v1)
    windows = file_data_windows(v1, _big_files(v1), bs)
    rng = np.random.Generator(np.random.PCG64(SEED))
    log = work / "logs" / "build.log"
    run(Measure("build", "init", 0), [*cmd, "init"], repo, log)
    t0 = time.perf_counter()
    for i in range(args.snapshots):
        if i:
            fd = os.open(disk, os.O_WRONLY)
            try:
                for off in np.sort(rng.choice(windows, CHANGED_WRITES, replace=False)).tolist():
                    os.pwrite(fd, rng.bytes(WRITE_SIZE), off)
            finally:
                os.close(fd)
        run(Measure("build", f"backup{i}", 0), [*cmd, "backup", str(disk), "--name", "bench", "-q"], repo, log)
        say(f"  snapshot {i + 1}/{args.snapshots} ({time.perf_counter() - t0:.0f} s)")
    disk.unlink()
    done.write_text(json.dumps({"snapshots": args.snapshots, "build_s": round(time.perf_counter() - t0, 1)}))
    return repo


def bench_prune(args: argparse.Namespace, work: Path, v1: Path) -> dict[str, Any]:
    cmd = vmbak_cmd(args)
    base = build_fifty(args, work, v1)
    log = work / "logs" / "prune.log"
    keep = max(1, args.snapshots // 2)
    res: dict[str, list[Measure]] = {}
    for r in range(1, args.runs + 1):
        repo = work / "prune-copy"
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(base, repo)
        before = du_bytes(repo)
        say(f"run {r}: prune --dry-run, forget --keep-last {keep}, prune --grace 0")
        res.setdefault("prune --dry-run (before forget)", []).append(
            run(Measure("prune", "dry-run", r), [*cmd, "prune", "--dry-run", "--json"], repo, log))
        res.setdefault(f"forget --keep-last {keep}", []).append(
            run(Measure("forget", "forget", r), [*cmd, "forget", "--keep-last", str(keep), "--json"], repo, log))
        mid = du_bytes(repo)
        p = run(Measure("prune", "prune", r), [*cmd, "prune", "--grace", "0", "--json"], repo, log)
        p.verify = {"repo_before_forget": before, "repo_after_forget": mid, "repo_after_prune": p.repo_bytes}
        res.setdefault("prune --grace 0", []).append(p)
        res.setdefault("prune --grace 0 (nothing left to do)", []).append(
            run(Measure("prune", "again", r), [*cmd, "prune", "--grace", "0", "--json"], repo, log))
        chk = run(Measure("check", "check", r), [*cmd, "check", "--json"], repo, log)
        if not (chk.output or {}).get("ok"):
            raise SystemExit(f"check failed after prune: {chk.output}")
        shutil.rmtree(repo, ignore_errors=True)
    out: dict[str, Any] = {"snapshots": args.snapshots, "kept": keep, "steps": {}}
    for step, ms in res.items():
        out["steps"][step] = {"wall_s": round(med(ms, "wall_s"), 2), "cpu_s": round(med(ms, "cpu_s"), 2),
                              "max_rss_mib": round(med(ms, "max_rss_kib") / 1024, 1),
                              "runs_wall_s": [round(m.wall_s, 2) for m in ms]}
    p = res["prune --grace 0"][-1]
    out["repository_bytes"] = p.verify
    o = p.output or {}
    out["last_prune"] = {k: o.get(k) for k in ("packs_before", "packs_after", "bytes_before", "bytes_after",
                                                "freed_bytes", "marked")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "work"))
    ap.add_argument("--only", default="encryption,prune")
    ap.add_argument("--snapshots", type=int, default=50)
    ap.add_argument("--restore-dir", default="", help="where restores are written (default: /dev/shm if it has room)")
    ap.add_argument("--vmbak", default="", help="vmbak executable (default: this Python's vmbak.cli.main)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    meta = build_images(workdir / "images", rebuild=False)
    v1 = workdir / "images" / "v1.raw"
    work = workdir / "maintenance"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    results: dict[str, Any] = {"runs": args.runs, "image": {"size": v1.stat().st_size,
                                                            "sha256": meta.get("v1_sha256")},
                               "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "encryption" in parts:
        results["encryption"] = bench_encryption(args, work, v1)
    if "prune" in parts:
        results["prune"] = bench_prune(args, work, v1)
    path = work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    if "encryption" in results:
        print(f"\nencryption (medians of {args.runs} runs)")
        for step, d in results["encryption"].items():
            if step == "in_process":
                e, n = d["aes-256-gcm"], d["none"]
                print(f"  in-process, {e['stored_gb']:.2f} GB of chunks in memory: authenticate+decompress "
                      f"{e['decode_s']:.2f} s encrypted, {n['decode_s']:.2f} s unencrypted "
                      f"({d['decode_slowdown_pct']:+.1f}%); opening the repository +{d['open_extra_s']:.3f} s "
                      "(scrypt)")
                continue
            print(f"  {step:8} encrypted {d['encrypted']['wall_s']:7.2f} s   unencrypted "
                  f"{d['unencrypted']['wall_s']:7.2f} s   slowdown {d['slowdown_wall_pct']:+.1f}% wall, "
                  f"{d['slowdown_cpu_pct']:+.1f}% cpu")
    if "prune" in results:
        p = results["prune"]
        print(f"\nrepository of {p['snapshots']} snapshots (medians of {args.runs} runs)")
        for step, d in p["steps"].items():
            print(f"  {step:40} {d['wall_s']:7.2f} s  {d['cpu_s']:7.2f} s cpu  peak RSS {d['max_rss_mib']:7.1f} MiB")
        rb = p["repository_bytes"]
        print(f"  repository: {rb['repo_before_forget'] / 2**20:.0f} MiB -> {rb['repo_after_prune'] / 2**20:.0f} MiB")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
