"""A radiologist's decision on a result, shared by the form and the JSON API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from models.tasks import TASKS
from worker.db import Database, Result, Series, User
from worker.db.review import Decision, record_decision

log = logging.getLogger(__name__)
MAX_COMMENT = 2000

#: Called with the review's id after a correction is committed: the place that issues the revised SR.
CorrectionHook = Callable[[int], None]


class DecisionError(ValueError):
    """The decision cannot be stored (unknown result, superseded result, bad label); the message says why."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DecisionOutcome:
    review_id: int
    study_id: int
    label: str
    #: Why the revised SR could not be made (the decision is stored regardless); ``None`` when it was, or none
    #: was due.
    report_error: str | None = None


def decide(
    database: Database,
    result_id: int,
    user_id: int,
    decision: str,
    label: str | None,
    comment: str,
    on_correction: CorrectionHook | None,
) -> DecisionOutcome:
    """Check and store a decision; after a committed correction, call ``on_correction(review_id)``.

    A confirmation keeps the model's label, ``indeterminate`` included; a correction picks one of the task's classes
    (never ``indeterminate``: a radiologist who judges the series names what it shows). The decision is committed
    first: a failing hook (archive full, source instances gone) is logged and reported
    in the outcome, and never loses the decision.
    """
    try:
        checked = Decision(decision)
    except ValueError:
        raise DecisionError(f"decision must be confirm or correct, not {decision!r}") from None
    if len(comment) > MAX_COMMENT:
        raise DecisionError(f"the comment is longer than {MAX_COMMENT} characters")
    with database.session() as session:
        row = session.execute(
            select(Result, Series.study_pk).join(Series, Series.id == Result.series_pk).where(Result.id == result_id)
        ).first()
        if row is None:
            raise DecisionError(f"no result {result_id}", status=404)
        result, study_id = row
        if result.superseded_by_pk is not None:
            raise DecisionError("this result was superseded by a newer one; review the current result", status=409)
        task = TASKS.get(result.task)
        chosen = result.label if checked is Decision.CONFIRM else (label or "")
        if checked is Decision.CORRECT and (task is None or chosen not in task.class_names):
            allowed = ", ".join(task.class_names) if task else "none"
            raise DecisionError(f"label must be one of {allowed}; got {chosen!r}")
        user = session.get(User, user_id)
        assert user is not None  # the caller's session guarantees the user exists
        try:
            review = record_decision(session, result, user, checked, chosen, comment.strip())
        except ValueError as exc:
            raise DecisionError(str(exc)) from None
        review_id = review.id
    report_error = None
    if checked is Decision.CORRECT and on_correction is not None:
        try:
            on_correction(review_id)
        except Exception as exc:  # any failure of the SR path must not turn a stored decision into an error page
            log.exception("revised SR for review %d failed", review_id)
            report_error = f"the revised report could not be made: {type(exc).__name__}"
    return DecisionOutcome(review_id=review_id, study_id=study_id, label=chosen, report_error=report_error)
