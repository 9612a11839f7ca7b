#!/usr/bin/env python3
"""The in-memory index on a small repository, for comparing two trees (the paged index must
not slow it down): in fresh processes, alternating, RUNS times each, the time to stage and
commit 200 000 rows, the mean time of a lookup (``usable``) of 50 000 present and 50 000
absent ids, and the mean time of ``add_pack`` of a 64-chunk pack (2000 packs, so merges
happen). Prints per-run numbers and the medians, and each tree's ratio to the first.

    .venv/bin/python bench/bench_index_small.py --impl src --impl /work/main/src [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, time
import numpy as np
from vmbak.repo.index import INDEX_ENTRY, Index
from vmbak.repo.pack import PACK_ENTRY
rng = np.random.default_rng(1)
n = 200_000
e = np.zeros(n, INDEX_ENTRY)
e["id"] = rng.integers(0, 1 << 63, size=(n, 4), dtype=np.int64).view("V32").reshape(-1)
t = time.perf_counter()
idx = Index()
idx.stage(["%064x" % 1], e)
idx.commit()
load = time.perf_counter() - t
ids = e["id"][:50000].tolist() + [os.urandom(32) for _ in range(50000)]
t = time.perf_counter()
found = sum(map(idx.usable, ids))
look = (time.perf_counter() - t) / len(ids)
assert found == 50000
p = np.zeros(64, PACK_ENTRY)
packs = [rng.integers(0, 1 << 63, size=(64, 4), dtype=np.int64).view("V32").reshape(-1) for _ in range(2000)]
t = time.perf_counter()
for k, ids in enumerate(packs):
    p["id"] = ids
    idx.add_pack("%064x" % (k + 2), p)
add = (time.perf_counter() - t) / len(packs)
print(json.dumps({"load_ms": load * 1e3, "lookup_us": look * 1e6, "add_pack_us": add * 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", action="append", help="a src/ directory (repeatable)")
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    impls = a.impl or ["src"]
    res: dict[str, dict[str, list[float]]] = {i: {} for i in impls}
    for run in range(a.runs):
        for impl in impls if run % 2 == 0 else impls[::-1]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
            env["PYTHONPATH"] = impl if os.path.isabs(impl) else str((ROOT / impl).resolve())
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True,
                                 text=True).stdout
            m = json.loads(out)
            print(json.dumps({"impl": impl, "run": run, **{k: round(v, 2) for k, v in m.items()}}), flush=True)
            for k, v in m.items():
                res[impl].setdefault(k, []).append(v)
    med = {i: {k: round(statistics.median(v), 2) for k, v in d.items()} for i, d in res.items()}
    first = impls[0]
    ratio = {i: {k: round(v / med[first][k], 3) for k, v in d.items()} for i, d in med.items()}
    print(json.dumps({"median": med, "ratio_to_first": ratio, "runs": a.runs}))


if __name__ == "__main__":
    main()
