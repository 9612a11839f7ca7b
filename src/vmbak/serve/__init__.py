"""Exports and views of backups: NBD export (read-only or copy-on-write), instant recovery,
file browsing inside backups, and the FUSE mount."""
