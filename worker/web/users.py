"""Creating and listing users (shared by ``dicom-triage users`` and the admin page)."""

from __future__ import annotations

import functools
import re
from importlib import resources

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import User
from worker.db.review import Role, audit
from worker.web import throttle
from worker.web.security import MIN_PASSWORD_LENGTH, hash_password

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
#: What people append to a common password to get past a rule ("Password2024!").
_DECORATION = "0123456789!@#$%^&*()_+-=.,;:?~ "


@functools.cache
def common_passwords() -> frozenset[str]:
    """The refused passwords shipped beside this module (``common-passwords.txt``), lower case."""
    text = resources.files("worker.web").joinpath("common-passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def password_problem(name: str, password: str) -> str | None:
    """Why ``password`` may not be ``name``'s (OWASP ASVS 2.1: length, no common or guessable ones), or ``None``."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"the password needs at least {MIN_PASSWORD_LENGTH} characters (it has {len(password)})"
    lowered = password.lower()
    if name and name.lower() in (lowered, lowered.rstrip(_DECORATION)):
        return "the password must not be the user name"
    if lowered in common_passwords() or lowered.rstrip(_DECORATION) in common_passwords():
        return "the password is one of the most common passwords; choose another"
    if len(set(lowered)) < 4:
        return "the password uses too few different characters"
    return None


class UserError(ValueError):
    """A user cannot be created or changed as asked; the message says why."""


def add_user(session: Session, name: str, role: str, password: str, by: User | None = None) -> User:
    """Create an active user with an Argon2id password hash; refuse a taken name or a bad role or password."""
    if not _NAME_RE.match(name):
        raise UserError(f"user name {name!r} must be 1-128 letters, digits or _.@-")
    try:
        checked_role = Role(role)
    except ValueError:
        raise UserError(f"role must be one of {', '.join(r.value for r in Role)}; got {role!r}") from None
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserError(f"user {name!r} already exists")
    if (problem := password_problem(name, password)) is not None:
        raise UserError(problem)
    try:
        password_hash = hash_password(password)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    user = User(name=name, role=checked_role.value, password_hash=password_hash, active=True)
    session.add(user)
    session.flush()
    audit(session, by, "user.add", f"user:{user.id}")
    return user


def set_active(session: Session, user_id: int, active: bool, by: User | None = None) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise UserError(f"no user with id {user_id}")
    user.active = active
    audit(session, by, "user.enable" if active else "user.disable", f"user:{user.id}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def unlock(session: Session, name: str, by: User | None = None) -> bool | None:
    """Forget the failed logins under ``name`` (its back-off or lockout ends now): ``True`` if there were any,
    ``False`` if none, ``None`` for a name that is neither a user nor throttled. Audited."""
    lifted = throttle.clear(session, throttle.account_key(name))
    user = session.scalar(select(User).where(User.name == name))
    if user is None and not lifted:
        return None
    audit(session, by, "user.unlock", f"user:{user.id}" if user is not None else f"name:{name[:64]}")
    return lifted
