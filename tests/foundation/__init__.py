"""Tests of the foundation: repository, backup, restore, check, CLI and API."""
