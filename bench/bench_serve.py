"""Single-file restore and the NBD export of a backup (issue 6).

On the foundation benchmark's 4 GiB ext4 image (bench/bench_foundation.py builds
WORKDIR/images/v1.raw), backed up once into WORKDIR/serve/repo (kept between runs while the
image is unchanged; AES-256-GCM, zstd level 1, 1 MiB chunks, as the foundation benchmark):

a. **extract**: ``vmbak extract bench:latest /disk/PATH --json`` of a 100 MiB file. The
   foundation image holds no file that large (its largest is about 48 MiB), so the backed-up
   disk is a copy of v1.raw with one 100 MiB file of random bytes added offline by
   ``debugfs write`` (BIG_FILE). Measured: the stored bytes extract fetched from the
   repository (``repository_bytes_read``: the view's fetch statistics) against the stored
   bytes of *that file's chunks*, computed independently of the view: ``debugfs -R
   "blocks PATH"`` lists the file's filesystem blocks, each run of blocks becomes a byte
   range of the disk (the filesystem starts at byte 0 of the image), and every extent of the
   snapshot's manifest (block range -> chunk id, the extent map) that overlaps a range names
   one chunk; the distinct chunks' stored lengths (the index's ``length``: compressed and
   sealed bytes) are summed. Target: fetched <= 110% of that. The extracted file is also
   compared with the file's blocks read straight from the image.
b. **sequential read throughput** of the export: ``nbdcopy`` and ``qemu-img convert -O raw``
   from ``vmbak serve bench:latest`` (a fresh server each time, so a cold chunk cache) to a
   file, against a plain ``vmbak restore bench:latest FILE``, in the same run. The outputs
   are compared with the restored file (run 1).
c. **random 4 KiB read latency** through the export with libnbd (one connection, one
   request at a time): N reads at random 4 KiB-aligned offsets inside the snapshot's data
   extents, timed one by one, on a fresh server (cold cache), then the same offsets again
   (after a pass). With the default 256 MiB cache the second pass hits only the chunks that
   are still cached, so it is also run with ``--cache-size`` large enough to hold every chunk
   the offsets touch (all hits).

Medians over --runs runs; a markdown table goes to standard output, progress to standard
error, and the results to WORKDIR/serve/results-DATE.json.

Usage:
    .venv/bin/python bench/bench_serve.py [--runs 3] [--workdir bench/work] [--reads 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbd
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import (  # noqa: E402  (the shared harness of the foundation benchmark)
    NAME,
    PASSWORD,
    Measure,
    build_images,
    make_tools,
    measured,
    run_quiet,
    say,
)

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TARGET_FILE = 100 * MIB
BIG_FILE = "/bench-100MiB.bin"  # added to the copy of v1.raw that is backed up
TARGET_RATIO = 1.10


# ---------------------------------------------------------------------------- the repository
def prepare_repo(vmbak: str, env: dict[str, str], work: Path, v1: Path,
                 meta: dict[str, Any]) -> tuple[Path, str, Path]:
    """WORKDIR/serve/repo holding one backup of WORKDIR/serve/disk/disk.raw, a copy of v1.raw
    with BIG_FILE added (both made again only if the image changed); (repo, snapshot, disk)."""
    repo, key_path = work / "repo", work / "repo.json"
    disk = work / "disk" / "disk.raw"
    key = {"v1_sha256": meta.get("v1_sha256"), "size": v1.stat().st_size, "mtime_ns": v1.stat().st_mtime_ns,
           "big_file": [BIG_FILE, TARGET_FILE]}
    if repo.exists() and key_path.exists() and disk.exists():
        saved = json.loads(key_path.read_text())
        if saved.get("key") == key:
            say(f"using the cached backup in {repo}")
            return repo, saved["snapshot"], disk
    shutil.rmtree(repo, ignore_errors=True)
    key_path.unlink(missing_ok=True)
    shutil.rmtree(disk.parent, ignore_errors=True)
    disk.parent.mkdir(parents=True)
    say(f"copying {v1} and adding a {TARGET_FILE // MIB} MiB file ...")
    run_quiet(["cp", "--sparse=always", str(v1), str(disk)])
    src = disk.parent / "big.bin"
    src.write_bytes(np.random.default_rng(100).bytes(TARGET_FILE))
    run_quiet(["debugfs", "-w", "-R", f"write {src} {BIG_FILE}", str(disk)])
    src.unlink()
    say(f"backing up {disk} into {repo} ...")
    subprocess.run([vmbak, "-r", str(repo), "init"], env=env, check=True, capture_output=True)
    t0 = time.perf_counter()
    p = subprocess.run([vmbak, "-r", str(repo), "--json", "backup", str(disk), "--name", NAME], env=env,
                       check=True, capture_output=True, text=True)
    sid = json.loads(p.stdout.strip().splitlines()[-1])["id"]  # the summary: the last line (docs/json.md)
    say(f"  backup {sid[:8]} in {time.perf_counter() - t0:.1f} s")
    key_path.write_text(json.dumps({"key": key, "snapshot": sid}))
    return repo, sid, disk


# ---------------------------------------------------------------------------- the file and its chunks
def file_ranges(image: Path, path: str, size: int, fs_bs: int) -> list[tuple[int, int]]:
    """Disk byte ranges (offset, length) holding the file's data, from ``debugfs blocks``."""
    out = run_quiet(["debugfs", "-R", f"blocks {path}", str(image)]).stdout.split()
    blocks = np.array(out, dtype=np.int64)
    if blocks.size * fs_bs < size:
        raise SystemExit(f"debugfs lists {blocks.size} blocks for {path} of {size} bytes")
    brk = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [blocks.size]))
    return [(int(blocks[a]) * fs_bs, int(b - a) * fs_bs) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def file_chunks(repo_path: Path, sid: str, ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """The distinct chunks of the snapshot's extent map that overlap ``ranges``, and their sizes."""
    from vmbak.repo.repository import Repository

    repo = Repository.open(str(repo_path), PASSWORD)
    m = repo.load_manifest(sid)
    if len(repo.chain(m)) != 1:
        raise SystemExit("the benchmark snapshot should be a full backup")
    bs = m.block_size
    st = m.ext_start.astype(np.int64) * bs
    en = st + m.ext_count.astype(np.int64) * bs
    order = np.argsort(st)
    st, en = st[order], en[order]
    ids = [bytes(m.ext_id[i]) for i in order.tolist()]
    chosen: set[bytes] = set()
    for off, n in ranges:
        i = int(np.searchsorted(en, off, side="right"))
        j = int(np.searchsorted(st, off + n, side="left"))
        chosen.update(ids[i:j])
    stored = raw = 0
    for cid in chosen:
        loc = repo.index.get(cid)
        if loc is None:
            raise SystemExit(f"chunk {cid.hex()[:16]} is not in the index")
        stored += loc.length
        raw += loc.raw_length
    return {"chunks": len(chosen), "stored_bytes": stored, "raw_bytes": raw, "block_size": bs,
            "extents": len(ids)}


def image_file_bytes(image: Path, ranges: list[tuple[int, int]], size: int) -> bytes:
    out = bytearray()
    with open(image, "rb") as f:
        for off, n in ranges:
            out += os.pread(f.fileno(), n, off)
    return bytes(out[:size])


def extract_run(vmbak: str, env: dict[str, str], repo: Path, work: Path, path: str, run: int,
                expect: bytes) -> Measure:
    target = work / "extract"
    shutil.rmtree(target, ignore_errors=True)
    m = measured(Measure("vmbak", "extract", run),
                 [vmbak, "-r", str(repo), "--json", "extract", f"{NAME}:latest", f"/disk{path}", "--target",
                  str(target)], env, work / f"run{run}.log")
    if m.rc:
        raise SystemExit(f"extract failed: {m.error}")
    got = (target / Path(path).name).read_bytes()
    m.verify = {"identical": got == expect}
    if got != expect:
        raise SystemExit(f"the extracted {path} differs from the file in the image")
    shutil.rmtree(target, ignore_errors=True)
    return m


# ---------------------------------------------------------------------------- the export
class Serve:
    """``vmbak serve bench:latest --socket SOCK --json`` in the foreground, until stop()."""

    def __init__(self, vmbak: str, env: dict[str, str], repo: Path, sock: Path, *extra: str) -> None:
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([vmbak, "-r", str(repo), "serve", f"{NAME}:latest", "--socket", str(sock),
                                      "--json", *extra], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise SystemExit(f"vmbak serve did not start: {err}")
        self.info = json.loads(line)
        self.cpu_s = 0.0
        self.uri = self.info["uri"]

    def stop(self) -> str:
        """SIGTERM; return the server's stderr. ``cpu_s``: its CPU time, nbdkit's included
        (wait4 reports a child's own usage plus that of the children it waited for)."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = rc = os.waitstatus_to_exitcode(status)
        self.cpu_s = ru.ru_utime + ru.ru_stime
        if rc:
            raise SystemExit(f"vmbak serve exited {rc}: {err}")
        return err


def copy_runs(vmbak: str, env: dict[str, str], repo: Path, work: Path, run: int) -> list[Measure]:
    out_dir = work / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    log = work / f"run{run}.log"
    sock = work / "serve.sock"
    results: list[Measure] = []
    restored = out_dir / "restore.raw"
    m = measured(Measure("vmbak", "restore", run),
                 [vmbak, "-r", str(repo), "--json", "restore", f"{NAME}:latest", str(restored)], env, log)
    if m.rc:
        raise SystemExit(f"restore failed: {m.error}")
    results.append(m)
    for name, cmd in (("nbdcopy", lambda uri, dst: ["nbdcopy", uri, str(dst)]),
                      ("qemu-img convert", lambda uri, dst: ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                                             uri, str(dst)])):
        dst = out_dir / f"{name.split()[0]}.raw"
        if name == "nbdcopy":
            with open(dst, "wb") as f:  # nbdcopy writes into an existing file
                f.truncate(restored.stat().st_size)
        srv = Serve(vmbak, env, repo, sock)
        try:
            m = measured(Measure(name, "export read", run), cmd(srv.uri, dst), env, log)
        finally:
            srv.stop()
        m.verify["server_cpu_s"] = srv.cpu_s
        m.cpu_s += srv.cpu_s  # client and server
        if m.rc:
            raise SystemExit(f"{name} from the export failed: {m.error}")
        if run == 1:
            same = subprocess.run(["cmp", "-s", str(restored), str(dst)]).returncode == 0
            m.verify["identical_to_restore"] = same
            if not same:
                raise SystemExit(f"{name} from the export differs from the restored disk")
        dst.unlink()
        results.append(m)
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


def data_offsets(repo_path: Path, sid: str, n: int, seed: int) -> list[int]:
    """``n`` random 4 KiB-aligned offsets inside the snapshot's data extents."""
    from vmbak.engine.view import SnapshotView
    from vmbak.repo.repository import Repository

    repo = Repository.open(str(repo_path), PASSWORD)
    view = SnapshotView(repo, repo.load_manifest(sid), 0)
    ext = [(o, ln) for o, ln in view.data_extents() if ln >= 4096]
    lens = np.array([ln // 4096 for _, ln in ext], np.int64)
    cum = np.cumsum(lens)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, int(cum[-1]), n)
    out = []
    for p in picks.tolist():
        k = int(np.searchsorted(cum, p, side="right"))
        before = int(cum[k - 1]) if k else 0
        out.append(ext[k][0] + (p - before) * 4096)
    return out


def latency_pass(uri: str, offsets: list[int]) -> list[float]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        lat = []
        for off in offsets:
            t0 = time.perf_counter_ns()
            h.pread(4096, off)
            lat.append((time.perf_counter_ns() - t0) / 1e3)
        return lat
    finally:
        h.shutdown()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def latency_runs(vmbak: str, env: dict[str, str], repo: Path, work: Path, offsets: list[int],
                 run: int) -> dict[str, Any]:
    sock = work / "serve.sock"
    out: dict[str, Any] = {}
    for label, extra in (("default cache (256M)", ()), ("cache holds all", ("--cache-size", "4G"))):
        srv = Serve(vmbak, env, repo, sock, *extra)
        try:
            cold = latency_pass(srv.uri, offsets)
            warm = latency_pass(srv.uri, offsets)
        finally:
            err = srv.stop()
        out[label] = {"cold_us": {"median": statistics.median(cold), "p99": pct(cold, 99)},
                      "warm_us": {"median": statistics.median(warm), "p99": pct(warm, 99)},
                      "server": err.strip().splitlines()[-1] if err.strip() else ""}
        say(f"  run {run} latency, {label}: cold median {out[label]['cold_us']['median']:.0f} us "
            f"p99 {out[label]['cold_us']['p99']:.0f} us; after a pass median "
            f"{out[label]['warm_us']['median']:.0f} us p99 {out[label]['warm_us']['p99']:.0f} us")
    return out


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--vmbak", default=str(ROOT / ".venv" / "bin" / "vmbak"))
    ap.add_argument("--reads", type=int, default=1000, help="random 4 KiB reads per latency pass (default 1000)")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    meta = build_images(workdir / "images", rebuild=False)
    v1 = workdir / "images" / "v1.raw"
    work = workdir / "serve"
    work.mkdir(parents=True, exist_ok=True)
    env = make_tools(args.vmbak, workdir)["vmbak"].env
    repo, sid, image = prepare_repo(args.vmbak, env, work, v1, meta)

    path, size = BIG_FILE, TARGET_FILE
    say(f"file: {path} ({size / MIB:.1f} MiB)")
    ranges = file_ranges(image, path, size, int(meta.get("fs_block_size", 4096)))
    chunks = file_chunks(repo, sid, ranges)
    say(f"  {len(ranges)} block runs; {chunks['chunks']} chunks, {chunks['stored_bytes'] / MIB:.1f} MiB stored")
    expect = image_file_bytes(image, ranges, size)
    offsets = data_offsets(repo, sid, args.reads, seed=6)

    ex: list[Measure] = []
    cp: list[Measure] = []
    lat: list[dict[str, Any]] = []
    for run in range(1, args.runs + 1):
        m = extract_run(args.vmbak, env, repo, work, path, run, expect)
        ex.append(m)
        fetched = m.output["repository_bytes_read"]
        say(f"  run {run}: extract {m.wall_s:.2f} s, fetched {fetched / MIB:.1f} MiB "
            f"({fetched / chunks['stored_bytes']:.3f} of the file's chunks)")
        cp.extend(copy_runs(args.vmbak, env, repo, work, run))
        say("  run {}: {}".format(run, ", ".join(f"{m.tool} {m.wall_s:.2f} s" for m in cp[-3:])))
        lat.append(latency_runs(args.vmbak, env, repo, work, offsets, run))

    disk = v1.stat().st_size
    fetched = statistics.median(m.output["repository_bytes_read"] for m in ex)
    ratio = fetched / chunks["stored_bytes"]
    med = {t: statistics.median(m.wall_s for m in cp if m.tool == t) for t in ("vmbak", "nbdcopy", "qemu-img convert")}
    cpu = {t: statistics.median(m.cpu_s for m in cp if m.tool == t) for t in med}
    lat_med: dict[str, dict[str, float]] = {}
    for label in lat[0]:
        lat_med[label] = {f"{p}_{k}": statistics.median(r[label][f"{p}_us"][k] for r in lat)
                          for p in ("cold", "warm") for k in ("median", "p99")}
    data = meta.get("v1_fs_used_bytes", 0)
    lines = [
        f"Medians of {args.runs} runs, {os.cpu_count()} CPUs, warm page cache; 4 GiB image, "
        f"{data / 2**30:.2f} GiB used by ext4 plus the {TARGET_FILE // MIB} MiB file added; "
        "AES-256-GCM, zstd 1, 1 MiB chunks.",
        "",
        f"Extract of {path} ({size / MIB:.1f} MiB)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| file's chunks (distinct, from debugfs blocks + extent map) | {chunks['chunks']} "
        f"({chunks['stored_bytes'] / MIB:.1f} MiB stored) |",
        f"| fetched from the repository by extract | {fetched / MIB:.1f} MiB |",
        f"| fetched / file's chunks | {ratio:.3f} |",
        f"| extract wall | {statistics.median(m.wall_s for m in ex):.2f} s |",
        "",
        "| whole-disk read | wall s | CPU s (client + server) | MB/s (4 GiB disk) |",
        "|---|---:|---:|---:|",
    ]
    for t, label in (("vmbak", "vmbak restore (raw)"), ("nbdcopy", "nbdcopy from vmbak serve"),
                     ("qemu-img convert", "qemu-img convert -O raw from vmbak serve")):
        lines.append(f"| {label} | {med[t]:.2f} | {cpu[t]:.2f} | {disk / med[t] / 1e6:.0f} |")
    lines += ["", f"| random 4 KiB reads ({args.reads}, libnbd, QD1) | cold median | cold p99 | "
              "after a pass median | after a pass p99 |", "|---|---:|---:|---:|---:|"]
    for label, v in lat_med.items():
        lines.append(f"| {label} | {v['cold_median'] / 1e3:.2f} ms | {v['cold_p99'] / 1e3:.2f} ms | "
                     f"{v['warm_median'] / 1e3:.3f} ms | {v['warm_p99'] / 1e3:.3f} ms |")
    ok = ratio <= TARGET_RATIO
    lines += ["", f"- extract fetched / file's chunks: {ratio:.3f} (target <= {TARGET_RATIO}: "
              f"{'PASS' if ok else 'FAIL'})",
              f"- nbdcopy / restore wall: {med['nbdcopy'] / med['vmbak']:.2f}; "
              f"qemu-img convert / restore wall: {med['qemu-img convert'] / med['vmbak']:.2f}"]
    print("\n".join(lines))
    out = work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"file": {"path": path, "size": size, "at_least_100MiB": size >= TARGET_FILE,
                                        "block_runs": len(ranges)},
                               "file_chunks": chunks, "fetched_bytes_median": fetched, "ratio": ratio,
                               "ratio_target": TARGET_RATIO, "pass": ok, "copy_wall_s": med, "copy_cpu_s": cpu,
                               "latency": lat_med, "latency_runs": lat, "reads": args.reads,
                               "runs": [m.__dict__ for m in ex + cp]}, indent=1, default=str))
    say(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
