"""bench/bench_verify.py runs end to end on a small image: it reads vmbak's --json output
as docs/json.md gives it (a long command's summary is its last line, init prints one
indented document). It broke silently once when check began streaming status lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_verify_runs_and_reports_each_repository(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_verify.py"), "--size", "16", "--runs", "2",
                        "--workers", "1,2", "--restic", "", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "verify" / "results.json").read_text())
    assert {(r["encryption"], r["workers"]) for r in rows} == {("aes-256-gcm", 1), ("aes-256-gcm", 2),
                                                                 ("none", 1), ("none", 2)}
    for r in rows:
        assert len(r["gib_per_s"]) == 2 and r["median_gib_per_s"] > 0 and r["stored_bytes"] > 4 << 20
