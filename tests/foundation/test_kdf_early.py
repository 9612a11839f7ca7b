"""The key derivation started before the imports (vmbak.repo.kdf_early) gives the key the key
file's own derivation gives, and is used only for exactly the same inputs."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest
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


@pytest.mark.parametrize(("password", "salt", "n", "r", "p"), [
    (b"early pw", bytes(range(32)), 1 << 16, 8, 1),  # what vmbak writes
    (b"", b"", 2, 1, 1),
    ("pässwörd ✓".encode(), b"s" * 7, 1 << 10, 1, 3),
    (b"x" * 300, bytes(range(64, 128)), 1 << 12, 3, 2),
    (b"\x00pw\x00", b"\xff" * 16, 1 << 14, 16, 1),
])
def test_the_derivation_is_openssls_scrypt(password, salt, n, r, p):  # noqa: ANN001
    """libsodium's scrypt (kdf_early.derive) gives OpenSSL's bytes (cryptography's Scrypt,
    which vmbak used before, and hashlib's), so key files of either open with the other."""
    want = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)
    assert want == hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=1 << 28)
    assert kdf_early.derive(password, salt, n, r, p) == want
    assert crypto._kek(password, salt, n, r, p) == want


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


_DRIVER = """
import atexit, json, sys
from vmbak.repo import kdf_early
seen = {}
real_take = kdf_early.take
def take(*a, **k):
    seen.setdefault("loaded", sorted(m for m in sys.modules if m in WANT))
    return real_take(*a, **k)
kdf_early.take = take
atexit.register(lambda: print("SEEN " + json.dumps(seen), file=sys.stderr))
from vmbak.cli.main import main
sys.argv = ["vmbak", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_disk_backup_imports_what_it_needs_while_the_key_derives(make_repo, make_disk, tmp_path):  # noqa: ANN001
    """The modules that open and analyse a disk file (qemu-img and NBD access, the filesystem
    parsers) are imported before the repository's key is taken, while the derivation started
    at launch runs on another CPU; imported after it, they held up every backup by about
    70 ms. Checked on the real command line: the key is taken with them loaded."""
    import subprocess
    import sys

    from tests.conftest import _base_env

    want = ["vmbak.changes.overlay", "vmbak.disks.qemu", "vmbak.usage.ext", "vmbak.usage.xfs"]
    repo = make_repo("aes-256-gcm", password="pw")
    disk = make_disk("d", 4 << 20)
    driver = tmp_path / "driver.py"
    driver.write_text(f"WANT = {want!r}\n" + _DRIVER)
    proc = subprocess.run([sys.executable, str(driver), "-r", str(repo.path), "backup", str(disk.path), "--name", "d"],
                          env=_base_env({"VMBAK_PASSWORD": "pw"}), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "snapshot" in proc.stdout
    seen = json.loads(proc.stderr.split("SEEN ", 1)[1])
    assert seen["loaded"] == want
