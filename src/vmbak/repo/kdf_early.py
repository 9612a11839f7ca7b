"""Start a local repository's key derivation before the slow imports (built-in modules only).

``vmbak snapshots`` on a small encrypted repository spends most of its time in scrypt
(about 0.13 s) and in imports (numpy and the rest, about 0.1 s). The derivation releases
the GIL, so ``start`` runs it in a thread as soon as the command line is known, and
``take`` hands the result to the key file's unwrapping. The parameters and the check of the
key (AES-GCM over the master key) are unchanged: an early result is the same 32 bytes the
key file's own derivation would give, for the same password, salt, N, r and p.

Only the plain case is started early: a local repository, the first key file in name order
(the one ``open_master_key`` tries first), and a password that can be known without side
effects, taken with the command line's precedence (cli/common.py ``resolve_password``):
``--password-file FILE``, else $VMBAK_PASSWORD_FILE, else $VMBAK_PASSWORD; never when the
password would come from a command (--password-command, or $VMBAK_PASSWORD_COMMAND without
--password-file). A password file is
read early only when it is a regular file of at most 64 KiB, read the way the command line
reads it (UTF-8 text, trailing line ends removed); the command line still reads it again
itself, so its errors are reported as before, and a FIFO or a device is never consumed
here. Anything else derives as before.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import stat
import threading

_KEY_NAME = re.compile(r"[0-9a-f]{32}")
_pending: dict[tuple[bytes, bytes, int, int, int], tuple[threading.Thread, dict]] = {}


def derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    """scrypt(password, salt, N=n, r, p) with a 32-byte result: every key-encryption key.

    libsodium's scrypt (through PyNaCl) rather than OpenSSL's (hashlib, cryptography): the
    same bytes, in 134 ms against 193 ms for N=2^16, r=8, p=1 (medians of 15 interleaved
    runs in one process on the 2-core machine); it releases the GIL as well. Imported here,
    on the deriving thread, so that ``start`` stays free of slow imports. Raises ValueError
    for parameters scrypt does not accept (N not a power of two above 1)."""
    from nacl.bindings import crypto_pwhash_scryptsalsa208sha256_ll

    return crypto_pwhash_scryptsalsa208sha256_ll(password, salt, n, r, p, dklen=32,
                                                 maxmem=scrypt_memory(n, r, p) + (16 << 20))


def scrypt_memory(n: int, r: int, p: int) -> int:
    """The bytes scrypt allocates for these parameters (its V and B arrays)."""
    return 128 * r * (n + p + 2)


# The largest scrypt a key file may ask for: N=2^20, r=8 (1 GiB) fits. Without a limit, a
# hostile key file asking for 32 GiB (N=2^22, r=64) would get the process killed for memory.
MAX_SCRYPT_MEMORY = 2 << 30


def plausible(n: int, r: int, p: int) -> bool:
    """Whether a key file's scrypt parameters are ones a reader derives with: N a power of
    two in 2..2^22, r in 1..64, p in 1..16, and at most MAX_SCRYPT_MEMORY bytes."""
    return (1 < n <= 1 << 22 and n & (n - 1) == 0 and 0 < r <= 64 and 0 < p <= 16
            and scrypt_memory(n, r, p) <= MAX_SCRYPT_MEMORY)


_MAX_PASSWORD_FILE = 1 << 16


def _password_file(path: str) -> str | None:
    """The password in ``path`` as cli/common.py reads it, if it is a small regular file."""
    st = os.stat(path)  # before opening: opening a FIFO would block or take its writer's data
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_PASSWORD_FILE:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read(_MAX_PASSWORD_FILE + 1).rstrip("\r\n")


def _password(file_opt: str | None) -> str | None:
    """The password resolve_password would return, when it can be had without running a
    command; None otherwise (or when it is not to be had at all)."""
    env = os.environ
    if file_opt:
        return _password_file(file_opt)
    env_file, env_cmd = env.get("VMBAK_PASSWORD_FILE"), env.get("VMBAK_PASSWORD_COMMAND")
    if env_cmd:
        return None
    if env_file:
        return _password_file(env_file)
    return env.get("VMBAK_PASSWORD")


def start(argv: list[str], value_options: tuple[str, ...]) -> None:
    """Start deriving the first key file's key of the repository ``argv`` names, if simple."""
    try:
        env = os.environ
        repo = env.get("VMBAK_REPOSITORY")
        file_opt: str | None = None
        it = iter(argv)
        for a in it:
            if a == "--password-file":
                file_opt = next(it, None)
                if file_opt is None:
                    return
            elif a.startswith("--password-file="):
                file_opt = a.split("=", 1)[1]
            elif a.startswith("--pass"):  # a password command, or an abbreviation
                return
            elif a in ("-r", "--repo"):
                repo = next(it, None)
            elif a.startswith("--repo="):
                repo = a.split("=", 1)[1]
            elif a in value_options:
                next(it, None)
        if not repo or not os.path.isdir(os.path.join(repo, "keys")):
            return
        names = sorted(n for n in os.listdir(os.path.join(repo, "keys")) if _KEY_NAME.fullmatch(n))
        if not names:
            return
        with open(os.path.join(repo, "keys", names[0]), "rb") as f:
            doc = json.loads(f.read(1 << 16))
        if doc.get("kdf") != "scrypt":
            return
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if not plausible(n, r, p):
            return
        salt = base64.b64decode(doc["salt"].encode(), validate=True)
        pw = _password(file_opt)  # last: a password file is read only for a repository that needs it
        if pw is None:
            return
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # the real opening reports whatever is wrong
    key = (pw.encode(), salt, n, r, p)
    box: dict = {}

    def run() -> None:
        try:
            box["kek"] = derive(*key)
        except (ValueError, MemoryError, RuntimeError, ImportError):
            pass

    t = threading.Thread(target=run, name="vmbak-kdf", daemon=True)
    if not _pending:
        atexit.register(_join_pending)
    _pending[key] = (t, box)
    t.start()


def _join_pending() -> None:
    """At exit (a signal or an error before the key was taken): let the derivation end
    first. A thread still inside OpenSSL's scrypt (used before libsodium's) while the
    process exits could meet the locks OpenSSL's exit handlers free (seen: SIGSEGV in
    pthread_rwlock_rdlock on a non-main thread, about 1 in 100 start-ups interrupted by
    SIGINT); libsodium's keeps no such locks, and the wait is kept all the same."""
    for t, _ in list(_pending.values()):
        t.join(timeout=30)


def take(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes | None:
    """The key started early for exactly these inputs, or None."""
    got = _pending.pop((password, salt, n, r, p), None)
    if got is None:
        return None
    t, box = got
    t.join()
    return box.get("kek")
