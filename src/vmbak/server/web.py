"""The web dashboard: server-rendered pages (Jinja2) with htmx for the buttons and live logs,
and uPlot for the charts. Both are vendored in ``static/`` (see docs/server.md).

Login: the admin or the read-only token, typed into the login page, opens a cookie
session (HttpOnly, SameSite=Strict, Secure under TLS) that carries the token's role.
Every page, static file and action needs a session (or a Bearer token); pages redirect to
/login without one. Actions (POST) need the admin role and, with a cookie session, the
session's CSRF token in the ``X-CSRF-Token`` header (htmx sends it from ``hx-headers``).
Sessions live in memory: a restart or a changed token ends them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
COOKIE = "vmbak_session"
SESSION_S = 12 * 3600
DEFAULT_STALE_H = 26.0
STATIC_FILES = {"htmx.min.js": "text/javascript", "uPlot.iife.min.js": "text/javascript",
                "uPlot.min.css": "text/css", "app.css": "text/css", "app.js": "text/javascript"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
MAX_ROWS = 500  # snapshots drawn on a disk's page (the newest)
# checked against when the user name is unknown, so that a wrong name costs as long as a wrong password
DUMMY_HASH = "scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    role: str
    csrf: str
    fp: str  # the token's (or the user's password hash's) fingerprint: a change (SIGHUP) ends the session
    expires: float
    user: str | None = None  # logged in with a password; None: with a token


class Sessions:
    def __init__(self) -> None:
        self._s: dict[str, Session] = {}

    def new(self, role: str, secret: str, user: str | None = None) -> tuple[str, Session]:
        """A session for ``role``; ``secret`` is the token, or the user's password hash."""
        now = time.time()
        for k in [k for k, s in self._s.items() if s.expires < now]:
            del self._s[k]
        sid = secrets.token_urlsafe(32)
        s = Session(role, secrets.token_urlsafe(32), fingerprint(secret), now + SESSION_S, user)
        self._s[sid] = s
        return sid, s

    def get(self, sid: str | None, cfg) -> Session | None:  # noqa: ANN001 - ServerConfig
        s = self._s.get(sid or "")
        if s is None or s.expires < time.time():
            return None
        if s.user is not None:
            h, role = cfg.users.get(s.user, ("", ""))
            current = h if role == s.role else ""
        else:
            current = cfg.admin_token if s.role == "admin" else cfg.read_token
        if not current or not hmac.compare_digest(fingerprint(current), s.fp):
            self._s.pop(sid or "", None)
            return None
        return s

    def drop(self, sid: str | None) -> None:
        self._s.pop(sid or "", None)


def is_page(path: str) -> bool:
    """A dashboard path (cookie sessions), as opposed to the API and /metrics (Bearer only)."""
    return not (path.startswith("/api/") or path == "/metrics")


# ---------------------------------------------------------------------- formatting
def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def snap_ts(t: str | None) -> float | None:
    if not t:
        return None
    try:
        return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def short_time(t: str | None) -> str:
    ts = snap_ts(t)
    if ts is None:
        return "–"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(t: str | float | None) -> str:
    ts = t if isinstance(t, float | int) else snap_ts(t)
    if ts is None:
        return "never"
    d = time.time() - ts
    if d < 0:
        return "just now"
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= s:
            return f"{d / s:.0f} {unit} ago"
    return f"{d:.0f} s ago"


def duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def install_dashboard(app: FastAPI, service, api) -> None:  # noqa: ANN001, C901 - Service; helpers from app.py
    """Add the dashboard's routes to ``app``. ``api`` carries app.py's helpers:
    ``catalog(key)``, ``find_snapshot``, ``snapshot_files``, ``download_response``, ``safe_path``."""
    env = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")), autoescape=select_autoescape(),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(bytes=human_bytes, time=short_time, ago=ago, duration=duration, urlq=lambda s: quote(s, safe="/"))
    sessions: Sessions = app.state.sessions
    with open(os.path.join(STATIC, "app.css"), encoding="utf-8") as f:
        inline_css = f.read()  # the login page answers without a login, and so cannot load /static/

    def render(request: Request, template: str, status: int = 200, **ctx: object) -> HTMLResponse:
        s: Session | None = getattr(request.state, "session", None)
        ctx.update(role=getattr(request.state, "role", None), csrf=s.csrf if s else "",
                   csrf_json=json.dumps({"X-CSRF-Token": s.csrf if s else ""}), page_path=request.url.path, inline_css=inline_css)
        html = env.get_template(template).render(**ctx)
        return HTMLResponse(html, status_code=status, headers={"Content-Security-Policy": CSP,
                                                               "X-Frame-Options": "DENY",
                                                               "Referrer-Policy": "same-origin",
                                                               "Cache-Control": "no-store"})

    app.state.render_error = lambda request, code, detail: render(request, "error.html", status=code, code=code,
                                                                  detail=detail)

    def stale_hours(job) -> float:  # noqa: ANN001
        if job is not None and job.stale_after_hours is not None:
            return job.stale_after_hours
        h = service.config.notify.stale_after_hours
        return h if h is not None else DEFAULT_STALE_H

    def job_for(repo_key: str, name: str):  # noqa: ANN202
        for j in service.config.jobs.values():
            if j.repository == repo_key and (j.name == name or (j.libvirt and name.startswith(f"{j.name}-"))):
                return j
        return None

    def job_state(key: str) -> dict:
        active = [r for r in service.active.values() if r.job.key == key]
        last = service.history.last_run(key, "backup") or service.history.last_run(key)
        return {"active": active[0].to_json() if active else None, "last": last}

    # ------------------------------------------------------------------ login
    @app.get("/login", include_in_schema=False)
    async def login_page(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002
        return render(request, "login.html", next=_local(next), error=None, user="")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            # a form on another site posting here (login CSRF): browsers send Origin with every form POST
            return render(request, "login.html", status=403, next="/", user="",
                          error="This login came from another site's page; open this server's own login page.")
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        user = (form.get("user") or [""])[0].strip()
        nxt = _local((form.get("next") or ["/"])[0])
        cfg = service.config.server
        role = None
        secret = token
        if user:  # a user name and a password
            import asyncio

            from vmbak.server.passwords import check_password

            h, urole = cfg.users.get(user, (DUMMY_HASH, ""))
            ok = await asyncio.to_thread(check_password, (form.get("token") or [""])[0], h)  # as slow for unknown users
            if ok and urole:
                role, secret = urole, h
        elif token and cfg.admin_token and hmac.compare_digest(token.encode(), cfg.admin_token.encode()):
            role = "admin"
        elif token and cfg.read_token and hmac.compare_digest(token.encode(), cfg.read_token.encode()):
            role = "read"
        if role is None:
            what = "That user name and password do not match." if user else "That token is not valid."
            return render(request, "login.html", status=401, next=nxt, error=what, user=user)
        sid, _s = sessions.new(role, secret, user or None)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(COOKIE, sid, max_age=SESSION_S, httponly=True, samesite="strict", path="/",
                        secure=bool(cfg.tls_cert))
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        sessions.drop(request.cookies.get(COOKIE))
        resp = Response(status_code=204, headers={"HX-Redirect": "/login"})
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        return FileResponse(os.path.join(STATIC, name), media_type=STATIC_FILES[name],
                            headers={"Cache-Control": "private, max-age=3600"})

    # ------------------------------------------------------------------ overview
    @app.get("/", include_in_schema=False)
    def overview(request: Request) -> HTMLResponse:
        now = time.time()
        rows = []
        seen_jobs = set()
        for rkey in sorted(service.config.repositories):
            cat = api.catalog(rkey)
            for name, snaps in sorted(cat.disks().items()):
                last = snaps[-1]
                job = job_for(rkey, name)
                st = job_state(job.key) if job else {"active": None, "last": None}
                if job:
                    seen_jobs.add(job.key)
                ts = snap_ts(last["time"]) or 0
                stale = now - ts > stale_hours(job) * 3600
                failed = bool(st["last"] and st["last"]["state"] in ("failed", "aborted"))
                rows.append({"repo": rkey, "name": name, "job": job.key if job else None, "count": len(snaps),
                             "last": last, "stale": stale, "failed": failed, "run": st["last"],
                             "active": st["active"]})
        for key, job in sorted(service.config.jobs.items()):
            if key in seen_jobs or job.libvirt:
                continue
            st = job_state(key)
            rows.append({"repo": job.repository, "name": job.name, "job": key, "count": 0, "last": None,
                         "stale": now - service.started > stale_hours(job) * 3600,
                         "failed": bool(st["last"] and st["last"]["state"] in ("failed", "aborted")),
                         "run": st["last"], "active": st["active"]})
        errors = {k: api.catalog(k).error for k in service.config.repositories if api.catalog(k).error}
        bad = sum(1 for r in rows if r["failed"] or r["stale"])
        return render(request, "overview.html", rows=rows, errors=errors, bad=bad,
                      repos=sorted(service.config.repositories), running=len(service.active))

    # ------------------------------------------------------------------ one disk
    @app.get("/disk/{repo}/{name}", include_in_schema=False)
    def disk_page(request: Request, repo: str, name: str) -> HTMLResponse:
        if repo not in service.config.repositories:
            raise HTTPException(404, f"no repository {repo!r}")
        snaps = api.catalog(repo).disks().get(name)
        job = job_for(repo, name)
        if not snaps and job is None:
            raise HTTPException(404, f"no disk {name!r} in repository {repo!r}")
        snaps = list(reversed(snaps or []))[:MAX_ROWS]  # newest first
        series = {"t": [], "stored": [], "read": [], "dedup": [], "compression": [], "duration": []}
        for e in reversed(snaps):
            series["t"].append(snap_ts(e["time"]))
            series["stored"].append(e["stored_bytes"])
            series["read"].append(e["read_bytes"])
            series["dedup"].append(e["dedup_ratio"])
            series["compression"].append(e["compression_ratio"])
            series["duration"].append(e["duration_s"])
        return render(request, "disk.html", repo=repo, name=name, snaps=snaps, job=job,
                      chain=_chain_svg(snaps), series=json.dumps(series), total=len(snaps),
                      runs=service.history.runs(job.key, 10) if job else [])

    # ------------------------------------------------------------------ a snapshot: files
    @api.vmbak_errors
    def browse(repo: str, sid: str, path: str) -> dict:
        path = api.safe_path(path)
        k, m, files = api.snapshot_files(sid, repo)
        entry = api.catalog(k).get(m.id)
        node, entries = files.listdir(path)
        if node.kind != "dir":
            raise HTTPException(400, f"{path} is a {node.kind}, not a directory")
        listing = sorted(entries, key=lambda pe: (pe[1].kind != "dir", pe[1].name))
        crumbs = []
        acc = ""
        for part in [p for p in path.split("/") if p]:
            acc += "/" + part
            crumbs.append((part, acc))
        chain = api.catalog(k).chain(entry) if entry else []
        return {"repo": k, "m": m, "entry": entry, "path": path, "crumbs": crumbs, "chain": chain,
                "entries": [e.to_json(p) for p, e in listing], "problems": files.problems, "job": job_for(k, m.name)}

    @app.get("/snapshot/{repo}/{sid}", include_in_schema=False)
    def snapshot_page(request: Request, repo: str, sid: str, path: str = "/") -> HTMLResponse:
        return render(request, "snapshot.html", **browse(repo, sid, path))

    @app.get("/snapshot/{repo}/{sid}/download", include_in_schema=False)
    def snapshot_download(repo: str, sid: str, path: str) -> Response:
        return api.download_response(sid, path, repo)

    @app.post("/snapshot/{repo}/{sid}/restore", include_in_schema=False)
    async def snapshot_restore(request: Request, repo: str, sid: str) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        target = (form.get("target") or [""])[0].strip()
        overwrite = (form.get("overwrite") or [""])[0] in ("on", "1", "true")
        if not target.startswith("/") or "\x00" in target:
            return HTMLResponse('<p class="err">The target must be an absolute path on the server.</p>',
                                status_code=400)
        if service.stopping:
            raise HTTPException(503, "the server is stopping")
        if repo not in service.config.repositories:
            raise HTTPException(404, f"no repository {repo!r}")
        entry = api.catalog(repo).get(sid)
        if entry is None:
            raise HTTPException(404, f"no snapshot {sid!r}")
        run = service.enqueue_restore(repo, entry["id"], entry["name"], target, overwrite, None)
        return Response(status_code=204, headers={"HX-Redirect": f"/runs/{run.id}"})

    # ------------------------------------------------------------------ jobs and runs
    @app.get("/jobs", include_in_schema=False)
    def jobs_page(request: Request) -> HTMLResponse:
        jobs = []
        for key, job in sorted(service.config.jobs.items()):
            st = job_state(key)
            jobs.append({"key": key, "job": job, "next": service.next_runs(key), **st})
        return render(request, "jobs.html", jobs=jobs)

    @app.post("/jobs/{name}/run", include_in_schema=False)
    async def job_run(name: str, kind: str = "backup") -> Response:
        if name not in service.config.jobs:
            raise HTTPException(404, f"no job {name!r}")
        if kind not in ("backup", "prune", "verify"):
            raise HTTPException(400, "kind is backup, prune or verify")
        if service.stopping:
            raise HTTPException(503, "the server is stopping")
        run, other = service.enqueue(name, kind, "manual", None)
        return Response(status_code=204, headers={"HX-Redirect": f"/runs/{(run or other).id}"})

    @app.get("/runs", include_in_schema=False)
    def runs_page(request: Request, job: str | None = None, before: int | None = None) -> HTMLResponse:
        runs = service.history.runs(job, 50, before)
        for d in runs:
            r = service.active.get(d["id"])
            if r is not None:
                d.update(r.to_json())
        return render(request, "runs.html", runs=runs, job=job, jobs=sorted(service.config.jobs),
                      older=runs[-1]["id"] if len(runs) == 50 else None)

    def run_data(rid: int) -> dict:
        r = service.active.get(rid)
        if r is not None:
            d = r.to_json()
            d["log"] = list(r.log)
            d["live"] = True
            return d
        d = service.history.run(rid, with_log=True)
        if d is None:
            raise HTTPException(404, f"no run {rid}")
        d["live"] = False
        return d

    @app.get("/runs/{rid}", include_in_schema=False)
    def run_page(request: Request, rid: int) -> HTMLResponse:
        return render(request, "run.html", run=run_data(rid))

    @app.get("/runs/{rid}/live", include_in_schema=False)
    def run_live(request: Request, rid: int) -> HTMLResponse:
        return render(request, "run_live.html", run=run_data(rid))


def _local(url: str) -> str:
    """Only same-site paths after login (no open redirect)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


KIND_CLASS = {"full": "full", "incremental": "inc", "differential": "diff", "synthetic-full": "syn"}
ROW_H = 36


def _chain_svg(snaps: list[dict]) -> dict:
    """Where to draw each snapshot (newest first, one row each) and the lines to its parent."""
    row = {e["id"]: i for i, e in enumerate(snaps)}
    nodes, edges = [], []
    for i, e in enumerate(snaps):
        y = i * ROW_H + ROW_H // 2
        nodes.append({"y": y, "cls": KIND_CLASS.get(e["type"], "inc"), "full": e["type"] in ("full", "synthetic-full")})
        p = row.get(e["parent"] or "")
        if p is None:
            if e["parent"]:  # the parent is older than the rows drawn
                edges.append({"d": f"M14 {y} L14 {len(snaps) * ROW_H}", "cls": "far"})
            continue
        py = p * ROW_H + ROW_H // 2
        if p == i + 1:
            edges.append({"d": f"M14 {y} L14 {py}", "cls": "near"})
        else:  # a differential (or a parent further down): an arc to the right
            bulge = min(14 + 8 + 4 * (p - i), 56)
            edges.append({"d": f"M14 {y} C{bulge} {y} {bulge} {py} 14 {py}", "cls": "arc"})
    return {"nodes": nodes, "edges": edges, "height": len(snaps) * ROW_H, "row": ROW_H}
