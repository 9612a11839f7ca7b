#!/usr/bin/env python3
"""Unused-block benchmark (issue 5): vmbak's full backup against restic's on the 4 GiB image.

Uses the images of bench_foundation.py (v1.raw: 4 GiB, about 1.6 GiB used by ext4, random
garbage in the free space). Each run backs v1.raw up into a fresh vmbak repository and a fresh
restic repository. Also measured: the time to compute the used map (in-process, median of 7),
and what partclone.ext4 considers used (its domain file and the size of its image).

    .venv/bin/python bench/bench_usage.py [--runs 3] [--workdir bench/work]

Checks (issue 5): vmbak reads and stores no more than partclone's used bytes + 5%; vmbak's
repository is at most 50% of restic's; vmbak's full backup is at least 6x faster than
restic's; the used map takes under 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_foundation as bf  # noqa: E402

from vmbak.disks.raw import RawDisk  # noqa: E402
from vmbak.usage import analyze  # noqa: E402


def partclone_used(image: Path, workdir: Path) -> tuple[int, int]:
    """(used bytes from partclone's domain file, size of partclone's image of the filesystem)."""
    dom = workdir / "usage.dom"
    img = workdir / "usage.partclone"
    for p in (dom, img):
        p.unlink(missing_ok=True)
    subprocess.run([bf.tool_path("partclone.ext4") or "partclone.ext4", "-D", "-q", "-s", str(image), "-o",
                    str(dom)], check=True, capture_output=True)
    used = 0
    for line in dom.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith("0x") and parts[2] == "+":
            used += int(parts[1], 16)
    subprocess.run([bf.tool_path("partclone.ext4") or "partclone.ext4", "-c", "-q", "-s", str(image), "-o",
                    str(img)], check=True, capture_output=True)
    size = img.stat().st_size
    for p in (dom, img):
        p.unlink(missing_ok=True)
    return used, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=bf.ROOT / "bench" / "work")
    ap.add_argument("--vmbak", default=str(bf.ROOT / ".venv" / "bin" / "vmbak"))
    args = ap.parse_args(argv)
    work = args.workdir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    meta = bf.build_images(work / "images", False)
    v1 = work / "images" / "v1.raw"

    times = []
    for _ in range(7):
        with RawDisk(v1) as d:
            t0 = time.perf_counter()
            u = analyze(d)
            times.append(time.perf_counter() - t0)
    map_s = statistics.median(times)
    bf.say(f"used map: {map_s:.3f} s (median of 7), used {u.used_bytes} bytes")
    pc_used, pc_image = partclone_used(v1, work)
    bf.say(f"partclone.ext4: used {pc_used} bytes, image {pc_image} bytes")

    tools = bf.make_tools(args.vmbak, work)
    if "restic" not in tools:
        bf.say("restic is not installed (make bench installs it)")
        return 2
    rows: dict[str, list[bf.Measure]] = {"vmbak": [], "restic": []}
    disk = work / "disk" / "disk.raw"
    disk.parent.mkdir(parents=True, exist_ok=True)
    bf.relink(v1, disk)
    for run in range(1, args.runs + 1):
        for name in ("vmbak", "restic"):
            tool = tools[name]
            repo = work / "repos" / f"usage-{name}"
            log = work / "logs" / f"usage-run{run}-{name}.log"
            bf.clean(repo, log, work / "cache" / name)
            repo.parent.mkdir(parents=True, exist_ok=True)
            bf.measured(bf.Measure(name, "init", run), tool.init(repo), tool.env, log)
            m = bf.measured(bf.Measure(name, "full", run), tool.backup(repo, disk, "full"), tool.env, log, repo=repo)
            if m.rc:
                bf.say(f"{name} failed: {m.error}")
                return 1
            rows[name].append(m)
            bf.say(f"  run {run} {name:7} full {m.wall_s:6.2f} s  cpu {m.cpu_s:6.2f} s  repo {m.repo_bytes / bf.MIB:8.0f} MiB")
            bf.clean(repo)
    disk.unlink(missing_ok=True)

    def med(name: str, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in rows[name])

    stats = rows["vmbak"][-1].output["stats"]
    vm_wall, rs_wall = med("vmbak", "wall_s"), med("restic", "wall_s")
    vm_repo, rs_repo = med("vmbak", "repo_bytes"), med("restic", "repo_bytes")
    limit = pc_used * 1.05
    checks = [
        ("vmbak read bytes / partclone used", stats["read_bytes"] / pc_used, "<= 1.05",
         stats["read_bytes"] <= limit),
        ("vmbak new raw bytes (stored before compression) / partclone used", stats["new_raw_bytes"] / pc_used,
         "<= 1.05", stats["new_raw_bytes"] <= limit),
        ("vmbak repository / restic repository", vm_repo / rs_repo, "<= 0.5", vm_repo <= 0.5 * rs_repo),
        ("restic full wall / vmbak full wall", rs_wall / vm_wall, ">= 6", rs_wall >= 6 * vm_wall),
        ("used map time (s)", map_s, "< 0.3", map_s < 0.3),
    ]
    lines = [f"Medians of {args.runs} run(s); 4 GiB ext4 image, {bf.fmt_bytes(pc_used)} used per partclone "
             f"(image {bf.fmt_bytes(pc_image)}), vmbak's map says {bf.fmt_bytes(u.used_bytes)} used.", "",
             "| tool | full wall s | CPU s | repository |", "|---|---:|---:|---:|",
             f"| vmbak | {vm_wall:.2f} | {med('vmbak', 'cpu_s'):.2f} | {bf.fmt_bytes(vm_repo)} |",
             f"| restic | {rs_wall:.2f} | {med('restic', 'cpu_s'):.2f} | {bf.fmt_bytes(rs_repo)} |", "",
             f"vmbak read {bf.fmt_bytes(stats['read_bytes'])}, stored {bf.fmt_bytes(stats['new_stored_bytes'])} "
             f"({bf.fmt_bytes(stats['new_raw_bytes'])} before compression).", "",
             "| check | value | target | result |", "|---|---:|---|---|"]
    lines += [f"| {n} | {v:.3f} | {t} | {'PASS' if ok else 'FAIL'} |" for n, v, t, ok in checks]
    text = "\n".join(lines)
    print(text)
    (work / "results-usage.json").write_text(json.dumps({
        "runs": args.runs, "map_s": map_s, "map_times": times, "partclone_used": pc_used,
        "partclone_image": pc_image, "vmbak_used": u.used_bytes, "vmbak_stats": stats,
        "medians": {"vmbak_wall": vm_wall, "restic_wall": rs_wall, "vmbak_repo": vm_repo, "restic_repo": rs_repo},
        "checks": [{"check": n, "value": v, "target": t, "pass": ok} for n, v, t, ok in checks],
        "table_markdown": text, "images": {k: v for k, v in meta.items() if k != "source_bytes"},
    }, indent=1))
    return 0 if all(ok for *_x, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
