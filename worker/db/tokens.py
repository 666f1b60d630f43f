"""API tokens of sending systems (a PACS posting STOW-RS): one per system, made by an admin (migration ``bf0001``).

Only the token's SHA-256 is stored: the token is a random 256-bit secret, so a plain hash is as strong as a slow
one, and a leaked database yields no usable token.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from worker.db.models import Base, utcnow


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TokenError(ValueError):
    """A token name that is empty, too long or taken."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_token(session: Session, name: str) -> str:
    """Make a token for the sending system ``name`` and return it (shown once; only its hash is kept)."""
    name = name.strip()
    if not name or len(name) > 64:
        raise TokenError("a token name has 1 to 64 characters")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists")
    token = secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_sha256=_digest(token)))
    return token


def token_owner(session: Session, token: str) -> str | None:
    """The name of the system ``token`` belongs to, or None for an unknown token."""
    return session.scalar(select(ApiToken.name).where(ApiToken.token_sha256 == _digest(token)))


__all__ = ["ApiToken", "TokenError", "add_token", "token_owner"]
