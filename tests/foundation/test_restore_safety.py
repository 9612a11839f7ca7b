"""Restores that race for one target, and repository data that names paths (issue 18).

* Two real ``vmbak restore`` processes of two different snapshots to the same new path:
  whatever each one claims (exit 0, "restored snapshot X ... verified") must be what the
  path holds at the end; the loser fails with one line, and no partial or lock file is
  left beside the target.
"""

from __future__ import annotations

import json
import os
import subprocess

MiB = 1 << 20
SIZE = 8 * MiB
TRIALS = 5


def test_concurrent_restores_to_one_new_path(repo, make_disk, popen_vmbak, assert_cli_error, sha256_file,
                                             tmp_path) -> None:
    a = make_disk("a.raw", SIZE, seed=11)
    b = make_disk("b.raw", SIZE, seed=12)
    snap = {"a": repo.backup(a, "a")["id"], "b": repo.backup(b, "b")["id"]}
    want = {snap["a"]: sha256_file(a.path), snap["b"]: sha256_file(b.path)}
    out = tmp_path / "out"
    out.mkdir()
    for trial in range(TRIALS):
        target = out / f"t{trial}.raw"
        first, second = ("a", "b") if trial % 2 == 0 else ("b", "a")
        procs = [popen_vmbak("restore", f"{n}:latest", target, "--json", env=repo.env()) for n in (first, second)]
        results = [(p, *p.communicate(timeout=120)) for p in procs]
        winners = []
        for p, stdout, stderr in results:
            assert "Traceback" not in stdout + stderr, stderr
            if p.returncode == 0:
                r = json.loads(stdout)
                assert r["verified"] and r["target"] == os.fspath(target)
                winners.append(r["snapshot"])
            else:
                line = assert_cli_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
                assert "in use by another restore" in line or "exists" in line or "appeared" in line, line
        assert winners, f"trial {trial}: neither restore succeeded: {[r[2] for r in results]}"
        got = sha256_file(target)
        for sid in winners:  # every success claims exactly what is at the path
            assert want[sid] == got, f"trial {trial}: a restore of {sid[:8]} said it succeeded, but " \
                                     f"{target} holds {'the other snapshot' if got in want.values() else 'neither'}"
        assert sorted(os.listdir(out)) == sorted(f"t{i}.raw" for i in range(trial + 1)), os.listdir(out)
