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

The standard library's thread and process code (``threading``, ``queue``,
``concurrent.futures``, ``subprocess``) takes an exception only where it blocks: it is
written for Ctrl-C in a wait, not at any bytecode. Raised between a lock's acquire and
the ``with`` or ``try`` that releases it, an exception leaves that lock held for ever; a
worker then hangs on it, and so does the pool's shutdown and the interpreter's exit
(one SIGTERM in about a thousand, sent while a backup started its threads, hung the
process). So the handler raises only where every frame of that code on the main
thread's stack stands at one of its waits (``_SAFE_WAITS``); elsewhere it holds the
signal back and sends it again to the main thread a moment later, until it lands at
such a point. A blocking wait is such a point, so a wait is still interrupted at once.

This module imports nothing heavy: it must be usable before anything else is imported.
The library never installs handlers itself; embedding programs keep their own.
"""

from __future__ import annotations

# Only built-in modules here (no import time): the command line installs the handlers
# before anything else is loaded.
import _signal
import _thread
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT, SIGTERM or SIGHUP; ``exit_code`` is 128 + the signal number
    (130, 143, 129), as a shell reports a process killed by it."""

    def __init__(self, signum: int = _signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


# raised: the first signal was raised (cleanup runs; later signals are ignored);
# pending: a signal held back by deferred(); depth: deferred() nesting in the main thread;
# held: install(hold=True) holds signals until release()
# retrying: a signal raised at an unsafe point is being sent again (_retry)
_state = {"raised": False, "pending": 0, "depth": 0, "held": False, "main": _thread.get_ident(),
          "retrying": False}
_cleanups: dict[int, Callable[[], None]] = {}
_cleanup_lock = _thread.allocate_lock()
_next_token = [0]


# Where the standard library's thread and process code may take an exception: for each
# function, the lines (found by their text, so no Python version's line numbers are
# assumed) at which it waits inside a ``try`` or ``with`` that undoes what it holds, or
# calls such a wait. A frame of these modules anywhere else (a lock just taken, a thread
# half registered) is not interrupted. A line not found (another Python's text) only
# delays the signal until that code returns.
_SAFE_WAITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("threading", "Condition.wait"): ("waiter.acquire(",),
    ("threading", "Condition.wait_for"): ("self.wait(",),
    ("threading", "Event.wait"): ("self._cond.wait(",),
    ("threading", "Semaphore.acquire"): ("self._cond.wait(",),
    ("threading", "Thread.join"): ("self._wait_for_tstate_lock(", "self._handle.join("),  # 3.11; 3.13
    ("threading", "Thread._wait_for_tstate_lock"): ("lock.acquire(block, timeout)",),
    ("queue", "Queue.get"): ("self.not_empty.wait(",),
    ("queue", "Queue.put"): ("self.not_full.wait(",),
    ("queue", "Queue.join"): ("self.all_tasks_done.wait(",),
    ("concurrent.futures._base", "Future.result"): ("self._condition.wait(",),
    ("concurrent.futures._base", "Future.exception"): ("self._condition.wait(",),
    ("concurrent.futures._base", "_result_or_cancel"): ("fut.result(",),
    ("concurrent.futures._base", "Executor.map.<locals>.result_iterator"): ("_result_or_cancel(",),
    ("concurrent.futures._base", "wait"): ("waiter.event.wait(",),
    ("concurrent.futures._base", "as_completed"): ("waiter.event.wait(",),
    ("concurrent.futures._base", "Executor.__exit__"): ("self.shutdown(",),
    ("concurrent.futures.thread", "ThreadPoolExecutor.shutdown"): ("t.join(",),
    ("subprocess", "run"): ("process.communicate(", "process.wait("),
    ("subprocess", "call"): ("p.wait(",),
    ("subprocess", "check_call"): ("retcode = call(",),
    ("subprocess", "check_output"): ("return run(",),
    ("subprocess", "Popen.__exit__"): ("self.wait()", "self._wait(timeout="),
    ("subprocess", "Popen.communicate"): ("self._communicate(", ".read()", "self.wait()", "self._wait(timeout=",
                                          "self._stdin_write(input)"),
    ("subprocess", "Popen._stdin_write"): ("self.stdin.write(input)",),
    ("subprocess", "Popen._communicate"): ("selector.select(", "self.wait(timeout="),
    ("subprocess", "Popen.wait"): ("self._wait(timeout=",),
    ("subprocess", "Popen._wait"): ("self._try_wait(0)", "time.sleep(delay)"),
    ("subprocess", "Popen._try_wait"): ("os.waitpid(",),
}
_GUARDED = frozenset(m for m, _ in _SAFE_WAITS)
_safe_lines: dict[object, frozenset[int]] = {}  # code object -> its lines that match
_source: dict[str, list[str]] = {}


def _lines_of(code: object, fragments: tuple[str, ...]) -> frozenset[int]:
    name = code.co_filename  # type: ignore[attr-defined]
    text = _source.get(name)
    if text is None:
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read().splitlines()
        except (OSError, ValueError):
            text = []
        _source[name] = text
    found = set()
    for _, _, line in code.co_lines():  # type: ignore[attr-defined]
        if line is not None and 0 < line <= len(text) and any(f in text[line - 1] for f in fragments):
            found.add(line)
    return frozenset(found)


def _safe_point(frame: object) -> bool:
    """Whether an exception may be raised in the main thread at ``frame``: no frame of
    the guarded modules on the stack stands outside its waits (``_SAFE_WAITS``)."""
    while frame is not None:
        module = frame.f_globals.get("__name__")  # type: ignore[attr-defined]
        if module in _GUARDED:
            code = frame.f_code  # type: ignore[attr-defined]
            lines = _safe_lines.get(code)
            if lines is None:
                fragments = _SAFE_WAITS.get((module, code.co_qualname), ())
                lines = _safe_lines[code] = _lines_of(code, fragments) if fragments else frozenset()
            if frame.f_lineno not in lines:  # type: ignore[attr-defined]
                return False
        frame = frame.f_back  # type: ignore[attr-defined]
    return True


def _retry(signum: int) -> None:
    pause = _thread.allocate_lock()
    pause.acquire()
    pause.acquire(timeout=0.002)  # a sleep without importing time
    _state["retrying"] = False
    try:
        _signal.pthread_kill(_state["main"], signum)  # a real signal: it ends a blocking wait
    except OSError:
        pass  # the main thread is gone: the process is exiting


def _handler(signum: int, frame: object) -> None:
    if _state["raised"]:
        return  # the cleanup of the first signal is under way
    if _state["depth"] > 0:
        if not _state["pending"]:
            _state["pending"] = signum
        return
    if not _safe_point(frame):
        if not _state["retrying"]:
            _state["retrying"] = True  # before the start: the helper clears it
            try:
                _thread.start_new_thread(_retry, (signum,))
            except RuntimeError:  # the interpreter is shutting down: there is nothing to stop
                _state["retrying"] = False
        return
    _state["raised"] = True
    raise Interrupted(signum)


def _redeliver(signum: int) -> None:
    pause = _thread.allocate_lock()
    pause.acquire()
    pause.acquire(timeout=0.05)  # a sleep without importing time
    _thread.interrupt_main(signum)  # runs _handler in the main thread (nothing once quiet())


def _unraisable(info: object) -> None:
    """A signal that lands while the main thread runs a ``__del__`` or a weakref callback
    (the garbage collector runs them at any moment) raises ``Interrupted`` where Python
    cannot propagate it: it would be printed as "Exception ignored" and the command would
    go on as if nothing had happened. Deliver it again a moment later instead, when the
    main thread is back in ordinary code."""
    exc = getattr(info, "exc_value", None)
    if isinstance(exc, Interrupted):
        _state["raised"] = False
        _thread.start_new_thread(_redeliver, (exc.signum,))
        return
    _previous_unraisablehook[0](info)


_previous_unraisablehook = [sys.unraisablehook]


def install(hold: bool = False) -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread (call it
    from the main thread). With ``hold``, a signal is held back until ``release()``:
    the entry point holds them from its first line until it stands in the ``try`` that
    reports them."""
    _state["main"] = _thread.get_ident()
    if sys.unraisablehook is not _unraisable:
        _previous_unraisablehook[0] = sys.unraisablehook
        sys.unraisablehook = _unraisable
    if hold and not _state["held"]:
        _state["held"] = True
        _state["depth"] += 1
    for name in SIGNALS:
        sig = getattr(_signal, name, None)
        if sig is not None:
            _signal.signal(sig, _handler)


def release() -> None:
    """End an ``install(hold=True)``: raise a signal that came meanwhile."""
    if _state["held"]:
        _state["held"] = False
        _Deferred().__exit__(None, None, None)


def quiet() -> None:
    """The command is over: from now on these signals are ignored (the process is exiting)."""
    for name in SIGNALS:
        sig = getattr(_signal, name, None)
        if sig is not None:
            _signal.signal(sig, _signal.SIG_IGN)


class _Deferred:
    def __enter__(self) -> None:
        if _thread.get_ident() == _state["main"]:
            _state["depth"] += 1

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if _thread.get_ident() != _state["main"]:
            return
        _state["depth"] -= 1
        if exc_type is None and _state["depth"] == 0 and _state["pending"] and not _state["raised"]:
            _state["raised"] = True
            raise Interrupted(_state["pending"])


def deferred() -> _Deferred:
    """A context manager: hold back SIGINT/SIGTERM/SIGHUP in the main thread until the
    block ends; a signal that came meanwhile is raised as ``Interrupted`` then (unless
    the block already raises). Keep the block short: it is not interruptible. In other
    threads (which never receive signals) it does nothing."""
    return _Deferred()


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
