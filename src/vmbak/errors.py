"""Exceptions. Every error a user can cause is a VmbakError with a one-line message."""

from __future__ import annotations


class VmbakError(Exception):
    """An error reported to the user as one line, with a non-zero exit."""

    exit_code = 1


class RepositoryError(VmbakError):
    """The repository is missing, foreign, damaged, locked or of an unknown version."""


class IntegrityError(RepositoryError):
    """Data read back from the repository failed authentication or its hash check."""


class WrongPassword(RepositoryError):
    """No key file of the repository opens with the given password."""


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
