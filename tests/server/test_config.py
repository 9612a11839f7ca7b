"""vmbak server --check and the refusals at start: one line per problem, with its key path."""

from __future__ import annotations

import os

MINIMAL = '''[server]
listen = "127.0.0.1:8420"
token_file = "/etc/vmbak/admin.token"        # admin: may start jobs
read_token_file = "/etc/vmbak/read.token"    # optional: read-only

[repositories.main]
location = "/backups/repo"                   # or s3:...
password_file = "/etc/vmbak/password"

[jobs.web]
repository = "main"
disk = "/var/lib/images/web.raw"             # or libvirt = "web-*", or changes = "track:/run/vmbak/web.sock"
name = "web"
schedule = "0 2 * * *"
keep = { last = 7, daily = 14 }
'''


def _problems(p) -> list[str]:  # noqa: ANN001
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert all(line.startswith("vmbak: error: ") for line in lines), p.stderr
    return lines


def test_minimal_config_as_written(server_env, make_repo, make_disk) -> None:
    """The issue's minimal configuration parses as written: on this machine only its files are missing."""
    server_env.write_config(MINIMAL)
    lines = _problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False))
    keys = sorted(line.split(": ")[3] for line in lines)
    missing = {"server.token_file", "server.read_token_file", "repositories.main.password_file"}
    assert set(keys) >= missing, lines
    assert set(keys) <= missing | {"repositories.main.location", "jobs.web.disk"}, lines
    # the same text with this test's files in place of /etc/vmbak, /backups and /var/lib/images
    repo = make_repo("aes-256-gcm", password="correct horse battery staple")
    disk = make_disk("web.raw", 1 << 20)
    text = (MINIMAL.replace("/etc/vmbak/admin.token", "admin.token").replace("/etc/vmbak/read.token", "read.token")
            .replace("/etc/vmbak/password", "password").replace("/backups/repo", str(repo.path))
            .replace("/var/lib/images/web.raw", str(disk.path)))
    server_env.write_config(text)
    p = server_env.vmbak("server", "--config", str(server_env.config), "--check")
    assert "configuration OK: 1 job, 1 repository" in p.stdout
    p = server_env.vmbak("server", "--config", str(server_env.config), "--check", "--json")
    assert '"ok": true' in p.stdout


def test_bad_config_one_line_per_problem(server_env) -> None:
    server_env.write_config(server_env.header(max_concurrent_jobs=0) + '''
[repositories.main]
location = "repo"
password_file = "password"
colour = "blue"

[jobs.a]
repository = "nowhere"
disk = "a.raw"
schedule = "61 * * * *"
keep = { last = 7, fortnightly = 2 }

[jobs.b]
repository = "main"
schedule = "0 2 * *"

[jobs.c]
repository = "main"
disk = "c.raw"
libvirt = "c"
mode = "sideways"
before = 3

[notify]
webhook = "ftp://example"
''')
    lines = _problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False))
    text = "\n".join(lines)
    for key in ("server.max_concurrent_jobs", "repositories.main.colour", "jobs.a.repository", "jobs.a.schedule",
                "jobs.a.keep.fortnightly", "jobs.b:", "jobs.b.schedule", "jobs.c:", "jobs.c.mode", "jobs.c.before", "notify.webhook"):
        assert f": {key}" in text, (key, text)
    # the server refuses to start on the same file, with one line naming the first problem
    p = server_env.vmbak("server", "--config", str(server_env.config), check=False)
    assert len(_problems(p)) == 1 and "more problems; see vmbak server --check" in p.stderr


def test_world_readable_files_refused(server_env, make_repo, make_disk) -> None:
    repo = make_repo("none")
    disk = make_disk("d.raw", 1 << 20)
    server_env.write_config(server_env.header() + f'''
[repositories.main]
location = "{repo.path}"

[jobs.d]
repository = "main"
disk = "{disk.path}"
''')
    server_env.vmbak("server", "--config", str(server_env.config), "--check")
    for f in (server_env.config, server_env.dir / "admin.token", server_env.dir / "read.token"):
        os.chmod(f, 0o644)
        p = server_env.vmbak("server", "--config", str(server_env.config), check=False)
        lines = _problems(p)
        assert len(lines) == 1 and "readable by every user" in lines[0] and f.name in lines[0], lines
        os.chmod(f, 0o600)
    # a short token is refused too
    (server_env.dir / "read.token").write_text("short\n")
    lines = _problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False))
    assert "server.read_token_file" in lines[0] and "at least 16 characters" in lines[0]


def test_listen_not_loopback_needs_allow_remote(server_env, make_repo) -> None:
    repo = make_repo("none")
    text = server_env.header().replace(f"127.0.0.1:{server_env.port}", "0.0.0.0:8420") + f'''
[repositories.main]
location = "{repo.path}"
'''
    server_env.write_config(text)
    lines = _problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False))
    assert "server.listen" in lines[0] and "allow_remote" in lines[0]
    server_env.write_config(text.replace("[server]\n", "[server]\nallow_remote = true\n"))
    server_env.vmbak("server", "--config", str(server_env.config), "--check")


def test_jobs_without_a_server(server_env, make_repo) -> None:
    repo = make_repo("none")
    server_env.write_config(server_env.header() + f'\n[repositories.main]\nlocation = "{repo.path}"\n')
    p = server_env.vmbak("jobs", "--config", str(server_env.config), check=False)
    lines = _problems(p)
    assert len(lines) == 1 and "cannot reach the vmbak server" in lines[0]
    p = server_env.vmbak("jobs", "run", "x", "--config", str(server_env.config), check=False)
    assert len(_problems(p)) == 1


def test_s3_bandwidth_limits_in_the_config(server_env) -> None:
    """s3_limit_upload / s3_limit_download: KiB/s, 0 or more, on S3 repositories only; the
    jobs' children get them as $VMBAK_S3_LIMIT_UPLOAD / _DOWNLOAD."""
    from vmbak.server.config import load
    from vmbak.server.jobs import child_env

    server_env.write_config(server_env.header() + '''
[repositories.local]
location = "repo"
s3_limit_upload = 1024

[repositories.cloud]
location = "s3:bucket/prefix"
s3_limit_upload = -5
s3_limit_download = "fast"
''')
    lines = _problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False))
    text = "\n".join(lines)
    assert ": repositories.local.s3_limit_upload: goes with an s3:BUCKET/PREFIX location" in text, text
    assert ": repositories.cloud.s3_limit_upload: must be 0 (no limit) or more KiB/s, not -5" in text, text
    assert ": repositories.cloud.s3_limit_download: must be a number, not 'fast'" in text, text
    server_env.write_config(server_env.header() + '''
[repositories.cloud]
location = "s3:bucket/prefix"
s3_limit_upload = 2048
s3_limit_download = 512.5
''')
    cfg = load(str(server_env.config))
    env = child_env(cfg.repositories["cloud"])
    assert env["VMBAK_S3_LIMIT_UPLOAD"] == "2048" and env["VMBAK_S3_LIMIT_DOWNLOAD"] == "512.5"


def test_job_tags_and_keep_within_and_tag(server_env, make_repo, make_disk) -> None:
    """A job's ``tags`` go to every backup (--tag), and ``keep`` takes ``within`` (a
    duration) and ``tag`` (tags, or "a,b" groups) as forget does; the command lines the
    server runs are run here as they are, on a real repository."""
    import json
    import subprocess

    from vmbak.server.config import load
    from vmbak.server.jobs import backup_commands, child_env, forget_command

    server_env.write_config(server_env.header() + '''
[repositories.main]
location = "repo"

[jobs.a]
repository = "main"
disk = "a.raw"
tags = ["nightly", "-x"]
keep = { last = 1, within = "7x", tag = ["ok", "a b"] }
''')
    text = "\n".join(_problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False)))
    assert ": jobs.a.tags: bad tag '-x': it starts with '-'" in text, text
    assert ": jobs.a.keep.within: cannot parse --keep-within '7x'" in text, text
    assert ": jobs.a.keep.tag: bad tag 'a b': it contains a space" in text, text
    # rules that keep nothing: forget would refuse (or, with a zero duration taken as a rule,
    # remove every snapshot of the name)
    server_env.write_config(server_env.header() + '''
[repositories.main]
location = "repo"

[jobs.a]
repository = "main"
disk = "a.raw"
keep = { last = 1, within = "0d" }

[jobs.b]
repository = "main"
disk = "b.raw"
keep = { last = 0, daily = 0 }

[jobs.c]
repository = "main"
disk = "c.raw"
keep = { tag = [] }
''')
    text = "\n".join(_problems(server_env.vmbak("server", "--config", str(server_env.config), "--check", check=False)))
    assert ": jobs.a.keep.within: '0d' keeps nothing (a duration of 0 is no rule)" in text, text
    assert ": jobs.b.keep: no rule keeps anything (counts of 0, no tags)" in text, text
    assert ": jobs.c.keep: no rule keeps anything" in text, text
    assert "jobs.a.keep:" not in text, text  # named once, as keep.within

    repo = make_repo("none")
    disk = make_disk("a.raw", 1 << 20, seed=3)
    server_env.write_config(server_env.header() + f'''
[repositories.main]
location = "{repo.path}"

[jobs.a]
repository = "main"
disk = "{disk.path}"
tags = ["nightly"]
keep = {{ last = 1, within = "1h", tag = ["keep", "release,verified"] }}
''')
    cfg = load(str(server_env.config))
    job, rc = cfg.jobs["a"], cfg.repositories["main"]
    assert job.keep == {"last": 1, "within": "1h", "tag": ["keep", "release,verified"]}

    def run(cmd: list[str]) -> dict:
        p = subprocess.run(cmd, env=child_env(rc), capture_output=True, text=True, timeout=300, check=True)
        return json.loads(p.stdout.splitlines()[-1])

    first = run(backup_commands(job, rc)[0])
    assert first["tags"] == ["nightly"]
    repo.run("tag", "--add", "keep", first["id"])
    disk.write_random(0, 65536, seed=4)
    run(backup_commands(job, rc)[0])
    disk.write_random(65536, 65536, seed=5)
    last = run(backup_commands(job, rc)[0])
    out = run(forget_command(job, rc, "a"))
    assert out["policy"] == "keep-last 1, keep-within 1h, keep-tag keep, keep-tag release,verified", out["policy"]
    # the first has a new id since it was tagged
    assert out["deleted"] == [] and [d["reasons"] for d in out["names"]["a"] if "keep" in d["tags"]] == [
        ["within 1h", "tag keep"]], out["names"]
    del job.keep["within"]  # the three were made within the hour: without within, last and tag decide
    run(forget_command(job, rc, "a"))
    left = repo.snapshots()
    assert len(left) == 2 and left[-1]["time"] == last["time"], left  # the latest, and the one tagged keep
    assert left[0]["tags"] == ["nightly", "keep"]
