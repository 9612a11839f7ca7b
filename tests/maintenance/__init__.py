"""Encryption, keys, authentication, retention, prune, merge and locks (issue 7)."""
