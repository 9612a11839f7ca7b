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
