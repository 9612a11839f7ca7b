"""An attacker who can write to the storage but lacks the password: the config is bound
to the key files, a client holding a password never writes into a repository that claims
to be unencrypted, and config fields that size memory are bounded (issue 18, item 1)."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmbak.repo import crypto
from vmbak.repo.backend import LocalBackend

MiB = 1 << 20
PW = "config attack test"


@pytest.fixture
def enc_repo(make_repo, make_disk):
    repo = make_repo("aes-256-gcm", password=PW)
    disk = make_disk("a.raw", 2 * MiB, seed=5)
    repo.backup(disk, "a")
    return repo, disk


def _config(repo) -> dict:  # noqa: ANN001
    return json.loads((repo.path / "config").read_text())


def _write_config(repo, cfg: dict) -> None:  # noqa: ANN001
    (repo.path / "config").write_text(json.dumps(cfg))


def _data_files(repo) -> set[str]:  # noqa: ANN001
    return {os.fspath(p) for p in (repo.path / "data").rglob("*") if p.is_file()}


def _plant_plain_key(repo, cfg: dict, remove_others: bool) -> None:  # noqa: ANN001
    """What the attacker does: a key file with a master key of their own, unprotected."""
    if remove_others:
        for k in (repo.path / "keys").iterdir():
            k.unlink()
    doc = crypto.wrap_key(crypto.MasterKey.generate(), None, cfg)
    crypto.save_key_file(LocalBackend(os.fspath(repo.path)), doc)


@pytest.mark.parametrize("remove_others", [True, False])
def test_downgrade_to_unencrypted_is_refused(enc_repo, remove_others, assert_cli_error):
    repo, disk = enc_repo
    cfg = _config(repo)
    cfg["encryption"] = "none"
    _write_config(repo, cfg)
    _plant_plain_key(repo, cfg, remove_others)
    before = _data_files(repo)
    disk.write_random(0, 100_000, seed=6)
    p = repo.run("backup", disk.path, "--name", "a", check=False)
    assert_cli_error(p, "claims to be an unencrypted repository", "password was given")
    assert _data_files(repo) == before, "plaintext written into the repository"
    assert_cli_error(repo.run("snapshots", check=False), "claims to be an unencrypted repository")
    # The same through a password file and through the library.
    pwf = repo.path.parent / "pw"
    pwf.write_text(PW + "\n")
    p = repo.run("backup", disk.path, "--name", "a", "--password-file", pwf,
                 env={"VMBAK_PASSWORD": None}, check=False)
    assert_cli_error(p, "claims to be an unencrypted repository")
    import vmbak

    with pytest.raises(vmbak.VmbakError, match="claims to be an unencrypted"):
        vmbak.Repository.open(os.fspath(repo.path), PW)
    assert _data_files(repo) == before


def test_unencrypted_repository_without_password_still_works(make_repo, make_disk, assert_cli_error):
    repo = make_repo("none")
    disk = make_disk("p.raw", MiB, seed=7)
    repo.backup(disk, "p")
    assert len(repo.snapshots()) == 1
    # A password given to an unencrypted repository is a refusal, not a silent plaintext write.
    p = repo.run("snapshots", env={"VMBAK_PASSWORD": "x"}, check=False)
    assert_cli_error(p, "claims to be an unencrypted repository")


@pytest.mark.parametrize("field,value", [("chunk_size", 65536), ("pack_size", 1 << 20),
                                         ("compression", {"codec": "zstd", "level": 19}),
                                         ("chunk_id", "blake3")])
def test_changed_config_field_is_refused(enc_repo, field, value, assert_cli_error):
    repo, disk = enc_repo
    cfg = _config(repo)
    assert cfg[field] != value
    cfg[field] = value
    _write_config(repo, cfg)
    before = _data_files(repo)
    line = assert_cli_error(repo.run("backup", disk.path, "--name", "a", check=False),
                            "does not match key file", "tampered")
    assert field in line
    assert _data_files(repo) == before
    # key passwd keeps the binding: after a password change the repository still opens,
    # and a tampered config is still refused.
    cfg[field] = _config_original(repo, field)
    _write_config(repo, cfg)
    repo.run("key", "passwd", env={"VMBAK_NEW_PASSWORD": PW + "2"})
    new = repo.run("snapshots", env={"VMBAK_PASSWORD": PW + "2"})
    assert "a" in new.stdout
    cfg[field] = value
    _write_config(repo, cfg)
    assert_cli_error(repo.run("snapshots", env={"VMBAK_PASSWORD": PW + "2"}, check=False), "does not match key file")


def _config_original(repo, field: str) -> object:  # noqa: ANN001
    return {"chunk_size": 1 << 20, "pack_size": 32 << 20, "compression": {"codec": "zstd", "level": 1},
            "chunk_id": "blake3-blocks-64k"}[field]


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
@pytest.mark.parametrize("field,value,msg", [
    ("pack_size", 1 << 40, "pack size"),
    ("chunk_size", 1 << 34, "chunk size"),
    ("chunk_size", 3 << 20, "chunk size"),
    ("chunk_size", "1048576", "chunk size"),
    ("compression", {"codec": "zstd", "level": 10**9}, "compression level"),
    ("compression", "zstd", "damaged"),
])
def test_config_fields_that_size_memory_are_bounded(make_repo, make_disk, encryption, field, value, msg,
                                                    assert_cli_error):
    repo = make_repo(encryption, password=PW)
    cfg = _config(repo)
    cfg[field] = value
    _write_config(repo, cfg)
    assert_cli_error(repo.run("snapshots", check=False), msg)


def test_init_refuses_sizes_out_of_bounds(tmp_path, run_vmbak, assert_cli_error):
    p = run_vmbak("-r", tmp_path / "r", "init", "--encryption", "none", "--pack-size", 1 << 40, check=False)
    assert_cli_error(p, "pack size")


def test_key_files_from_before_the_binding_still_open(make_repo, make_disk):
    """Repositories made by earlier vmbak versions have key files without the config
    binding: they open as before (docs/threat-model.md says what that leaves open)."""
    repo = make_repo("aes-256-gcm", password=PW)
    disk = make_disk("l.raw", MiB, seed=9)
    repo.backup(disk, "l")
    backend = LocalBackend(os.fspath(repo.path))
    cfg = _config(repo)
    (name,) = crypto.key_names(backend)
    doc = crypto.read_key_doc(backend, name)
    master = crypto.unwrap_key(doc, PW, cfg["id"], name, cfg["encryption"])
    assert master.config == crypto.bound_config(cfg)
    # Re-wrap the same secrets the way version-1 key files were written (no "config").
    salt, nonce = os.urandom(32), os.urandom(12)
    kek = crypto._kek(PW.encode(), salt, doc["n"], doc["r"], doc["p"])
    plain = json.dumps({"id_key": base64.b64encode(master.id_key).decode(),
                        "enc_key": base64.b64encode(master.enc_key).decode()}).encode()
    ct = AESGCM(kek).encrypt(nonce, plain, b"vmbak-key:" + cfg["id"].encode())
    doc.update(salt=base64.b64encode(salt).decode(), data=base64.b64encode(nonce + ct).decode())
    (repo.path / name).write_text(json.dumps(doc))
    assert crypto.unwrap_key(doc, PW, cfg["id"], name, cfg["encryption"]).config is None
    assert [s["name"] for s in repo.snapshots()] == ["l"]
    repo.check(read_data=True)
