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


def test_early_derivation_from_a_password_file(make_repo, monkeypatch, tmp_path):  # noqa: ANN001
    """--password-file and $VMBAK_PASSWORD_FILE start the derivation early too, with the
    password read as the command line reads it (UTF-8, trailing line ends removed), in the
    command line's precedence; a password command, or a file that is not a regular file,
    does not."""
    repo = make_repo("aes-256-gcm", password="file pw")
    (name,) = os.listdir(repo.path / "keys")
    doc = json.loads((repo.path / "keys" / name).read_text())
    salt = base64.b64decode(doc["salt"])
    n, r, p = doc["n"], doc["r"], doc["p"]
    for k in ("VMBAK_PASSWORD", "VMBAK_PASSWORD_FILE", "VMBAK_PASSWORD_COMMAND", "VMBAK_REPOSITORY"):
        monkeypatch.delenv(k, raising=False)
    expected = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(b"file pw")
    pwf = tmp_path / "pw"
    pwf.write_bytes(b"file pw\r\n")
    other = tmp_path / "other"
    other.write_text("other pw\n")

    def early(argv: list[str], pw: bytes = b"file pw") -> bool:
        kdf_early.start(argv, _VALUE_OPTIONS)
        return kdf_early.take(pw, salt, n, r, p) is not None

    for argv in (["-r", str(repo.path), "--password-file", str(pwf), "snapshots"],
                 ["--password-file=" + str(pwf), "-r", str(repo.path), "--json", "snapshots"]):
        assert early(argv), argv
    # the option wins over the environment, as in resolve_password
    monkeypatch.setenv("VMBAK_PASSWORD", "env pw")
    monkeypatch.setenv("VMBAK_PASSWORD_FILE", str(other))
    assert early(["-r", str(repo.path), "--password-file", str(pwf), "snapshots"])
    # $VMBAK_PASSWORD_FILE wins over $VMBAK_PASSWORD
    kdf_early.start(["-r", str(repo.path), "snapshots"], _VALUE_OPTIONS)
    assert kdf_early.take(b"env pw", salt, n, r, p) is None
    assert kdf_early.take(b"other pw", salt, n, r, p) is not None
    # a password command (on the line, or in the environment without --password-file): none
    assert not early(["-r", str(repo.path), "--password-command", "cat " + str(pwf), "snapshots"])
    monkeypatch.setenv("VMBAK_PASSWORD_COMMAND", "cat " + str(pwf))
    assert not early(["-r", str(repo.path), "snapshots"], b"other pw")
    assert early(["-r", str(repo.path), "--password-file", str(pwf), "snapshots"])
    monkeypatch.delenv("VMBAK_PASSWORD_COMMAND")
    # a FIFO is not read early (reading it would take the password from the command line)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer, so opening it does not block
    try:
        os.write(fd, b"file pw\n")
        assert not early(["-r", str(repo.path), "--password-file", str(fifo), "snapshots"])
        assert os.read(fd, 100) == b"file pw\n"  # still there for the real read
    finally:
        os.close(fd)
    # and the real derivation takes the early key, which is the key file's
    kdf_early.start(["-r", str(repo.path), "--password-file", str(pwf), "snapshots"], _VALUE_OPTIONS)
    assert crypto._kek(b"file pw", salt, n, r, p) == expected
    assert kdf_early.take(b"file pw", salt, n, r, p) is None


def test_snapshots_with_a_password_file(make_repo, run_vmbak, tmp_path):  # noqa: ANN001
    repo = make_repo("aes-256-gcm", password="pf pw")
    (tmp_path / "pw").write_text("pf pw\n")
    (tmp_path / "bad").write_text("wrong\n")
    env = {"VMBAK_REPOSITORY": str(repo.path)}
    out = run_vmbak("--password-file", tmp_path / "pw", "snapshots", "--json", env=env)
    assert json.loads(out.stdout) == []
    out = run_vmbak("snapshots", "--json", env={**env, "VMBAK_PASSWORD_FILE": tmp_path / "pw"})
    assert json.loads(out.stdout) == []
    bad = run_vmbak("--password-file", tmp_path / "bad", "snapshots", env=env, check=False)
    assert bad.returncode == 12
