"""docs/repository-format.md, read as a specification: an independent reader written from
it alone (scrypt from hashlib, AES-GCM from cryptography, blake3, zstandard; nothing of
vmbak) opens a key file and a manifest that the real CLI wrote."""

from __future__ import annotations

import base64
import hashlib
import json

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def test_an_independent_reader_opens_key_files_and_manifests(make_repo, make_disk) -> None:  # noqa: ANN001
    repo = make_repo("aes-256-gcm", password="pw for the spec")
    repo.backup(make_disk("s.raw", 1 << 20), "spec")
    config = json.loads((repo.path / "config").read_text())
    (key_path,) = (repo.path / "keys").iterdir()
    key = json.loads(key_path.read_text())

    # the key file's fields: integers n, r, p; base64 (standard, padded) salt of 32 bytes
    assert key["kdf"] == "scrypt" and all(isinstance(key[f], int) for f in ("n", "r", "p"))
    salt = base64.b64decode(key["salt"], validate=True)
    assert len(salt) == 32 and key["salt"] == base64.b64encode(salt).decode()
    kek = hashlib.scrypt(b"pw for the spec", salt=salt, n=key["n"], r=key["r"], p=key["p"], dklen=32,
                         maxmem=256 << 20)
    data = base64.b64decode(key["data"], validate=True)
    # the AAD holds the repository id as its 64 hex digits of text
    assert len(config["id"]) == 64 and config["id"] == config["id"].lower()
    aad = b"vmbak-key:" + config["id"].encode("ascii")
    assert len(aad) == 74
    master = json.loads(AESGCM(kek).decrypt(data[:12], data[12:], aad))
    id_key = base64.b64decode(master["id_key"])
    enc_key = base64.b64decode(master["enc_key"])
    bound = {k: config[k] for k in ("chunk_size", "compression", "encryption", "id", "pack_size")}
    bound["chunk_id"] = config["chunk_id"]  # bound when present: versions 3 and 4 have it
    assert config["version"] == 4 and config["chunk_id"] == "blake3-blocks-64k"
    assert master["config"] == json.dumps(bound, sort_keys=True, separators=(",", ":"))

    # a manifest: an envelope of type 1; its name hashes the compressed payload
    (snap,) = (repo.path / "snapshots").iterdir()
    blob = snap.read_bytes()
    assert blob[0] == 1
    payload = AESGCM(enc_key).decrypt(blob[1:13], blob[13:], b"vmbak-manifest")
    assert blake3.blake3(payload, key=id_key).hexdigest() == snap.name
    plain = zstandard.ZstdDecompressor().decompress(payload, max_output_size=64 << 20)
    assert blake3.blake3(plain, key=id_key).hexdigest() != snap.name  # not the plaintext's hash
    assert plain.startswith(b"VMBKMAN1")
