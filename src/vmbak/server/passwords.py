"""Dashboard passwords: scrypt hashes kept in the configuration (``[server.users.NAME]``).

The format is ``scrypt$N$r$p$SALT$HASH`` with SALT (16 random bytes) and HASH (32 bytes)
in unpadded URL-safe base64, made by ``vmbak server --hash-password``. Checking costs
~50-100 ms of CPU (N = 2^15, r = 8, p = 1), which makes guessing slow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

N, R, P, DKLEN = 1 << 15, 8, 1, 32


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str) -> str:
    """A new hash of ``password`` (a fresh random salt each time)."""
    salt = os.urandom(16)
    h = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=DKLEN, maxmem=128 << 20)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(h)}"


def hash_problem(text: str) -> str | None:
    """Why ``text`` is not a hash this module made, or None."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return "must be scrypt$N$r$p$SALT$HASH, as vmbak server --hash-password prints it"
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, h = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return "must be scrypt$N$r$p$SALT$HASH, as vmbak server --hash-password prints it"
    if n < 2 or n & (n - 1) or not (1 <= r <= 64 and 1 <= p <= 16) or n * r > 1 << 22 or len(salt) < 8 or len(h) < 16:
        return "has parameters out of range; make it again with vmbak server --hash-password"
    return None


def check_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (compared in constant time)."""
    if hash_problem(stored):
        return False
    _, n, r, p, salt, h = stored.split("$")
    want = _unb64(h)
    got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(want),
                         maxmem=256 << 20)
    return hmac.compare_digest(got, want)
