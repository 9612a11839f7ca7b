"""Exceptions. Every error a user can cause is a VmbakError with a one-line message.

Each class carries the exit status the command line ends with (docs/json.md lists them,
following restic's where it has the class): 1 a failure, 3 partial results, 10 no
repository, 11 the repository is locked, 12 a wrong or missing password. 2 is a usage
error and 128 + N a signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP; vmbak.interrupts).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3  # the command ran, but some files or blocks could not be read
EXIT_NO_REPOSITORY = 10
EXIT_LOCKED = 11
EXIT_WRONG_PASSWORD = 12
EXIT_INTERRUPTED = 130  # SIGINT; SIGTERM gives 143 and SIGHUP 129 (128 + the signal number)


class VmbakError(Exception):
    """An error reported to the user as one line, with a non-zero exit."""

    exit_code = EXIT_FAILURE


class UsageError(VmbakError):
    """The command line itself is wrong (unknown option, missing argument)."""

    exit_code = EXIT_USAGE


class PartialFailure(VmbakError):
    """The command did what it could, but some files or blocks could not be read."""

    exit_code = EXIT_PARTIAL


class RepositoryError(VmbakError):
    """The repository is missing, foreign, damaged, locked or of an unknown version."""


class RepositoryMissing(RepositoryError):
    """There is no vmbak repository at the location (nothing there, or no config)."""

    exit_code = EXIT_NO_REPOSITORY


class RepositoryLocked(RepositoryError):
    """Another process holds a lock that conflicts with the one asked for."""

    exit_code = EXIT_LOCKED


class IntegrityError(RepositoryError):
    """Data read back from the repository failed authentication or its hash check."""


class WrongPassword(RepositoryError):
    """No key file of the repository opens with the given password."""

    exit_code = EXIT_WRONG_PASSWORD


class PasswordMissing(RepositoryError):
    """The repository is encrypted and no password was given."""

    exit_code = EXIT_WRONG_PASSWORD


class SnapshotNotFound(VmbakError):
    """A snapshot specification matched nothing (or was ambiguous)."""


class DiskError(VmbakError):
    """The disk to back up or the restore target cannot be used."""


class ChangeTrackingError(VmbakError):
    """A change source cannot prove it saw every change (the backup falls back to a scan)."""


def printable(text: str, keep_newlines: bool = False, slash: bool = False) -> str:
    """``text`` safe to print on a terminal, on one line: every character that is not
    printable (newlines, tabs, escape sequences, bidi and other format characters, ...)
    becomes a Python-style escape (``\\n``, ``\\x1b``, ``\\u202e``), and a byte that was
    not UTF-8 (a surrogate escape of a file name) becomes ``\\xNN``, so that text from a
    disk or a repository can neither break a line or a table nor drive the terminal. The
    result is printable, so escaping it again changes nothing (layers may each escape).
    With ``keep_newlines``, newlines stay (for text that is several lines by design); with
    ``slash``, ``/`` is escaped too (for one name, which cannot hold one)."""
    if text.isprintable() and not (slash and "/" in text):
        return text
    if keep_newlines:
        return "\n".join(printable(line, slash=slash) for line in text.split("\n"))
    out = []
    for c in text:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif slash and c == "/":
            out.append("\\x2f")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(repr(c)[1:-1] if not 0xD800 <= o <= 0xDFFF else f"\\u{o:04x}")
    return "".join(out)
