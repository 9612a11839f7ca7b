"""vmbak's command line: parse, call the library, print text or --json.

Signals: SIGINT, SIGTERM and SIGHUP are handled alike from the first line of this module
on (see vmbak.interrupts): the command cleans up (locks, partial files, child processes),
prints one line ``vmbak: error: interrupted`` and exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), as a shell reports a killed process.

Errors: one line ``vmbak: error: ...`` on standard error and an exit status by class
(vmbak.errors: 1 failure, 2 usage, 3 partial, 10 no repository, 11 locked, 12 wrong or
missing password); with --json, also one ``{"message_type": "error", ...}`` line on
standard output (docs/json.md).
"""

from __future__ import annotations

import sys

from vmbak import interrupts  # built-in modules only

# When this module is the program (python -m vmbak.cli.main, or the vmbak script), signals
# are handled before anything slow is imported, and held back until main() stands in the
# try that reports them: a signal must never print a traceback. (Imported for another
# purpose, the module leaves the process's signals alone until main() is called.)
if __name__ == "__main__" or getattr(sys, "argv", [""])[0].rsplit("/", 1)[-1] == "vmbak":
    interrupts.install(hold=True)
    # vmbak never multiplies matrices: without this, importing numpy starts OpenBLAS's
    # threads, which spin for a while (0.05-0.06 s of CPU for every command measured on
    # the benchmark machine: `vmbak snapshots` 0.32 -> 0.26 s). A user's setting is kept,
    # and the user's scripts do not get this one (vmbak.user_environment).
    import os

    import vmbak

    if "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = vmbak.OWN_ENVIRONMENT["OPENBLAS_NUM_THREADS"] = "1"

import argparse  # noqa: E402

GROUPS = ["repository", "backup", "restore", "snapshots", "keys", "maintenance", "copy", "completion", "manpage"]
OPTIONAL_GROUPS = ["track", "usage_cmd", "serve", "browse", "service", "verify"]  # present when their modules are installed
# The group module of the commands that are run most often, so that running one imports
# only its own group (the others import engines it does not need). Any command not named
# here, and any help request, builds the whole parser.
COMMAND_GROUPS = {"backup": "backup", "restore": "restore", "snapshots": "snapshots", "init": "repository",
                  "check": "repository", "stats": "repository", "forget": "maintenance", "prune": "maintenance"}
# Global options that take a value (as a separate word), to find the command word.
_VALUE_OPTIONS = ("-r", "--repo", "--password-file", "--password-command", "--s3-endpoint")
# Global options that take no value. Any other option word before the command (an
# abbreviation such as --rep, or a typo) makes the whole parser read the line.
_FLAG_OPTIONS = ("--json", "-q", "--quiet")


def command_group(argv: list[str]) -> str | None:
    """The group module of the command ``argv`` runs, when it is one of COMMAND_GROUPS and
    no help or version is asked before it; None otherwise."""
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help", "--version") or a == "--":
            return None
        if a in _VALUE_OPTIONS:
            next(it, None)
        elif not a.startswith("-"):
            return COMMAND_GROUPS.get(a)
        elif a not in _FLAG_OPTIONS and a.split("=", 1)[0] not in _VALUE_OPTIONS:
            return None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser; with ``only`` (a group module name), just that group's
    commands."""
    import importlib

    from vmbak import __version__
    from vmbak.cli.common import CommandParser

    # Global options are accepted before and after the command (restic style).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-r", "--repo", default=argparse.SUPPRESS,
                        help="repository location (default: $VMBAK_REPOSITORY)")
    common.add_argument("--password-file", default=argparse.SUPPRESS, metavar="FILE",
                        help="read the password from this file (default: $VMBAK_PASSWORD_FILE, "
                        "else $VMBAK_PASSWORD, else a prompt on a terminal)")
    common.add_argument("--password-command", default=argparse.SUPPRESS, metavar="CMD",
                        help="run CMD (no shell) and take the first line it prints as the password "
                        "(default: $VMBAK_PASSWORD_COMMAND)")
    common.add_argument("--s3-endpoint", default=argparse.SUPPRESS, metavar="URL",
                        help="S3 endpoint for s3:BUCKET/PREFIX locations (default: $VMBAK_S3_ENDPOINT)")
    common.add_argument("--no-lock", action="store_true", default=argparse.SUPPRESS,
                        help="read the repository without writing a lock into it, for a repository on "
                        "read-only media or an S3 key that may only read (restore, check, verify, copy's "
                        "source; a prune elsewhere may then remove data they read). On a read-only file "
                        "system they do so by themselves; commands that write to the repository lock it "
                        "regardless")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON: one document, or JSON lines from long-running commands (docs/json.md)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print only errors")
    p = CommandParser(  # every subcommand's parser is one too: positionals may follow options
        prog="vmbak", parents=[common],
        description="Block-level backup for virtual-machine disks: changed-block incrementals, "
        "deduplicated, compressed and encrypted repositories, chain restores.",
        epilog="examples:\n  export VMBAK_REPOSITORY=/backups/repo VMBAK_PASSWORD=...\n  vmbak init\n"
        "  vmbak backup /var/lib/images/web.raw --name web\n  vmbak snapshots\n"
        "  vmbak restore web:latest /tmp/web.raw\n  vmbak check --read-data",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vmbak {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    if only is not None:
        importlib.import_module(f"vmbak.cli.{only}").register(sub, common)
        return p
    for g in GROUPS:
        importlib.import_module(f"vmbak.cli.{g}").register(sub, common)
    import inspect

    for g in OPTIONAL_GROUPS:
        try:
            mod = importlib.import_module(f"vmbak.cli.{g}")
            if len(inspect.signature(mod.register).parameters) >= 2:
                mod.register(sub, common)
            else:
                mod.register(sub)
        except ImportError:
            continue
    return p


def main(argv: list[str] | None = None) -> int:
    interrupts.install(hold=True)  # already done on import; again for a second call
    try:
        interrupts.release()  # a signal that came during start-up is raised here
        code = _main(argv)
        interrupts.quiet()  # the command is over: a late signal only ends the process
        if argv is None and command_group(sys.argv[1:]) in _LEAVE_NOW:
            interrupts.run_cleanups()
            _leave_now(code)
        return code
    except KeyboardInterrupt as e:  # a signal during start-up, parsing or the command
        return _interrupted(e)
    except Exception as e:
        # A signal raised inside code whose own cleanup then failed (a library's finally
        # that assumed its try had run to the end) reaches here as that second error,
        # with the interruption as its context: it is still an interruption.
        cause = _interruption_behind(e)
        if cause is None:
            raise
        return _interrupted(cause)
    finally:
        interrupts.quiet()
        interrupts.run_cleanups()  # what an interrupted owner could not release itself


# The command groups whose commands end with _leave_now: backup, and the listing of
# snapshots, a short read-only command whose teardown was a tenth of its time on a small
# encrypted repository: 25 ms from its last write to exit_group (strace), and 0.365 s
# against 0.317 s end to end (medians of 40 interleaved runs, load about 2).
_LEAVE_NOW = ("backup", "snapshots")


def _leave_now(code: int) -> None:
    """End the process at once with ``code``, without the interpreter's teardown, once the
    command is over: its output flushed, the atexit handlers run (they end helper
    processes and join helper threads), no other thread left that Python would wait for.
    Returns (the process then exits the usual way) when any of that does not hold.

    The teardown frees every module, object and connection one by one: after a
    ``backup --libvirt`` of a running guest it took 100-200 ms of a 1.3-2.6 s command
    (time from main's end to the process's exit, load 8.8-9.2 on 2 CPUs), the libvirt
    connection's close among it. Everything a backup keeps is written and fsynced before
    it reports success, and the kernel closes the files and sockets."""
    import atexit
    import os
    import threading

    me = threading.current_thread()
    if me is not threading.main_thread() or any(t is not me and t.is_alive() and not t.daemon
                                                   for t in threading.enumerate()):
        return
    try:
        for f in (sys.stdout, sys.stderr):
            if f is not None:
                f.flush()
        atexit._run_exitfuncs()
        for f in (sys.stdout, sys.stderr):
            if f is not None:
                f.flush()
    except (OSError, ValueError):
        return  # a closed or broken output: the usual exit reports it
    os._exit(code)


def _interruption_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt in ``e``'s chain of context, if there is one."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__context__
    return None


def _interrupted(e: KeyboardInterrupt) -> int:
    import signal

    interrupts.quiet()
    interrupts.run_cleanups()
    sig = getattr(e, "signum", signal.SIGINT)
    name = "" if sig == signal.SIGINT else f" ({signal.Signals(sig).name})"
    return _fail(128 + sig, f"interrupted{name}", "interrupted", signal=signal.Signals(sig).name)


# Whether errors go to standard output as JSON too: "--json" on the command line, known
# before the arguments are parsed (a usage error under --json is JSON as well).
_JSON = [False]

# The class names of exit statuses, as the "exit_class" of an error message (docs/json.md).
EXIT_CLASSES = {1: "failure", 2: "usage", 3: "partial", 10: "no_repository", 11: "locked",
                12: "wrong_password"}


def _fail(code: int, message: str, exit_class: str | None = None, **extra: object) -> int:
    """Report an error: one line on standard error and, under --json, one error message
    on standard output; return ``code``."""
    from vmbak.errors import printable

    try:
        from vmbak.engine.progress import close_all

        try:
            close_all()  # no status line or bar after the error
        except Exception:  # noqa: BLE001 - reporting the error must not fail in turn
            pass
        if _JSON[0]:
            from vmbak.cli.common import json_line

            cls = exit_class or EXIT_CLASSES.get(code, "failure")
            print(json_line("error", {"code": code, "exit_class": cls, "message": message, **extra}), flush=True)
    except OSError:
        pass
    try:
        print(f"vmbak: error: {printable(message)}", file=sys.stderr)
    except OSError:
        pass
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if command_group(argv) is not None:  # a repository command: derive its key during the imports
        from vmbak.repo import kdf_early

        kdf_early.start(argv, _VALUE_OPTIONS)
        if command_group(argv) == "backup":  # backup --libvirt DOMAIN: begin the job meanwhile
            from vmbak.changes import libvirt_early

            libvirt_early.start(argv)
            libvirt_early.let_run_first()  # its imports first, then ours while it waits on the guest

    from vmbak.cli.common import damage_warnings
    from vmbak.errors import VmbakError

    _JSON[0] = "--json" in argv
    parser = build_parser(command_group(argv))
    try:
        with interrupts.deferred():  # argparse's own finally blocks fail when a signal cuts them short
            args = parser.parse_args(argv)
        for k, v in (("repo", None), ("password_file", None), ("password_command", None), ("json", False),
                     ("quiet", False)):
            if not hasattr(args, k):
                setattr(args, k, v)
        _JSON[0] = bool(args.json)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        rc = int(args.func(args) or 0)
        damage_warnings(args)
        return rc
    except VmbakError as e:
        return _fail(e.exit_code, str(e))
    except BrokenPipeError:
        return 1
    except OSError as e:
        name = f" {e.filename}" if getattr(e, "filename", None) else ""
        return _fail(1, f"{name.lstrip()} {e.strerror or e}".lstrip())
    except MemoryError:
        return _fail(1, "out of memory")


if __name__ == "__main__":
    sys.exit(main())
