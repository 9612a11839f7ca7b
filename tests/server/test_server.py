"""The server as a real process: scheduled backups with retention, history, the HTTP API and its
security, metrics, notifications, the jobs command, reload, clean stop, and kill -9 mid-job."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time

from prometheus_client.parser import text_string_to_metric_families

MiB = 1 << 20


def _repo_config(repo, key: str = "main") -> str:  # noqa: ANN001
    pw = 'password_file = "password"\n' if repo.password else ""
    return f'\n[repositories.{key}]\nlocation = "{repo.path}"\n{pw}'


def _locks(repo) -> list[str]:  # noqa: ANN001
    d = repo.path / "locks"
    return sorted(os.listdir(d)) if d.exists() else []


def _wait_lock(sp, repo, what: str) -> None:  # noqa: ANN001
    """Wait until a backup holds its lock, looking every 2 ms: on a fast machine the
    backup of this test's disk holds it for a few tenths of a second only."""
    end = time.monotonic() + 60
    while not _locks(repo):
        assert time.monotonic() < end, f"timed out waiting for {what}; server log:\n" + "\n".join(sp.log[-40:])
        assert sp.proc.poll() is None, "the server exited:\n" + "\n".join(sp.log)
        time.sleep(0.002)


def _forget_rows(result: object, name: str) -> list[dict]:
    """The rows of ``vmbak forget --json`` for ``name`` (wherever a JSON-lines summary puts them)."""
    if isinstance(result, dict):
        if isinstance(result.get("names"), dict):
            return result["names"].get(name, [])
        for v in result.values():
            rows = _forget_rows(v, name)
            if rows:
                return rows
    return []


def test_scheduled_backups_api_metrics_notifications(server_env, make_repo, make_ext4, make_disk, debugfs,
                                                     webhook_receiver, smtp_server) -> None:
    repo = make_repo("aes-256-gcm", password="correct horse battery staple")
    disk, files = make_ext4("db.img", 24 * MiB)  # backed up on demand: browsed below
    small = make_disk("web.raw", 4 * MiB, seed=3)  # backed up every 4 s, two kept
    server_env.write_config(server_env.header(max_concurrent_jobs=2) + _repo_config(repo) + f'''
[jobs.web]
repository = "main"
disk = "{small.path}"
name = "web"
schedule = "* * * * * */4"
keep = {{ last = 2 }}

[jobs.db]
repository = "main"
disk = "{disk.path}"
name = "db"
before = "echo before $VMBAK_JOB $VMBAK_RUN_ID >> {server_env.dir / 'hooks.log'}"
after = ["/bin/sh", "-c", "echo after $VMBAK_RESULT $VMBAK_SNAPSHOTS >> {server_env.dir / 'hooks.log'}"]

[jobs.broken]
repository = "main"
disk = "{server_env.dir / "missing.raw"}"
stale_after_hours = 0.0008

[notify]
on_success = true
webhook = "{webhook_receiver.url}"

[notify.email]
host = "127.0.0.1"
port = {smtp_server.port}
from = "vmbak@localhost"
to = ["admin@localhost"]
''')
    sp = server_env.start()

    # ---- scheduled backups run on time; retention keeps two
    def web_done() -> list[dict]:
        rs = [r for r in sp.runs("web") if r["state"] == "succeeded"]
        return rs if len(rs) >= 3 else []
    done = sp.wait_for(web_done, 120, "three scheduled backups of web")
    assert all(r["trigger"] == "schedule" for r in done)
    for r in done:
        assert r["scheduled"].endswith(".000000Z") and int(r["scheduled"][17:19]) % 4 == 0, r["scheduled"]
        lag = time.mktime(time.strptime(r["started"][:19], "%Y-%m-%dT%H:%M:%S")) - \
            time.mktime(time.strptime(r["scheduled"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert lag <= 4, r  # started on time (or, when the one before ran long, at the next free moment)
        assert len(r["snapshots"]) == 1 and r["bytes_read"] > 0
    assert any(r["forgotten"] for r in done), done  # keep last 2: the third backup's retention forgot one
    full = sp.get(f"/api/v1/runs/{done[0]['id']}").json()
    rows = _forget_rows(full["result"][-1], "web")  # the retention step's result: two kept, the rest forgotten
    assert [r["action"] for r in rows].count("keep") == 2 and len(rows) >= 3, rows
    assert any("$ vmbak backup" in line for line in full["log"]), full["log"]
    assert any("$ vmbak forget --name web" in line for line in full["log"]), full["log"]

    # ---- a manual run, through the jobs command; a job is never started twice
    p = server_env.vmbak("jobs", "run", "db", "--wait", "--json", "--config", str(server_env.config))
    db_run = json.loads(p.stdout)
    assert db_run["state"] == "succeeded" and db_run["trigger"] == "manual" and db_run["snapshots"]
    hooks_log = (server_env.dir / "hooks.log").read_text().splitlines()
    assert hooks_log == [f"before db {db_run['id']}", f"after succeeded {db_run['snapshots'][0]}"], hooks_log
    first = sp.post("/api/v1/jobs/web/run")
    second = sp.post("/api/v1/jobs/web/run")
    assert first.status in (202, 409) and second.status == 409, (first, second)
    p = server_env.vmbak("jobs", "--config", str(server_env.config))
    assert p.stdout.splitlines()[0].split()[:3] == ["JOB", "REPOSITORY", "SOURCE"]
    assert any(line.startswith("db ") and "succeeded" in line for line in p.stdout.splitlines()), p.stdout
    jobs = json.loads(server_env.vmbak("jobs", "--json", "--config", str(server_env.config)).stdout)
    by = {j["name"]: j for j in jobs}
    assert by["web"]["next_run"]["backup"] and by["db"]["next_run"] == {}
    assert by["db"]["last_run"]["state"] == "succeeded"

    # ---- prune and verify, on demand (their schedules work as backups' do)
    for kind in ("prune", "verify"):
        p = server_env.vmbak("jobs", "run", "db", "--kind", kind, "--wait", "--json", "--config", str(server_env.config))
        r = json.loads(p.stdout)
        assert r["state"] == "succeeded" and r["kind"] == kind, r
        cmd = {"prune": "$ vmbak prune", "verify": "$ vmbak check"}[kind]
        assert any(cmd in line for line in sp.get(f"/api/v1/runs/{r['id']}").json()["log"])

    # ---- a failing job notifies by webhook and email
    r = sp.post("/api/v1/jobs/broken/run").json()["run"]
    failed = sp.wait_run(r["id"])
    assert failed["state"] == "failed" and "missing.raw" in failed["error"], failed
    p = server_env.vmbak("jobs", "run", "broken", "--wait", "--config", str(server_env.config), check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("vmbak: error: run ")
    hooks = webhook_receiver.received
    sp.wait_for(lambda: any(h["event"] == "failure" and h["job"] == "broken" for h in hooks), 30, "failure webhook")
    sp.wait_for(lambda: any(h["event"] == "success" and h["job"] == "db" for h in hooks), 30, "success webhook")
    sp.wait_for(lambda: any(h["event"] == "stale" and h["job"] == "broken" for h in hooks), 30, "stale webhook")
    fail_hook = next(h for h in hooks if h["event"] == "failure")
    assert fail_hook["run"]["state"] == "failed" and fail_hook["version"] == 1
    sp.wait_for(lambda: any("job broken failed" in m["Subject"] for m in smtp_server.messages), 30, "failure email")
    mail = next(m for m in smtp_server.messages if "job broken failed" in m["Subject"])
    assert mail["To"] == "admin@localhost" and "missing.raw" in mail.get_payload()

    # ---- browse and download through the API
    sid = db_run["snapshots"][0]
    listing = sp.get(f"/api/v1/snapshots/{sid[:12]}/files?path=/").json()
    top = [e["name"] for e in listing["entries"]]
    assert top == ["disk"], listing
    etc = sp.get(f"/api/v1/snapshots/{sid}/files?path=/disk/etc").json()
    assert sorted(e["name"] for e in etc["entries"]) == ["hostname", "services.txt"]
    got = sp.get(f"/api/v1/snapshots/{sid}/download?path=/disk/var/log/syslog")
    assert got.status == 200 and got.body == files["var/log/syslog"]
    tar = sp.get(f"/api/v1/snapshots/{sid}/download?path=/disk/data")
    assert tar.status == 200 and tar.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar.body)) as tf:
        names = {m.name: m for m in tf.getmembers()}
        for rel in ("data/random-1.bin", "data/random-2.bin", "data/empty"):
            assert tf.extractfile(names[rel]).read() == files[rel]
    for bad in ("/disk/../../etc/passwd", "/disk/etc/..", "..", "/disk/%2e%2e/x", "/disk/etc/hostname%00"):
        for what in ("files", "download"):
            r = sp.get(f"/api/v1/snapshots/{sid}/{what}?path={bad}")
            assert r.status == 400, (what, bad, r.status, r.body)
    assert sp.get("/api/v1/snapshots/ffffffff/files?path=/").status == 404
    # ---- restore to a path on the server (admin only)
    target = server_env.dir / "restored.img"
    body = json.dumps({"target": str(target)}).encode()
    ctype = {"Content-Type": "application/json"}
    r = sp.request("POST", f"/api/v1/snapshots/{sid}/restore", token="read", data=body, headers=ctype)
    assert r.status == 403
    r = sp.request("POST", f"/api/v1/snapshots/{sid}/restore", data=json.dumps({"target": "rel"}).encode(),
                   headers=ctype)
    assert r.status == 400
    r = sp.request("POST", f"/api/v1/snapshots/{sid}/restore", data=body, headers=ctype)
    assert r.status == 202, r
    res = sp.wait_run(r.json()["run"]["id"])
    assert res["state"] == "succeeded" and res["job"] == "(restore)", res
    assert target.stat().st_size == disk.size
    assert debugfs(target, "cat /etc/hostname").encode() == files["etc/hostname"]

    snap = sp.get(f"/api/v1/snapshots/{sid}").json()
    assert snap["chain"][0]["id"] == sid and snap["repository"] == "main"

    # ---- security: no endpoint answers without a token; a read token cannot start a job
    schema = sp.get("/api/v1/openapi.json").json()
    paths = [p.replace("{name}", "web").replace("{rid}", "1").replace("{sid}", sid)
             for p in schema["paths"] if p != "/metrics"]
    assert len(paths) >= 10
    for path in [*paths, "/", "/nothing", "/api/v1/openapi.json"]:
        for method in ("GET", "POST"):
            for tok in (None, "wrong-token-0123456789abcdef"):
                r = sp.request(method, path, token=tok)
                if method == "GET" and tok is None and not path.startswith("/api/"):
                    # a dashboard page sends a browser to the login form (followed here)
                    assert r.status == 200 and b'action="/login"' in r.body and b"<nav>" not in r.body, path
                    continue
                assert r.status == 401, (method, path, r.status)
    assert sp.get("/api/v1/jobs", token="read").status == 200
    r = sp.post("/api/v1/jobs/db/run", token="read")
    assert r.status == 403
    assert sp.request("GET", "/api/v1/jobs", headers={"Authorization": f"Basic {sp.admin}"}, token=None).status == 401

    # ---- metrics: scraped without a token on loopback, parsed by prometheus_client
    m = sp.get("/metrics", token=None)
    assert m.status == 200
    fams = {f.name: f for f in text_string_to_metric_families(m.body.decode())}
    ok = {s.labels["job"]: s.value for s in fams["vmbak_job_last_success_timestamp_seconds"].samples}
    assert ok["web"] > time.time() - 600 and ok["db"] > 0 and "broken" not in ok
    runs = {(s.labels["job"], s.labels["result"]): s.value for s in fams["vmbak_job_runs"].samples
            if s.name == "vmbak_job_runs_total"}
    assert runs[("web", "succeeded")] >= 3 and runs[("broken", "failed")] >= 2
    fails = {s.labels["job"]: s.value for s in fams["vmbak_job_failures"].samples if s.name.endswith("_total")}
    assert fails["broken"] >= 2 and fails["web"] == 0
    size = [s.value for s in fams["vmbak_repository_size_bytes"].samples if s.labels["repository"] == "main"]
    assert size and size[0] > 0
    assert any(s.labels["job"] == "broken" and s.value == 1 for s in fams["vmbak_job_stale"].samples)
    assert "vmbak_job_last_duration_seconds" in fams and "process_cpu_seconds" in fams

    # ---- SIGHUP: a new job appears, the running one is not interrupted
    text = server_env.config.read_text().replace("[notify]", f'''[jobs.late]
repository = "main"
disk = "{small.path}"
name = "late"

[notify]''')
    server_env.write_config(text)
    sp.wait_for(lambda: any(r["state"] == "running" for r in sp.runs("web")), 60, "a running web backup")
    running = next(r for r in sp.runs("web") if r["state"] == "running")
    sp.proc.send_signal(signal.SIGHUP)
    sp.wait_for(lambda: "late" in [j["name"] for j in sp.get("/api/v1/jobs").json()], 30, "the reloaded job")
    assert sp.wait_run(running["id"])["state"] == "succeeded"
    server_env.write_config(text.replace('schedule = "* * * * * */4"', 'schedule = "not a schedule"'))
    sp.proc.send_signal(signal.SIGHUP)
    sp.wait_for(lambda: any("keeping the running one" in line for line in sp.log), 30, "a refused reload")
    assert sp.get("/api/v1/jobs/web").json()["schedule"]["backup"] == "* * * * * */4"

    # ---- SIGTERM: a clean stop, no lock left, the repository checks clean
    assert sp.stop() == 0
    assert _locks(repo) == []
    assert repo.check(read_data=True)["ok"]
    assert not [r for r in sp.log if "Traceback" in r]


def test_kill9_mid_job_then_restart(server_env, make_repo, make_disk) -> None:
    repo = make_repo("none")
    disk = make_disk("big.raw", 160 * MiB, seed=11)
    server_env.write_config(server_env.header() + _repo_config(repo) + f'''
[jobs.big]
repository = "main"
disk = "{disk.path}"
schedule = "0 3 * * *"
''')
    sp = server_env.start()
    rid = sp.post("/api/v1/jobs/big/run").json()["run"]["id"]
    _wait_lock(sp, repo, "the backup to take its lock")
    sp.kill9()
    # the child learns that its server died (SIGTERM), aborts cleanly and releases its lock
    deadline = time.monotonic() + 60
    while _locks(repo) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _locks(repo) == []
    assert repo.check(read_data=False)["ok"]
    assert repo.snapshots() == []
    # the restarted server marks the run interrupted and runs the job again
    sp2 = server_env.start()
    old = sp2.get(f"/api/v1/runs/{rid}").json()
    assert old["state"] == "interrupted", old
    again = sp2.wait_for(lambda: [r for r in sp2.runs("big") if r["trigger"] == "resumed"], 30, "the resumed run")
    res = sp2.wait_run(again[0]["id"], 180)
    assert res["state"] == "succeeded", res
    assert [s["id"] for s in repo.snapshots()] == res["snapshots"]
    # SIGTERM mid-job: the run is aborted cleanly, the server exits 0
    disk.write_random(0, 160 * MiB, seed=12)  # all of it: the backup stores as much as the first
    rid = sp2.post("/api/v1/jobs/big/run").json()["run"]["id"]
    _wait_lock(sp2, repo, "the second backup to take its lock")
    assert sp2.stop() == 0
    assert _locks(repo) == []
    assert len(repo.snapshots()) == 1
    sp3 = server_env.start()
    stopped = sp3.get(f"/api/v1/runs/{rid}").json()
    assert stopped["state"] == "interrupted" and stopped["error"] == "the server is stopping", stopped
    again = sp3.wait_for(lambda: [r for r in sp3.runs("big") if r["trigger"] == "resumed" and r["id"] > rid], 30,
                         "the run stopped by SIGTERM to run again")
    assert sp3.wait_run(again[0]["id"], 180)["state"] == "succeeded"
    assert sp3.stop() == 0
    assert len(repo.snapshots()) == 2
    assert repo.check(read_data=True)["ok"]


def test_concurrency_limit_and_no_double_start(server_env, make_repo, make_disk) -> None:
    repo = make_repo("none")
    jobs = ""
    for name in ("a", "b", "c"):
        d = make_disk(f"{name}.raw", 24 * MiB, seed=ord(name))
        jobs += f'\n[jobs.{name}]\nrepository = "main"\ndisk = "{d.path}"\n'
    server_env.write_config(server_env.header(max_concurrent_jobs=2) + _repo_config(repo) + jobs)
    sp = server_env.start()
    ids = [sp.post(f"/api/v1/jobs/{n}/run").json()["run"]["id"] for n in ("a", "b", "c")]
    assert sp.post("/api/v1/jobs/a/run").status == 409
    states = sp.wait_for(lambda: [r["state"] for r in sp.runs()] if any(r["state"] == "running"
                                                                       for r in sp.runs()) else None, 30, "a run")
    assert states.count("running") <= 2
    runs = [sp.wait_run(i) for i in ids]
    assert all(r["state"] == "succeeded" for r in runs), runs
    spans = sorted((r["started"], r["ended"]) for r in runs)
    # never three at once: the third started only after one of the first two had ended
    assert spans[2][0] >= min(spans[0][1], spans[1][1]), spans
    assert sp.stop() == 0


def test_missed_schedule_runs_once_at_start(server_env, make_repo, make_disk) -> None:
    repo = make_repo("none")
    disk = make_disk("m.raw", 1 * MiB, seed=5)
    body = _repo_config(repo) + f'''
[jobs.m]
repository = "main"
disk = "{disk.path}"
schedule = "* * * * * */3"
'''
    server_env.write_config(server_env.header() + body)
    sp = server_env.start()
    sp.wait_for(lambda: [r for r in sp.runs("m") if r["state"] == "succeeded"], 60, "a scheduled run")
    assert sp.stop() == 0
    time.sleep(3.5)  # at least one schedule passes while no server runs
    sp = server_env.start()
    # a run the stop interrupted runs again ("resumed"), else the missed schedule runs ("missed"): once
    want = "resumed" if sp.runs("m")[0]["state"] == "interrupted" else "missed"
    caught = sp.wait_for(lambda: [r for r in sp.runs("m") if r["trigger"] == want], 10, f"the {want} run")
    assert len(caught) == 1 and len([r for r in sp.runs("m") if r["trigger"] in ("missed", "resumed")]) == 1
    assert sp.stop() == 0
    # with run_missed = false, nothing is caught up
    server_env.write_config(server_env.header(run_missed="false") + body)
    time.sleep(3.5)
    sp = server_env.start()
    time.sleep(1)
    assert len([r for r in sp.runs("m") if r["trigger"] in ("missed", "resumed")]) == 1
    assert sp.stop() == 0
    assert _locks(repo) == []
