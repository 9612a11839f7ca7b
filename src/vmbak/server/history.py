"""The job history: an SQLite file in the state directory.

It is a cache of what the server did (runs: start, end, result, bytes, log lines, snapshot
ids) and of when each schedule last fired; the repository stays the source of truth for
snapshots. Deleting the file loses the run history and nothing else.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import UTC, datetime

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    kind TEXT NOT NULL,            -- backup, prune, verify
    trigger TEXT NOT NULL,         -- schedule, manual, missed, resumed
    state TEXT NOT NULL,           -- queued, running, succeeded, failed, aborted, interrupted
    scheduled TEXT,                -- the schedule time it stands for (ISO, UTC)
    queued TEXT NOT NULL,
    started TEXT,
    ended TEXT,
    duration_s REAL,
    exit_code INTEGER,
    error TEXT,
    bytes_read INTEGER DEFAULT 0,
    bytes_added INTEGER DEFAULT 0,
    snapshots TEXT DEFAULT '[]',   -- JSON list of snapshot ids
    forgotten TEXT DEFAULT '[]',   -- JSON list of snapshot ids removed by retention
    result TEXT,                   -- JSON: the final summary of the commands run
    log TEXT DEFAULT ''            -- the log lines, one per line
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, id);
CREATE TABLE IF NOT EXISTS ticks (
    job TEXT NOT NULL,
    kind TEXT NOT NULL,
    last TEXT NOT NULL,            -- the last schedule time handled (ISO, UTC)
    PRIMARY KEY (job, kind)
);
"""

FINAL_STATES = ("succeeded", "failed", "aborted", "interrupted")
RUN_FIELDS = ("id", "job", "kind", "trigger", "state", "scheduled", "queued", "started", "ended", "duration_s",
              "exit_code", "error", "bytes_read", "bytes_added", "snapshots", "forgotten", "result")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class History:
    """Thread-safe access to the history file (one connection, one lock: writes are tiny)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    # ------------------------------------------------------------------ runs
    def add_run(self, job: str, kind: str, trigger: str, scheduled: str | None) -> int:
        cur = self._exec("INSERT INTO runs (job, kind, trigger, state, scheduled, queued) VALUES (?, ?, ?, 'queued', ?, ?)",
                         (job, kind, trigger, scheduled, now_iso()))
        return int(cur.lastrowid)

    def start_run(self, rid: int) -> str:
        t = now_iso()
        self._exec("UPDATE runs SET state = 'running', started = ? WHERE id = ?", (t, rid))
        return t

    def finish_run(self, rid: int, state: str, *, exit_code: int | None, error: str | None, bytes_read: int,
                   bytes_added: int, snapshots: list[str], forgotten: list[str], result: object,
                   log: list[str]) -> None:
        row = self.run(rid)
        ended = now_iso()
        dur = None
        if row and row["started"]:
            dur = round((parse_iso(ended) - parse_iso(row["started"])).total_seconds(), 3)
        self._exec("UPDATE runs SET state = ?, ended = ?, duration_s = ?, exit_code = ?, error = ?, bytes_read = ?, "
                   "bytes_added = ?, snapshots = ?, forgotten = ?, result = ?, log = ? WHERE id = ?",
                   (state, ended, dur, exit_code, error, bytes_read, bytes_added, json.dumps(snapshots),
                    json.dumps(forgotten), json.dumps(result), "\n".join(log), rid))

    def interrupted_runs(self) -> list[dict]:
        """Runs a server that stopped without finishing them left queued or running."""
        rows = self._exec(f"SELECT {', '.join(RUN_FIELDS)} FROM runs WHERE state IN ('queued', 'running')").fetchall()
        return [self._row(r) for r in rows]

    def mark_interrupted(self, rid: int, why: str) -> None:
        self._exec("UPDATE runs SET state = 'interrupted', ended = ?, error = ? WHERE id = ?", (now_iso(), why, rid))

    @staticmethod
    def _row(r: tuple, log: str | None = None) -> dict:
        d = dict(zip(RUN_FIELDS, r, strict=True))
        for k in ("snapshots", "forgotten"):
            d[k] = json.loads(d[k] or "[]")
        d["result"] = json.loads(d["result"]) if d["result"] else None
        if log is not None:
            d["log"] = log.split("\n") if log else []
        return d

    def run(self, rid: int, with_log: bool = False) -> dict | None:
        cols = ", ".join(RUN_FIELDS) + ", log"
        r = self._exec(f"SELECT {cols} FROM runs WHERE id = ?", (rid,)).fetchone()
        if r is None:
            return None
        return self._row(r[:-1], r[-1] if with_log else None)

    def runs(self, job: str | None = None, limit: int = 100, before: int | None = None) -> list[dict]:
        where, args = [], []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        sql = f"SELECT {', '.join(RUN_FIELDS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [self._row(r) for r in self._exec(sql, tuple(args)).fetchall()]

    def last_run(self, job: str, kind: str | None = None, state: str | None = None) -> dict | None:
        sql = f"SELECT {', '.join(RUN_FIELDS)} FROM runs WHERE job = ?"
        args: list = [job]
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if state:
            sql += " AND state = ?"
            args.append(state)
        else:
            sql += f" AND state IN ({', '.join('?' * len(FINAL_STATES))})"
            args += FINAL_STATES
        r = self._exec(sql + " ORDER BY id DESC LIMIT 1", tuple(args)).fetchone()
        return self._row(r) if r else None

    # ------------------------------------------------------------------ schedule ticks
    def last_tick(self, job: str, kind: str) -> str | None:
        r = self._exec("SELECT last FROM ticks WHERE job = ? AND kind = ?", (job, kind)).fetchone()
        return r[0] if r else None

    def set_tick(self, job: str, kind: str, when: str) -> None:
        self._exec("INSERT INTO ticks (job, kind, last) VALUES (?, ?, ?) "
                   "ON CONFLICT (job, kind) DO UPDATE SET last = excluded.last", (job, kind, when))

    # ------------------------------------------------------------------ for metrics
    def totals(self) -> list[tuple[str, str, str, int, int, int, float]]:
        """(job, kind, state, runs, bytes read, bytes added, seconds) over every finished run."""
        return [tuple(r) for r in self._exec(
            "SELECT job, kind, state, COUNT(*), COALESCE(SUM(bytes_read), 0), COALESCE(SUM(bytes_added), 0), "
            "COALESCE(SUM(duration_s), 0) FROM runs WHERE state IN ('succeeded', 'failed', 'aborted', 'interrupted') "
            "GROUP BY job, kind, state").fetchall()]
