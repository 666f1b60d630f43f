"""Passwords, the server secret, session tokens and CSRF tokens.

* Passwords: Argon2id (argon2-cffi's defaults, RFC 9106 low-memory profile); hashes are re-computed on login
  when the parameters change.
* The secret key signs cookies and derives CSRF tokens. It is created once in ``data_dir`` with mode 0600, so
  every web process of one installation shares it and restarts keep sessions valid.
* Session cookie: ``<random token>.<HMAC>``. The HMAC rejects forged cookies before any database query; the
  database holds only the token's SHA-256 (see :class:`worker.db.review.WebSession`), so logout revokes it.
* CSRF: synchroniser tokens, ``HMAC(secret, "csrf" + binding)`` where the binding is the session token (or, before
  login, a random pre-login cookie). A token is useless without the cookie it is bound to.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

SECRET_FILE = "web-secret.key"
_hasher = PasswordHasher()
#: OWASP ASVS 2.1.1; the rest of the password policy is worker.web.users.password_problem.
MIN_PASSWORD_LENGTH = 12


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_dummy() -> None:
    """Verify against a throw-away hash: a login for an unknown name takes as long as a wrong password."""
    verify_password(_dummy_hash(), "not-the-password")


def load_or_create_secret(data_dir: Path) -> bytes:
    """The installation's 32-byte secret from ``data_dir/web-secret.key``, created (0600) on first use."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    try:
        # O_EXCL: two processes starting at once cannot both create (and disagree on) the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"{path} is shorter than 32 bytes; delete it to create a new one") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    return key


class Signer:
    """HMAC-SHA256 signing of cookie values and derivation of CSRF tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def sign(self, value: str) -> str:
        return f"{value}.{self._mac('cookie', value)}"

    def unsign(self, signed: str | None) -> str | None:
        """The value of a signed cookie, or ``None`` when it is missing or its signature is wrong."""
        if not signed or "." not in signed:
            return None
        value, mac = signed.rsplit(".", 1)
        return value if hmac.compare_digest(mac, self._mac("cookie", value)) else None

    def csrf_token(self, binding: str) -> str:
        return self._mac("csrf", binding)

    def check_csrf(self, binding: str | None, token: str | None) -> bool:
        return bool(binding and token) and hmac.compare_digest(str(token), self.csrf_token(str(binding)))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
