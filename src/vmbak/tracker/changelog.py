"""The tracker's change log: one JSON object per line, appended, next to the bitmaps.

Every start, recovery, checkpoint, commit, abort and stop is recorded, so an operator can
see why a backup was incremental, or why it had to fall back to a scan.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

_lock = threading.Lock()


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def append(path: str, event: str, **fields: Any) -> dict:
    rec = {"time": now_iso(), "event": event, **fields}
    line = (json.dumps(rec, sort_keys=False) + "\n").encode()
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    return rec


def read(path: str) -> list[dict]:
    """All records; lines that do not parse (a torn last line after a crash) are skipped."""
    out: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


_SKIP = ("time", "event")


def format_record(rec: dict) -> str:
    parts = [str(rec.get("time", "?")), f"{rec.get('event', '?'):<10}"]
    msg = rec.get("message")
    for k, v in rec.items():
        if k in _SKIP or k == "message" or v is None or v == [] or v == {}:
            continue
        if isinstance(v, list):
            v = "; ".join(str(x) for x in v)
        parts.append(f"{k}={v}")
    if msg:
        parts.append(f"- {msg}")
    return " ".join(parts)
