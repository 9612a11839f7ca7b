"""The service commands: server (run or check the server) and jobs (ask the running server)."""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

from vmbak.cli.common import emit
from vmbak.errors import VmbakError, printable

DEFAULT_CONFIG = "/etc/vmbak/vmbak.toml"

SERVER_EPILOG = """examples:
  vmbak server --config /etc/vmbak/vmbak.toml           # run in the foreground (systemd: contrib/vmbak-server.service)
  vmbak server --config vmbak.toml --check              # check the configuration: one line per problem
  kill -HUP $(pidof -s vmbak)                           # reload the configuration; running jobs go on
  vmbak server --hash-password                          # a password hash for [server.users.NAME] (dashboard login)

A minimal configuration (every key: docs/server.md):

  [server]
  listen = "127.0.0.1:8420"
  token_file = "/etc/vmbak/admin.token"        # admin: may start jobs
  read_token_file = "/etc/vmbak/read.token"    # optional: read-only

  [repositories.main]
  location = "/backups/repo"
  password_file = "/etc/vmbak/password"

  [jobs.web]
  repository = "main"
  disk = "/var/lib/images/web.raw"
  name = "web"
  schedule = "0 2 * * *"
  keep = { last = 7, daily = 14 }
"""

JOBS_EPILOG = """examples:
  vmbak jobs                                   # every job, its next run and its last result
  vmbak jobs --json
  vmbak jobs run web                           # run job web now; print the run's id
  vmbak jobs run web --wait                    # ... and wait for it: exit status 1 if it fails
  vmbak jobs run web --kind prune
  vmbak jobs --server http://127.0.0.1:8420 --token-file ~/.vmbak-token

The server's address and token come from the configuration (--config, $VMBAK_CONFIG,
else /etc/vmbak/vmbak.toml), or from --server and --token-file.
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("server", parents=[parent], help="run the backup server (scheduler, HTTP API, metrics)",
                       description="Run vmbak as a service in the foreground: back up the configured jobs on "
                       "their cron schedules, apply their retention rules, keep a history of runs, serve the HTTP "
                       "API and Prometheus metrics, and send notifications. SIGHUP reloads the configuration "
                       "without interrupting running jobs; SIGTERM aborts them cleanly and stops.",
                       epilog=SERVER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_option(p)
    p.add_argument("--check", action="store_true",
                   help="check the configuration (and that its repositories open and its disks exist), print one "
                   "line per problem, and exit")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (a prompt, twice; or the first line of standard input) and print its "
                   "hash for a dashboard user: [server.users.NAME] password_hash = \"...\"")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("jobs", parents=[parent], help="list the server's jobs, or run one now",
                       description="Ask the running vmbak server for its jobs (schedule, next run, last result), "
                       "or start one now.", epilog=JOBS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _client_options(p)
    jsub = p.add_subparsers(dest="jobs_command", metavar="COMMAND")
    r = jsub.add_parser("run", parents=[parent], help="run a job now (needs the admin token)",
                        description="Queue a run of the job now on the running server.",
                        epilog="examples:\n  vmbak jobs run web\n  vmbak jobs run web --wait --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("job", metavar="NAME")
    r.add_argument("--kind", choices=("backup", "prune", "verify"), default="backup",
                   help="what to run (default: backup, then the job's retention rules)")
    r.add_argument("--wait", action="store_true", help="wait until the run ends; exit 1 if it did not succeed")
    _client_options(r)
    r.set_defaults(func=cmd_jobs_run)
    p.set_defaults(func=cmd_jobs)


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS,
                   help=f"the configuration (default: $VMBAK_CONFIG, else {DEFAULT_CONFIG})")


def _client_options(p: argparse.ArgumentParser) -> None:
    _config_option(p)
    p.add_argument("--server", metavar="URL", default=argparse.SUPPRESS,
                   help="the server's address (default: from the configuration's server.listen)")
    p.add_argument("--token-file", metavar="FILE", default=argparse.SUPPRESS,
                   help="a file holding the token (default: the configuration's token_file, else read_token_file)")


def _config_path(args: argparse.Namespace) -> str:
    return getattr(args, "config", None) or os.environ.get("VMBAK_CONFIG") or DEFAULT_CONFIG


# ---------------------------------------------------------------------------- server
def cmd_server(args: argparse.Namespace) -> int:
    from vmbak.server.config import ConfigError, load

    if args.hash_password:
        return _hash_password()
    path = _config_path(args)
    if args.check:
        try:
            cfg = load(path)
            problems = _deep_check(cfg)
        except ConfigError as e:
            problems = e.problems
        if args.json:
            print(json.dumps({"config": os.path.abspath(path), "ok": not problems, "problems": problems}, indent=2))
        else:
            for pr in problems:
                print(f"vmbak: error: {printable(path)}: {printable(pr)}", file=sys.stderr)
            if not problems:
                print(f"{printable(path)}: configuration OK: {_n(len(cfg.jobs), 'job')}, "
                      f"{_n(len(cfg.repositories), 'repository')}")
        return 1 if problems else 0
    cfg = load(path)
    from vmbak.server.main import serve

    return serve(cfg)


def _hash_password() -> int:
    from vmbak.server.passwords import hash_password

    if sys.stdin.isatty():
        import getpass

        pw = getpass.getpass("password for the dashboard user: ")
        if getpass.getpass("the same again: ") != pw:
            raise VmbakError("the two passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if len(pw) < 8:
        raise VmbakError("a dashboard password needs at least 8 characters")
    print(hash_password(pw))
    return 0


def _n(n: int, word: str) -> str:
    return f"{n} {word if n == 1 else word[:-1] + 'ies' if word.endswith('y') else word + 's'}"


def _deep_check(cfg) -> list[str]:  # noqa: ANN001 - a Config
    """What only trying shows: each repository opens with its password; each disk exists."""
    from vmbak.server.service import open_repository

    problems = []
    for key, rc in cfg.repositories.items():
        try:
            open_repository(rc)
        except (VmbakError, OSError) as e:
            problems.append(f"repositories.{key}.location: {e}")
    for key, job in cfg.jobs.items():
        if job.disk and not os.path.exists(job.disk):
            problems.append(f"jobs.{key}.disk: no such file or device: {job.disk}")
        for kind in ("track", "qemu"):
            if job.changes.startswith(f"{kind}:"):
                sock = job.changes.split(":")[1]
                if not os.path.exists(sock):
                    problems.append(f"jobs.{key}.changes: no such socket: {sock} (is the {kind} process running?)")
    return problems


# ---------------------------------------------------------------------------- client
class Client:
    """A small client of the server's API (standard library only)."""

    def __init__(self, args: argparse.Namespace) -> None:
        url = getattr(args, "server", None)
        token_file = getattr(args, "token_file", None)
        cafile = None
        if not url or not token_file:
            from vmbak.server.config import load

            cfg = load(_config_path(args), check_files=False)
            s = cfg.server
            host = f"[{s.host}]" if ":" in s.host else s.host
            if host in ("0.0.0.0", "[::]"):
                host = "127.0.0.1"
            url = url or f"{'https' if s.tls_cert else 'http'}://{host}:{s.port}"
            cafile = s.tls_cert
            if not token_file:
                token_file = s.token_file if os.access(s.token_file, os.R_OK) else s.read_token_file
        if not token_file:
            raise VmbakError("no token: give --token-file FILE, or a configuration whose token file you can read")
        try:
            with open(os.path.expanduser(token_file), encoding="utf-8") as f:
                self.token = f.read().strip()
        except OSError as e:
            raise VmbakError(f"cannot read the token file {token_file}: {e.strerror}") from None
        self.url = url.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=cafile) if self.url.startswith("https") else None

    def call(self, method: str, path: str) -> object:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:  # noqa: S310 - the server's URL
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail")
            except (ValueError, AttributeError):
                detail = None
            raise VmbakError(f"the server answered {e.code}: {detail or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise VmbakError(f"cannot reach the vmbak server at {self.url}: {why} (is 'vmbak server' running?)") \
                from None


def _when(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ") or "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = Client(args).call("GET", "/api/v1/jobs")
    assert isinstance(jobs, list)
    head = ("JOB", "REPOSITORY", "SOURCE", "SCHEDULE", "NEXT RUN", "LAST RUN", "RESULT")
    rows = []
    for j in jobs:
        last = j.get("last_run") or {}
        active = j.get("active") or []
        result = active[0]["state"] if active else (last.get("state") or "never run")
        if not active and last.get("state") == "failed" and last.get("error"):
            result += f": {last['error']}"
        if j.get("stale"):
            result += " (stale)"
        nxt = min((j.get("next_run") or {}).values(), default=None)
        rows.append(tuple(printable(str(c)) for c in (
            j["name"], j["repository"], j["source"], (j.get("schedule") or {}).get("backup", "-"),
            _when(nxt), _when(last.get("ended")), result)))
    widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in [head, *rows]]
    lines.append(_n(len(jobs), "job"))
    emit(args, jobs, "\n".join(lines))
    return 0


FINAL = ("succeeded", "failed", "aborted", "interrupted")


def cmd_jobs_run(args: argparse.Namespace) -> int:
    c = Client(args)
    r = c.call("POST", f"/api/v1/jobs/{urllib.request.quote(args.job, safe='')}/run?kind={args.kind}")
    assert isinstance(r, dict)
    run = r["run"]
    if not args.wait:
        emit(args, run, f"run {run['id']} of job {printable(args.job)} ({args.kind}) queued")
        return 0
    if not args.json and not args.quiet:
        print(f"vmbak: run {run['id']} of job {printable(args.job)} ({args.kind}) queued; waiting", file=sys.stderr)
    delay = 0.2
    while run.get("state") not in FINAL:
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
        run = c.call("GET", f"/api/v1/runs/{run['id']}")
        assert isinstance(run, dict)
    text = (f"run {run['id']} of job {printable(args.job)} {run['state']}"
            + (f": {printable(run['error'])}" if run.get("error") else "")
            + (f"; snapshots {', '.join(s[:8] for s in run['snapshots'])}" if run.get("snapshots") else ""))
    if run["state"] != "succeeded" and not args.json:
        print(f"vmbak: error: {text}", file=sys.stderr)
        return 1
    emit(args, run, text)
    return 0 if run["state"] == "succeeded" else 1
