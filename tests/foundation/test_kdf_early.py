"""The key derivation started before the imports (vmbak.repo.kdf_early) gives the key the key
file's own derivation gives, and is used only for exactly the same inputs."""

from __future__ import annotations

import base64
import json
import os

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vmbak.cli.main import _VALUE_OPTIONS
from vmbak.repo import crypto, kdf_early


def test_early_derivation_is_the_key_files_derivation(make_repo, monkeypatch):  # noqa: ANN001
    repo = make_repo("aes-256-gcm", password="early pw")
    (name,) = os.listdir(repo.path / "keys")
    doc = json.loads((repo.path / "keys" / name).read_text())
    salt = base64.b64decode(doc["salt"])
    n, r, p = doc["n"], doc["r"], doc["p"]
    assert (n, r, p) == (crypto.SCRYPT_N, crypto.SCRYPT_R, crypto.SCRYPT_P)
    for k in ("VMBAK_PASSWORD_FILE", "VMBAK_PASSWORD_COMMAND", "VMBAK_REPOSITORY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VMBAK_PASSWORD", "early pw")
    expected = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(b"early pw")

    # a password file or command on the line: nothing starts early
    kdf_early.start(["-r", str(repo.path), "--password-file", "/nonexistent", "snapshots"], _VALUE_OPTIONS)
    assert kdf_early.take(b"early pw", salt, n, r, p) is None

    kdf_early.start(["--json", "-r", str(repo.path), "snapshots"], _VALUE_OPTIONS)
    # other inputs do not take it
    assert kdf_early.take(b"other pw", salt, n, r, p) is None
    # the real derivation takes it (once) and it is the same key
    assert crypto._kek(b"early pw", salt, n, r, p) == expected
    assert kdf_early.take(b"early pw", salt, n, r, p) is None


def test_snapshots_of_an_encrypted_repository_with_two_passwords(make_repo, run_vmbak, tmp_path):  # noqa: ANN001
    """The early derivation uses the first key file; a password of the second still opens."""
    repo = make_repo("aes-256-gcm", password="first")
    env = {"VMBAK_PASSWORD": "first", "VMBAK_REPOSITORY": str(repo.path)}
    (tmp_path / "pw2").write_text("second\n")
    run_vmbak("key", "add", "--new-password-file", tmp_path / "pw2", env=env)
    names = sorted(os.listdir(repo.path / "keys"))
    assert len(names) == 2
    for pw in ("first", "second"):
        out = run_vmbak("snapshots", "--json", env={**env, "VMBAK_PASSWORD": pw})
        assert json.loads(out.stdout) == []
    bad = run_vmbak("snapshots", env={**env, "VMBAK_PASSWORD": "third"}, check=False)
    assert bad.returncode == 12
