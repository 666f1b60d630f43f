"""What the radiologists' review adds to the schema: web sessions and confirmed training examples, plus the one
function that records a decision.

Users, reviews and the audit log are :class:`worker.db.models.User`, :class:`~worker.db.models.Review` and
:class:`~worker.db.models.AuditEvent`; this module builds on them. Migration ``web0001`` creates its tables.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.tasks import TASKS
from worker.db.models import AuditEvent, Base, Result, Review, User, utcnow


class Role(str, enum.Enum):
    """``radiologist``: reviews results. ``admin``: manages users and models (and does not decide)."""

    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


class Decision(str, enum.Enum):
    CONFIRM = "confirm"
    CORRECT = "correct"


class WebSession(Base):
    """A logged-in browser. The cookie carries a random token; only its SHA-256 is stored, so a database leak
    does not hand out sessions."""

    __tablename__ = "web_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class TrainingExample(Base):
    """A series whose label a radiologist confirmed or corrected: retraining's ground truth (latest decision wins)."""

    __tablename__ = "training_examples"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)
    task: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    review_pk: Mapped[int] = mapped_column(ForeignKey("reviews.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


def audit(session: Session, user: User | None, action: str, target: str = "") -> None:
    """Append an audit event. ``target`` names rows by primary key (``study:12``), never by patient data."""
    session.add(AuditEvent(user_pk=user.id if user else None, action=action, target=target))


def record_decision(
    session: Session, result: Result, user: User, decision: Decision, label: str, comment: str = ""
) -> Review:
    """Store ``user``'s decision on ``result``, mark its series a confirmed training example (unless the decision
    confirms an indeterminate result or an untyped finding, which name no class), audit it.

    ``label`` is the result's own label for a confirmation and the corrected class for a correction; the caller
    has checked it against the task's classes.
    """
    if decision is Decision.CONFIRM and label != result.label:
        raise ValueError(f"a confirmation keeps the label {result.label!r}, not {label!r}")
    if decision is Decision.CORRECT and label == result.label:
        raise ValueError("a correction must choose a label other than the model's")
    review = Review(result_pk=result.id, user_pk=user.id, decision=decision.value, label=label, comment=comment)
    session.add(review)
    session.flush()
    example = session.scalar(select(TrainingExample).where(TrainingExample.series_pk == result.series_pk))
    task = TASKS.get(result.task)
    if task is None or label not in task.class_names:
        # Agreeing that the model cannot judge the series, or that it shows a tumour of no stated type, names no
        # class to train on; an example left from an earlier decision on the series no longer stands either.
        if example is not None:
            session.delete(example)
    elif example is None:
        session.add(TrainingExample(series_pk=result.series_pk, task=result.task, label=label, review_pk=review.id))
    else:
        example.task, example.label, example.review_pk, example.updated_at = result.task, label, review.id, utcnow()
    audit(session, user, f"decision.{decision.value}", f"result:{result.id}")
    return review


__all__ = ["Decision", "Role", "TrainingExample", "WebSession", "audit", "record_decision"]
