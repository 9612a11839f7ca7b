#!/usr/bin/env python3
"""Scale-out on Ceph: RBD images as disks, radosgw (S3) as the repository, many writers.

For each number of writers W (default 1, 2, 4, 8), in a fresh repository (its own prefix)
in one bucket of the cluster's radosgw:

1. W `vmbak backup rbd:POOL/img-i --name img-i` processes start at once, each backing up
   its own image (full); timed together: throughput = logical bytes read / wall time;
2. a scratch image is backed up and forgotten (so that prune has packs to delete); every
   image gets changes (CHANGE_MIB of random writes), then W incremental backups run at
   once while `vmbak prune --grace 0` runs beside them (it marks the scratch packs; it may
   sweep only what no operation running at marking time can still use), and a second
   prune after them sweeps what the first could not;
3. every image is restored (`vmbak restore img-i:latest rbd:POOL/restored-i`) and compared
   byte for byte with the image; then `vmbak check --read-data`.

Peak RSS of each writer is GNU time's %M for that process. The cluster is a running
one (--ceph-conf, --s3-endpoint and the keys in $VMBAK_TEST_S3_ACCESS_KEY /
$VMBAK_TEST_S3_SECRET_KEY, as `bash scripts/ceph-rgw.sh start` writes them into $DIR/env).
Images are written into pool --pool (made if missing) and removed at the end.

    . /tmp/vmbak-ceph/env && .venv/bin/python bench/bench_ceph.py --ceph-conf /tmp/vmbak-ceph/ceph.conf \\
        --s3-endpoint $VMBAK_TEST_S3_ENDPOINT [--writers 1,2,4,8] [--image-mib 128] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
PASSWORD = "bench ceph password"


def vmbak_env(repo: str, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.update(PYTHONPATH=str(ROOT / "src"), VMBAK_REPOSITORY=repo, VMBAK_PASSWORD=PASSWORD,
               AWS_ACCESS_KEY_ID=args.access_key, AWS_SECRET_ACCESS_KEY=args.secret_key,
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", CEPH_CONF=args.ceph_conf)
    return env


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # GNU time reports the child's own peak RSS: a child forked from this process directly
    # would inherit this process's RSS high-water mark (Linux keeps it across exec).
    fd, rss_file = tempfile.mkstemp(prefix="vmbak-bench-rss-")
    os.close(fd)
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file, sys.executable, "-m", "vmbak.cli.main",
                          *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.rss_file = rss_file  # type: ignore[attr-defined]
    return p


def wait(p: subprocess.Popen) -> tuple[int, str, str]:
    """(peak RSS in bytes, stdout, stderr); exits on failure."""
    out, err = p.communicate()
    with open(p.rss_file) as f:  # type: ignore[attr-defined]
        peak = int(f.read().split()[-1]) * 1024
    os.unlink(p.rss_file)  # type: ignore[attr-defined]
    if p.returncode != 0:
        raise SystemExit(f"{p.args} exited {p.returncode}:\n{out}\n{err}")
    return peak, out, err


def prune_summary(result: tuple[int, str, str]) -> dict:
    """What one prune did, from its --json summary: packs it marked and deleted, bytes freed."""
    rss, out, _ = result
    doc = json.loads(out.strip().splitlines()[-1])
    marked = doc.get("marked") or {}
    return {"marked_packs": marked.get("doomed_packs", 0), "deleted_packs": sum(x["deleted_packs"] for x in doc["swept"]),
            "freed_mib": round(doc["freed_bytes"] / MiB, 1), "postponed": len(doc["postponed"]), "peak_rss_mib": rss >> 20}


def fill(img, size: int, seed: int) -> None:  # noqa: ANN001 - rbd.Image
    """Half the image: random 4 MiB stretches, text-like ones and holes."""
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod ", np.uint8)
    for off in range(0, size, 4 * MiB):
        kind = rng.integers(0, 4)
        if kind == 0:
            img.write(rng.integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes(), off)
        elif kind == 1:
            img.write(np.resize(np.roll(words, int(rng.integers(0, 64))), 4 * MiB).tobytes(), off)
        # kinds 2 and 3: never written (thin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ceph-conf", default="/tmp/vmbak-ceph/ceph.conf")
    ap.add_argument("--s3-endpoint", default=os.environ.get("VMBAK_TEST_S3_ENDPOINT", "http://127.0.0.1:7480"))
    ap.add_argument("--access-key", default=os.environ.get("VMBAK_TEST_S3_ACCESS_KEY", ""))
    ap.add_argument("--secret-key", default=os.environ.get("VMBAK_TEST_S3_SECRET_KEY", ""))
    ap.add_argument("--writers", default="1,2,4,8")
    ap.add_argument("--image-mib", type=int, default=128)
    ap.add_argument("--change-mib", type=int, default=8)
    ap.add_argument("--scratch-mib", type=int, default=32, help="size of the forgotten scratch image prune deletes")
    ap.add_argument("--pool", default="vmbak-bench")
    a = ap.parse_args()
    import boto3
    import rados
    import rbd

    levels = [int(x) for x in a.writers.split(",")]
    nimg = max(levels)
    cluster = rados.Rados(conffile=a.ceph_conf)
    cluster.connect(timeout=30)
    if a.pool not in cluster.list_pools():
        cluster.create_pool(a.pool)
        io = cluster.open_ioctx(a.pool)
        rbd.RBD().pool_init(io, True)
        io.close()
    io = cluster.open_ioctx(a.pool)
    size = a.image_mib * MiB
    names = [f"img-{i}" for i in range(nimg)]
    existing = set(rbd.RBD().list(io))
    for i, n in enumerate(names):
        if n in existing:
            with rbd.Image(io, n) as img:
                for s in img.list_snaps():
                    img.remove_snap(s["name"])
            rbd.RBD().remove(io, n)
        rbd.RBD().create(io, n, size, order=22)
        with rbd.Image(io, n) as img:
            fill(img, size, 100 + i)
    s3 = boto3.client("s3", endpoint_url=a.s3_endpoint, aws_access_key_id=a.access_key,
                      aws_secret_access_key=a.secret_key, region_name="us-east-1")
    bucket = f"vmbak-bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    with open("/proc/loadavg") as f:
        print(json.dumps({"loadavg": f.read().split()[:3], "image_mib": a.image_mib, "bucket": bucket}), flush=True)
    ep = a.s3_endpoint.rstrip("/")
    results = []
    rng = np.random.default_rng(7)
    for w in levels:
        repo = f"s3:{ep}/{bucket}/w{w}"
        env = vmbak_env(repo, a)
        wait(start(["init"], env))
        imgs = names[:w]
        rec: dict = {"writers": w}
        for phase in ("full", "incremental"):
            if phase == "incremental":
                scratch = f"scratch-{w}"
                if scratch in set(rbd.RBD().list(io)):
                    rbd.RBD().remove(io, scratch)
                rbd.RBD().create(io, scratch, a.scratch_mib * MiB, order=22)
                with rbd.Image(io, scratch) as img:
                    for off in range(0, a.scratch_mib * MiB, 4 * MiB):
                        img.write(rng.integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes(), off)
                wait(start(["backup", f"rbd:{a.pool}/{scratch}", "--name", scratch, "-q", "--ceph-conf", a.ceph_conf],
                           env))
                wait(start(["forget", f"{scratch}:latest", "-q"], env))
                with rbd.Image(io, scratch) as img:
                    for sn in img.list_snaps():
                        img.remove_snap(sn["name"])
                rbd.RBD().remove(io, scratch)
                for n in imgs:
                    with rbd.Image(io, n) as img:
                        for _ in range(a.change_mib):
                            img.write(rng.integers(0, 256, MiB, dtype=np.uint8).tobytes(),
                                      int(rng.integers(0, size // MiB)) * MiB)
            t = time.perf_counter()
            procs = [start(["backup", f"rbd:{a.pool}/{n}", "--name", n, "--json", "--ceph-conf", a.ceph_conf],
                           env) for n in imgs]
            pruner = start(["prune", "--grace", "0", "--json"], env) if phase == "incremental" else None
            outs = [wait(p) for p in procs]
            wall = time.perf_counter() - t
            pruned = wait(pruner) if pruner is not None else None
            sums = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in outs]
            read = sum(s["stats"]["read_bytes"] for s in sums)
            rec[phase] = {"wall_s": round(wall, 2), "read_mib": read // MiB,
                          "mib_per_s": round(read / MiB / wall, 1),
                          "logical_mib_per_s": round(w * size / MiB / wall, 1),
                          "peak_rss_mib": [r >> 20 for r, _, _ in outs],
                          "sources": sorted({s["change_source"] for s in sums})}
            if pruned is not None:
                rec[phase]["prune_beside_writers"] = prune_summary(pruned)
                rec[phase]["prune_after_writers"] = prune_summary(wait(start(["prune", "--grace", "0", "--json"], env)))
            print(json.dumps({"writers": w, phase: rec[phase]}), flush=True)
        # restore every image into a new one and compare
        t = time.perf_counter()
        rprocs = [start(["restore", f"{n}:latest", f"rbd:{a.pool}/restored-{w}-{n}", "--ceph-conf", a.ceph_conf],
                        env) for n in imgs]
        rss = [wait(p)[0] for p in rprocs]
        rec["restore"] = {"wall_s": round(time.perf_counter() - t, 2), "peak_rss_mib": [r >> 20 for r in rss]}
        same = []
        for n in imgs:
            with rbd.Image(io, n, read_only=True) as x, rbd.Image(io, f"restored-{w}-{n}", read_only=True) as y:
                same.append(x.read(0, size) == y.read(0, size))
            rbd.RBD().remove(io, f"restored-{w}-{n}")
        rec["restore"]["byte_identical"] = all(same)
        t = time.perf_counter()
        chk = start(["check", "--read-data", "--json"], env)
        crss, cout, _ = wait(chk)
        rec["check"] = {"ok": json.loads(cout.strip().splitlines()[-1])["ok"], "wall_s": round(time.perf_counter() - t, 2),
                        "peak_rss_mib": crss >> 20}
        print(json.dumps(rec), flush=True)
        results.append(rec)
        # free the OSD's memory for the next level
        objs = s3.list_objects_v2(Bucket=bucket, Prefix=f"w{w}/")
        while True:
            keys = [{"Key": o["Key"]} for o in objs.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            if not objs.get("IsTruncated"):
                break
            objs = s3.list_objects_v2(Bucket=bucket, Prefix=f"w{w}/")
    summary = [{"writers": r["writers"], "full_mib_per_s": r["full"]["mib_per_s"],
                "incr_wall_s": r["incremental"]["wall_s"],
                "pruned_beside_writers_packs": r["incremental"]["prune_beside_writers"]["deleted_packs"],
                "pruned_after_packs": r["incremental"]["prune_after_writers"]["deleted_packs"],
                "median_writer_peak_rss_mib": statistics.median(r["full"]["peak_rss_mib"]),
                "restore_identical": r["restore"]["byte_identical"], "check_ok": r["check"]["ok"]}
               for r in results]
    print(json.dumps({"summary": summary}), flush=True)
    for n in names:
        with rbd.Image(io, n) as img:
            for s in img.list_snaps():
                img.remove_snap(s["name"])
        rbd.RBD().remove(io, n)
    io.close()
    cluster.shutdown()


if __name__ == "__main__":
    main()
