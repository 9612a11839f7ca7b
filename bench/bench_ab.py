"""Interleaved A/B of vmbak source trees on the benchmark image: which of two changes is
faster, measured in the same run (the shared machines drift by tens of percent within
minutes, so only same-round ratios mean anything).

  backup: a full backup of v1.raw into a new encrypted repository, per variant and round;
  chain:  the restores of the chain of 30's head and of the one full of the same disk
          (bench_foundation's chain30, built here once into WORKDIR/chain30 if missing).

Each variant is NAME=SRC[:ARG,ARG...]: SRC is a tree with the ``vmbak`` package (a
checkout's ``src``), ARGs are added to the command (``--workers,6``). The order of the
variants alternates from round to round; each command starts with its input in the page
cache, as in bench_foundation. The report gives medians and, for each variant, the median
and range of the per-round ratios of the first variant's time to its own (> 1: faster).

Examples::

    python bench/bench_ab.py backup 8 main=src new=../wt-x/src
    python bench/bench_ab.py chain 10 main=src:--workers,4 new=../wt-x/src:--workers,6
    python bench/bench_ab.py chain 8 main=src new=../wt-x/src --out /dev/shm
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_foundation as bf  # noqa: E402


def variant(text: str) -> tuple[str, str, list[str]]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SRC[:ARG,...]")
    src, _, extra = spec.partition(":")
    if not (Path(src) / "vmbak" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{src}: no vmbak package there")
    return name, str(Path(src).resolve()), [a for a in extra.split(",") if a]


def timed(cmd: list[str], src: str, log: Path, inputs: tuple[Path, ...] = ()) -> tuple[float, float]:
    """(wall, CPU) seconds of ``cmd`` run with ``src`` first on the module path, its
    ``inputs`` warm (bench_foundation.measured); one line and exit if it fails."""
    env = dict(os.environ, PYTHONPATH=src, VMBAK_PASSWORD=bf.PASSWORD)
    m = bf.measured(bf.Measure("ab", "", 0), cmd, env, log, inputs=inputs)
    if m.rc:
        sys.exit(f"bench_ab: {m.cmd} failed: {m.error}")
    return m.wall_s, m.cpu_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python bench/bench_ab.py backup 8 main=src new=../wt-x/src")
    ap.add_argument("what", choices=("backup", "chain"))
    ap.add_argument("rounds", type=int)
    ap.add_argument("variants", nargs="+", type=variant, metavar="NAME=SRC[:ARG,...]")
    ap.add_argument("--workdir", type=Path, default=bf.ROOT / "bench" / "work",
                    help="bench_foundation's workdir (images, chain30; default bench/work)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="chain: write the restores into DIR (default WORKDIR/ab); a tmpfs such as /dev/shm "
                         "takes the target disk out, so that the CPU work decides")
    args = ap.parse_args(argv)
    if args.rounds < 1 or len({v[0] for v in args.variants}) != len(args.variants):
        ap.error("at least one round, and distinct variant names")
    work: Path = args.workdir.resolve()
    bf.build_images(work / "images", False)
    v1 = work / "images" / "v1.raw"
    py = sys.executable
    cli = [py, "-m", "vmbak.cli.main"]
    if args.what == "chain":
        base = work / "chain30"
        if not (base / "chain-repo").is_dir() or not (base / "full-repo").is_dir():
            tool = bf.make_tools(str(bf.ROOT / ".venv" / "bin" / "vmbak"), work)["vmbak"]
            bf.build_chain(tool, work, v1)
        kinds = [("head", base / "chain-repo"), ("full", base / "full-repo")]
    else:
        kinds = [("full backup", v1)]
    scratch = work / "ab"
    bf.clean(scratch)
    scratch.mkdir(parents=True)
    log = scratch / "ab.log"  # each command's output (bench_foundation.measured); removed at the end
    res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        order = args.variants if r % 2 == 0 else args.variants[::-1]
        for name, src, extra in order:
            for kind, path in (kinds if r % 2 == 0 else kinds[::-1]):
                if args.what == "backup":
                    repo = scratch / "repo"
                    bf.clean(repo)
                    timed([*cli, "-r", str(repo), "init"], src, log)
                    cmd = [*cli, "-r", str(repo), "backup", str(path), "--name", "ab", *extra]
                else:
                    out = (args.out.resolve() if args.out else scratch) / "vmbak-ab-out.raw"
                    bf.clean(out)
                    cmd = [*cli, "-r", str(path), "restore", f"{bf.NAME}:latest", str(out), *extra]
                wall, cpu = timed(cmd, src, log, (path,))
                res.setdefault((name, kind), []).append((wall, cpu))
                bf.say(f"round {r + 1} {name:10} {kind:11} wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
                       f"load {os.getloadavg()[0]:.1f}")
    shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        bf.clean(args.out.resolve() / "vmbak-ab-out.raw")
    first = args.variants[0][0]
    for kind, _ in kinds:
        print(f"\n{kind}: medians of {args.rounds} rounds")
        for name, _, _ in args.variants:
            w = res[(name, kind)]
            line = (f"  {name:10} wall {statistics.median(x[0] for x in w):6.2f} s  "
                    f"cpu {statistics.median(x[1] for x in w):6.2f} s")
            if name != first:
                rr = [a[0] / b[0] for a, b in zip(res[(first, kind)], w, strict=True)]
                line += f"  {first}/{name} {statistics.median(rr):.3f} ({min(rr):.2f}-{max(rr):.2f})"
            print(line)
    if args.what == "chain":
        print("\nhead / full, median of per-round ratios")
        for name, _, _ in args.variants:
            rr = [a[0] / b[0] for a, b in zip(res[(name, "head")], res[(name, "full")], strict=True)]
            print(f"  {name:10} {statistics.median(rr):.3f} ({min(rr):.2f}-{max(rr):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
