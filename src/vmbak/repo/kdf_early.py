"""Start a local repository's key derivation before the slow imports (built-in modules only).

``vmbak snapshots`` on a small encrypted repository spends most of its time in scrypt
(about 0.19 s) and in imports (numpy and the rest, about 0.1 s). hashlib's scrypt releases
the GIL, so ``start`` runs it in a thread as soon as the command line is known, and
``take`` hands the result to the key file's unwrapping. The parameters and the check of the
key (AES-GCM over the master key) are unchanged: an early result is the same 32 bytes the
key file's own derivation would give, for the same password, salt, N, r and p.

Only the plain case is started early: a local repository, the password in $VMBAK_PASSWORD
(no password file or command anywhere), the first key file in name order (the one
``open_master_key`` tries first). Anything else derives as before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading

_KEY_NAME = re.compile(r"[0-9a-f]{32}")
_pending: dict[tuple[bytes, bytes, int, int, int], tuple[threading.Thread, dict]] = {}


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=128 * r * (n + p + 2) + (16 << 20))


def start(argv: list[str], value_options: tuple[str, ...]) -> None:
    """Start deriving the first key file's key of the repository ``argv`` names, if simple."""
    try:
        env = os.environ
        pw = env.get("VMBAK_PASSWORD")
        if pw is None or env.get("VMBAK_PASSWORD_FILE") or env.get("VMBAK_PASSWORD_COMMAND"):
            return
        repo = env.get("VMBAK_REPOSITORY")
        it = iter(argv)
        for a in it:
            if a.startswith("--pass"):
                return
            if a in ("-r", "--repo"):
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
        if not (1 < n <= 1 << 22 and 0 < r <= 64 and 0 < p <= 16):
            return
        salt = base64.b64decode(doc["salt"].encode(), validate=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # the real opening reports whatever is wrong
    key = (pw.encode(), salt, n, r, p)
    box: dict = {}

    def run() -> None:
        try:
            box["kek"] = _derive(*key)
        except (ValueError, MemoryError):
            pass

    t = threading.Thread(target=run, name="vmbak-kdf", daemon=True)
    _pending[key] = (t, box)
    t.start()


def take(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes | None:
    """The key started early for exactly these inputs, or None."""
    got = _pending.pop((password, salt, n, r, p), None)
    if got is None:
        return None
    t, box = got
    t.join()
    return box.get("kek")
