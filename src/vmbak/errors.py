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


def printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: every character that is not printable
    (newlines, tabs, escape sequences, bidi and other format characters, ...) becomes a
    Python-style escape (``\\n``, ``\\x1b``, ``\\u202e``), so that text from a disk or a
    repository can neither break a line or a table nor drive the terminal. With
    ``keep_newlines``, newlines stay (for text that is several lines by design). Lone
    surrogates (undecodable bytes of a file name) are escaped too: printing them fails."""
    if text.isprintable():
        return text
    if keep_newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
