"""Guest-consistent backups: hook scripts and a filesystem freeze around the point in time.

A ``Quiescer`` is used in three steps by a backup with a point-in-time view (libvirt,
``qemu:``, ``track:``)::

    q.start()                 # the pre hook (a failure aborts: HookError)
    with q.frozen():          # freeze (per --freeze), then the checkpoint is made inside,
        make_checkpoint()     # then thaw at once; after a successful checkpoint, the post hook
    ...                       # the backup reads the point-in-time view
    q.close(ok)               # the post hook, if it has not run yet (the pre hook ran)

A plain disk file has no point in time apart from the read itself: ``start`` before it is
opened, ``close`` once the backup is saved or failed, and no freeze.

Freeze modes: ``never``; ``auto`` (freeze when the guest agent answers, otherwise a
crash-consistent backup, with a note saying why); ``always`` (no agent, or a freeze that
fails, is a one-line error and no backup is taken).

The guest is never left frozen: the thaw runs in a ``finally``; SIGINT and SIGTERM that
arrive while frozen are held until the thaw is done and then raised as
KeyboardInterrupt. Before it freezes, vmbak writes a state file
(``$VMBAK_STATE_DIR`` or ``/run/vmbak``, ``freeze-*.json``) that names the guest and its pid;
the thaw removes it. A vmbak killed with ``kill -9`` in between leaves it, and the next run
against that guest thaws the guest and says so (``recover``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmbak import user_environment
from vmbak.errors import VmbakError
from vmbak.guest.agent import AgentError, AgentUnavailable

FREEZE_MODES = ("auto", "always", "never")
FROZEN = "frozen"  # the guest's filesystems were frozen by its agent at the point in time
CRASH = "crash"  # a point-in-time view of a running guest, not frozen (as after a power cut)
HOOKS = "hooks"  # no point-in-time view: only the hook scripts made the disk consistent
OFFLINE = "offline"  # the guest was shut off: its disks were read at rest (a paused start, no guest code ran)
HOOK_TIMEOUT = 600.0
Log = Callable[[str], None]


class HookError(VmbakError):
    """The pre hook failed: no backup is taken."""


def state_dir() -> str:
    d = os.environ.get("VMBAK_STATE_DIR")
    if d:
        return d
    if os.geteuid() == 0:
        return "/run/vmbak"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", f"vmbak-{os.getuid()}")


def _state_path(key: str) -> str:
    return os.path.join(state_dir(), f"freeze-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def _vmbak_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"vmbak" in f.read()
    except OSError:
        return False


# ---------------------------------------------------------------------------- hooks
@dataclass
class Hooks:
    """``pre`` and ``post`` scripts (paths; run without a shell) and the environment that
    names what is backed up: VMBAK_VM, VMBAK_DISK, VMBAK_NAME, VMBAK_SOURCE, VMBAK_FREEZE."""

    pre: str | None = None
    post: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = HOOK_TIMEOUT

    def run(self, phase: str, extra: dict[str, str] | None = None) -> tuple[int, str]:
        """Run one hook; (exit status, output). Never raises for the script's own failure."""
        path = self.pre if phase == "pre" else self.post
        assert path is not None
        # vmbak's own VMBAK_* settings (the repository password among them) stay out
        inherited = {k: v for k, v in user_environment().items() if not k.startswith("VMBAK_")}
        env = {**inherited, **self.env, **(extra or {}), "VMBAK_HOOK_PHASE": phase}
        try:
            p = subprocess.run([path], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               errors="replace", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {self.timeout:.0f} s"
        except OSError as e:
            return -1, str(e.strerror or e)
        return p.returncode, (p.stdout + p.stderr).strip()


# ---------------------------------------------------------------------------- signals
@contextlib.contextmanager
def _held_signals(wake: threading.Event) -> Iterator[None]:
    """Hold SIGINT and SIGTERM (main thread only) until the block is left; then raise
    KeyboardInterrupt if one came. ``wake`` is set when one comes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum: int, frame: object) -> None:
        got.append(signum)
        wake.set()

    for s in old:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got and not all(old[s] == signal.SIG_IGN for s in got):
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- the quiescer
class Quiescer:
    """Hooks and freeze around one backup's point in time; see the module documentation.

    ``agent``: a callable that connects to the guest agent (``LibvirtAgent``/``SocketAgent``),
    or None when the source has no agent; ``agent_key`` names the guest for the state file
    (needed to recover even when ``agent`` is never called)."""

    def __init__(self, *, mode: str = "auto", agent: Callable[[], object] | None = None,
                 agent_key: str | None = None, guest: str = "the guest", mountpoints: list[str] | None = None,
                 hooks: Hooks | None = None, point_in_time: bool = True, log: Log | None = None) -> None:
        if mode not in FREEZE_MODES:
            raise VmbakError(f"unknown --freeze mode {mode!r} (use {', '.join(FREEZE_MODES)})")
        if mode == "always" and agent is None:
            raise VmbakError(f"--freeze always needs a guest agent, and {guest} has none "
                             "(use --libvirt DOMAIN, or --guest-agent SOCKET with qemu: or track:)")
        self.mode = mode
        self._connect = agent
        self.agent_key = agent_key
        self.guest = guest
        self.mountpoints = list(mountpoints or [])
        self.hooks = hooks or Hooks()
        self.point_in_time = point_in_time
        self.log = log or (lambda s: None)
        self.notes: list[str] = []
        self.level: str | None = None
        self.frozen_count = 0
        self.frozen_s: float | None = None
        self.freeze_error: str | None = None
        self._agent: object = None
        self._pre_ran = False
        self._post_ran = False
        self.hooks_run: list[str] = []
        # set by SIGINT/SIGTERM while frozen (main thread), or by ``interrupt`` (another thread
        # freezing: vmbak.changes.libvirt_early)
        self.wake = threading.Event()

    # -- notes
    def _note(self, msg: str, show: bool = True) -> None:
        self.notes.append(msg)
        if show:
            self.log(msg)

    # -- agent
    def _agent_obj(self):  # noqa: ANN202
        if self._agent is None:
            assert self._connect is not None
            self._agent = self._connect()
        return self._agent

    def close_agent(self) -> None:
        a, self._agent = self._agent, None
        if a is not None:
            a.close()  # type: ignore[attr-defined]

    def recover(self) -> None:
        """Thaw a guest that a vmbak killed while it was frozen left frozen (its state file
        names this guest and a process that no longer runs), and say so."""
        if self.agent_key is None or self._connect is None:
            return
        path = _state_path(self.agent_key)
        try:
            with open(path, encoding="utf-8") as f:
                st = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            st = {}
        pid = int(st.get("pid") or 0)
        if pid and _vmbak_alive(pid) and pid != os.getpid():
            return  # that vmbak still runs; it thaws its guest itself
        try:
            n = self._agent_obj().thaw()  # type: ignore[attr-defined]
        except AgentError as e:
            self._note(f"guest: a vmbak (pid {pid}) was killed while {self.guest} was frozen, and the "
                       f"thaw failed ({e}); the guest agent may be gone")
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if n:
            self._note(f"guest: thawed {n} filesystems of {self.guest} that an interrupted vmbak "
                       f"(pid {pid}, since {st.get('time', '?')}) left frozen")
        else:
            self._note(f"guest: an interrupted vmbak (pid {pid}) left a freeze record for {self.guest}, "
                       "but nothing was frozen")

    # -- hooks
    def start(self) -> None:
        """Run the pre hook; a failure (non-zero exit, not executable, timeout) raises
        HookError and no backup is taken (the post hook still runs in ``close``)."""
        if self.hooks.pre is None:
            return
        self._pre_ran = True
        rc, out = self.hooks.run("pre")
        if rc != 0:
            last = out.splitlines()[-1] if out else ""
            self._run_post("failed")
            raise HookError(f"pre hook {self.hooks.pre} failed ({'exit ' + str(rc) if rc >= 0 else 'not run'})"
                            f"{': ' + last if last else ''}; no backup taken")
        self.hooks_run.append("pre")
        for line in out.splitlines()[:20]:
            self.log(f"hook pre: {line}")

    def _run_post(self, status: str) -> None:
        if self.hooks.post is None or self._post_ran or not (self._pre_ran or self.hooks.pre is None):
            return
        self._post_ran = True
        rc, out = self.hooks.run("post", {"VMBAK_STATUS": status, "VMBAK_CONSISTENCY": self.level or ""})
        if rc != 0:
            last = out.splitlines()[-1] if out else ""
            self._note(f"warning: post hook {self.hooks.post} failed "
                       f"({'exit ' + str(rc) if rc >= 0 else 'not run'}){': ' + last if last else ''}")
        else:
            self.hooks_run.append("post")
            for line in out.splitlines()[:20]:
                self.log(f"hook post: {line}")

    def close(self, ok: bool) -> None:
        """The backup is over (saved, or failed): the post hook if it has not run, and
        the agent connection."""
        try:
            if self.level is None and not self.point_in_time and (self._pre_ran or self.hooks.post):
                self.level = HOOKS
            self._run_post("ok" if ok else "failed")
        finally:
            self.close_agent()

    # -- freeze
    def _freeze(self) -> bool:
        """Freeze per the mode; True when frozen. Raises VmbakError in mode always."""
        if self.mode == "never":
            self._note(f"guest: --freeze never: {self.guest} is not frozen (crash-consistent)")
            return False
        if self._connect is None:  # none configured (qemu:, track: without --guest-agent): a note only
            self._note(f"guest: no guest agent for {self.guest}: crash-consistent backup", show=False)
            return False
        path = _state_path(self.agent_key or "")
        try:
            agent = self._agent_obj()
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "guest": self.guest, "key": self.agent_key,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.frozen_count = int(agent.freeze(self.mountpoints or None))  # type: ignore[attr-defined]
            return True
        except AgentError as e:
            # A freeze that failed half-way, or whose answer was garbage, may have frozen
            # something: thaw. If that thaw cannot be confirmed either, the state file stays,
            # and the next vmbak run against this guest thaws it (``recover``).
            thawed = isinstance(e, AgentUnavailable) and self._agent is None
            with contextlib.suppress(AgentError, AttributeError, ValueError, TypeError):
                if self._agent is not None:
                    self._agent.thaw()  # type: ignore[attr-defined]
                    thawed = True
            if thawed or isinstance(e, AgentUnavailable):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self.freeze_error = str(e)
            why = "does not answer" if isinstance(e, AgentUnavailable) else "cannot freeze"
            if self.mode == "always":
                raise VmbakError(f"the guest agent of {self.guest} {why} ({e}); --freeze always: "
                                 "no backup taken") from None
            self._note(f"guest: the guest agent of {self.guest} {why} ({e}): crash-consistent backup")
            return False

    def _thaw(self) -> None:
        try:
            self._agent_obj().thaw()  # type: ignore[attr-defined]
        except AgentError as e:
            # Keep the state file: the next run thaws again.
            raise VmbakError(f"could not thaw {self.guest} ({e}); the next vmbak run against it "
                             "thaws it again") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_state_path(self.agent_key or ""))

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Freeze (per the mode) for the duration of the block, which makes the checkpoint;
        thaw on every way out. After a checkpoint that succeeded, the post hook runs."""
        t0 = time.monotonic()
        wake = self.wake
        with _held_signals(wake):
            is_frozen = self._freeze()
            t1 = time.monotonic()
            try:
                if is_frozen:
                    pause = float(os.environ.get("VMBAK_TEST_FREEZE_PAUSE") or 0)
                    if pause > 0:  # tests only: make the frozen window observable
                        wake.wait(pause)
                yield
            finally:
                if is_frozen:
                    self._thaw()
                    self.frozen_s = round(time.monotonic() - t1, 3)
                    self._note(f"guest: {self.guest}: {self.frozen_count} filesystems frozen for "
                               f"{self.frozen_s:.3f} s (freeze took {t1 - t0:.3f} s)")
        self.level = FROZEN if is_frozen else CRASH
        self._run_post("ok")

    def interrupt(self) -> None:
        """End a freeze that ``frozen`` holds in another thread as soon as it can (the
        thaw follows at once)."""
        self.wake.set()

    def at_rest(self) -> None:
        """The guest is shut off (started paused only to read its disks): nothing to freeze;
        its disks are as its last shutdown left them."""
        self.level = OFFLINE
        self._note(f"guest: {self.guest} is shut off: its disks are read at rest, nothing to freeze", show=False)

    def record(self) -> dict:
        """The manifest's ``guest_consistency`` header field."""
        out: dict = {"level": self.level or (CRASH if self.point_in_time else HOOKS), "freeze": self.mode}
        if self.level == FROZEN:
            out["filesystems"] = self.frozen_count
            out["frozen_s"] = self.frozen_s
            if self.mountpoints:
                out["mountpoints"] = self.mountpoints
        if self.freeze_error:
            out["error"] = self.freeze_error
        if self.hooks_run:
            out["hooks"] = list(self.hooks_run)
        return out
