"""The HTTP API (FastAPI): JSON under /api/v1/, Prometheus metrics at /metrics.

Every request needs ``Authorization: Bearer TOKEN``: the admin token for anything that
changes something (any method but GET and HEAD), the admin or the read-only token
otherwise. /metrics alone answers without a token, and only to loopback clients unless
``metrics_public`` is set. Repository reads (snapshots, files) run in worker threads
through the library; the job state is read in the event loop, where the scheduler
changes it. The OpenAPI description is at /api/v1/openapi.json (a token is needed).
"""

from __future__ import annotations

import hmac
import tarfile
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.middleware.base import BaseHTTPMiddleware

from vmbak import __version__
from vmbak.errors import SnapshotNotFound, VmbakError
from vmbak.repo.backend import ObjectMissing
from vmbak.server.config import is_loopback

READ_METHODS = ("GET", "HEAD")


class RestoreRequest(BaseModel):
    """Where to restore a snapshot: a path on the server (a new file, or with overwrite an
    existing file or block device), and optionally an image format (raw, qcow2, vhdx, vpc, vmdk)."""

    target: str
    overwrite: bool = False
    format: str | None = None


def _check_token(given: str, expected: str | None) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())  # type: ignore[union-attr]


class AuthMiddleware(BaseHTTPMiddleware):
    """401 without a valid token, 403 for a read-only token on a request that changes something.

    The API and /metrics take ``Authorization: Bearer TOKEN`` only. Dashboard pages take a
    Bearer token or a cookie session (vmbak/server/web.py): without one, a page redirects
    to /login (the one path that answers without a login), anything else answers 401. A
    request that changes something with a cookie session needs the session's CSRF token in
    the ``X-CSRF-Token`` header.
    """

    async def dispatch(self, request: Request, call_next):  # noqa: ANN001, ANN201
        from vmbak.server.web import COOKIE, is_page

        svc = request.app.state.service
        cfg = svc.config.server
        path = request.url.path
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        role = None
        session = None
        if token and _check_token(token, cfg.admin_token):
            role = "admin"
        elif token and _check_token(token, cfg.read_token):
            role = "read"
        if path == "/metrics" and role is None:
            client = request.client.host if request.client else ""
            if cfg.metrics_public or is_loopback(client):
                role = "metrics"
        page = is_page(path)
        if page and role is None and not token:
            if path == "/login":
                request.state.role = None
                return await call_next(request)
            session = request.app.state.sessions.get(request.cookies.get(COOKIE), cfg)
            if session is not None:
                role = session.role
        if role is None:
            if page and not token and request.method in READ_METHODS and not request.headers.get("hx-request"):
                from urllib.parse import quote

                target = path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            headers = {"WWW-Authenticate": "Bearer"}
            if page:
                headers["HX-Redirect"] = "/login"
            return JSONResponse({"detail": "a valid token is needed: Authorization: Bearer TOKEN"}, status_code=401,
                                headers=headers)
        if request.method not in READ_METHODS and role != "admin":
            return JSONResponse({"detail": "this token may only read; starting or stopping jobs needs the admin "
                                 "token"}, status_code=403)
        if session is not None and request.method not in READ_METHODS:
            given = request.headers.get("x-csrf-token", "")
            if not given or not hmac.compare_digest(given.encode(), session.csrf.encode()):
                return JSONResponse({"detail": "the CSRF token is missing or wrong: reload the page"},
                                    status_code=403)
        request.state.role = role
        request.state.session = session
        return await call_next(request)


def _safe_path(path: str) -> str:
    if "\x00" in path:
        raise HTTPException(400, "a path may not contain NUL")
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        raise HTTPException(400, "'..' is not allowed in paths (path traversal refused)")
    return "/" + "/".join(p for p in parts if p and p != ".")


def create_app(service) -> FastAPI:  # noqa: ANN001, C901 - a Service; one function holds the routes
    """The FastAPI application serving ``service``."""
    app = FastAPI(title="vmbak server", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json",
                  description="vmbak's HTTP API. Every endpoint needs `Authorization: Bearer TOKEN`; "
                  "changes need the admin token. See docs/server.md.")
    from vmbak.server.catalog import RepoCatalog
    from vmbak.server.web import Sessions, install_dashboard

    app.state.service = service
    app.state.sessions = Sessions()
    app.add_middleware(AuthMiddleware)
    repos = service.repos
    catalogs: dict[tuple, RepoCatalog] = {}

    def catalog(key: str) -> RepoCatalog:
        """The in-memory snapshot catalog of the configured repository ``key`` (server/catalog.py)."""
        rc = service.config.repositories.get(key)
        if rc is None:
            raise HTTPException(404, f"no repository {key!r}")
        ck = (rc.location, rc.password_file, rc.s3_endpoint)
        c = catalogs.get(ck)
        if c is None:
            c = catalogs[ck] = RepoCatalog(lambda: repos.get(service.config.repositories[key]))
        return c

    def invalidate(_record: dict) -> None:
        for c in catalogs.values():
            c.invalidate()

    service.on_finish.append(invalidate)

    def warm() -> None:  # read every manifest once, in the background, before the first page asks
        for k in list(service.config.repositories):
            catalog(k).entries()

    threading.Thread(target=warm, name="vmbak-catalog", daemon=True).start()

    def job_json(key: str) -> dict:
        job = service.config.jobs[key]
        last = service.history.last_run(key)
        last_backup = service.history.last_run(key, "backup")
        active = [r.to_json() for r in service.active.values() if r.job.key == key]
        ls = service.last_success(job)
        return {"name": key, "snapshot_name": job.name, "repository": job.repository, "source": job.source_text(),
                "enabled": job.enabled, "schedule": job.schedules(), "keep": job.keep, "mode": job.mode,
                "next_run": service.next_runs(key), "last_run": last, "last_backup": last_backup,
                "last_success": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ls)) if ls else None,
                "stale": key in service.stale_notified, "active": active}

    def run_json(rid: int) -> dict:
        r = service.active.get(rid)
        if r is not None:
            d = r.to_json()
            d["log"] = list(r.log)
            return d
        d = service.history.run(rid, with_log=True)
        if d is None:
            raise HTTPException(404, f"no run {rid}")
        return d

    def find_snapshot(sid: str, repository: str | None):  # noqa: ANN202 - (key, Repository, Manifest)
        keys = [repository] if repository else list(service.config.repositories)
        if repository and repository not in service.config.repositories:
            raise HTTPException(404, f"no repository {repository!r}")
        found = []
        for k in keys:
            repo = repos.get(service.config.repositories[k])
            ids = catalog(k).match(sid)  # an id (prefix) the catalog knows: read that manifest alone
            if len(ids) == 1:
                try:
                    found.append((k, repo, repo.load_manifest(ids[0])))
                    continue
                except (ObjectMissing, VmbakError):
                    pass  # forgotten meanwhile, or damaged: as the library says below
            try:
                found.append((k, repo, repo.find(sid)))
            except SnapshotNotFound:
                continue
        if not found:
            raise HTTPException(404, f"no snapshot {sid!r}")
        if len(found) > 1:
            raise HTTPException(409, f"snapshot {sid!r} is in several repositories; give ?repository=")
        return found[0]

    def vmbak_errors(fn):  # noqa: ANN001, ANN202
        import functools

        @functools.wraps(fn)
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            try:
                return fn(*a, **kw)
            except HTTPException:
                raise
            except SnapshotNotFound as e:
                raise HTTPException(404, str(e)) from None
            except VmbakError as e:
                from vmbak.serve.files import BrowseError

                msg = str(e)
                code = 500  # the repository cannot be read, damaged data, ...
                if isinstance(e, BrowseError):  # a path inside a snapshot
                    code = 404 if "no such file" in msg else 400 if any(
                        w in msg for w in ("not allowed", "is a directory", "not a regular file", "not a directory")
                    ) else 422  # exists, but its filesystem or entry cannot be read
                raise HTTPException(code, msg) from None
        return wrapper

    # ------------------------------------------------------------------ server and jobs
    @app.get("/api/v1/server", summary="The server: version, start time, jobs, runs")
    async def server_info() -> dict:
        return {"version": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(service.started)),
                "jobs": len(service.config.jobs), "repositories": sorted(service.config.repositories),
                "running": [r.id for r in service.active.values() if r.state == "running"],
                "queued": [r.id for r in service.queue], "max_concurrent_jobs": service.config.server.max_concurrent_jobs}

    @app.get("/api/v1/jobs", summary="Every job: schedule, next run, last run, last success")
    async def list_jobs() -> list[dict]:
        return [job_json(k) for k in sorted(service.config.jobs)]

    @app.get("/api/v1/jobs/{name}", summary="One job")
    async def get_job(name: str) -> dict:
        if name not in service.config.jobs:
            raise HTTPException(404, f"no job {name!r}")
        return job_json(name)

    @app.post("/api/v1/jobs/{name}/run", status_code=202, summary="Run a job now (admin)")
    async def run_job(name: str, kind: str = Query("backup", pattern="^(backup|prune|verify)$")) -> JSONResponse:
        if name not in service.config.jobs:
            raise HTTPException(404, f"no job {name!r}")
        if service.stopping:
            raise HTTPException(503, "the server is stopping")
        run, other = service.enqueue(name, kind, "manual", None)
        if run is None:
            return JSONResponse({"detail": f"job {name} {kind} is already {other.state} (run {other.id})",
                                 "run": other.to_json()}, status_code=409)
        return JSONResponse({"run": run.to_json()}, status_code=202)

    @app.get("/api/v1/runs", summary="Runs, newest first")
    async def list_runs(job: str | None = None, limit: int = Query(100, ge=1, le=1000),
                        before: int | None = None) -> list[dict]:
        out = service.history.runs(job, limit, before)
        for d in out:
            r = service.active.get(d["id"])
            if r is not None:
                d.update(r.to_json())
        return out

    @app.get("/api/v1/runs/{rid}", summary="One run, with its log lines")
    async def get_run(rid: int) -> dict:
        return run_json(rid)

    @app.post("/api/v1/runs/{rid}/abort", summary="Abort a queued or running run cleanly (admin)")
    async def abort_run(rid: int) -> dict:
        r = service.active.get(rid)
        if r is None:
            raise HTTPException(409, f"run {rid} is not queued or running")
        await service.abort(r, "aborted through the API")
        return {"run": rid, "aborting": True}

    # ------------------------------------------------------------------ repositories and snapshots
    @app.get("/api/v1/repositories", summary="Configured repositories and what the server last saw of them")
    async def list_repositories() -> list[dict]:
        out = []
        for k, rc in sorted(service.config.repositories.items()):
            info = service.repo_info.get(k, {})
            out.append({"name": k, "location": rc.location, "size_bytes": info.get("size"),
                        "snapshots": info.get("snapshots"), "error": info.get("error"),
                        "jobs": sorted(j.key for j in service.config.jobs.values() if j.repository == k)})
        return out

    @app.get("/api/v1/repositories/{name}/stats", summary="A repository's statistics (vmbak stats)")
    @vmbak_errors
    def repository_stats(name: str) -> dict:
        from vmbak.engine.info import repo_stats

        rc = service.config.repositories.get(name)
        if rc is None:
            raise HTTPException(404, f"no repository {name!r}")
        return repo_stats(repos.get(rc))

    @app.get("/api/v1/snapshots", summary="Snapshots, oldest first, in every repository (or one)")
    @vmbak_errors
    def list_snapshots(repository: str | None = None, name: str | None = None) -> JSONResponse:
        keys = [repository] if repository else sorted(service.config.repositories)
        out = []
        for k in keys:
            rc = service.config.repositories.get(k)
            if rc is None:
                raise HTTPException(404, f"no repository {k!r}")
            for e in catalog(k).entries():
                if name is None or e["name"] == name:
                    out.append(e["summary"] | {"repository": k})
        return JSONResponse(out)  # 5,000 plain dicts: no per-field encoding pass

    @app.get("/api/v1/snapshots/{sid}", summary="One snapshot, its statistics and its chain")
    @vmbak_errors
    def get_snapshot(sid: str, repository: str | None = None) -> dict:
        from vmbak.engine.info import snapshot_stats

        k, repo, m = find_snapshot(sid, repository)
        st = snapshot_stats(repo, m)
        return st["snapshot"] | {"repository": k, "stats": st["stats"],
                                 "chain": [{"id": c.id, "type": c.kind, "time": c.time} for c in repo.chain(m)]}

    def snapshot_files(sid: str, repository: str | None):  # noqa: ANN202
        from vmbak.engine.view import SnapshotView
        from vmbak.serve.files import SnapshotFiles

        k, repo, m = find_snapshot(sid, repository)
        return k, m, SnapshotFiles(SnapshotView(repo, m))

    @app.post("/api/v1/snapshots/{sid}/restore", status_code=202,
              summary="Restore a snapshot to a path on the server (admin); a run of the job '(restore)'")
    @vmbak_errors
    def restore_snapshot(sid: str, body: RestoreRequest, repository: str | None = None) -> JSONResponse:
        if "\x00" in body.target or not body.target.startswith("/"):
            raise HTTPException(400, "target must be an absolute path on the server")
        k, _repo, m = find_snapshot(sid, repository)
        if service.stopping:
            raise HTTPException(503, "the server is stopping")
        run = service.loop_call(service.enqueue_restore, k, m.id, m.name, body.target, body.overwrite, body.format)
        return JSONResponse({"run": run.to_json()}, status_code=202)

    @app.get("/api/v1/snapshots/{sid}/files", summary="List a directory (or describe a file) inside a snapshot")
    @vmbak_errors
    def list_files(sid: str, path: str = "/", repository: str | None = None) -> dict:
        path = _safe_path(path)
        k, m, files = snapshot_files(sid, repository)
        node, entries = files.listdir(path)
        return {"snapshot": m.id, "repository": k, "path": path, "type": node.kind,
                "entries": [e.to_json(p) for p, e in entries] if node.kind == "dir" else [],
                "entry": None if node.kind == "dir" else node.to_json(path),
                "problems": [{"path": p, "why": w} for p, w in files.problems]}

    @vmbak_errors
    def download_response(sid: str, path: str, repository: str | None) -> Response:
        path = _safe_path(path)
        _k, m, files = snapshot_files(sid, repository)
        fs, _vol, node, norm = files.resolve(path)
        name = norm.rstrip("/").rsplit("/", 1)[-1] or m.name
        if fs is not None and node.kind == "file":
            return StreamingResponse((piece for _off, piece in files.pieces(fs, node, norm)),
                                     media_type="application/octet-stream",
                                     headers={"Content-Length": str(node.size),
                                              "Content-Disposition": _attachment(name)})
        if node.kind != "dir":
            raise HTTPException(400, f"{norm} is a {node.kind}: only files and directories can be downloaded")
        return StreamingResponse(_tar_stream(files, norm), media_type="application/x-tar",
                                 headers={"Content-Disposition": _attachment(f"{name}.tar")})

    @app.get("/api/v1/snapshots/{sid}/download",
             summary="Download a file, or a directory as a tar stream, out of a snapshot")
    def download(sid: str, path: str, repository: str | None = None) -> Response:
        return download_response(sid, path, repository)

    # ------------------------------------------------------------------ stats over time
    @app.get("/api/v1/disks", summary="Every disk name in every repository: snapshot count, newest snapshot")
    @vmbak_errors
    def list_disks(repository: str | None = None) -> list[dict]:
        keys = [repository] if repository else sorted(service.config.repositories)
        out = []
        for k in keys:
            for name, snaps in sorted(catalog(k).disks().items()):
                last = snaps[-1]
                out.append({"repository": k, "name": name, "snapshots": len(snaps), "first": snaps[0]["time"],
                            "last": {f: last[f] for f in ("id", "time", "type", "used_bytes", "data_bytes", "stored_bytes",
                                                          "consistency", "guest")}})
        return out

    @app.get("/api/v1/stats", summary="Per-snapshot figures over time: bytes read and stored, ratios, durations")
    @vmbak_errors
    def stats_over_time(repository: str | None = None, name: str | None = None,
                        since: str | None = None, limit: int = Query(10000, ge=1, le=100000)) -> JSONResponse:
        keys = [repository] if repository else sorted(service.config.repositories)
        points = []
        for k in keys:
            for e in catalog(k).entries():
                if (name is None or e["name"] == name) and (since is None or e["time"] >= since):
                    points.append({"repository": k} | {f: e[f] for f in STATS_FIELDS})
        points.sort(key=lambda p: (p["time"], p["id"]))
        totals = {"snapshots": len(points), "read_bytes": sum(p["read_bytes"] for p in points),
                  "stored_bytes": sum(p["stored_bytes"] for p in points),
                  "duration_s": round(sum(p["duration_s"] or 0 for p in points), 3)}
        return JSONResponse({"points": points[-limit:], "truncated": len(points) > limit, "totals": totals})

    # ------------------------------------------------------------------ metrics
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from vmbak.server.metrics import registry

    reg = registry(service)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics() -> Response:
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    class _Helpers:
        pass

    h = _Helpers()
    h.catalog, h.find_snapshot, h.snapshot_files = catalog, find_snapshot, vmbak_errors(snapshot_files)
    h.download_response, h.safe_path, h.vmbak_errors = download_response, _safe_path, vmbak_errors
    install_dashboard(app, service, h)

    from fastapi.exception_handlers import http_exception_handler

    @app.exception_handler(HTTPException)
    async def page_errors(request: Request, exc: HTTPException) -> Response:
        from vmbak.server.web import is_page

        if is_page(request.url.path) and request.method in READ_METHODS and "text/html" in request.headers.get(
                "accept", ""):
            return app.state.render_error(request, exc.status_code, str(exc.detail))
        return await http_exception_handler(request, exc)

    return app


STATS_FIELDS = ("id", "name", "time", "type", "parent", "disk_size", "used_bytes", "data_bytes", "read_bytes", "changed_bytes",
                "new_raw_bytes", "stored_bytes", "dedup_bytes", "compression_ratio", "dedup_ratio", "duration_s",
                "consistency", "guest")


def _attachment(name: str) -> str:
    """A Content-Disposition for any file name: an ASCII fallback and the exact name (RFC 6266)."""
    from urllib.parse import quote

    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name.encode('utf-8', 'surrogateescape'), safe='')}"


def _tar_stream(files, top: str) -> Iterator[bytes]:  # noqa: ANN001 - SnapshotFiles
    """A directory of a snapshot as a tar stream (POSIX pax), written as it is read: each
    file streams in pieces, so memory stays small whatever the file sizes."""
    base = top.rstrip("/").rsplit("/", 1)[-1] or "snapshot"

    def arcname(p: str) -> str:
        rel = p[len(top.rstrip("/")):].lstrip("/")
        return f"{base}/{rel}" if rel else base

    def header(p: str, node) -> tarfile.TarInfo:  # noqa: ANN001
        ti = tarfile.TarInfo(arcname(p))
        ti.mode = node.mode & 0o7777
        ti.mtime = node.mtime_ns // 1_000_000_000 if node.mtime_ns else 0
        return ti

    fs, _vol, node, norm = files.resolve(top)
    if fs is None:  # a virtual directory (the volumes): walk each volume
        walks = []
        for path, _e in files.listdir(norm)[1]:
            sub_fs, _v, sn, snorm = files.resolve(path)
            walks.append((sub_fs, sn, snorm))
    else:
        walks = [(fs, node, norm)]
    for wfs, wnode, wpath in walks:
        if wfs is None:
            continue
        for p, n in files.walk(wfs, wnode, wpath):
            ti = header(p, n)
            if n.kind == "dir":
                ti.type = tarfile.DIRTYPE
                yield ti.tobuf(tarfile.PAX_FORMAT)
            elif n.kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = n.target or ""
                yield ti.tobuf(tarfile.PAX_FORMAT)
            elif n.kind == "file":
                ti.type = tarfile.REGTYPE
                ti.size = n.size
                yield ti.tobuf(tarfile.PAX_FORMAT)
                sent = 0
                try:
                    for _off, piece in files.pieces(wfs, n, p):
                        sent += len(piece)
                        yield piece
                except VmbakError:
                    pass  # the header promised n.size bytes: pad with zeros (the problem is logged)
                if sent < n.size:
                    yield bytes(n.size - sent)
                if n.size % tarfile.BLOCKSIZE:
                    yield bytes(tarfile.BLOCKSIZE - n.size % tarfile.BLOCKSIZE)
    yield bytes(tarfile.BLOCKSIZE * 2)

