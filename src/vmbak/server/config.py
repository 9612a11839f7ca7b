"""The server's TOML configuration: parsing and checking, one problem per line with its key path.

``load(path)`` returns a ``Config`` or raises ``ConfigError`` holding every problem found
(``vmbak server --check`` prints them all; the server refuses to start on the first).
Files that hold secrets (the config itself, token files, password files) must not be
readable by every user. See docs/server.md for every key.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any

from vmbak.errors import VmbakError

DEFAULT_LISTEN = "127.0.0.1:8420"
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")  # counts; and "within", "tag"
MODES = ("auto", "full", "incremental", "differential")
STOP_MODES = ("abort", "finish")
MIN_TOKEN = 16

SERVER_KEYS = {"listen", "token_file", "read_token_file", "tls_cert", "tls_key", "state_dir", "max_concurrent_jobs",
               "run_missed", "stop", "stop_timeout", "metrics_public", "log_lines", "allow_remote", "users"}
USER_KEYS = {"password_hash", "role"}
REPO_KEYS = {"location", "password_file", "s3_endpoint", "s3_limit_upload", "s3_limit_download"}
JOB_KEYS = {"repository", "disk", "libvirt", "libvirt_uri", "changes", "name", "schedule", "mode", "format", "keep", "tags",
            "prune", "prune_grace", "verify", "verify_read_data", "run_missed", "workers", "enabled",
            "stale_after_hours", "timeout", "before", "after"}
NOTIFY_KEYS = {"on_success", "on_failure", "stale_after_hours", "webhook", "webhook_timeout", "email"}
EMAIL_KEYS = {"host", "port", "from", "to", "starttls", "ssl", "username", "password_file", "timeout"}
TOP_KEYS = {"server", "repositories", "jobs", "notify"}


class ConfigError(VmbakError):
    """The configuration has problems; ``problems`` holds one line each ("KEY.PATH: why")."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        more = f" (and {len(problems) - 1} more problems; see vmbak server --check)" if len(problems) > 1 else ""
        super().__init__(f"{path}: {problems[0]}{more}")


@dataclass
class ServerConfig:
    """The ``[server]`` table."""

    host: str = "127.0.0.1"
    port: int = 8420
    listen: str = DEFAULT_LISTEN
    token_file: str = ""
    read_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    state_dir: str = ""
    max_concurrent_jobs: int = 2
    run_missed: bool = True
    stop: str = "abort"
    stop_timeout: float = 120.0
    metrics_public: bool = False
    allow_remote: bool = False
    log_lines: int = 2000
    admin_token: str = field(default="", repr=False)
    read_token: str | None = field(default=None, repr=False)
    users: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # name -> (password hash, role)


@dataclass
class RepositoryConfig:
    """One ``[repositories.NAME]`` table."""

    key: str
    location: str
    password_file: str | None = None
    s3_endpoint: str | None = None
    s3_limit_upload: float = 0.0  # KiB/s, 0: no limit ($VMBAK_S3_LIMIT_UPLOAD of the jobs' children)
    s3_limit_download: float = 0.0


@dataclass
class JobConfig:
    """One ``[jobs.NAME]`` table: what to back up, where, when, and what to keep."""

    key: str
    repository: str
    name: str
    schedule: str | None = None
    disk: str | None = None
    libvirt: str | None = None
    libvirt_uri: str = "qemu:///system"
    changes: str = "auto"
    mode: str = "auto"
    format: str | None = None
    # forget's rules: counts by rule name; "within" a duration (7d, 1y2m); "tag" a list of
    # tags or comma-joined tag groups (--keep-tag each)
    keep: dict[str, int | str | list[str]] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)  # given to every backup (--tag)
    prune: str | None = None
    prune_grace: str = "1h"
    verify: str | None = None
    verify_read_data: bool = False
    run_missed: bool | None = None
    workers: int = 2
    enabled: bool = True
    stale_after_hours: float | None = None
    timeout: float | None = None
    before: list[str] | None = None  # argv of a hook run before each backup (a string: through /bin/sh -c)
    after: list[str] | None = None  # ... and after it, whatever its result

    def schedules(self) -> dict[str, str]:
        """The cron expression of each kind of work this job does: backup, prune, verify."""
        out = {}
        for kind, expr in (("backup", self.schedule), ("prune", self.prune), ("verify", self.verify)):
            if expr:
                out[kind] = expr
        return out

    def source_text(self) -> str:
        if self.libvirt:
            return f"libvirt:{self.libvirt}"
        if self.disk:
            return self.disk if self.changes == "auto" else f"{self.disk} ({self.changes})"
        return self.changes


@dataclass
class EmailConfig:
    host: str = "127.0.0.1"
    port: int = 25
    sender: str = ""
    to: list[str] = field(default_factory=list)
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password_file: str | None = None
    timeout: float = 30.0


@dataclass
class NotifyConfig:
    """The ``[notify]`` table."""

    on_success: bool = False
    on_failure: bool = True
    stale_after_hours: float | None = None
    webhook: list[str] = field(default_factory=list)
    webhook_timeout: float = 10.0
    email: EmailConfig | None = None


@dataclass
class Config:
    path: str
    server: ServerConfig
    repositories: dict[str, RepositoryConfig]
    jobs: dict[str, JobConfig]
    notify: NotifyConfig


def default_state_dir() -> str:
    """$STATE_DIRECTORY (systemd's StateDirectory=), /var/lib/vmbak for root, else the
    user's XDG state directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/vmbak"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "vmbak")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); a ValueError saying why not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8420)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_cron(expr: str) -> str | None:
    """Why ``expr`` is not a schedule (None when it is one): five cron fields, six with a
    trailing seconds field, or @hourly, @daily, @weekly, @monthly, @yearly."""
    from croniter import croniter

    if not isinstance(expr, str) or not expr.strip():
        return "a schedule is a cron expression string, e.g. \"0 2 * * *\""
    fields = expr.split()
    if not expr.startswith("@") and len(fields) not in (5, 6):
        return f"{expr!r} has {len(fields)} fields; a cron expression has 5 (or 6, the last being seconds)"
    if not croniter.is_valid(expr):
        return f"{expr!r} is not a valid cron expression"
    return None


def secret_file_problem(path: str) -> str | None:
    """Why ``path`` cannot hold a secret: missing, unreadable, not a file, or readable by
    every user (None when it is fine)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & stat.S_IROTH:
        return (f"{path} is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"make it private: chmod o-rwx {path}")
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    return None


def read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class _Checker:
    def __init__(self, base: str) -> None:
        self.problems: list[str] = []
        self.base = base

    def add(self, key: str, why: str) -> None:
        self.problems.append(f"{key}: {why}" if key else why)

    def path(self, p: str) -> str:
        """A path relative to the config file's directory."""
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) or ":" in p.split("/")[0] else os.path.join(self.base, p)

    def unknown(self, key: str, table: dict, allowed: set[str]) -> None:
        for k in table:
            if k not in allowed:
                self.add(f"{key}.{k}" if key else k, f"unknown key (known: {', '.join(sorted(allowed))})")

    def get(self, table: dict, key: str, keypath: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in table:
            return default
        v = table[key]
        ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, float, (int, float)))
        if not ok:
            names = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
                     (int, float): "a number", list: "a list", dict: "a table"}
            self.add(keypath, f"must be {names.get(typ, str(typ))}, not {v!r}")
            return default
        return v

    def table(self, parent: dict, key: str, keypath: str) -> dict:
        v = parent.get(key, {})
        if not isinstance(v, dict):
            self.add(keypath, f"must be a table ([{keypath}]), not {v!r}")
            return {}
        return v


def _keep_within_problem(v: object) -> str | None:
    """Why ``keep.within`` is not a duration forget --keep-within takes (None: it is)."""
    from vmbak.engine.retention import parse_within, within_on

    if not isinstance(v, str):
        return f"must be a duration such as \"7d\" or \"1y6m\", not {v!r}"
    try:
        parse_within(v)
    except VmbakError as e:
        return str(e)
    if not within_on(v):
        return f"{v!r} keeps nothing (a duration of 0 is no rule): give one such as \"7d\", or leave within out"
    return None


def _tags_problem(tags: list, groups_allowed: bool) -> str | None:
    """Why a list of tags (with ``groups_allowed``, each may be "a,b": all of them) is not
    one backup --tag / forget --keep-tag takes (None: it is)."""
    from vmbak.engine.backup import check_tags

    if not all(isinstance(t, str) for t in tags):
        return f"must be a list of strings, not {tags!r}"
    try:
        for t in tags:
            check_tags(t.split(",") if groups_allowed else [t])
    except VmbakError as e:
        return str(e)
    return None


def load(path: str, check_files: bool = True) -> Config:
    """Read and check the configuration at ``path``; ConfigError with every problem."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read the configuration: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    c = _Checker(os.path.dirname(os.path.abspath(path)))
    if check_files and st.st_mode & stat.S_IROTH:
        c.add("", f"the configuration is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}); "
              f"make it private: chmod o-rwx {path}")
    c.unknown("", data, TOP_KEYS)
    server = _server(c, c.table(data, "server", "server"), check_files)
    repos = _repositories(c, c.table(data, "repositories", "repositories"), check_files)
    jobs = _jobs(c, c.table(data, "jobs", "jobs"), repos)
    notify = _notify(c, c.table(data, "notify", "notify"), check_files)
    if c.problems:
        raise ConfigError(path, c.problems)
    return Config(os.path.abspath(path), server, repos, jobs, notify)


def _server(c: _Checker, t: dict, check_files: bool) -> ServerConfig:
    s = ServerConfig()
    c.unknown("server", t, SERVER_KEYS)
    s.listen = c.get(t, "listen", "server.listen", str, DEFAULT_LISTEN)
    try:
        s.host, s.port = parse_listen(s.listen)
    except ValueError as e:
        c.add("server.listen", str(e))
    s.allow_remote = c.get(t, "allow_remote", "server.allow_remote", bool, False)
    if not is_loopback(s.host) and not s.allow_remote:
        c.add("server.listen", f"{s.host} is not a loopback address; to serve other hosts set "
              "server.allow_remote = true (and use tls_cert and tls_key)")
    tf = c.get(t, "token_file", "server.token_file", str)
    if tf is None:
        c.add("server.token_file", "missing: the file with the admin token (every request needs a token)")
    else:
        s.token_file = c.path(tf)
    rtf = c.get(t, "read_token_file", "server.read_token_file", str)
    s.read_token_file = c.path(rtf) if rtf else None
    for key in ("token_file", "read_token_file"):
        p = getattr(s, key)
        if not p or not check_files:
            continue
        why = secret_file_problem(p)
        if why:
            c.add(f"server.{key}", why)
            continue
        tok = read_secret(p)
        if len(tok) < MIN_TOKEN or any(ch.isspace() for ch in tok):
            c.add(f"server.{key}", f"{p} must hold one token of at least {MIN_TOKEN} characters and no spaces "
                  "(e.g. from: openssl rand -hex 32)")
        elif key == "token_file":
            s.admin_token = tok
        else:
            s.read_token = tok
    if s.read_token is not None and s.read_token == s.admin_token:
        c.add("server.read_token_file", "the read-only token is the admin token; give it a token of its own")
    for key in ("tls_cert", "tls_key"):
        v = c.get(t, key, f"server.{key}", str)
        if v:
            setattr(s, key, c.path(v))
            if check_files and not os.path.isfile(getattr(s, key)):
                c.add(f"server.{key}", f"no such file: {getattr(s, key)}")
    if bool(s.tls_cert) != bool(s.tls_key):
        c.add("server.tls_cert", "TLS needs both tls_cert and tls_key")
    if s.tls_key and check_files and os.path.isfile(s.tls_key):
        why = secret_file_problem(s.tls_key)
        if why:
            c.add("server.tls_key", why)
    sd = c.get(t, "state_dir", "server.state_dir", str)
    s.state_dir = c.path(sd) if sd else default_state_dir()
    n = c.get(t, "max_concurrent_jobs", "server.max_concurrent_jobs", int, 2)
    if n < 1:
        c.add("server.max_concurrent_jobs", f"must be at least 1, not {n}")
    s.max_concurrent_jobs = max(1, n)
    s.run_missed = c.get(t, "run_missed", "server.run_missed", bool, True)
    s.stop = c.get(t, "stop", "server.stop", str, "abort")
    if s.stop not in STOP_MODES:
        c.add("server.stop", f"must be one of {', '.join(STOP_MODES)}, not {s.stop!r}")
    s.stop_timeout = float(c.get(t, "stop_timeout", "server.stop_timeout", (int, float), 120.0))
    s.metrics_public = c.get(t, "metrics_public", "server.metrics_public", bool, False)
    s.log_lines = c.get(t, "log_lines", "server.log_lines", int, 2000)
    from vmbak.server.passwords import hash_problem

    for name, u in c.table(t, "users", "server.users").items():
        kp = f"server.users.{name}"
        if not isinstance(u, dict):
            c.add(kp, "must be a table: { password_hash = \"...\", role = \"admin\" or \"read\" }")
            continue
        c.unknown(kp, u, USER_KEYS)
        h = c.get(u, "password_hash", f"{kp}.password_hash", str)
        role = c.get(u, "role", f"{kp}.role", str, "read")
        if h is None:
            c.add(f"{kp}.password_hash", "missing: make one with vmbak server --hash-password")
        elif hash_problem(h):
            c.add(f"{kp}.password_hash", hash_problem(h))  # type: ignore[arg-type]
        if role not in ("admin", "read"):
            c.add(f"{kp}.role", f"must be admin or read, not {role!r}")
        elif h and not hash_problem(h):
            s.users[name] = (h, role)
    return s


def _repositories(c: _Checker, t: dict, check_files: bool) -> dict[str, RepositoryConfig]:
    out = {}
    for key, r in t.items():
        kp = f"repositories.{key}"
        if not isinstance(r, dict):
            c.add(kp, "must be a table")
            continue
        c.unknown(kp, r, REPO_KEYS)
        loc = c.get(r, "location", f"{kp}.location", str)
        if not loc:
            c.add(f"{kp}.location", "missing: the repository's location (a directory or s3:BUCKET/PREFIX)")
            continue
        rc = RepositoryConfig(key, loc if loc.startswith("s3:") else c.path(loc))
        pf = c.get(r, "password_file", f"{kp}.password_file", str)
        if pf:
            rc.password_file = c.path(pf)
            why = secret_file_problem(rc.password_file) if check_files else None
            if why:
                c.add(f"{kp}.password_file", why)
        rc.s3_endpoint = c.get(r, "s3_endpoint", f"{kp}.s3_endpoint", str)
        if rc.s3_endpoint and not loc.startswith("s3:"):
            c.add(f"{kp}.s3_endpoint", "goes with an s3:BUCKET/PREFIX location")
        for lim in ("s3_limit_upload", "s3_limit_download"):
            v = c.get(r, lim, f"{kp}.{lim}", (int, float))
            if v is None:
                continue
            if v < 0:
                c.add(f"{kp}.{lim}", f"must be 0 (no limit) or more KiB/s, not {v!r}")
            elif v and not loc.startswith("s3:"):
                c.add(f"{kp}.{lim}", "goes with an s3:BUCKET/PREFIX location")
            else:
                setattr(rc, lim, float(v))
        out[key] = rc
    return out


def _jobs(c: _Checker, t: dict, repos: dict[str, RepositoryConfig]) -> dict[str, JobConfig]:
    from vmbak.engine.backup import check_name
    from vmbak.engine.sources import parse_changes

    out = {}
    for key, j in t.items():
        kp = f"jobs.{key}"
        if not isinstance(j, dict):
            c.add(kp, "must be a table")
            continue
        if "/" in key or key.startswith("."):
            c.add(kp, "a job's name may not contain '/' or start with '.'")
        c.unknown(kp, j, JOB_KEYS)
        repo = c.get(j, "repository", f"{kp}.repository", str)
        if repo is None:
            c.add(f"{kp}.repository", f"missing: the repository to back up into ({', '.join(repos) or 'none defined'})")
        elif repo not in repos:
            c.add(f"{kp}.repository", f"no repository {repo!r} (defined: {', '.join(repos) or 'none'})")
        jc = JobConfig(key, repo or "", c.get(j, "name", f"{kp}.name", str, key))
        jc.disk = c.get(j, "disk", f"{kp}.disk", str)
        if jc.disk:
            jc.disk = c.path(jc.disk)
        jc.libvirt = c.get(j, "libvirt", f"{kp}.libvirt", str)
        jc.libvirt_uri = c.get(j, "libvirt_uri", f"{kp}.libvirt_uri", str, jc.libvirt_uri)
        jc.changes = c.get(j, "changes", f"{kp}.changes", str, "auto")
        try:
            spec = parse_changes(jc.changes)
        except VmbakError as e:
            c.add(f"{kp}.changes", str(e))
            spec = None
        given = [k for k in ("disk", "libvirt") if j.get(k)]
        if spec is not None and not spec.reads_disk_file:
            given.append("changes")
        if not given:
            c.add(kp, "say what to back up: disk = \"/path/to/image\", libvirt = \"DOMAIN\" or changes = "
                  "\"track:SOCKET\" / \"qemu:QMP:NODE\"")
        elif len(given) > 1:
            c.add(kp, f"{' and '.join(given)} do not go together: one source per job")
        try:
            check_name(jc.name if not jc.libvirt else f"{jc.name}-vda")
        except VmbakError as e:
            c.add(f"{kp}.name", str(e))
        for kind_key in ("schedule", "prune", "verify"):
            v = c.get(j, kind_key, f"{kp}.{kind_key}", str)
            if v is not None:
                why = check_cron(v)
                if why:
                    c.add(f"{kp}.{kind_key}", why)
                setattr(jc, kind_key, v)
        jc.mode = c.get(j, "mode", f"{kp}.mode", str, "auto")
        if jc.mode not in MODES:
            c.add(f"{kp}.mode", f"must be one of {', '.join(MODES)}, not {jc.mode!r}")
        jc.format = c.get(j, "format", f"{kp}.format", str)
        keep = c.get(j, "keep", f"{kp}.keep", dict, {})
        problems = len(c.problems)
        for rule, n in keep.items():
            if rule == "within":
                why = _keep_within_problem(n)
                if why:
                    c.add(f"{kp}.keep.within", why)
                else:
                    jc.keep[rule] = n
            elif rule == "tag":
                groups = n if isinstance(n, list) else [n]
                why = _tags_problem(groups, groups_allowed=True)
                if why:
                    c.add(f"{kp}.keep.tag", why)
                else:
                    jc.keep[rule] = list(groups)
            elif rule not in KEEP_RULES:
                c.add(f"{kp}.keep.{rule}", f"unknown rule (known: {', '.join((*KEEP_RULES, 'within', 'tag'))})")
            elif not isinstance(n, int) or isinstance(n, bool) or n < -1:
                c.add(f"{kp}.keep.{rule}", f"must be a count (-1: all), not {n!r}")
            else:
                jc.keep[rule] = n
        if keep and len(c.problems) == problems and not any(jc.keep.values()):
            # forget would refuse every run: without a rule every snapshot would go
            c.add(f"{kp}.keep", "no rule keeps anything (counts of 0, no tags): give a count, or leave keep "
                  "out to keep every snapshot")
        tags = c.get(j, "tags", f"{kp}.tags", list, [])
        why = _tags_problem(tags, groups_allowed=False)
        if why:
            c.add(f"{kp}.tags", why)
        else:
            jc.tags = list(tags)
        jc.prune_grace = c.get(j, "prune_grace", f"{kp}.prune_grace", str, "1h")
        jc.verify_read_data = c.get(j, "verify_read_data", f"{kp}.verify_read_data", bool, False)
        jc.run_missed = c.get(j, "run_missed", f"{kp}.run_missed", bool)
        jc.workers = c.get(j, "workers", f"{kp}.workers", int, 2)
        if jc.workers < 1:
            c.add(f"{kp}.workers", "must be at least 1")
        jc.enabled = c.get(j, "enabled", f"{kp}.enabled", bool, True)
        sh = c.get(j, "stale_after_hours", f"{kp}.stale_after_hours", (int, float))
        jc.stale_after_hours = float(sh) if sh is not None else None
        to = c.get(j, "timeout", f"{kp}.timeout", (int, float))
        jc.timeout = float(to) if to is not None else None
        for hook in ("before", "after"):
            h = j.get(hook)
            if h is None:
                continue
            if isinstance(h, str) and h.strip():
                setattr(jc, hook, ["/bin/sh", "-c", h])
            elif isinstance(h, list) and h and all(isinstance(x, str) for x in h):
                setattr(jc, hook, list(h))
            else:
                c.add(f"{kp}.{hook}", "must be a shell command (a string) or a command and its arguments (a list)")
        out[key] = jc
    return out


def _notify(c: _Checker, t: dict, check_files: bool) -> NotifyConfig:
    n = NotifyConfig()
    c.unknown("notify", t, NOTIFY_KEYS)
    n.on_success = c.get(t, "on_success", "notify.on_success", bool, False)
    n.on_failure = c.get(t, "on_failure", "notify.on_failure", bool, True)
    sh = c.get(t, "stale_after_hours", "notify.stale_after_hours", (int, float))
    if sh is not None and sh <= 0:
        c.add("notify.stale_after_hours", "must be more than 0")
    n.stale_after_hours = float(sh) if sh is not None else None
    hooks = t.get("webhook", [])
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        c.add("notify.webhook", "must be a URL or a list of URLs")
        hooks = []
    for h in hooks:
        if not h.startswith(("http://", "https://")):
            c.add("notify.webhook", f"{h!r} is not an http:// or https:// URL")
    n.webhook = hooks
    n.webhook_timeout = float(c.get(t, "webhook_timeout", "notify.webhook_timeout", (int, float), 10.0))
    e = c.table(t, "email", "notify.email") if "email" in t else None
    if e is not None:
        c.unknown("notify.email", e, EMAIL_KEYS)
        ec = EmailConfig()
        ec.host = c.get(e, "host", "notify.email.host", str, "127.0.0.1")
        ec.port = c.get(e, "port", "notify.email.port", int, 25)
        ec.sender = c.get(e, "from", "notify.email.from", str, "")
        if not ec.sender:
            c.add("notify.email.from", "missing: the sender address")
        to = e.get("to", [])
        to = [to] if isinstance(to, str) else to
        if not isinstance(to, list) or not to or not all(isinstance(x, str) for x in to):
            c.add("notify.email.to", "must be an address or a list of addresses")
            to = []
        ec.to = to
        ec.starttls = c.get(e, "starttls", "notify.email.starttls", bool, False)
        ec.ssl = c.get(e, "ssl", "notify.email.ssl", bool, False)
        ec.username = c.get(e, "username", "notify.email.username", str)
        pf = c.get(e, "password_file", "notify.email.password_file", str)
        if pf:
            ec.password_file = c.path(pf)
            why = secret_file_problem(ec.password_file) if check_files else None
            if why:
                c.add("notify.email.password_file", why)
        ec.timeout = float(c.get(e, "timeout", "notify.email.timeout", (int, float), 30.0))
        n.email = ec
    return n
