"""What one run of a job does: the vmbak commands it runs, and what their output means.

Each step of a run is one ``python -m vmbak.cli.main COMMAND ... --json`` child process (see
docs/server.md, "Why jobs run as child processes"): the child owns its repository lock,
its change source and its guest freeze, and cleans them up on SIGTERM exactly as the
command line does for a user; a server killed outright takes its children down with it
(PR_SET_PDEATHSIG sends them SIGTERM), so no lock is left behind either way.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys

from vmbak.server.config import JobConfig, RepositoryConfig

VMBAK = [sys.executable, "-m", "vmbak.cli.main"]


def child_env(repo: RepositoryConfig) -> dict[str, str]:
    """The environment of a job's child: the server's, less VMBAK_*, plus the repository's password file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBAK_")}
    env.setdefault("LC_ALL", "C.UTF-8")
    if repo.password_file:
        env["VMBAK_PASSWORD_FILE"] = repo.password_file
    if repo.s3_endpoint:
        env["VMBAK_S3_ENDPOINT"] = repo.s3_endpoint
    if repo.s3_limit_upload:
        env["VMBAK_S3_LIMIT_UPLOAD"] = f"{repo.s3_limit_upload:g}"
    if repo.s3_limit_download:
        env["VMBAK_S3_LIMIT_DOWNLOAD"] = f"{repo.s3_limit_download:g}"
    return env


def repo_args(repo: RepositoryConfig) -> list[str]:
    return ["-r", repo.location]


def libvirt_domains(pattern: str, uri: str) -> list[str]:
    """The running domains whose names match ``pattern`` (a glob); the pattern itself when it has no wildcard."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern]
    virsh = shutil.which("virsh")
    if virsh is None:
        raise RuntimeError("virsh is not installed: cannot list libvirt domains for a glob")
    out = subprocess.run([virsh, "-c", uri, "list", "--name"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"virsh list failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return sorted(d for d in out.stdout.split() if fnmatch.fnmatchcase(d, pattern))


def backup_commands(job: JobConfig, repo: RepositoryConfig) -> list[list[str]]:
    """The ``vmbak backup`` command lines of one backup run (one per libvirt domain matched)."""
    common = ["--mode", job.mode, "--workers", str(job.workers), "--json", *repo_args(repo),
              *[a for t in job.tags for a in ("--tag", t)]]
    if job.libvirt:
        doms = libvirt_domains(job.libvirt, job.libvirt_uri)
        glob = len(doms) != 1 or doms[0] != job.libvirt
        return [[*VMBAK, "backup", "--libvirt", d, "--libvirt-uri", job.libvirt_uri, "--name", d if glob else job.name,
                 "--changes", job.changes, *common] for d in doms]
    cmd = [*VMBAK, "backup"]
    if job.disk:
        cmd.append(job.disk)
    cmd += ["--name", job.name, "--changes", job.changes, *common]
    if job.format:
        cmd += ["--format", job.format]
    return [cmd]


def forget_command(job: JobConfig, repo: RepositoryConfig, name: str) -> list[str]:
    cmd = [*VMBAK, "forget", "--name", name, "--json", *repo_args(repo)]
    for rule, n in job.keep.items():
        if rule == "tag":
            cmd += [a for group in n for a in ("--keep-tag", group)]  # type: ignore[union-attr]
        else:
            cmd += [f"--keep-{rule}", str(n)]
    return cmd


def prune_command(job: JobConfig, repo: RepositoryConfig) -> list[str]:
    return [*VMBAK, "prune", "--grace", job.prune_grace, "--json", *repo_args(repo)]


def verify_command(job: JobConfig, repo: RepositoryConfig) -> list[str]:
    return [*VMBAK, "check", "--json", *repo_args(repo), *(["--read-data"] if job.verify_read_data else [])]


def restore_command(repo: RepositoryConfig, snapshot: str, target: str, overwrite: bool = False,
                    format: str | None = None) -> list[str]:  # noqa: A002 - the option's name
    cmd = [*VMBAK, "restore", snapshot, target, "--json", *repo_args(repo)]
    if overwrite:
        cmd.append("--overwrite")
    if format:
        cmd += ["--format", format]
    return cmd


def last_json(stdout: str) -> object:
    """The result a ``--json`` command printed: the whole output as one JSON document, or
    else its last line that is JSON (newer commands print JSON lines, status messages first)."""
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def snapshots_of(result: object) -> list[dict]:
    """The snapshot summaries a backup's JSON result holds (one disk, or a libvirt domain's disks)."""
    if isinstance(result, dict):
        if isinstance(result.get("snapshots"), list):
            return [s for s in result["snapshots"] if isinstance(s, dict)]
        if "id" in result and "stats" in result:
            return [result]
        for key in ("summary", "result"):  # a final JSON-lines summary that wraps the result
            if isinstance(result.get(key), dict):
                return snapshots_of(result[key])
    return []


def error_of(result: object, stderr_lines: list[str]) -> str | None:
    """The one-line error of a failed command: from its JSON error, else its last error line."""
    if isinstance(result, dict):
        for key in ("error", "message"):
            v = result.get(key)
            if isinstance(v, str) and (key == "error" or result.get("message_type") == "error"):
                return v
            if isinstance(v, dict) and isinstance(v.get("message"), str):
                return v["message"]
    for line in reversed(stderr_lines):
        if "vmbak: error:" in line:
            return line.split("vmbak: error:", 1)[1].strip()
    return stderr_lines[-1] if stderr_lines else None
