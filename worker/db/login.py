"""Login failures counted per account name and per client address, for :mod:`worker.web.throttle`.

Kept in the database rather than in memory so that every web process of an installation (several uvicorn
workers, several hosts) counts the same failures and a restart does not wipe them. Migration ``auth0001``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from worker.db.models import Base


class LoginFailures(Base):
    """Recent failed logins of one key: ``name:<attempted name>`` or ``addr:<client address>``.

    Names are keyed as typed, known or not, so that an unknown name is throttled exactly like a real one (its
    answers cannot tell the two apart). Rows whose last failure is old are purged as new failures come in.
    """

    __tablename__ = "login_failures"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    failures: Mapped[int]
    last_failure_at: Mapped[datetime] = mapped_column(index=True)


__all__ = ["LoginFailures"]
