"""The dashboard and the API with 50 disks and 5,000 snapshots: response times and idle CPU.

Builds a repository (encrypted, local) of ``--disks`` disk names with ``--per-disk`` snapshots
each, through the library: four real backups of a small raw disk per name (a full, two
incrementals, a differential), then the rest as copies of those manifests saved with
``Repository.save_manifest`` (new times, parents and statistics), which is how 5,000
snapshots are made in a minute instead of an hour. Then it starts a real ``vmbak server``
on loopback with one job per disk, and times each page and the main API endpoints over one
kept-alive connection: the first request (the catalog is cold), then ``--runs`` more
(median and 95th percentile), beside a static file from the same server as the peer (the
floor any page has on this machine at this load), and the server's CPU time per request
(from /proc/PID/stat: it does not grow with the load of other processes). Last, the server's CPU time over ``--idle`` seconds of idling
(from /proc/PID/stat). Targets (issue 14): pages under 200 ms; idle under 1% of a core.

    PYTHONPATH=src .venv/bin/python bench/bench_dashboard.py [--disks 50 --per-disk 100 --runs 30 --idle 60]
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

PASSWORD = "bench-dashboard"


def build(dirpath: str, disks: int, per_disk: int) -> dict[str, list[str]]:
    import vmbak

    repo = vmbak.Repository.init(os.path.join(dirpath, "repo"), password=PASSWORD)
    rnd = random.Random(14)
    ids: dict[str, list[str]] = {}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for d in range(disks):
        name = f"vm{d:02d}"
        path = os.path.join(dirpath, "disks", f"{name}.raw")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rnd.randbytes(256 * 1024))
        real = []
        for mode in ("full", "incremental", "incremental", "differential"):
            with open(path, "r+b") as f:
                f.seek(rnd.randrange(4) * 65536)
                f.write(rnd.randbytes(8192))
            real.append(vmbak.backup(repo, path, name=name, mode=mode, workers=1))
        # the rest: copies of those four, one every 6 hours, as a chain full, inc, inc, diff, ...
        out = [m.id for m in real]
        last_full = real[0].id
        prev = real[-1].id
        for k in range(len(real), per_disk):
            src = real[k % 4]
            m = copy.copy(src)
            m.time = (start + timedelta(hours=6 * k, minutes=d)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            m.parent = None if m.kind == "full" else last_full if m.kind == "differential" else prev
            m.stats = dict(src.stats) | {"new_stored_bytes": rnd.randrange(1, 4 << 20),
                                         "new_raw_bytes": rnd.randrange(4 << 20, 8 << 20),
                                         "read_bytes": rnd.randrange(8 << 20, 64 << 20),
                                         "duration_s": round(rnd.uniform(1, 90), 3)}
            sid = repo.save_manifest(m)
            out.append(sid)
            prev = sid
            if m.kind == "full":
                last_full = sid
        ids[name] = out
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disks", type=int, default=50)
    ap.add_argument("--per-disk", type=int, default=100)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--idle", type=float, default=60)
    ap.add_argument("--dir", help="work directory (default: a new temporary one, removed at the end)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="vmbak-bench-dash-")
    d = args.dir or tmp.name  # type: ignore[union-attr]
    os.makedirs(d, exist_ok=True)
    t0 = time.monotonic()
    if os.path.exists(os.path.join(d, "ids.json")):
        ids = json.load(open(os.path.join(d, "ids.json")))
    else:
        ids = build(d, args.disks, args.per_disk)
        json.dump(ids, open(os.path.join(d, "ids.json"), "w"))
    build_s = time.monotonic() - t0
    admin = secrets.token_hex(24)
    private(os.path.join(d, "admin.token"), admin + "\n")
    private(os.path.join(d, "password"), PASSWORD + "\n")
    port = free_port()
    conf = [f'[server]\nlisten = "127.0.0.1:{port}"\ntoken_file = "admin.token"\nstate_dir = "state"\n',
            f'[repositories.main]\nlocation = "{os.path.join(d, "repo")}"\npassword_file = "password"\n']
    for name in ids:
        conf.append(f'[jobs.{name}]\nrepository = "main"\ndisk = "{os.path.join(d, "disks", name + ".raw")}"\n'
                    f'name = "{name}"\n')
    private(os.path.join(d, "vmbak.toml"), "\n".join(conf))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    proc = subprocess.Popen([sys.executable, "-m", "vmbak.cli.main", "server", "--config", os.path.join(d, "vmbak.toml")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=d)
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if "listening on" in line:
                break
        else:
            raise SystemExit(f"the server did not start ({proc.wait()})")
        auth = {"Authorization": f"Bearer {admin}", "Accept": "text/html"}

        def get(path: str) -> tuple[float, int, int]:
            # a new connection per request, as curl makes: over one kept-alive connection
            # Python's client meets the 40 ms delayed-ACK stall on every response
            t = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("GET", path, headers=auth)
            r = c.getresponse()
            body = r.read()
            c.close()
            return (time.perf_counter() - t) * 1000, r.status, len(body)

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        name = sorted(ids)[len(ids) // 2]
        sid = ids[name][-1]
        # one run in the history, so the run pages have something to show
        conn.request("POST", f"/api/v1/jobs/{name}/run", headers=auth)
        rid = json.loads(conn.getresponse().read())["run"]["id"]
        while json.loads((conn.request("GET", f"/api/v1/runs/{rid}", headers=auth), conn.getresponse().read())[1])[
                "state"] not in ("succeeded", "failed", "aborted", "interrupted"):
            time.sleep(0.2)
        targets = [
            ("floor /static/app.css", "/static/app.css"),  # the peer: a static file from the same server
            ("page /", "/"), ("page /disk/main/NAME", f"/disk/main/{name}"), ("page /jobs", "/jobs"),
            ("page /runs", "/runs"), (f"page /runs/{rid}", f"/runs/{rid}"),
            ("page /snapshot/main/ID", f"/snapshot/main/{sid}"),
            ("api /api/v1/snapshots", "/api/v1/snapshots"), ("api /api/v1/snapshots?name=NAME", f"/api/v1/snapshots?name={name}"),
            ("api /api/v1/snapshots/ID", f"/api/v1/snapshots/{sid[:12]}"), ("api /api/v1/disks", "/api/v1/disks"),
            ("api /api/v1/stats", "/api/v1/stats"), ("api /api/v1/stats?name=NAME", f"/api/v1/stats?name={name}"),
            ("api /api/v1/jobs", "/api/v1/jobs"), ("api /api/v1/runs", "/api/v1/runs"), ("metrics /metrics", "/metrics"),
        ]
        results = []
        for label, path in targets:
            first, status, size = get(path)
            if status != 200:
                raise SystemExit(f"{path}: HTTP {status}")
            c0 = cpu_ticks(proc.pid)
            times = [get(path)[0] for _ in range(args.runs)]
            cpu_ms = (cpu_ticks(proc.pid) - c0) * 1000 / os.sysconf("SC_CLK_TCK") / args.runs
            times.sort()
            p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
            results.append({"what": label, "first_ms": round(first, 1), "median_ms": round(statistics.median(times), 1),
                            "p95_ms": round(p95, 1), "server_cpu_ms": round(cpu_ms, 1), "bytes": size})
        conn.close()
        hz = os.sysconf("SC_CLK_TCK")
        time.sleep(2)
        c0, w0 = cpu_ticks(proc.pid), time.monotonic()
        time.sleep(args.idle)
        c1, w1 = cpu_ticks(proc.pid), time.monotonic()
        idle_pct = (c1 - c0) / hz / (w1 - w0) * 100
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) // 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if tmp is not None:
            tmp.cleanup()
    snaps = sum(len(v) for v in ids.values())
    report = {"disks": len(ids), "snapshots": snaps, "build_s": round(build_s, 1), "runs": args.runs,
              "results": results, "idle_s": args.idle, "idle_cpu_percent": round(idle_pct, 3),
              "idle_cpu_ticks": c1 - c0, "rss_mb": rss, "load": os.getloadavg()}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{len(ids)} disks, {snaps} snapshots (built in {build_s:.0f} s); {args.runs} requests each after the first;"
          f" load {os.getloadavg()[0]:.1f}")
    floor = results[0]["median_ms"] or 0.1
    print(f"{'what':40} {'first':>9} {'median':>9} {'p95':>9} {'×floor':>7} {'cpu/req':>9} {'bytes':>9}")
    for r in results:
        print(f"{r['what']:40} {r['first_ms']:>7.1f}ms {r['median_ms']:>7.1f}ms {r['p95_ms']:>7.1f}ms "
              f"{r['median_ms'] / floor:>7.1f} {r['server_cpu_ms']:>7.1f}ms {r['bytes']:>9}")
    print(f"idle: {idle_pct:.2f}% of one core over {args.idle:.0f} s ({c1 - c0} ticks), {rss} MB resident")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
