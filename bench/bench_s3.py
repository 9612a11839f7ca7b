#!/usr/bin/env python3
"""S3 benchmark: vmbak to a loopback S3 server (moto) beside the local directory, restic
against the same S3 server in the same run, and vmbak copy throughput.

On the foundation's benchmark image (bench/bench_foundation.py builds v1.raw and v2.raw
in bench/work/images): for each target, a full backup of v1, an incremental of v2 and a
restore of the latest snapshot (verified against v2's sha256 where the tool restores the
file whole). Then ``vmbak copy`` of both snapshots from the local repository into a fresh
S3 repository (different keys: everything is re-keyed) and back into a fresh local one.
A fresh moto server is started for each S3 target (it keeps objects in memory).

    .venv/bin/python bench/bench_s3.py [--workdir bench/work] [--only vmbak-local,vmbak-s3,restic-s3,copy]

Results go to bench/work/results-s3.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_foundation as bf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("vmbak-local", "vmbak-s3", "restic-s3", "copy")
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "benchsecret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true"}


class Moto:
    def __init__(self, logdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(logdir / f"moto-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=self.log)
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="benchsecret").create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "bench/work"))
    ap.add_argument("--only", default=",".join(PARTS))
    args = ap.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    work = Path(args.workdir).resolve()
    meta = bf.build_images(work / "images", False)
    v1, v2 = work / "images/v1.raw", work / "images/v2.raw"
    s3dir = work / "s3"
    shutil.rmtree(s3dir, ignore_errors=True)
    s3dir.mkdir(parents=True)
    disk = s3dir / "disk.raw"  # one path, re-linked to v1 then v2 (as the foundation bench does)
    log = s3dir / "log.txt"
    vmbak = str(ROOT / ".venv/bin/vmbak")
    restic = bf.tool_path("restic")
    base = dict(os.environ, PATH=bf.sbin_path(), LC_ALL="C.UTF-8", VMBAK_PASSWORD=bf.PASSWORD,
                VMBAK_FROM_PASSWORD=bf.PASSWORD, VMBAK_CACHE_DIR=str(s3dir / "cache"), **KEYS)
    results: list[bf.Measure] = []

    def vm(repo: str, out: Path) -> tuple[list[str], ...]:
        return ([vmbak, "-r", repo, "init"], [vmbak, "-r", repo, "--json", "backup", str(disk), "--name", "bench"],
                [vmbak, "-r", repo, "--json", "backup", str(disk), "--name", "bench"],
                [vmbak, "-r", repo, "--json", "restore", "bench:latest", str(out)])

    def staged(label: str, cmds: tuple[list[str], ...], env: dict[str, str], out: Path, repo_dir: Path | None) -> None:
        bf.relink(v1, disk)
        init, full, incr, rest = cmds
        m = bf.measured(bf.Measure(label, "init", 1), init, env, log)
        if m.rc:
            raise RuntimeError(f"{label} init failed: {m.error}")
        for step, cmd in (("full", full), ("incremental", incr), ("restore", rest)):
            if step == "incremental":
                bf.relink(v2, disk)
            m = bf.measured(bf.Measure(label, step, 1), cmd, env, log, repo=repo_dir)
            if step == "restore" and m.rc == 0:
                # vmbak restores blocks no filesystem uses as zeros: judged on the used blocks
                v = bf.verify_restore("vmbak" if label.startswith("vmbak") else label, out, v2, meta)
                m.output = {"restore_ok": bool(v.get("ok")), "verify": v}
                out.unlink(missing_ok=True)
            bf.say(f"bench-s3: {label} {step}: {m.wall_s:.1f} s" + (f" ERROR {m.error}" if m.rc else ""))
            results.append(m)

    if "vmbak-local" in parts or "copy" in parts:
        staged("vmbak-local", vm(str(s3dir / "local-repo"), s3dir / "out.raw"), base, s3dir / "out.raw",
               s3dir / "local-repo")
    if "vmbak-s3" in parts:
        moto = Moto(s3dir)
        try:
            repo = f"s3:{moto.endpoint}/{moto.bucket('vmbak')}/repo"
            staged("vmbak-s3", vm(repo, s3dir / "out.raw"), base, s3dir / "out.raw", None)
        finally:
            moto.stop()
    if "restic-s3" in parts and restic:
        moto = Moto(s3dir)
        try:
            repo = f"s3:{moto.endpoint}/{moto.bucket('restic')}/repo"
            env = dict(base, RESTIC_PASSWORD=bf.PASSWORD, RESTIC_CACHE_DIR=str(s3dir / "cache/restic"))
            rdir = s3dir / "restic-out"
            staged("restic-s3", ([restic, "-r", repo, "init"],
                                 [restic, "-r", repo, "backup", "--host", "bench", str(disk)],
                                 [restic, "-r", repo, "backup", "--host", "bench", str(disk)],
                                 [restic, "-r", repo, "restore", "latest", "--target", str(rdir)]),
                   env, rdir / str(disk).lstrip("/"), None)
            shutil.rmtree(rdir, ignore_errors=True)
        finally:
            moto.stop()
    if "copy" in parts:
        moto = Moto(s3dir)
        try:
            repo = f"s3:{moto.endpoint}/{moto.bucket('copy')}/repo"
            env = dict(base)
            bf.measured(bf.Measure("copy", "init", 1), [vmbak, "-r", repo, "init"], env, log)
            m = bf.measured(bf.Measure("copy", "local-to-s3", 1),
                            [vmbak, "--json", "copy", "--from-repo", str(s3dir / "local-repo"), "--to-repo", repo],
                            env, log)
            results.append(m)
            bf.say(f"bench-s3: copy local->s3: {m.wall_s:.1f} s" + (f" ERROR {m.error}" if m.rc else ""))
            back = s3dir / "copy-back"
            bf.measured(bf.Measure("copy", "init", 1), [vmbak, "-r", str(back), "init"], env, log)
            m = bf.measured(bf.Measure("copy", "s3-to-local", 1),
                            [vmbak, "--json", "copy", "--from-repo", repo, "--to-repo", str(back)], env, log,
                            repo=back)
            results.append(m)
            bf.say(f"bench-s3: copy s3->local: {m.wall_s:.1f} s" + (f" ERROR {m.error}" if m.rc else ""))
        finally:
            moto.stop()
    rows = []
    for m in results:
        o = m.output if isinstance(m.output, dict) else {}
        stats = o.get("stats", {}) if isinstance(o.get("stats"), dict) else {}
        moved = o.get("raw_bytes_sent") or stats.get("read_bytes") or o.get("bytes_written") or 0
        rows.append({"target": m.tool, "step": m.step, "wall_s": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 2),
                     "max_rss_mib": round(m.max_rss_kib / 1024, 1), "rc": m.rc,
                     "MB_per_s": round(moved / m.wall_s / 1e6, 1) if moved and m.wall_s else None,
                     "verified": o.get("restore_ok"), "error": m.error})
    (work / "results-s3.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{'target':<12} {'step':<12} {'wall s':>8} {'cpu s':>8} {'RSS MiB':>8} {'MB/s':>8}  verified")
    for r in rows:
        print(f"{r['target']:<12} {r['step']:<12} {r['wall_s']:>8} {r['cpu_s']:>8} {r['max_rss_mib']:>8} "
              f"{r['MB_per_s'] or '-':>8}  {r['verified'] if r['verified'] is not None else ''}"
              + (f"  ERROR {r['error']}" if r["error"] else ""))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
