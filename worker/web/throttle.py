"""Login throttling: exponential back-off after a few failed logins and a temporary lockout after many, per
account name and per client address (OWASP ASVS 2.2.1).

The counts live in the database (:class:`worker.db.login.LoginFailures`) so that every web process agrees. A
failure is counted by one atomic upsert per key; attempts refused while a key waits are not counted, so a lockout
ends when its time is up however hard it is hammered, and nobody can lock an account forever (``users unlock``
lifts one at once). A key's count starts again once its last failure is older than the longest wait. Two attempts
racing through the check at the same moment may both be tried: the bound is one extra attempt per concurrent
request, not an unbounded stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from config import Settings
from worker.db.login import LoginFailures

NAME_PREFIX = "name:"
ADDRESS_PREFIX = "addr:"


@dataclass(frozen=True)
class Policy:
    backoff_after: int
    lockout_after: int
    backoff_seconds: float
    backoff_max_seconds: float
    lockout_seconds: float
    address_factor: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(settings.login_backoff_after, settings.login_lockout_after, settings.login_backoff_seconds,
                   settings.login_backoff_max_seconds, settings.login_lockout_seconds, settings.login_address_factor)

    def _scale(self, key: str) -> int:
        return self.address_factor if key.startswith(ADDRESS_PREFIX) else 1

    def is_locked(self, key: str, failures: int) -> bool:
        return failures >= self.lockout_after * self._scale(key)

    def wait_seconds(self, key: str, failures: int) -> float:
        """How long after its ``failures``-th failure the key must wait before its next attempt."""
        scale = self._scale(key)
        if failures >= self.lockout_after * scale:
            return self.lockout_seconds
        if failures >= self.backoff_after * scale:
            return min(self.backoff_seconds * 2.0 ** (failures - self.backoff_after * scale), self.backoff_max_seconds)
        return 0.0

    @property
    def memory(self) -> timedelta:
        """Failures older than this are forgotten: no wait is longer."""
        return timedelta(seconds=max(self.lockout_seconds, self.backoff_max_seconds))


@dataclass(frozen=True)
class Refusal:
    """An attempt refused unchecked: try again in ``retry_after`` whole seconds; ``locked`` for a lockout."""

    retry_after: int
    locked: bool


def account_key(name: str) -> str:
    return NAME_PREFIX + name[:128]


def address_key(address: str) -> str:
    return ADDRESS_PREFIX + address[:64]


def check(session: Session, policy: Policy, keys: list[str], now: datetime) -> Refusal | None:
    """The refusal owed to an attempt on ``keys`` now (the longest wait among them), or ``None``."""
    refusal: Refusal | None = None
    rows = session.execute(select(LoginFailures).where(LoginFailures.key.in_(keys))).scalars()
    for row in rows:
        until = row.last_failure_at + timedelta(seconds=policy.wait_seconds(row.key, row.failures))
        if until > now:
            retry_after = max(1, math.ceil((until - now).total_seconds()))
            if refusal is None or retry_after > refusal.retry_after:
                refusal = Refusal(retry_after, policy.is_locked(row.key, row.failures))
    return refusal


def record_failure(session: Session, policy: Policy, keys: list[str], now: datetime) -> list[str]:
    """Count a failure against each key; the keys this failure locked (for the audit log)."""
    table = LoginFailures.__table__
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    forget_before = now - policy.memory
    locked = []
    for key in keys:
        statement = insert(table).values(key=key, failures=1, last_failure_at=now)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.key],
            set_={"failures": case((table.c.last_failure_at < forget_before, 1), else_=table.c.failures + 1),
                  "last_failure_at": now},
        ).returning(table.c.failures)
        failures = session.execute(statement).scalar_one()
        if failures == policy.lockout_after * policy._scale(key):
            locked.append(key)
    # Keys of names tried once long ago would otherwise pile up (an attacker may try endless made-up names).
    session.execute(delete(LoginFailures).where(LoginFailures.last_failure_at < forget_before))
    return locked


def clear(session: Session, key: str) -> bool:
    """Forget a key's failures (a successful login, ``users unlock``); whether there were any."""
    return session.execute(delete(LoginFailures).where(LoginFailures.key == key)).rowcount > 0


__all__ = ["Policy", "Refusal", "account_key", "address_key", "check", "clear", "record_failure"]
