"""Progress reporting: a no-op by default; the command line passes a ``Report``.

The library tells a progress object what it does through the ``Progress`` protocol:
``start(total, label)`` begins a phase that processes ``total`` bytes, ``advance(n)``
counts bytes done, ``close()`` ends it. A progress object may also offer ``phase(name)``
(a phase without a byte count, or the next phase of the same bytes) and
``watch_upload(fn)`` (the bytes a backup has produced for the repository and how many of
them are durable); the helpers ``set_phase`` and ``watch_upload`` call them when present,
so any object with the three protocol methods still works.

``Report`` keeps one command's state across its phases and shows it two ways from the
same numbers: a one-line bar on standard error (only on a terminal), redrawn every 0.2 s,
and, with ``--json``, ``status`` lines on standard output: one at the start, one at each
change of phase, and one a second in between (docs/json.md describes them). A backup's bar is one bar over all its phases:
its percentage and ETA count the bytes to read and the bytes to store, the latter
estimated from the ratio so far until reading ends, so the wait for the last pack
uploads (the upload tail on S3) shows as the last part of the same bar.

This module imports nothing heavy: the command line creates its ``Report`` before it
opens the repository, so that the bar appears at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from vmbak.interrupts import deferred


class Progress(Protocol):
    def start(self, total: int, label: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    """Reports nothing."""

    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def watch_upload(self, fn: Callable[[], tuple[int, int]] | None) -> None:
        pass


def set_phase(progress: object, name: str) -> None:
    """Tell ``progress`` that the command entered phase ``name`` (if it cares)."""
    f = getattr(progress, "phase", None)
    if f is not None:
        f(name)


def watch_upload(progress: object, fn: Callable[[], tuple[int, int]] | None) -> None:
    """Give ``progress`` a function returning (durable bytes, produced bytes) of the data a
    backup stores, so its bar and ETA include the uploads still under way (None: stop)."""
    f = getattr(progress, "watch_upload", None)
    if f is not None:
        f(fn)


def human(n: float) -> str:
    """Bytes in binary units, as everywhere in vmbak (vmbak.engine.common.human, without numpy)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


_OUT_LOCK = threading.Lock()  # one writer at a time on stdout/stderr: status lines, bar frames, log lines
_ACTIVE: list[Report] = []


def close_all() -> None:
    """Stop every running ``Report`` (the command line calls it before its last line)."""
    for r in list(_ACTIVE):
        r.close()


def clear_bar() -> None:
    """Erase a bar from the terminal before another line goes to standard error; the
    bar is drawn again at its next tick, below that line."""
    with _OUT_LOCK:
        for r in _ACTIVE:
            r._erase()


class Report:
    """The progress of one command across its phases, shown as a terminal bar and/or
    JSON status lines (see the module docstring). Thread-safe for one producer (the
    engine's main thread) and its own ticker thread."""

    BAR_TICK = 0.2
    JSON_INTERVAL = 1.0

    def __init__(self, command: str, bar: bool = True, json_out: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.command = command
        self.bar_out = sys.stderr if bar and _isatty(sys.stderr) else None
        self.json_out = json_out
        env = os.environ.get("VMBAK_PROGRESS_INTERVAL")  # seconds between status lines (docs/json.md)
        self.interval = interval if interval is not None else float(env) if env else self.JSON_INTERVAL
        self.t0 = time.monotonic()
        self.phase_name = "open"
        self.total = 0
        self.done = 0
        self.work_t0: float | None = None  # when the first byte-counting phase began
        self.upload: Callable[[], tuple[int, int]] | None = None
        self.upload_final = False  # the bytes produced are all there will be
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False
        self._last_json = 0.0
        self._pct_floor = 0.0  # the percentage shown never goes back within a phase
        self._run()

    # ---------------------------------------------------------------- Progress protocol
    def start(self, total: int, label: str) -> None:
        """Begin phase ``label`` over ``total`` bytes."""
        self.phase_name = label
        self.total = max(0, int(total))
        self.done = 0
        self._pct_floor = 0.0
        if self.work_t0 is None or not self.upload:
            self.work_t0 = time.monotonic()
        self._run(changed=True)

    def advance(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        """Stop drawing and printing; ``start`` may begin another phase later."""
        self._stop.set()
        t = self._thread
        # A signal can interrupt Thread.start() before the thread ran: never join that one.
        if t is not None and t is not threading.current_thread() and t.ident is not None:
            t.join()
        self._thread = None
        with _OUT_LOCK:
            self._erase()
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    # ---------------------------------------------------------------- extensions
    def phase(self, name: str) -> None:
        """Enter phase ``name``; the byte counts stay (an analysis has none; a backup's
        upload tail goes on from its reading)."""
        changed = name != self.phase_name
        self.phase_name = name
        if name == "upload":
            self.upload_final = True
        self._run(changed=changed)

    def watch_upload(self, fn: Callable[[], tuple[int, int]] | None) -> None:
        self.upload = fn
        self.upload_final = False

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- state
    def status(self) -> dict:
        """The current state as a JSON ``status`` message (docs/json.md)."""
        now = time.monotonic()
        done, total = self.done, self.total
        up_done = up_total = None
        work_done, work_total = done, total
        if self.upload is not None:
            up_done, produced = self.upload()
            up_total = produced
            if not self.upload_final and done and total > done:
                up_total = max(produced, int(produced * total / done))  # the ratio so far
            work_done += up_done
            work_total += up_total
        pct = min(1.0, work_done / work_total) if work_total else 0.0
        # a better estimate of the bytes to store may lower the fraction a little: hold it
        pct = self._pct_floor = max(pct, self._pct_floor)
        elapsed = now - self.t0
        work_elapsed = now - self.work_t0 if self.work_t0 is not None else 0.0
        rate = done / work_elapsed if work_elapsed > 0 and done else 0.0
        remaining = None
        if work_done and work_elapsed > 0.2 and work_total:
            remaining = round((work_total - work_done) * work_elapsed / work_done, 1)
        msg = {"message_type": "status", "command": self.command, "phase": self.phase_name,
               "percent_done": round(pct, 4), "bytes_done": done, "total_bytes": total,
               "bytes_per_second": int(rate), "seconds_elapsed": round(elapsed, 1),
               "seconds_remaining": remaining}
        if up_done is not None:
            msg["upload_bytes_done"] = up_done
            msg["upload_bytes_total"] = up_total
        return msg

    # ---------------------------------------------------------------- output
    def _run(self, changed: bool = False) -> None:
        """Make sure the ticker runs; show the state at once when it starts or ``changed``
        (a new phase: one status line and one frame at each change of phase)."""
        if self.bar_out is None and self.json_out is None:
            return
        if self._thread is not None and self._thread.is_alive():
            if changed:
                self._tick(first=True)
            return
        self._stop = threading.Event()
        if self not in _ACTIVE:
            _ACTIVE.append(self)
        self._tick(first=True)
        self._thread = threading.Thread(target=self._loop, name="vmbak-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        tick = self.BAR_TICK if self.bar_out is not None else min(self.interval, 0.25)
        while not self._stop.wait(tick):
            self._tick()

    def _tick(self, first: bool = False) -> None:
        try:
            st = self.status()
        except Exception:  # noqa: BLE001 - an upload callback racing a shutdown: skip a frame
            return
        now = time.monotonic()
        # (in the main thread, a signal waits until the line is out: never half a JSON line)
        with deferred(), _OUT_LOCK:
            if self._stop.is_set() and not first:
                return
            try:
                if self.json_out is not None and (first or now - self._last_json >= self.interval):
                    self._last_json = now
                    self.json_out.write(json.dumps(st) + "\n")
                    self.json_out.flush()
                if self.bar_out is not None:
                    self.bar_out.write("\r" + self._frame(st) + "\x1b[K")
                    self.bar_out.flush()
                    self._drawn = True
            except (OSError, ValueError):  # a closed pipe: the command line reports it
                self._stop.set()

    def _frame(self, st: dict) -> str:
        """One line: ``backup read:  36% |#####     | 156.0 MiB/300.0 MiB 116.9 MiB/s stored
        64.0 MiB/307.7 MiB ETA 0:02``; on a narrow terminal the details go first, the
        percentage and the ETA last."""
        try:
            cols = os.get_terminal_size(self.bar_out.fileno()).columns if self.bar_out is not None else 80
        except (OSError, ValueError):
            cols = shutil.get_terminal_size((80, 24)).columns
        cols = max(20, cols)
        pct = st["percent_done"]
        parts = []
        if st["total_bytes"]:
            parts.append(f"{human(st['bytes_done'])}/{human(st['total_bytes'])}")
        if st["bytes_per_second"]:
            parts.append(f"{human(st['bytes_per_second'])}/s")
        if st.get("upload_bytes_total"):
            parts.append(f"stored {human(st['upload_bytes_done'])}/{human(st['upload_bytes_total'])}")
        eta = st["seconds_remaining"]
        # "check: 53%", not "check check: 53%", where the phase is named after the command
        what = self.command if st["phase"] == self.command else f"{self.command} {st['phase']}"
        head = f"{what}: {pct * 100:3.0f}% "
        end = f"ETA {clock(eta) if eta is not None else '-:--'}"
        while True:
            tail = " ".join([*parts, end])
            room = cols - 1 - len(head) - len(tail) - 3
            if room >= 10 or not parts:
                break
            parts.pop()
        width = min(40, room)
        if width < 5:
            return (head + end)[:cols - 1]
        fill = int(pct * width)
        return f"{head}|{'#' * fill}{' ' * (width - fill)}| {tail}"

    def _erase(self) -> None:
        """(Under _OUT_LOCK.) Remove the bar's line from the terminal."""
        if self._drawn and self.bar_out is not None:
            try:
                self.bar_out.write("\r\x1b[K")
                self.bar_out.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False


class BarProgress(Report):
    """A terminal bar on standard error (only on a terminal), nothing on standard output."""

    def __init__(self, command: str = "vmbak") -> None:
        super().__init__(command, bar=True, json_out=None)


def _isatty(f: TextIO) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False
