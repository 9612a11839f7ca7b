"""Encryption and key management: several passwords per repository, password changes
that rewrite only key files, mode 0600, and clear errors for bad passwords and keys."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import blake3
import pytest

MiB = 1 << 20
PW = "first password"


def digests(path, skip=("keys", "locks", "tmp")) -> dict[str, str]:  # noqa: ANN001
    out = {}
    for root, _, files in os.walk(path):
        rel = os.path.relpath(root, path)
        if rel.split(os.sep)[0] in skip:
            continue
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.join(rel, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def enc(make_repo, make_disk):
    repo = make_repo("aes-256-gcm", password=PW, name="enc")
    disk = make_disk("k.raw", 2 * MiB + 512, seed=61)
    repo.backup(disk, "k")
    return repo, disk


def keys(repo) -> list:  # noqa: ANN001
    return sorted((repo.path / "keys").iterdir())


def test_several_keys_open_one_repository_and_passwd_touches_only_key_files(enc, tmp_path, assert_cli_error,
                                                                             assert_same_file):
    repo, disk = enc
    data_before = digests(repo.path)
    added = repo.json("key", "add", env={"VMBAK_NEW_PASSWORD": "second password"})["added"]
    assert len(keys(repo)) == 2
    for k in keys(repo):
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
    assert stat.S_IMODE((repo.path / "keys").stat().st_mode) == 0o700
    listed = repo.json("key", "list")
    assert {r["id"] for r in listed} == {k.name for k in keys(repo)}
    assert [r["current"] for r in listed if r["id"] == added] == [False]
    as_second = repo.json("key", "list", env={"VMBAK_PASSWORD": "second password"})
    assert [r["id"] for r in as_second if r["current"]] == [added]
    # both passwords restore the same data
    for i, pw in enumerate((PW, "second password")):
        repo.run("restore", "k:latest", tmp_path / f"r{i}.raw", env={"VMBAK_PASSWORD": pw})
        assert_same_file(tmp_path / f"r{i}.raw", disk.path)
    # change the first password: a new key file replaces the old one, nothing else changes
    pwfile = tmp_path / "new.pw"
    pwfile.write_text("third password\n")
    out = repo.json("key", "passwd", "--new-password-file", pwfile)
    assert out["removed"] not in {k.name for k in keys(repo)} and out["added"] in {k.name for k in keys(repo)}
    assert digests(repo.path) == data_before
    assert_cli_error(repo.run("snapshots", check=False), "wrong password")  # the old password
    assert len(repo.json("snapshots", env={"VMBAK_PASSWORD": "third password"})) == 1
    assert len(repo.json("snapshots", env={"VMBAK_PASSWORD": "second password"})) == 1
    # remove the second key using the third password
    assert repo.json("key", "remove", added[:8], env={"VMBAK_PASSWORD": "third password"})["removed"] == added
    assert_cli_error(repo.run("snapshots", env={"VMBAK_PASSWORD": "second password"}, check=False),
                     "wrong password")
    assert digests(repo.path) == data_before


def test_key_remove_refuses_the_current_and_the_last_key(enc, assert_cli_error):
    repo, _ = enc
    (only,) = keys(repo)
    assert_cli_error(repo.run("key", "remove", only.name, check=False), "the given password opens")
    repo.run("key", "add", env={"VMBAK_NEW_PASSWORD": "other"})
    assert_cli_error(repo.run("key", "remove", only.name[:6], check=False), "the given password opens")
    assert_cli_error(repo.run("key", "remove", "ffffffffffffff", check=False), "no key")
    # with the other password the first key can go; then the last one cannot
    repo.run("key", "remove", only.name, env={"VMBAK_PASSWORD": "other"})
    (last,) = keys(repo)
    repo.run("key", "add", env={"VMBAK_PASSWORD": "other", "VMBAK_NEW_PASSWORD": "x"})
    repo.run("key", "remove", last.name, env={"VMBAK_PASSWORD": "x"})
    (final,) = keys(repo)
    assert_cli_error(repo.run("key", "remove", final.name, env={"VMBAK_PASSWORD": "other"}, check=False),
                     "no key")
    assert_cli_error(repo.run("key", "remove", final.name, env={"VMBAK_PASSWORD": "x"}, check=False),
                     "the given password opens")


def test_key_commands_need_a_new_password_and_an_encrypted_repository(enc, repo, assert_cli_error, tmp_path):
    r, _ = enc
    assert_cli_error(r.run("key", "add", check=False), "new password")
    assert_cli_error(r.run("key", "add", "--new-password-file", tmp_path / "missing", check=False),
                     "new password file")
    (tmp_path / "empty.pw").write_text("\n")
    assert_cli_error(r.run("key", "passwd", "--new-password-file", tmp_path / "empty.pw", check=False), "empty")
    assert len(keys(r)) == 1
    assert_cli_error(repo.run("key", "add", env={"VMBAK_NEW_PASSWORD": "x"}, check=False), "not encrypted")


@pytest.mark.parametrize("damage", ["wrong-password", "no-key", "truncated", "empty-dir-file", "flipped",
                                    "unprotected-planted", "n-not-power-of-two", "n-r-asking-32-gib"])
def test_bad_passwords_and_key_files_give_one_line(enc, assert_cli_error, damage, tmp_path):
    repo, _ = enc
    (key,) = keys(repo)
    env = None
    if damage == "wrong-password":
        env, frag = {"VMBAK_PASSWORD": "guess"}, "wrong password"
    elif damage == "no-key":
        key.unlink()
        frag = "no key file"
    elif damage == "truncated":
        key.write_bytes(key.read_bytes()[:100])
        frag = f"key file keys/{key.name} is damaged"
    elif damage == "empty-dir-file":
        key.write_bytes(b"")
        frag = f"key file keys/{key.name} is damaged"
    elif damage == "flipped":  # a bit of the wrapped key: indistinguishable from a wrong password
        doc = json.loads(key.read_text())
        raw = bytearray(__import__("base64").b64decode(doc["data"]))
        raw[20] ^= 0x10
        doc["data"] = __import__("base64").b64encode(bytes(raw)).decode()
        key.write_text(json.dumps(doc))
        frag = "tampered"
    elif damage.startswith("n-"):  # scrypt parameters no reader should derive with
        doc = json.loads(key.read_text())
        doc["n"], doc["r"] = (3, 8) if damage == "n-not-power-of-two" else (1 << 22, 64)
        key.write_text(json.dumps(doc))
        frag = "implausible scrypt parameters"
    else:  # someone plants an unprotected key with a master key of their choosing
        key.unlink()
        planted = {"kdf": "none", "data": __import__("base64").b64encode(json.dumps(
            {"id_key": "A" * 43 + "=", "enc_key": "A" * 43 + "="}).encode()).decode()}
        (repo.path / "keys" / ("0" * 32)).write_text(json.dumps(planted))
        frag = "not password-protected"
    for args in (["snapshots"], ["restore", "k:latest", tmp_path / "o.raw"]):
        assert_cli_error(repo.run(*args, env=env, check=False), frag)
    assert not (tmp_path / "o.raw").exists()


def test_a_planted_unprotected_key_is_ignored_when_a_real_key_opens(enc):
    repo, _ = enc
    planted = {"kdf": "none", "data": __import__("base64").b64encode(json.dumps(
        {"id_key": "A" * 43 + "=", "enc_key": "A" * 43 + "="}).encode()).decode()}
    (repo.path / "keys" / ("0" * 32)).write_text(json.dumps(planted))  # sorts first
    rows = repo.json("key", "list")
    assert [r["current"] for r in rows] == [False, True]
    assert len(repo.json("snapshots")) == 1


def test_everything_stored_is_encrypted_and_chunk_ids_are_keyed(make_repo, make_disk, random_bytes):
    disk = make_disk("p.raw", 2 * MiB, seed=62)
    marker = b"VMBAK-PLAINTEXT-MARKER-" * 40
    disk.write(5000, marker)  # compressible plaintext
    a = make_repo("aes-256-gcm", password=PW, name="a")
    b = make_repo("aes-256-gcm", password=PW, name="b")
    plain = make_repo("none", name="plain")
    for r in (a, b, plain):
        r.backup(disk, "p")
    for r in (a, b):
        for root, _, files in os.walk(r.path / "data"):
            for f in files:
                assert marker[:40] not in open(os.path.join(root, f), "rb").read()
        for d in ("index", "snapshots"):
            for f in (r.path / d).iterdir():
                blob = f.read_bytes()
                assert blob[0] == 1  # envelope type 1: AES-256-GCM
                assert b"\x28\xb5\x2f\xfd" not in blob[:64]  # no visible zstd frame
    # the same data gets different chunk ids in different repositories, and ids are not
    # a plain hash of the content
    ids = []
    for r in (a, b):
        lib = r.open()
        ids.append({cid for cid, _ in lib.index.items()})
    assert ids[0] and not ids[0] & ids[1]
    chunk = disk.read(0, MiB)
    assert blake3.blake3(chunk).digest() not in ids[0] | ids[1]
    assert hashlib.sha256(chunk).digest() not in ids[0] | ids[1]


def test_init_is_encrypted_by_default_and_the_opt_out_is_loud(run_vmbak, tmp_path, assert_cli_error):
    p = run_vmbak("-r", tmp_path / "d", "init", env={"VMBAK_PASSWORD": PW})
    cfg = json.loads((tmp_path / "d" / "config").read_text())
    assert cfg["encryption"] == "aes-256-gcm" and cfg["version"] == 4 and cfg["chunk_id"] == "blake3-blocks-64k"
    (key,) = list((tmp_path / "d" / "keys").iterdir())
    doc = json.loads(key.read_text())
    assert doc["kdf"] == "scrypt" and doc["n"] >= 1 << 16 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "WARNING" not in p.stderr
    p = run_vmbak("-r", tmp_path / "n", "init", "--encryption", "none")
    assert "NOT encrypted" in p.stderr
    assert_cli_error(run_vmbak("-r", tmp_path / "e", "init", check=False), "password")
