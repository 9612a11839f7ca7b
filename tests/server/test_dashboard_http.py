"""The dashboard and the new API endpoints over plain HTTP against a real server: login and
sessions, CSRF, read-only sessions, every page behind a login, path traversal refused,
stats over time, the disk list and the OpenAPI description."""

from __future__ import annotations

import io
import re
import tarfile
import urllib.parse

import pytest

pytestmark = pytest.mark.xdist_group("dashboard")

PAGES = ["/", "/jobs", "/runs", "/runs/1", "/runs/1/live", "/disk/main/db", "/static/app.js", "/static/htmx.min.js",
         "/snapshot/main/{sid}", "/snapshot/main/{sid}/download?path=/disk/etc/hostname", "/nowhere"]
API = ["/api/v1/server", "/api/v1/jobs", "/api/v1/runs", "/api/v1/snapshots", "/api/v1/disks", "/api/v1/stats",
       "/api/v1/openapi.json", "/api/v1/snapshots/{sid}/files?path=/", "/api/v1/repositories", "/api/v1/nothing"]


def _session(sp, token: str, user: str = "") -> tuple[str, str]:  # noqa: ANN001
    """Log in through the form (a token, or a user and password); return (cookie, CSRF token)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(sp.url.rsplit(":", 1)[1]), timeout=30)
    conn.request("POST", "/login", urllib.parse.urlencode({"user": user, "token": token, "next": "/jobs"}),
                 {"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("Location") == "/jobs", r.status
    cookie = r.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    sid = cookie.split(";", 1)[0]
    conn.request("GET", "/jobs", headers={"Cookie": sid})
    r = conn.getresponse()
    html = r.read().decode()
    assert r.status == 200
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', html.replace("&#34;", '"'))
    assert csrf, html[:500]
    conn.close()
    return sid, csrf.group(1)


def test_no_page_or_endpoint_answers_without_login(dashboard_server) -> None:  # noqa: ANN001
    sp = dashboard_server.sp
    sid = dashboard_server.db_snapshots[0]
    for p in PAGES:
        p = p.format(sid=sid)
        r = sp.request("GET", p, token=None)
        # a page sends the browser to the login page (followed here: the login form answers)
        assert r.status == 200 and b'action="/login"' in r.body and b"<nav>" not in r.body, p
        r = sp.request("GET", p, token="wrong-token-0123456789")
        assert r.status == 401, p
        r = sp.request("POST", p, token=None)
        assert r.status == 401, p
    for p in API:
        p = p.format(sid=sid)
        assert sp.request("GET", p, token=None).status == 401, p
        assert sp.request("GET", p, token=None, headers={"Cookie": "vmbak_session=forged"}).status == 401, p
    for p in ("/jobs/web/run", f"/snapshot/main/{sid}/restore", "/logout", "/api/v1/jobs/web/run"):
        assert sp.request("POST", p, token=None).status == 401, p
    # a wrong token on the login form: 401, no cookie
    body = urllib.parse.urlencode({"token": "x" * 48}).encode()
    r = sp.request("POST", "/login", token=None, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 401 and "Set-Cookie" not in r.headers and b"not valid" in r.body
    # the right token, but posted by another site's page (login CSRF): refused
    body = urllib.parse.urlencode({"token": sp.admin}).encode()
    r = sp.request("POST", "/login", token=None, data=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"})
    assert r.status == 403 and "set-cookie" not in {k.lower() for k in r.headers}


def test_sessions_csrf_and_read_only(dashboard_server) -> None:  # noqa: ANN001
    sp = dashboard_server.sp
    sid, csrf = _session(sp, sp.admin)
    h = {"Cookie": sid}
    r = sp.request("GET", "/", token=None, headers=h)
    assert r.status == 200 and b"data-disk=\"db\"" in r.body and b"data-disk=\"broken\"" in r.body
    assert "default-src 'self'" in r.headers["content-security-policy"]
    # the failed job is red on the overview
    row = re.search(rb'<tr class="row-bad" data-disk="broken">', r.body)
    assert row, r.body.decode()[:3000]
    # an action without the CSRF header, or with a wrong one: refused; with it: a run starts
    assert sp.request("POST", "/jobs/web/run?kind=verify", token=None, headers=h).status == 403
    assert sp.request("POST", "/jobs/web/run?kind=verify", token=None,
                      headers=h | {"X-CSRF-Token": csrf[:-2] + "xx"}).status == 403
    r = sp.request("POST", "/jobs/web/run?kind=verify", token=None, headers=h | {"X-CSRF-Token": csrf})
    assert r.status == 204 and re.fullmatch(r"/runs/\d+", r.headers["hx-redirect"])
    assert sp.wait_run(int(r.headers["hx-redirect"].rsplit("/", 1)[1]))["state"] == "succeeded"
    # restore a disk from the dashboard's form: a run of (restore), the image byte for byte
    target = dashboard_server.env.dir / "restored.img"
    sid0 = dashboard_server.db_snapshots[-1]
    form = urllib.parse.urlencode({"target": str(target)}).encode()
    fh = h | {"X-CSRF-Token": csrf, "Content-Type": "application/x-www-form-urlencoded"}
    r = sp.request("POST", f"/snapshot/main/{sid0}/restore", token=None, data=form, headers=fh)
    assert r.status == 204, r.body
    run = sp.wait_run(int(r.headers["hx-redirect"].rsplit("/", 1)[1]))
    assert run["state"] == "succeeded" and run["job"] == "(restore)", run
    assert target.read_bytes() == (dashboard_server.env.dir / "db.img").read_bytes()
    bad = urllib.parse.urlencode({"target": "relative/path"}).encode()
    assert sp.request("POST", f"/snapshot/main/{sid0}/restore", token=None, data=bad, headers=fh).status == 400
    # a read-only session: no buttons, 403 on every action even with its CSRF token
    rsid, rcsrf = _session(sp, sp.read)
    rh = {"Cookie": rsid}
    for page in ("/jobs", "/disk/main/db", f"/snapshot/main/{dashboard_server.db_snapshots[0]}"):
        body = sp.request("GET", page, token=None, headers=rh).body
        assert b"hx-post=\"/jobs" not in body and b"restore-form" not in body, page
        body = sp.request("GET", page, token=None, headers=h).body
        assert b"hx-post=\"/jobs" in body or b"restore-form" in body, (page, "\n".join(sp.log[-30:]))
    for p in ("/jobs/web/run", f"/snapshot/main/{dashboard_server.db_snapshots[0]}/restore"):
        assert sp.request("POST", p, token=None, headers=rh | {"X-CSRF-Token": rcsrf}).status == 403, p
    # logging out ends the session
    assert sp.request("POST", "/logout", token=None, headers=h | {"X-CSRF-Token": csrf}).status == 204
    r = sp.request("GET", "/jobs", token=None, headers=h)
    assert b'action="/login"' in r.body


def test_traversal_refused_in_browse_and_download(dashboard_server) -> None:  # noqa: ANN001
    sp = dashboard_server.sp
    sid = dashboard_server.db_snapshots[-1]
    bad = ["/../../etc/passwd", "/etc/../../..", "..", "/etc/hostname/..", "/etc/%00", "\\..\\..\\etc"]
    for path in bad:
        q = urllib.parse.quote(path.replace("%00", "\x00"), safe="")
        for url in (f"/snapshot/main/{sid}?path={q}", f"/snapshot/main/{sid}/download?path={q}",
                    f"/api/v1/snapshots/{sid}/files?path={q}", f"/api/v1/snapshots/{sid}/download?path={q}"):
            r = sp.get(url)
            assert r.status == 400, (url, r.status, r.body[:200])
    # the file itself downloads, through the dashboard and the API alike
    want = dashboard_server.files["etc/hostname"]
    assert sp.get(f"/snapshot/main/{sid}/download?path=/disk/etc/hostname").body == want
    assert sp.get(f"/api/v1/snapshots/{sid}/download?path=/disk/etc/hostname").body == want
    assert sp.get(f"/snapshot/main/{sid}?path=/nothing/here").status == 404
    r = sp.get(f"/snapshot/main/{sid}/download?path=/disk/srv/data")
    assert r.status == 200 and 'filename="data.tar"' in r.headers["content-disposition"], r.body[:300]
    tar = tarfile.open(fileobj=io.BytesIO(r.body))
    got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == {"data/blob.bin": dashboard_server.files["srv/data/blob.bin"],
                   "data/report 2026.txt": dashboard_server.files["srv/data/report 2026.txt"]}


def test_stats_over_time_disks_and_openapi(dashboard_server) -> None:  # noqa: ANN001
    sp = dashboard_server.sp
    st = sp.get("/api/v1/stats?name=db").json()
    pts = st["points"]
    assert [p["id"] for p in pts] == dashboard_server.db_snapshots
    assert [p["type"] for p in pts] == ["full", "incremental", "differential"]
    full = pts[0]
    assert full["read_bytes"] > 0 and full["stored_bytes"] > 0 and full["compression_ratio"] > 1
    assert full["duration_s"] > 0 and full["repository"] == "main"
    assert pts[1]["parent"] == pts[0]["id"] and pts[2]["parent"] == pts[0]["id"]
    assert st["totals"]["snapshots"] == 3
    assert st["totals"]["stored_bytes"] == sum(p["stored_bytes"] for p in pts)
    assert sp.get("/api/v1/stats?name=db&limit=1").json()["points"][0]["id"] == pts[-1]["id"]
    assert sp.get(f"/api/v1/stats?name=db&since={pts[1]['time']}").json()["totals"]["snapshots"] == 2
    disks = {d["name"]: d for d in sp.get("/api/v1/disks").json()}
    assert disks["db"]["snapshots"] == 3 and disks["db"]["last"]["id"] == pts[-1]["id"]
    spec = sp.get("/api/v1/openapi.json", token="read").json()
    for path in ("/api/v1/stats", "/api/v1/disks", "/api/v1/snapshots/{sid}/download", "/api/v1/jobs/{name}/run"):
        assert path in spec["paths"], path
    assert not any(p.startswith("/snapshot/") or p == "/" for p in spec["paths"])  # pages are not API


def test_password_users(dashboard_server) -> None:  # noqa: ANN001
    """[server.users.NAME]: a user name and password open a session with the user's role."""
    sp = dashboard_server.sp
    users = dashboard_server.users
    sid, csrf = _session(sp, users["alice"], user="alice")
    r = sp.request("POST", "/jobs/db/run?kind=verify", token=None, headers={"Cookie": sid, "X-CSRF-Token": csrf})
    assert r.status == 204
    sp.wait_run(int(r.headers["hx-redirect"].rsplit("/", 1)[1]))
    bsid, bcsrf = _session(sp, users["bob"], user="bob")
    assert b"hx-post=\"/jobs" not in sp.request("GET", "/jobs", token=None, headers={"Cookie": bsid}).body
    assert sp.request("POST", "/jobs/db/run", token=None, headers={"Cookie": bsid, "X-CSRF-Token": bcsrf}).status == 403
    for user, pw in (("alice", users["bob"]), ("carol", users["alice"]), ("alice", ""), ("bob", sp.read)):
        body = urllib.parse.urlencode({"user": user, "token": pw}).encode()
        r = sp.request("POST", "/login", token=None, data=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 401 and b"do not match" in r.body and "set-cookie" not in {k.lower() for k in r.headers}


def test_hash_password_and_bad_users(server_env) -> None:  # noqa: ANN001
    import os
    import subprocess
    import sys

    from vmbak.server.passwords import check_password

    cmd = [sys.executable, "-m", "vmbak.cli.main", "server", "--hash-password"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    p = subprocess.run(cmd, input="a fine password\n", capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    h = p.stdout.strip()
    assert h.startswith("scrypt$") and check_password("a fine password", h) and not check_password("a fine passwore", h)
    p = subprocess.run(cmd, input="short\n", capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == "vmbak: error: a dashboard password needs at least 8 characters"
    server_env.write_config(server_env.header() + f'''
[server.users.alice]
password_hash = "{h}"
role = "root"

[server.users.bob]
password_hash = "md5$abc"

[server.users.carol]
role = "read"
''')
    p = server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    text = p.stderr
    assert ": server.users.alice.role: must be admin or read, not 'root'" in text, text
    assert ": server.users.bob.password_hash: must be scrypt$N$r$p$SALT$HASH" in text, text
    assert ": server.users.carol.password_hash: missing: make one with vmbak server --hash-password" in text, text
