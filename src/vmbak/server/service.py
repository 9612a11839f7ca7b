"""The scheduler and job runner: one asyncio loop shared with the HTTP server.

Every (job, kind) pair with a cron expression (kind: backup, prune, verify) has a next due
time. When it comes, a run is queued, unless one of the same job and kind is already
queued or running (a job is never started twice). Queued runs start while fewer than
``max_concurrent_jobs`` run. A backup run backs up, then applies the job's ``keep`` rules
(forget). Per repository, forget (which needs the repository to itself) waits for the
other runs on that repository, and they wait for it.

Schedules missed while the server was down run once at start (``run_missed``), and so
do runs the last server left unfinished. SIGHUP reloads the configuration; running jobs
go on with the configuration they started with. SIGTERM aborts running jobs cleanly (or,
with ``stop = "finish"``, lets them finish) and then stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmbak.server import jobs as J
from vmbak.server.config import Config, JobConfig, RepositoryConfig, load
from vmbak.server.history import History, now_iso, parse_iso

PR_SET_PDEATHSIG = 1
RESTORE_JOB = "(restore)"  # the job name of restores started through the API


def log(msg: str) -> None:
    """The server's own log: one line on stderr (journald keeps it under systemd)."""
    print(f"vmbak server: {msg}", file=sys.stderr, flush=True)


def _die_with_parent(parent: int) -> None:
    """In a job's child, between fork and exec: get SIGTERM when the server dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != parent:  # the server died before the line above: do not start at all
        os._exit(143)


class RWLock:
    """Many shared holders or one exclusive holder; a waiting exclusive one goes first."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._excl = False
        self._waiting_excl = 0

    @contextlib.asynccontextmanager
    async def shared(self):  # noqa: ANN201
        async with self._cond:
            await self._cond.wait_for(lambda: not self._excl and not self._waiting_excl)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self):  # noqa: ANN201
        async with self._cond:
            self._waiting_excl += 1
            try:
                await self._cond.wait_for(lambda: not self._excl and self._shared == 0)
            finally:
                self._waiting_excl -= 1
            self._excl = True
        try:
            yield
        finally:
            async with self._cond:
                self._excl = False
                self._cond.notify_all()


class Aborted(Exception):
    """The run was aborted (server stopping, or its timeout passed)."""


@dataclass
class Run:
    """A queued or running run (finished runs live in the history only)."""

    id: int
    job: JobConfig
    repo: RepositoryConfig
    kind: str
    trigger: str
    scheduled: str | None
    state: str = "queued"
    started: str | None = None
    log: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    abort_reason: str | None = None
    abort_state: str = "aborted"  # "interrupted" when the server stops: run again at the next start
    task: asyncio.Task | None = None
    bytes_read: int = 0
    bytes_added: int = 0
    snapshots: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    results: list[object] = field(default_factory=list)
    restore: dict = field(default_factory=dict)  # kind "restore": snapshot, target, overwrite, format

    def to_json(self) -> dict:
        return {"id": self.id, "job": self.job.key, "kind": self.kind, "trigger": self.trigger, "state": self.state,
                "scheduled": self.scheduled, "started": self.started, "ended": None, "bytes_read": self.bytes_read,
                "bytes_added": self.bytes_added, "snapshots": list(self.snapshots),
                "forgotten": list(self.forgotten), "error": None, "exit_code": None, "duration_s": None}


class Service:
    """The running server's state: configuration, history, schedule, queue and runs."""

    def __init__(self, config: Config, history: History) -> None:
        self.config = config
        self.history = history
        self.started = time.time()
        self.queue: list[Run] = []
        self.active: dict[int, Run] = {}  # queued and running, by run id
        self.due: dict[tuple[str, str], datetime] = {}
        self.repo_locks: dict[str, RWLock] = {}
        self.stopping = False
        self.wake = asyncio.Event()
        self.stale_notified: set[str] = set()
        self.repo_info: dict[str, dict] = {}  # repository key -> {"latest": {name: time}, "size": bytes, ...}
        self.on_finish: list[Callable[[dict], None]] = []  # metrics, notifications
        self.on_stale: list[Callable[[str, float, str | None], None]] = []
        self._exprs: dict[tuple[str, str], str] = {}
        self.repos = RepoCache()

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def _now() -> datetime:
        return datetime.now().astimezone()  # cron expressions are in the server's local time

    @staticmethod
    def next_time(expr: str, after: datetime) -> datetime:
        from croniter import croniter

        return croniter(expr, after).get_next(datetime)

    @staticmethod
    def prev_time(expr: str, before: datetime) -> datetime:
        from croniter import croniter

        return croniter(expr, before).get_prev(datetime)

    def _schedule_all(self) -> None:
        now = self._now()
        due = {}
        for job in self.config.jobs.values():
            if not job.enabled:
                continue
            for kind, expr in job.schedules().items():
                key = (job.key, kind)
                old = self.due.get(key)
                prev_expr = self._exprs.get(key)
                due[key] = old if old is not None and prev_expr == expr else self.next_time(expr, now)
        self.due = due
        self._exprs = {(j.key, k): e for j in self.config.jobs.values() for k, e in j.schedules().items()}

    def catch_up(self) -> None:
        """At start: runs the last server left unfinished are marked interrupted; a job
        whose last run was interrupted (the server died or stopped during it) runs again;
        schedules missed while no server ran run once (``run_missed``)."""
        for r in self.history.interrupted_runs():
            self.history.mark_interrupted(r["id"], "the server stopped before the run finished")
            log(f"run {r['id']} ({r['job']} {r['kind']}) was left unfinished by the last server: interrupted")
        again = set()
        for job in self.config.jobs.values():
            for kind in ("backup", "prune", "verify"):
                last = self.history.last_run(job.key, kind)
                if last is not None and last["state"] == "interrupted":
                    again.add((job.key, kind))
        now = self._now()
        for job in self.config.jobs.values():
            missed_ok = self.config.server.run_missed if job.run_missed is None else job.run_missed
            if not job.enabled or not missed_ok:
                continue
            for kind in sorted(k for j, k in again if j == job.key):
                self.enqueue(job.key, kind, "resumed", None)
            for kind, expr in job.schedules().items():
                last = self.history.last_tick(job.key, kind)
                prev = self.prev_time(expr, now)
                if (job.key, kind) in again:
                    continue
                elif last is not None and prev.astimezone(UTC) > parse_iso(last):
                    log(f"{job.key} {kind}: the run scheduled for {prev.isoformat(timespec='seconds')} was missed: "
                        "running it now")
                    self.enqueue(job.key, kind, "missed", prev.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
                    self.history.set_tick(job.key, kind, now_iso())

    def next_runs(self, job: str) -> dict[str, str]:
        return {k: t.isoformat(timespec="seconds") for (j, k), t in sorted(self.due.items()) if j == job}

    # ------------------------------------------------------------------ queue
    def busy(self, job: str, kind: str) -> Run | None:
        return next((r for r in self.active.values() if r.job.key == job and r.kind == kind), None)

    def enqueue(self, job_key: str, kind: str, trigger: str, scheduled: str | None) -> tuple[Run | None, Run | None]:
        """Queue a run; (new run, None), or (None, the run already queued or running)."""
        job = self.config.jobs[job_key]
        other = self.busy(job_key, kind)
        if other is not None:
            log(f"{job_key} {kind}: not started ({trigger}): run {other.id} is still {other.state}")
            return None, other
        rid = self.history.add_run(job_key, kind, trigger, scheduled)
        run = Run(rid, job, self.config.repositories[job.repository], kind, trigger, scheduled)
        self.active[rid] = run
        self.queue.append(run)
        self.wake.set()
        return run, None

    def enqueue_restore(self, repo_key: str, snapshot: str, name: str, target: str, overwrite: bool,
                        fmt: str | None) -> Run:
        """Queue a restore of ``snapshot`` (a full id) to ``target``, a path on this machine.
        Restores are runs of the pseudo-job ``RESTORE_JOB``; several may run at once (each
        locks its own target)."""
        job = JobConfig(RESTORE_JOB, repo_key, name)
        rid = self.history.add_run(RESTORE_JOB, "restore", "manual", None)
        run = Run(rid, job, self.config.repositories[repo_key], "restore", "manual", None)
        run.restore = {"snapshot": snapshot, "target": target, "overwrite": overwrite, "format": fmt}
        self.active[rid] = run
        self.queue.append(run)
        self.wake.set()
        return run

    def _dispatch(self) -> None:
        while self.queue and not self.stopping and self._running() < self.config.server.max_concurrent_jobs:
            run = self.queue.pop(0)
            run.task = asyncio.get_running_loop().create_task(self._execute(run))

    def _running(self) -> int:
        return sum(1 for r in self.active.values() if r.state == "running")

    def loop_call(self, fn: Callable, *args: object) -> object:
        """Call ``fn(*args)`` in the service's event loop (where its state lives) from a
        worker thread, and return what it returns."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def go() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(go)
        return fut.result(60)

    # ------------------------------------------------------------------ the loop
    async def run_forever(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._schedule_all()
        self.catch_up()
        asyncio.get_running_loop().create_task(self.refresh_all_repos())
        while True:  # cancelled when the server stops
            now = self._now()
            for key, when in list(self.due.items()):
                if when <= now and not self.stopping:
                    expr = self._exprs[key]
                    self.due[key] = self.next_time(expr, now)
                    self.history.set_tick(key[0], key[1], when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
                    self.enqueue(key[0], key[1], "schedule", when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            self._dispatch()
            stale_at = self._check_stale()
            wait = 60.0
            if stale_at is not None:
                wait = min(wait, max(0.0, stale_at - time.time()) + 0.01)
            if self.due:
                wait = min(wait, max(0.0, (min(self.due.values()) - self._now()).total_seconds()))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=wait + 0.001)

    # ------------------------------------------------------------------ one run
    def _lock(self, repo: str) -> RWLock:
        return self.repo_locks.setdefault(repo, RWLock())

    async def _execute(self, run: Run) -> None:
        run.state = "running"
        run.started = self.history.start_run(run.id)
        log(f"run {run.id}: {run.job.key} {run.kind} started ({run.trigger})")
        state, error, code = "succeeded", None, 0
        try:
            coro = self._work(run)
            if run.job.timeout:
                try:
                    await asyncio.wait_for(asyncio.shield(t := asyncio.ensure_future(coro)), run.job.timeout)
                except TimeoutError:
                    await self.abort(run, f"timeout of {run.job.timeout:g} s passed")
                    await t
            else:
                await coro
        except Aborted as e:
            state, error, code = run.abort_state, str(e), run.proc.returncode if run.proc else None
        except StepFailed as e:
            state, error, code = "failed", e.error, e.code
        except Exception as e:  # noqa: BLE001 - a run's failure never stops the server
            state, error, code = "failed", f"{type(e).__name__}: {e}", None
        if run.kind == "backup" and run.job.after and not (state == "interrupted" and self.stopping):
            try:
                await self._hook(run, "after", run.job.after, {"VMBAK_RESULT": state,
                                                               "VMBAK_SNAPSHOTS": " ".join(run.snapshots)})
            except Exception as e:  # noqa: BLE001 - StepFailed, OSError (no such program), ...
                run.log.append(f"{now_iso()} warning: {e}")
        if error:
            run.log.append(f"{now_iso()} error: {error}")
        self.history.finish_run(run.id, state, exit_code=code, error=error, bytes_read=run.bytes_read,
                                bytes_added=run.bytes_added, snapshots=run.snapshots, forgotten=run.forgotten,
                                result=run.results, log=run.log[-self.config.server.log_lines:])
        self.active.pop(run.id, None)
        log(f"run {run.id}: {run.job.key} {run.kind} {state}" + (f": {error}" if error else ""))
        record = self.history.run(run.id) or {}
        for cb in self.on_finish:
            try:
                cb(record)
            except Exception as e:  # noqa: BLE001
                log(f"warning: after run {run.id}: {type(e).__name__}: {e}")
        if state == "succeeded" and run.kind == "backup":
            self.stale_notified.discard(run.job.key)
        asyncio.get_running_loop().create_task(self.refresh_repo(run.repo))
        self.wake.set()

    async def _work(self, run: Run) -> None:
        job, repo = run.job, run.repo
        lock = self._lock(repo.key)
        if run.kind == "backup":
            if job.before:
                await self._hook(run, "before", job.before, {})
            cmds = await asyncio.to_thread(J.backup_commands, job, repo)
            if not cmds:
                raise StepFailed(f"no libvirt domain matches {job.libvirt!r}", None)
            names = []
            for cmd in cmds:
                async with lock.shared():
                    res = await self._step(run, cmd)
                for s in J.snapshots_of(res):
                    run.snapshots.append(s["id"])
                    st = s.get("stats") or {}
                    run.bytes_read += int(st.get("read_bytes", 0) or 0)
                    run.bytes_added += int(st.get("new_stored_bytes", 0) or 0)
                    if s.get("name") not in names:
                        names.append(s.get("name"))
            if job.keep:
                for name in names:
                    async with lock.exclusive():
                        res = await self._step(run, J.forget_command(job, repo, name))
                    if isinstance(res, dict):
                        run.forgotten += [d for d in res.get("deleted", []) if isinstance(d, str)]
        elif run.kind == "prune":
            async with lock.shared():
                await self._step(run, J.prune_command(job, repo))
        elif run.kind == "verify":
            async with lock.shared():
                await self._step(run, J.verify_command(job, repo))
        elif run.kind == "restore":
            async with lock.shared():
                res = await self._step(run, J.restore_command(repo, **run.restore))
            if isinstance(res, dict):
                run.bytes_read = int(res.get("written_bytes", 0) or 0)

    async def _step(self, run: Run, cmd: list[str]) -> object:
        if run.abort_reason:
            raise Aborted(run.abort_reason)
        shown = " ".join(cmd[2:]).replace("vmbak.cli.main ", "vmbak ")
        run.log.append(f"{now_iso()} $ {shown}")
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=J.child_env(run.repo), preexec_fn=functools.partial(_die_with_parent, os.getpid()), start_new_session=True, limit=1 << 24)
        run.proc = proc
        stderr: list[str] = []

        async def read_err() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                stderr.append(line)
                run.log.append(f"{now_iso()} {line}")
                if len(run.log) > 4 * self.config.server.log_lines:
                    del run.log[:len(run.log) - self.config.server.log_lines]

        assert proc.stdout is not None
        out, _ = await asyncio.gather(proc.stdout.read(), read_err())
        code = await proc.wait()
        result = J.last_json(out.decode("utf-8", "replace"))
        run.results.append(result)
        if code != 0 and run.abort_reason:
            raise Aborted(run.abort_reason)
        if code != 0:
            raise StepFailed(J.error_of(result, stderr) or f"exit status {code}", code)
        return result

    async def _hook(self, run: Run, which: str, argv: list[str], extra: dict[str, str]) -> None:
        """Run a job's before/after hook; its output goes to the run's log. A before hook that
        fails fails the run (nothing is backed up); an after hook's failure is a warning, and
        it runs whatever the result, also after an abort."""
        if run.abort_reason and which == "before":
            raise Aborted(run.abort_reason)
        run.log.append(f"{now_iso()} {which} hook: {' '.join(argv)}")
        env = {**J.child_env(run.repo), "VMBAK_JOB": run.job.key, "VMBAK_NAME": run.job.name,
               "VMBAK_RUN_ID": str(run.id), **extra}
        env.pop("VMBAK_PASSWORD_FILE", None)  # a hook gets no repository password
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=env, preexec_fn=functools.partial(_die_with_parent, os.getpid()), start_new_session=True)
        run.proc = proc
        assert proc.stdout is not None
        async for raw in proc.stdout:
            run.log.append(f"{now_iso()} {which}: {raw.decode('utf-8', 'replace').rstrip()}")
        code = await proc.wait()
        if code != 0:
            if run.abort_reason and which == "before":
                raise Aborted(run.abort_reason)
            raise StepFailed(f"the {which} hook failed (exit status {code})", code)

    async def abort(self, run: Run, why: str, state: str = "aborted") -> None:
        """Abort a run cleanly: its child gets SIGTERM (it releases its lock and aborts its
        change source, as on Ctrl-C), then SIGKILL if it has not ended after ``stop_timeout``.
        ``state`` is what the run ends as: "aborted", or "interrupted" (run again at the next start)."""
        if run.abort_reason:
            return
        run.abort_reason = why
        run.abort_state = state
        if run in self.queue:
            self.queue.remove(run)
            self.history.start_run(run.id)
            self.history.finish_run(run.id, state, exit_code=None, error=why, bytes_read=0, bytes_added=0,
                                    snapshots=[], forgotten=[], result=None, log=[])
            self.active.pop(run.id, None)
            return
        proc = run.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.server.stop_timeout)
        except TimeoutError:
            log(f"run {run.id}: the child did not stop within {self.config.server.stop_timeout:g} s: killed")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def stop(self) -> None:
        """Stop scheduling; abort (or, with stop = "finish", wait for) running runs."""
        if self.stopping:
            for run in list(self.active.values()):  # a second signal: abort now
                await self.abort(run, "the server is stopping", "interrupted")
            return
        self.stopping = True
        self.wake.set()
        for run in list(self.queue):
            await self.abort(run, "the server stopped before the run started", "interrupted")
        running = [r for r in self.active.values() if r.task is not None]
        if self.config.server.stop == "finish" and running:
            log(f"stopping: waiting for {len(running)} running jobs to finish")
            done, pending = await asyncio.wait([r.task for r in running], timeout=self.config.server.stop_timeout) \
                if running else (set(), set())
            running = [r for r in running if r.task in pending]
        if running:
            log(f"stopping: aborting {len(running)} running jobs")
        await asyncio.gather(*(self.abort(r, "the server is stopping", "interrupted") for r in running))
        tasks = [r.task for r in running if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.server.stop_timeout + 5)

    # ------------------------------------------------------------------ reload
    def reload(self) -> list[str]:
        """Read the configuration again (SIGHUP); running runs keep the one they started with.
        Returns the problems (then nothing changes)."""
        from vmbak.server.config import ConfigError

        try:
            new = load(self.config.path)
        except ConfigError as e:
            return e.problems
        old = self.config
        if (new.server.host, new.server.port, new.server.tls_cert) != (old.server.host, old.server.port,
                                                                        old.server.tls_cert):
            log("warning: listen and TLS changes take effect when the server restarts")
        self.config = new
        self._schedule_all()
        self.wake.set()
        log(f"configuration reloaded: {len(new.jobs)} jobs, {len(new.repositories)} repositories")
        return []

    # ------------------------------------------------------------------ repository facts
    async def refresh_all_repos(self) -> None:
        for repo in list(self.config.repositories.values()):
            await self.refresh_repo(repo)

    async def refresh_repo(self, repo: RepositoryConfig) -> None:
        try:
            self.repo_info[repo.key] = await asyncio.to_thread(repository_facts, self.repos.get(repo))
        except Exception as e:  # noqa: BLE001 - facts for metrics; the runs report real errors
            self.repo_info[repo.key] = {"error": str(e), "latest": {}, "size": None}
        self.wake.set()

    def last_success(self, job: JobConfig) -> float | None:
        """When the job's latest backup was taken: the repository's newest snapshot of its
        name, or the history's last successful run (epoch seconds)."""
        times = []
        r = self.history.last_run(job.key, "backup", "succeeded")
        if r and r["ended"]:
            times.append(parse_iso(r["ended"]).timestamp())
        latest = self.repo_info.get(job.repository, {}).get("latest", {})
        names = [n for n in latest if n == job.name or (job.libvirt and n.startswith(f"{job.name}-"))]
        times += [latest[n] for n in names]
        return max(times) if times else None

    def _check_stale(self) -> float | None:
        """Notify about jobs whose last backup is too old; return when to look again (epoch s)."""
        now = time.time()
        again = None
        for job in self.config.jobs.values():
            hours = job.stale_after_hours if job.stale_after_hours is not None else self.config.notify.stale_after_hours
            if hours is None or not job.enabled or job.key in self.stale_notified:
                continue
            last = self.last_success(job)
            since = last if last is not None else self.started
            if now - since <= hours * 3600:
                deadline = since + hours * 3600
                again = deadline if again is None else min(again, deadline)
            else:
                self.stale_notified.add(job.key)
                when = datetime.fromtimestamp(last, UTC).isoformat(timespec="seconds") if last else None
                log(f"{job.key}: no backup for more than {hours:g} hours (last: {when or 'never'})")
                for cb in self.on_stale:
                    try:
                        cb(job.key, hours, when)
                    except Exception as e:  # noqa: BLE001
                        log(f"warning: stale notification for {job.key}: {type(e).__name__}: {e}")
        return again


class StepFailed(Exception):
    def __init__(self, error: str, code: int | None) -> None:
        super().__init__(error)
        self.error = error
        self.code = code


def open_repository(repo: RepositoryConfig):  # noqa: ANN201 - a vmbak Repository
    """Open a configured repository with the library (for the API and metrics)."""
    from vmbak.repo.repository import Repository

    if repo.s3_endpoint:
        os.environ["VMBAK_S3_ENDPOINT"] = repo.s3_endpoint
    pw = None
    if repo.password_file:
        with open(repo.password_file, encoding="utf-8") as f:
            pw = f.read().rstrip("\r\n")
    r = Repository.open(repo.location, pw)
    from vmbak.repo.s3 import S3Backend, Throttle

    if isinstance(r.backend, S3Backend):  # the API's reads (browse, download) keep to the limits too
        r.backend.upload_limit = Throttle(repo.s3_limit_upload * 1024)
        r.backend.download_limit = Throttle(repo.s3_limit_download * 1024)
    return r


class RepoCache:
    """Opened repositories: the key is derived once (scrypt takes a while); ``get`` returns
    a fresh Repository object sharing it, which sees the repository as it is now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple, object] = {}

    def get(self, rc: RepositoryConfig):  # noqa: ANN201 - a vmbak Repository
        from vmbak.repo.repository import Repository

        key = (rc.location, rc.password_file, rc.s3_endpoint)
        with self._lock:
            base = self._open.get(key)
        if base is None:
            base = open_repository(rc)
            with self._lock:
                self._open[key] = base
        return Repository(base.backend, base.config, base.master)


def repository_facts(r) -> dict:  # noqa: ANN001 - a vmbak Repository
    """The newest snapshot time of each disk name and the repository's size (for metrics and staleness)."""
    from vmbak.engine.retention import parse_snapshot_time

    latest: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in r.manifests():
        t = parse_snapshot_time(m.time).timestamp()
        latest[m.name] = max(latest.get(m.name, 0.0), t)
        counts[m.name] = counts.get(m.name, 0) + 1
    size = sum(r.index.pack_sizes.values())
    return {"latest": latest, "counts": counts, "size": size, "snapshots": sum(counts.values()), "error": None}
