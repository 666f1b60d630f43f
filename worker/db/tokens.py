"""How sending systems (a PACS posting STOW-RS, a viewer pulling our SRs) prove who they are, both set up by an admin:
an API token (one per system, migration ``bf0001``) or a client certificate subject bound to the system's name
(migration ``cc0001``; :mod:`worker.web.api_tokens` reads both).

Only the token's SHA-256 is stored: the token is a random 256-bit secret, so a plain hash is as strong as a slow
one, and a leaked database yields no usable token. A certificate subject is written as
:func:`dicom_io.tls.certificate_subject` writes it (``O=...,CN=...``, as ``dicom_tls_subjects`` names them); a
subject names one system, a system may have several (a new certificate bound before the old one expires).
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


class CertificateBinding(Base):
    __tablename__ = "api_certificates"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(1024), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TokenError(ValueError):
    """A token name that is empty, too long or taken; a certificate subject that is malformed, bound or unknown."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_token(session: Session, name: str) -> str:
    """Make a token for the sending system ``name`` and return it (shown once; only its hash is kept)."""
    name = _check_name(name)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists")
    token = secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_sha256=_digest(token)))
    return token


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64:
        raise TokenError("a sending system's name has 1 to 64 characters")
    return name


def _check_subject(subject: str) -> str:
    subject = subject.strip()
    # The form certificate_subject writes: KEY=VALUE pairs joined by commas, at least one of them.
    if not subject or len(subject) > 1024 or any("=" not in pair for pair in subject.split(",")):
        raise TokenError(f"{subject!r} is not a certificate subject such as 'O=Hospital,CN=pacs'")
    return subject


def bind_certificate(session: Session, name: str, subject: str) -> None:
    """Let a client certificate with ``subject`` authenticate as the sending system ``name``."""
    name, subject = _check_name(name), _check_subject(subject)
    bound = session.scalar(select(CertificateBinding.name).where(CertificateBinding.subject == subject))
    if bound is not None:
        raise TokenError(f"the subject {subject!r} is bound to {bound!r}")
    session.add(CertificateBinding(name=name, subject=subject))


def unbind_certificate(session: Session, subject: str) -> str:
    """Remove the binding of ``subject``; return the system it named."""
    binding = session.scalar(select(CertificateBinding).where(CertificateBinding.subject == subject.strip()))
    if binding is None:
        raise TokenError(f"no sending system is bound to the subject {subject.strip()!r}")
    session.delete(binding)
    return binding.name


def certificate_owner(session: Session, subject: str) -> str | None:
    """The name of the system the certificate subject is bound to, or None."""
    return session.scalar(select(CertificateBinding.name).where(CertificateBinding.subject == subject))


def token_owner(session: Session, token: str) -> str | None:
    """The name of the system ``token`` belongs to, or None for an unknown token."""
    return session.scalar(select(ApiToken.name).where(ApiToken.token_sha256 == _digest(token)))


__all__ = ["ApiToken", "CertificateBinding", "TokenError", "add_token", "bind_certificate", "certificate_owner",
           "token_owner", "unbind_certificate"]
