"""Shared command-line plumbing: repository opening, passwords, output."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import select
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from vmbak import user_environment
from vmbak.engine.progress import Report, clear_bar
from vmbak.errors import PasswordMissing, UsageError, VmbakError, printable
from vmbak.interrupts import deferred
from vmbak.repo.repository import Repository


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the lines of descriptions and epilogs as written (examples, tables), but wraps
    a prose line (one that starts in the first column) that is wider than the help."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent) + "\n"
                       if len(line) > width and line[:1].strip() else indent + line + "\n"
                       for line in text.splitlines()).rstrip("\n")


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that takes positional arguments before, between and after options
    (``vmbak restore web:latest --format qcow2 /tmp/x.qcow2``). A parser with subcommands
    parses as usual; each subcommand's parser (this class too) then intermixes. A parser
    asked for argparse's RawDescriptionHelpFormatter gets HelpFormatter, which also wraps
    long prose lines."""

    _intermixing = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        if kw.get("formatter_class") is argparse.RawDescriptionHelpFormatter:
            kw["formatter_class"] = HelpFormatter
        super().__init__(*args, **kw)

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        if self._intermixing or any(a.nargs in (argparse.PARSER, argparse.REMAINDER)
                                    for a in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message: str):  # noqa: ANN201 - never returns
        """A usage error is one line, like every other error (the usage is in --help)."""
        cmd = self.prog.removeprefix("vmbak").strip()
        where = f"{cmd}: " if cmd else ""
        raise UsageError(f"{where}{message} (see {self.prog} --help)")


def counted(n: int, noun: str) -> str:
    """``n`` and the noun in the number it takes: "1 pack", "2 packs", "0 packs"."""
    return f"{n} {noun if n == 1 else noun + 's'}"


def parse_size(text: str) -> int:
    """An argparse type for sizes: 65536, 64K, 256M, 1G (KiB/MiB/GiB)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 256M, 1G)") from None


def apply_s3_options(args: argparse.Namespace) -> None:
    """--s3-endpoint reaches the S3 backend through $VMBAK_S3_ENDPOINT (this process only)."""
    ep = getattr(args, "s3_endpoint", None)
    if ep:
        os.environ["VMBAK_S3_ENDPOINT"] = ep


def needs_password(loc: str) -> bool:
    """Whether the repository at ``loc`` is encrypted (True when that cannot be told)."""
    try:
        if loc.startswith("s3:"):
            if not sys.stdin.isatty():
                return True  # no prompt can happen: a password from the environment is harmless
            from vmbak.repo.repository import open_backend

            cfg = json.loads(open_backend(loc).read("config"))
        else:
            with open(os.path.join(loc, "config"), encoding="utf-8") as f:
                cfg = json.load(f)
        return cfg.get("encryption") != "none"
    except (OSError, ValueError, AttributeError, VmbakError):
        return True


def repo_location(args: argparse.Namespace) -> str:
    apply_s3_options(args)
    loc = args.repo or os.environ.get("VMBAK_REPOSITORY")
    if not loc:
        raise VmbakError("no repository given: use -r REPO or set VMBAK_REPOSITORY")
    return loc


PASSWORD_COMMAND_TIMEOUT = 60.0  # seconds; $VMBAK_TOOL_TIMEOUT replaces it, as it does every tool's


def _read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as e:
        raise VmbakError(f"cannot read password file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise VmbakError(f"cannot read password file {path}: it is not UTF-8 text") from None


def run_password_command(command: str, option: str = "--password-command") -> str:
    """Run ``command`` (split like a shell line, but run without a shell) and return the
    first line of its standard output: the password. It inherits standard input, so that
    it may prompt; its standard error is captured. A command that cannot be started, exits
    non-zero, prints nothing or runs longer than PASSWORD_COMMAND_TIMEOUT ($VMBAK_TOOL_TIMEOUT)
    seconds is a VmbakError naming the command (never its output)."""
    import shlex

    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise VmbakError(f"{option} {command!r} cannot be parsed: {e}") from None
    if not argv:
        raise VmbakError(f"{option} is empty")
    timeout = PASSWORD_COMMAND_TIMEOUT
    env_t = os.environ.get("VMBAK_TOOL_TIMEOUT")
    if env_t:
        try:
            timeout = float(env_t)
        except ValueError:
            timeout = 0.0
        if not timeout > 0:
            raise VmbakError(f"VMBAK_TOOL_TIMEOUT must be a number of seconds, not {env_t!r}")
    what = f"{option} {command!r}"
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
                                env=user_environment())
    except OSError as e:
        raise VmbakError(f"{what} cannot be run: {e.strerror or e}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # a child it left behind may hold the pipes open: do not wait for their end
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        proc.wait()
        raise VmbakError(f"{what} did not finish within {timeout:g} s and was stopped") from None
    finally:
        if proc.poll() is None:  # interrupted (a signal): do not leave it running
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        status = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                  else f"exited with status {proc.returncode}")
        raise VmbakError(f"{what} {status}" + (f": {lines[-1][:200]}" if lines else ""))
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        raise VmbakError(f"{what} printed something that is not UTF-8 text") from None
    pw = text.split("\n", 1)[0].rstrip("\r")
    if not pw:
        raise VmbakError(f"{what} printed no password (its first line of output is empty)")
    return pw


def resolve_password(file_opt: str | None, command_opt: str | None, prefix: str = "VMBAK_",
                     option: str = "--password") -> str | None:
    """The password from a file or command given as an option, else from the environment.

    Precedence: ``{option}-file`` or ``{option}-command`` on the command line (not both), then
    ``${prefix}PASSWORD_FILE`` or ``${prefix}PASSWORD_COMMAND`` (not both), then
    ``${prefix}PASSWORD``; None when none of these is set (never asks)."""
    if file_opt and command_opt:
        raise VmbakError(f"{option}-file and {option}-command cannot both be given")
    if file_opt:
        return _read_password_file(file_opt)
    if command_opt:
        return run_password_command(command_opt, f"{option}-command")
    env_file = os.environ.get(f"{prefix}PASSWORD_FILE")
    env_cmd = os.environ.get(f"{prefix}PASSWORD_COMMAND")
    if env_file and env_cmd:
        raise VmbakError(f"${prefix}PASSWORD_FILE and ${prefix}PASSWORD_COMMAND are both set: unset one")
    if env_file:
        return _read_password_file(env_file)
    if env_cmd:
        return run_password_command(env_cmd, f"${prefix}PASSWORD_COMMAND")
    return os.environ.get(f"{prefix}PASSWORD")


def given_password(args: argparse.Namespace) -> str | None:
    """The password from --password-file or --password-command, else $VMBAK_PASSWORD_FILE or
    $VMBAK_PASSWORD_COMMAND, else $VMBAK_PASSWORD; never asks. (A command runs at most once per
    process: its answer is kept on ``args``.)"""
    cached = getattr(args, "_given_password", None)
    if cached is not None:
        return cached
    pw = resolve_password(getattr(args, "password_file", None), getattr(args, "password_command", None))
    if pw is not None:
        args._given_password = pw
    return pw


def password(args: argparse.Namespace, confirm: bool = False) -> str | None:
    pw = given_password(args)
    if pw is not None:
        return pw
    if sys.stdin.isatty():
        try:
            pw = getpass.getpass("repository password: ")
            if confirm and getpass.getpass("repeat password: ") != pw:
                raise VmbakError("passwords do not match")
        except EOFError:  # (Ctrl-C and SIGTERM are interrupts, reported as such by cli/main.py)
            raise PasswordMissing("no password given") from None
        return pw
    return None


def open_repo_and_password(args: argparse.Namespace) -> tuple[Repository, str | None]:
    """The repository, and the password it was opened with (for commands that pass it on)."""
    loc = repo_location(args)
    # Only ask for a password when the repository needs one; a password that was given
    # goes to Repository.open regardless, which refuses an "unencrypted" repository then.
    pw = password(args) if needs_password(loc) else given_password(args)
    repo = Repository.open(loc, pw)
    repo.note = log(args)  # e.g. "snapshot X was rewritten as Y by merge on DATE"
    repo.no_lock = bool(getattr(args, "no_lock", False))
    args.opened_repos = [*getattr(args, "opened_repos", []), repo]  # for damage_warnings()
    return repo, pw


def open_repo(args: argparse.Namespace) -> Repository:
    return open_repo_and_password(args)[0]


def open_repo_meanwhile(args: argparse.Namespace) -> Callable[[], Repository]:
    """Start opening the repository (its key derivation takes a good part of a second and
    releases the GIL) in a thread while the caller prepares other work; the returned
    function waits for it and returns the repository, or raises what opening raised.

    The location and password are found here, in the caller's thread (a prompt, a
    password command). Opening only reads: a caller that fails meanwhile may drop it."""
    import threading

    loc = repo_location(args)
    pw = password(args) if needs_password(loc) else given_password(args)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["repo"] = Repository.open(loc, pw)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="vmbak-open-repo", daemon=True)
    t.start()

    def result() -> Repository:
        t.join()
        if "error" in box:
            raise box["error"]
        repo = box["repo"]
        repo.note = log(args)
        repo.no_lock = bool(getattr(args, "no_lock", False))
        args.opened_repos = [*getattr(args, "opened_repos", []), repo]  # for damage_warnings()
        return repo

    return result


def damage_lines(repo: Repository) -> list[str]:
    """One line for each damaged manifest and index file this process came across."""
    out = []
    for sid, why in sorted(repo.damaged_seen.items()):
        out.append(f"snapshot {sid} is damaged ({why.removeprefix(f'snapshot {sid[:8]}: ')}) and is left out; "
                   f"snapshots that depend on it cannot be restored; 'vmbak forget {sid}' removes it")
    for name, why in sorted(repo.damaged_index_files.items()):
        out.append(f"index file {name} is damaged ({why.removeprefix(f'index file {name}: ')}) and is skipped; its packs "
                   "are read from their headers; 'vmbak repair index' rebuilds the index")
    return out


def damage_warnings(args: argparse.Namespace) -> None:
    """After a command succeeded: warn on stderr, one line each, about the damaged
    manifests and index files it skipped (unless the command reported them itself)."""
    if getattr(args, "damage_reported", False):
        return
    for repo in getattr(args, "opened_repos", []):
        for line in damage_lines(repo):
            print(f"vmbak: warning: {line}", file=sys.stderr)


def _without_password_command(argv: list[str]) -> list[str]:
    """``argv`` without --password-command CMD (or --password-command=CMD, or an abbreviation
    that argparse accepts, such as --password-c CMD)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        opt, eq, _ = a.partition("=")
        if len(opt) >= len("--password-c") and "--password-command".startswith(opt):
            skip = not eq
            continue
        out.append(a)
    return out


def run_detached(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict]:
    """Run this command again without --background, detached, and return it with the JSON
    line it prints once it is ready. A password asked for here (on a terminal) is passed
    on, since the detached process has no terminal to ask on. A child that exits before
    being ready becomes a VmbakError with its last error line."""
    argv = [a for a in sys.argv[1:] if a != "--background"]
    if "--json" not in argv:
        argv.append("--json")
    env = user_environment()  # the child sets its own (cli/main.py)
    if getattr(args, "password_command", None) or (not args.password_file and env.get("VMBAK_PASSWORD_COMMAND")):
        # The password command runs once, here, where it may prompt on the terminal; the
        # detached process (no terminal) gets its answer instead of running it again.
        pw = given_password(args)
        argv = _without_password_command(argv)
        for k in ("VMBAK_PASSWORD_COMMAND", "VMBAK_PASSWORD_FILE"):
            env.pop(k, None)
        if pw is not None:
            env["VMBAK_PASSWORD"] = pw
    elif args.password_file is None and "VMBAK_PASSWORD" not in env and sys.stdin.isatty():
        pw = password(args)
        if pw is not None:
            env["VMBAK_PASSWORD"] = pw
    proc = subprocess.Popen([sys.executable, "-m", "vmbak.cli.main", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
                            close_fds=True, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    from vmbak.disks.qemu import stop_process, tool_timeout

    timeout = tool_timeout("detach")  # $VMBAK_TOOL_TIMEOUT, else DEFAULT_TOOL_TIMEOUT
    if not select.select([proc.stdout], [], [], timeout)[0]:  # nothing read yet: the buffer is empty
        stop_process(proc, grace=10)
        raise VmbakError(f"the background vmbak {args.command} did not become ready within {timeout:g} s "
                         "and was stopped")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().strip().splitlines()
        proc.wait()
        msg = err[-1] if err else f"exit status {proc.returncode}"
        raise VmbakError(msg.removeprefix("vmbak: error: "))
    info = json.loads(line)
    info["pid"] = proc.pid
    return proc, info


def progress(args: argparse.Namespace, command: str | None = None) -> Report:
    """The progress of this command: a bar on standard error when it is a terminal (not
    with --json or --quiet), and with --json ``status`` lines on standard output
    (docs/json.md). Create it first thing, so the bar appears at once; close it (or use it
    as a context manager) before printing the result."""
    return Report(command or args.command or "vmbak", bar=not (args.json or args.quiet),
                  json_out=sys.stdout if args.json else None)


def log(args: argparse.Namespace):  # noqa: ANN201
    def _log(msg: str) -> None:
        if not args.quiet:
            clear_bar()
            print(f"vmbak: {printable(msg)}", file=sys.stderr)

    return _log


def emit(args: argparse.Namespace, data: Any, text: str | None) -> None:
    """Print ``data`` as JSON (with --json), else ``text``, in which nothing but its own
    line breaks may control the terminal (names and paths from a repository or a disk
    are best escaped with ``printable`` where they are put into a line, so that a
    newline in them cannot forge one). For reporting commands: one JSON document."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None and not args.quiet:
        print(printable(text, keep_newlines=True))


def json_line(message_type: str, data: dict) -> str:
    """One JSON-lines message: ``message_type`` first, then ``data``'s keys, sorted."""
    body = json.dumps(data, sort_keys=True)
    head = json.dumps({"message_type": message_type})[:-1]
    return head + ("}" if body == "{}" else ", " + body[1:])


def emit_summary(args: argparse.Namespace, data: dict, text: str | None) -> None:
    """The result of a long-running command: with --json, one line
    ``{"message_type": "summary", ...data}`` after its status lines (docs/json.md);
    else ``text``, as ``emit`` prints it."""
    from vmbak.engine.progress import close_all

    close_all()  # no status line may follow the summary
    if args.json:
        with deferred():  # a signal never cuts the line in half
            print(json_line("summary", data), flush=True)
    elif text is not None and not args.quiet:
        print(printable(text, keep_newlines=True))
