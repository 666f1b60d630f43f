"""Creating and listing users (shared by ``dicom-triage users`` and the admin page)."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import User
from worker.db.review import Role, audit
from worker.web.security import hash_password

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


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
