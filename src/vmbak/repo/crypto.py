"""Keys and the envelope that seals every object stored in a repository.

Every stored object (chunk blob, pack header, index, manifest) is an *envelope*:

* ``0x00 | payload | tag16`` for unencrypted repositories, where ``tag16`` is the
  first 16 bytes of BLAKE3(key=check_key, aad || payload). It detects corruption
  and objects swapped between kinds; it is not a secret.
* ``0x01 | nonce12 | AES-256-GCM(payload, aad)`` for encrypted repositories.

The AAD (associated data) names the kind of object (and, for chunks, the chunk id),
so a blob cannot be presented as something it is not. See docs/repository-format.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import dataclass, field

import blake3
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmbak.buffers import ThreadBuffers
from vmbak.errors import IntegrityError, PasswordMissing, RepositoryError, WrongPassword
from vmbak.repo import kdf_early  # started before the imports when the command line allowed
from vmbak.repo.backend import Backend, LocalBackend

ENC_NONE = "none"
ENC_AES = "aes-256-gcm"
ENCRYPTIONS = (ENC_AES, ENC_NONE)

# scrypt N=2^16, r=8, p=1: 64 MiB of memory and ~0.2 s per attempt on these
# machines. That costs an attacker 64 MiB and ~0.2 core-seconds per guess while
# keeping every command's start-up short (the key is unwrapped once per run).
SCRYPT_N = 1 << 16
SCRYPT_R = 8
SCRYPT_P = 1

TAG_LEN = 16
NONCE_LEN = 12

# How chunk ids are computed (the config's "chunk_id"; docs/repository-format.md):
# "blake3" (repositories of format version 1 and 2, which have no such field): the keyed
# BLAKE3 of the plaintext. "blake3-blocks-64k" (version 3): the keyed BLAKE3 over the
# plaintext's length and the 16-byte block hashes of its 64 KiB pieces, so that a backup
# at the default block size hashes every byte once (the block hashes it computes anyway
# give the chunk id).
CHUNK_ID_BLAKE3 = "blake3"
CHUNK_ID_BLOCKS = "blake3-blocks-64k"
CHUNK_ID_SCHEMES = (CHUNK_ID_BLOCKS, CHUNK_ID_BLAKE3)
ID_GRAIN = 1 << 16
_ID_PREFIX = b"vmbak chunk id v2"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


# The config fields that a key file binds (see bound_config). Changing any of them
# without the password makes every key file refuse the repository.
BOUND_FIELDS = ("id", "encryption", "chunk_size", "pack_size", "compression")
# Bound when present (configs written before the field existed do not have it, and the key
# files of such repositories bind the text without it).
BOUND_IF_PRESENT = ("chunk_id",)


def bound_config(config: dict) -> str:
    """The canonical text of the config fields a key file binds: compact JSON, sorted keys."""
    d = {k: config.get(k) for k in BOUND_FIELDS}
    d.update({k: config[k] for k in BOUND_IF_PRESENT if k in config})
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class MasterKey:
    """The repository's secrets: ``id_key`` keys the chunk ids, ``enc_key`` the cipher.

    ``config`` is the bound_config() text stored beside the secrets inside the wrapped
    key (None in key files written before vmbak bound the config).
    """

    id_key: bytes
    enc_key: bytes
    config: str | None = field(default=None, compare=False)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(id_key=os.urandom(32), enc_key=os.urandom(32))

    def to_json(self, config: dict | None = None) -> bytes:
        d = {"id_key": _b64(self.id_key), "enc_key": _b64(self.enc_key)}
        if config is not None:
            d["config"] = bound_config(config)
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MasterKey:
        d = json.loads(data)
        bound = d.get("config")
        if bound is not None and not isinstance(bound, str):
            raise ValueError("bad config binding")
        k = cls(id_key=_unb64(d["id_key"]), enc_key=_unb64(d["enc_key"]), config=bound)
        if len(k.id_key) != 32 or len(k.enc_key) != 32:
            raise ValueError("bad key length")
        return k


def _kek(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    early = kdf_early.take(password, salt, n, r, p)
    if early is not None:
        return early
    try:
        return kdf_early.derive(password, salt, n, r, p)
    except (MemoryError, RuntimeError) as e:  # PyNaCl's RuntimeError: libsodium failed (no memory)
        raise RepositoryError(f"cannot derive the key (scrypt N={n}, r={r}, p={p}): {e or 'out of memory'}") from None


def wrap_key(master: MasterKey, password: str | None, config: dict) -> dict:
    """Return the JSON document of a key file holding ``master`` for the repository whose
    config is ``config``; the secrets are stored with bound_config(config), so that the
    config cannot be changed by someone who lacks the password (see docs/threat-model.md)."""
    repo_id, encryption = config["id"], config["encryption"]
    doc: dict = {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": os.uname().nodename,
        "user": os.environ.get("USER", ""),
    }
    if encryption == ENC_NONE:
        doc["kdf"] = "none"
        doc["data"] = _b64(master.to_json(config))
        return doc
    if not password:
        raise RepositoryError("a password is required for an encrypted repository")
    salt = os.urandom(32)
    nonce = os.urandom(NONCE_LEN)
    kek = _kek(password.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    ct = AESGCM(kek).encrypt(nonce, master.to_json(config), b"vmbak-key:" + repo_id.encode())
    doc.update(kdf="scrypt", n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=_b64(salt), data=_b64(nonce + ct))
    return doc


def unwrap_key(doc: dict, password: str | None, repo_id: str, name: str,
               encryption: str | None = None) -> MasterKey:
    """Open a key file document; raise WrongPassword or RepositoryError.

    With ``encryption`` given, a key file whose protection does not match the
    repository's is refused: an unprotected key (``kdf: none``) planted in an
    encrypted repository would otherwise make vmbak write with a key someone else chose.
    """
    try:
        kdf = doc["kdf"]
        data = _unb64(doc["data"])
        if kdf == "none":
            if encryption is not None and encryption != ENC_NONE:
                raise RepositoryError(f"key file {name} is not password-protected in an encrypted "
                                      "repository (tampered with?); refusing it")
            return MasterKey.from_json(data)
        if kdf != "scrypt":
            raise RepositoryError(f"key file {name}: unknown key derivation {kdf!r}")
        if password is None:
            raise PasswordMissing("this repository is encrypted: a password is required "
                                  "(VMBAK_PASSWORD, --password-file, --password-command, or a terminal prompt)")
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if not kdf_early.plausible(n, r, p):
            raise RepositoryError(f"key file {name}: implausible scrypt parameters (a reader takes N a power "
                                  "of two up to 2^22, r up to 64, p up to 16, at most 2 GiB of memory)")
        salt = _unb64(doc["salt"])
    except (KeyError, ValueError, TypeError) as e:
        raise RepositoryError(f"key file {name} is damaged ({e.__class__.__name__})") from None
    if len(data) < NONCE_LEN + TAG_LEN:
        raise RepositoryError(f"key file {name} is truncated")
    kek = _kek(password.encode(), salt, n, r, p)
    try:
        plain = AESGCM(kek).decrypt(data[:NONCE_LEN], data[NONCE_LEN:], b"vmbak-key:" + repo_id.encode())
    except InvalidTag:
        raise WrongPassword("wrong password (or the key file was tampered with)") from None
    try:
        return MasterKey.from_json(plain)
    except (KeyError, ValueError, TypeError):
        raise RepositoryError(f"key file {name} is damaged") from None


_scratch = ThreadBuffers((1 << 20) + 1)  # Sealer.seal_payload's per-thread plaintext buffer
_NUMPY_COPY_MIN = 64 << 10  # smaller copies are done directly (see copy_unlocked)


def _uninit(n: int) -> memoryview:
    """``n`` bytes of new memory, not zeroed (every byte is written before it is read).

    ``bytearray(n)`` zeroes its memory while holding the GIL, and for a sealed chunk the
    first touch of that memory is where its pages fault in; here both the faults and the
    writes happen in the cipher, which releases the GIL. Measured on the 2-core VM:
    bytearray of 1 MiB 37-56 µs, numpy.empty 0.3-0.6 µs."""
    return memoryview(np.empty(n, np.uint8))


def copy_unlocked(dst: memoryview, src: bytes | memoryview) -> None:
    """``dst[:] = src`` with the GIL released (numpy copies arrays of more than a few
    hundred elements without holding it; a memoryview slice assignment holds it). Small
    copies are done directly: numpy's per-call cost (a few µs) is more than they take."""
    if len(src) < _NUMPY_COPY_MIN:
        dst[:] = src
    else:
        np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


KEY_DIR = "keys"
_KEY_NAME = re.compile(r"keys/[0-9a-f]{32}")


def new_key_name() -> str:
    return f"{KEY_DIR}/{os.urandom(16).hex()}"


def save_key_file(backend: Backend, doc: dict, name: str | None = None) -> str:
    """Store a key file document; return its name (``keys/<32 hex>``).

    On a local directory the file is created with mode 0600 before any byte is written
    (never readable by others, not even for a moment) and ``keys/`` is kept at 0700.
    """
    name = name or new_key_name()
    data = json.dumps(doc, indent=1).encode()
    if not isinstance(backend, LocalBackend):
        backend.write(name, data)
        return name
    keydir = os.path.join(backend.root, KEY_DIR)
    try:
        os.makedirs(keydir, mode=0o700, exist_ok=True)
        os.chmod(keydir, 0o700)
        tmp = backend.temp_path("key")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise RepositoryError(f"cannot write key file {name}: {e.strerror or e}") from None
    backend.write_file(name, tmp)
    return name


def key_names(backend: Backend) -> list[str]:
    """The key files of a repository, sorted (other names under ``keys/`` are ignored)."""
    return sorted(n for n, _ in backend.list(KEY_DIR) if _KEY_NAME.fullmatch(n))


def read_key_doc(backend: Backend, name: str) -> dict:
    """A key file's JSON document; RepositoryError naming the file if it is not one."""
    raw = backend.read(name)
    if not raw:
        raise RepositoryError(f"key file {name} is damaged (empty; truncated?)")
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise RepositoryError(f"key file {name} is damaged (not JSON; truncated?)") from None
    return doc


def open_master_key(backend: Backend, config: dict, password: str | None) -> tuple[str, MasterKey]:
    """Find a key file that opens with ``password``; return (its name, the master key).

    Every key file is tried. When none opens, the error names the reason: a wrong
    password (or tampered key files: without the password the two look the same), or
    damaged key files, or none at all.
    """
    names = key_names(backend)
    if not names:
        raise RepositoryError("repository has no key file (keys/ is empty)")
    wrong = 0
    problems: list[RepositoryError] = []
    for name in names:
        try:
            doc = read_key_doc(backend, name)
            return name, unwrap_key(doc, password, config["id"], name, config.get("encryption"))
        except WrongPassword:
            wrong += 1
        except RepositoryError as e:
            problems.append(e)
    problems.sort(key=lambda e: "password is required" not in str(e))
    if problems and "password is required" in str(problems[0]):
        raise problems[0]
    if wrong:
        tried = f" (tried {wrong} key files)" if wrong > 1 else ""
        extra = f"; {len(problems)} other key files are unusable ({problems[0]})" if problems else ""
        raise WrongPassword(f"wrong password: no key file opens with it{tried}, or the key file "
                            f"was tampered with{extra}")
    raise problems[0]


class Sealer:
    """Seals and opens envelopes; also computes chunk ids and block hashes.

    Thread-safe: AESGCM objects may be shared between threads.
    """

    def __init__(self, master: MasterKey, encryption: str, chunk_ids: str = CHUNK_ID_BLAKE3) -> None:
        if chunk_ids not in CHUNK_ID_SCHEMES:
            raise RepositoryError(f"unknown chunk id scheme {chunk_ids!r}")
        self.encryption = encryption
        self.chunk_ids = chunk_ids
        self.id_key = master.id_key
        # Derived keys keep the uses apart: block hashes never equal chunk ids.
        self.block_key = blake3.blake3(b"vmbak block hash v1", key=master.id_key).digest()
        self.check_key = blake3.blake3(b"vmbak envelope check v1", key=master.id_key).digest()
        self._aead = AESGCM(master.enc_key) if encryption == ENC_AES else None
        # bytes an envelope adds to its payload: type, nonce (encrypted only), tag
        self.overhead = 1 + (NONCE_LEN if self._aead is not None else 0) + TAG_LEN

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """A chunk's 32-byte id: see CHUNK_ID_SCHEMES."""
        if self.chunk_ids == CHUNK_ID_BLAKE3:
            return blake3.blake3(data, key=self.id_key).digest()
        mv = memoryview(data)
        key = self.block_key
        hashes = b"".join([blake3.blake3(mv[o:o + ID_GRAIN], key=key).digest(TAG_LEN)
                           for o in range(0, len(mv), ID_GRAIN)])
        return self.chunk_id_from_hashes(hashes, len(mv))

    def chunk_id_from_hashes(self, hashes: bytes, length: int) -> bytes:
        """The id (scheme "blake3-blocks-64k") of a chunk of ``length`` bytes whose 64 KiB
        pieces (the last may be shorter) have the block hashes ``hashes`` (16 bytes each,
        in order): the keyed BLAKE3 of "vmbak chunk id v2" || u64 length || hashes."""
        h = blake3.blake3(_ID_PREFIX, key=self.id_key)
        h.update(length.to_bytes(8, "little"))
        h.update(hashes)
        return h.digest()

    def block_hash(self, data: bytes | memoryview) -> bytes:
        """The 16-byte keyed hash of one block, kept per block for scans and diffs."""
        return blake3.blake3(data, key=self.block_key).digest(TAG_LEN)

    def seal(self, payload: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            h = blake3.blake3(aad, key=self.check_key)
            h.update(payload)
            return b"\x00" + payload + h.digest(TAG_LEN)
        nonce = os.urandom(NONCE_LEN)
        return b"\x01" + nonce + self._aead.encrypt(nonce, payload, aad)

    def seal_payload(self, codec: int, body: bytes | memoryview, aad: bytes) -> memoryview:
        """``seal(bytes((codec,)) + body, aad)``, built in one new buffer: the payload is
        assembled in a per-thread scratch buffer (its pages stay mapped from one chunk to
        the next) and AES-GCM encrypts it straight into the envelope.

        The envelope is new memory that is not zeroed first, and the body is copied with
        the GIL released (see _uninit, _copy): a backup's workers seal about a gigabyte,
        and these two passes over it were a third of the time a worker held the GIL
        (py-spy --gil on the benchmark image)."""
        n = 1 + len(body)
        if self._aead is None:
            out = _uninit(1 + n + TAG_LEN)
            out[0] = 0
            out[1] = codec
            copy_unlocked(out[2:1 + n], body)
            h = blake3.blake3(aad, key=self.check_key)
            h.update(out[1:1 + n])
            out[1 + n:] = h.digest(TAG_LEN)
            return out
        scratch = _scratch.get(n)
        nonce = os.urandom(NONCE_LEN)
        out = _uninit(1 + NONCE_LEN + n + TAG_LEN)
        out[0] = 1
        out[1:1 + NONCE_LEN] = nonce
        scratch[0] = codec
        with memoryview(scratch) as sv:
            copy_unlocked(sv[1:n], body)
            self._aead.encrypt_into(nonce, sv[:n], aad, out[1 + NONCE_LEN:])
        return out

    def open(self, blob: bytes | memoryview, aad: bytes, what: str) -> bytes:
        """Authenticate and return the payload; raise IntegrityError naming ``what``."""
        if len(blob) < 1 + TAG_LEN:
            raise IntegrityError(f"{what}: truncated")
        kind = blob[0]
        if kind == 0:
            if self._aead is not None:
                raise IntegrityError(f"{what}: unencrypted object in an encrypted repository")
            payload = bytes(blob[1:-TAG_LEN])
            h = blake3.blake3(aad, key=self.check_key)
            h.update(payload)
            if h.digest(TAG_LEN) != bytes(blob[-TAG_LEN:]):
                raise IntegrityError(f"{what}: checksum mismatch (corrupt data)")
            return payload
        if kind == 1:
            if self._aead is None:
                raise IntegrityError(f"{what}: encrypted object in an unencrypted repository")
            if len(blob) < 1 + NONCE_LEN + TAG_LEN:
                raise IntegrityError(f"{what}: truncated")
            try:
                mv = memoryview(blob)
                return self._aead.decrypt(mv[1:1 + NONCE_LEN], mv[1 + NONCE_LEN:], aad)
            except InvalidTag:
                raise IntegrityError(f"{what}: authentication failed (corrupt or tampered data)") from None
        raise IntegrityError(f"{what}: unknown envelope type {kind}")

    def open_into(self, blob: bytes | memoryview, aad: bytes, what: str, out: memoryview) -> int:
        """:meth:`open` into ``out`` (at least as long as ``blob``): the payload is written
        to the start of ``out`` and its length returned; nothing is allocated for it."""
        if len(blob) < 1 + TAG_LEN:
            raise IntegrityError(f"{what}: truncated")
        mv = memoryview(blob)
        if mv[0] != 1 or self._aead is None:
            payload = self.open(blob, aad, what)
            out[:len(payload)] = payload
            return len(payload)
        if len(blob) < 1 + NONCE_LEN + TAG_LEN:
            raise IntegrityError(f"{what}: truncated")
        n = len(blob) - 1 - NONCE_LEN - TAG_LEN
        try:
            self._aead.decrypt_into(mv[1:1 + NONCE_LEN], mv[1 + NONCE_LEN:], aad, out[:n])
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (corrupt or tampered data)") from None
        return n
