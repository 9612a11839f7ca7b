"""SIGINT, SIGTERM and SIGHUP end a command the same way: cleanly.

The command line installs ``install()`` as the very first thing it does. Each of the
three signals then raises ``Interrupted`` (a KeyboardInterrupt) in the main thread, so
every ``finally`` and ``except BaseException`` that cleans up after Ctrl-C (repository
locks, partial files, QEMU and NBD children) also runs for ``kill`` and a closed
terminal. Only the first signal raises: later ones are ignored while the cleanup runs.

Two tools close the gaps an exception raised at an arbitrary bytecode leaves:

* ``deferred()``: a short critical section (create a lock file *and* remember it) in
  which a signal is held back and raised when the section ends;
* ``register_cleanup()``: an action (remove a partial file, release a lock) that the
  command line runs on its way out if its owner never got the chance.

This module imports nothing heavy: it must be usable before anything else is imported.
The library never installs handlers itself; embedding programs keep their own.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT, SIGTERM or SIGHUP; ``exit_code`` is 128 + the signal number
    (130, 143, 129), as a shell reports a process killed by it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


_local = threading.local()
_state = {"installed": False, "raised": False, "pending": 0}
_cleanups: dict[int, Callable[[], None]] = {}
_cleanup_lock = threading.Lock()
_next_token = [0]


def _depth() -> int:
    return getattr(_local, "depth", 0)


def _handler(signum: int, frame: object) -> None:
    if _state["raised"]:
        return  # cleanup of the first signal is under way
    if _depth() > 0:
        if not _state["pending"]:
            _state["pending"] = signum
        return
    _state["raised"] = True
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread."""
    for name in SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _handler)
    _state["installed"] = True


def quiet() -> None:
    """The command is over: from now on a signal only ends the process, silently."""
    for name in SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP in the main thread until the block ends; a signal
    that came meanwhile is raised as ``Interrupted`` then (unless the block already
    raises). Keep the block short: it is not interruptible."""
    _local.depth = _depth() + 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _local.depth = _depth() - 1
        if ok and _local.depth == 0 and _state["pending"] and not _state["raised"] \
                and threading.current_thread() is threading.main_thread():
            _state["raised"] = True
            raise Interrupted(_state["pending"])


def register_cleanup(action: Callable[[], None]) -> int:
    """Remember ``action`` to run at exit if its owner does not unregister it; return a token."""
    with _cleanup_lock:
        _next_token[0] += 1
        _cleanups[_next_token[0]] = action
        return _next_token[0]


def unregister_cleanup(token: int | None) -> None:
    if token is None:
        return
    with _cleanup_lock:
        _cleanups.pop(token, None)


def run_cleanups() -> None:
    """Run (newest first) every registered action that is still pending; never raises."""
    with _cleanup_lock:
        actions = [a for _, a in sorted(_cleanups.items(), reverse=True)]
        _cleanups.clear()
    for a in actions:
        try:
            a()
        except Exception:  # noqa: BLE001, S110 - best effort on the way out
            pass
