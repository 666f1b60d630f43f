"""The worklist and study queries: one aggregate SQL query per page, the same on SQLite and PostgreSQL.

A study's row summarises its series: the latest job of each series (``jobs.revision = series.revision``), the
current results (``superseded_by_pk IS NULL``) and each result's latest review. Triage order: suspected findings
not yet fully reviewed first, then other studies awaiting a result or a review, then reviewed studies; within
each group the longest waiting (earliest received) first. An indeterminate result (``models.tasks.INDETERMINATE``:
the model could not judge the series) is no finding: it awaits review like a negative one, shows its reason, and
``finding=indeterminate`` filters for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, case, exists, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from models.tasks import INDETERMINATE, TASKS
from worker.db.models import Job, JobState, Patient, Result, Review, Series, Study

PAGE_SIZE = 50

# Study status: the most urgent state of its series' latest jobs wins (a failure shows over a success).
_STATUS_ORDER: tuple[JobState, ...] = (
    JobState.FAILED, JobState.RUNNING, JobState.QUEUED, JobState.RECEIVED, JobState.DONE, JobState.NOT_APPLICABLE,
)
_STATUS_RANK = {state: rank for rank, state in enumerate(_STATUS_ORDER)}


class ReviewState(str, enum.Enum):
    NO_RESULT = "no_result"  # nothing to review yet
    PENDING = "pending"  # no current result reviewed
    PARTIAL = "partial"  # some reviewed
    CONFIRMED = "confirmed"  # all reviewed, none corrected
    CORRECTED = "corrected"  # all reviewed, at least one corrected


def is_suspected(task: str, label: str) -> bool:
    """Whether ``label`` is a finding: one of the task's classes that is not negative (indeterminate is none)."""
    known = TASKS.get(task)
    return known is not None and label in known.finding_classes


def _suspected_sql(result: Any) -> Any:
    """:func:`is_suspected` in SQL."""
    return or_(*(and_(result.task == t.name, result.label.in_(t.finding_classes)) for t in TASKS.values()))


#: The values each worklist filter accepts. ``finding`` is a result's label: a class, or ``indeterminate``.
FILTER_CHOICES: dict[str, tuple[str, ...]] = {
    "status": tuple(s.value for s in JobState),
    "task": tuple(TASKS),
    "finding": (*sorted({c for t in TASKS.values() for c in t.class_names}), INDETERMINATE),
    "review": tuple(r.value for r in ReviewState),
}


@dataclass(frozen=True)
class WorklistFilter:
    status: str | None = None
    task: str | None = None
    finding: str | None = None
    review: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in FILTER_CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class SeriesResult:
    """A current result of one series with its latest review."""

    result_id: int
    series_id: int
    task: str
    #: A class name, or ``indeterminate``.
    label: str
    #: The label's probability; ``None`` for an indeterminate label, which is no class.
    probability: float | None
    suspected: bool
    #: Why the label is indeterminate (``None`` for a class label).
    reason: str | None
    model_name: str
    model_version: str
    review_decision: str | None
    review_label: str | None


@dataclass
class WorklistRow:
    study_id: int
    patient_name: str
    patient_id: str
    accession_number: str
    study_description: str
    received_at: datetime
    status: str
    review_state: str
    finding: str | None
    probability: float | None
    #: Why the headline finding is indeterminate (``None`` otherwise).
    reason: str | None
    model_version: str | None
    tasks: list[str] = field(default_factory=list)
    results: list[SeriesResult] = field(default_factory=list)


@dataclass
class WorklistPage:
    rows: list[WorklistRow]
    page: int
    page_size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def _aggregate() -> Select[Any]:
    """One row per study: status rank, whether a suspected finding awaits review, result and review counts.

    The joins yield one row per (series, current result) with at most one job (the latest) and one review (the
    latest, found by "no newer review of the same result"), so plain counts are exact: no ``COUNT(DISTINCT)``.
    """
    review, newer = aliased(Review), aliased(Review)
    status_rank = case(
        *((Job.state == state, rank) for state, rank in _STATUS_RANK.items()), else_=_STATUS_RANK[JobState.RECEIVED]
    )
    unreviewed_suspect = case((and_(_suspected_sql(Result), review.id.is_(None)), 1), else_=0)
    return (
        select(
            Study.id.label("study_id"),
            Study.created_at.label("received_at"),
            func.min(status_rank).label("status_rank"),
            func.max(unreviewed_suspect).label("unreviewed_suspect"),
            func.count(Result.id).label("n_results"),
            func.count(review.id).label("n_reviewed"),
            func.count(case((review.decision == "correct", review.id))).label("n_corrected"),
        )
        .select_from(Study)
        .outerjoin(Series, Series.study_pk == Study.id)
        .outerjoin(Job, and_(Job.series_pk == Series.id, Job.revision == Series.revision))
        .outerjoin(Result, and_(Result.series_pk == Series.id, Result.superseded_by_pk.is_(None)))
        .outerjoin(
            review,
            and_(
                review.result_pk == Result.id,
                ~exists().where(newer.result_pk == review.result_pk, newer.id > review.id),
            ),
        )
        .group_by(Study.id, Study.created_at)
    )


def _review_state_sql(agg: Any) -> Any:
    return case(
        (agg.c.n_results == 0, literal(ReviewState.NO_RESULT.value)),
        (agg.c.n_reviewed == 0, literal(ReviewState.PENDING.value)),
        (agg.c.n_reviewed < agg.c.n_results, literal(ReviewState.PARTIAL.value)),
        (agg.c.n_corrected > 0, literal(ReviewState.CORRECTED.value)),
        else_=literal(ReviewState.CONFIRMED.value),
    )


def _study_conditions(filters: WorklistFilter) -> list[Any]:
    """The task and finding filters, as conditions on ``studies`` (any series of the study matches)."""
    conditions = []
    if filters.task is not None:
        series, job = aliased(Series), aliased(Job)
        conditions.append(
            exists()
            .where(series.study_pk == Study.id, job.series_pk == series.id, job.revision == series.revision)
            .where(job.task == filters.task)
        )
    if filters.finding is not None:
        series, result = aliased(Series), aliased(Result)
        conditions.append(
            exists()
            .where(series.study_pk == Study.id, result.series_pk == series.id, result.superseded_by_pk.is_(None))
            .where(result.label == filters.finding)
        )
    return conditions


def load_worklist(session: Session, filters: WorklistFilter, page: int = 1, page_size: int = PAGE_SIZE) -> WorklistPage:
    """One page of the worklist in triage order."""
    if page < 1 or not 1 <= page_size <= 500:
        raise ValueError("page must be >= 1 and page_size 1..500")
    conditions = _study_conditions(filters)
    studies = _aggregate().where(*conditions).subquery("agg")
    review_state = _review_state_sql(studies)
    waiting = case((studies.c.n_reviewed < studies.c.n_results, 1), (studies.c.n_results == 0, 1), else_=2)
    triage_group = case((studies.c.unreviewed_suspect == 1, 0), else_=waiting)
    aggregate_filter = filters.status is not None or filters.review is not None
    columns = [studies.c.study_id, studies.c.status_rank, review_state.label("review_state")]
    if aggregate_filter:
        # The total rides along as a window count: the ORDER BY materialises every matching row anyway, and a
        # separate count would compute the aggregate a second time.
        columns.append(func.count().over().label("total"))
    query = select(*columns)
    if filters.status is not None:
        query = query.where(studies.c.status_rank == _STATUS_RANK[JobState(filters.status)])
    if filters.review is not None:
        query = query.where(review_state == filters.review)
    page_rows = session.execute(
        query.order_by(triage_group, studies.c.received_at, studies.c.study_id)
        .limit(page_size)
        .offset((page - 1) * page_size)
    ).all()
    if not aggregate_filter:
        total = session.scalar(select(func.count(Study.id)).where(*conditions)) or 0  # cheap: no aggregate
    elif page_rows:
        total = int(page_rows[0].total)
    else:  # past the last page, or nothing matches
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = _detail_rows(session, [(r.study_id, _STATUS_ORDER[r.status_rank].value, r.review_state) for r in page_rows])
    return WorklistPage(rows=rows, page=page, page_size=page_size, total=total)


def _detail_rows(session: Session, keys: list[tuple[int, str, str]]) -> list[WorklistRow]:
    """Patient, study and current-result details for the studies of one page (two small queries)."""
    ids = [k[0] for k in keys]
    if not ids:
        return []
    studies = {
        s.id: (s, p)
        for s, p in session.execute(select(Study, Patient).join(Patient).where(Study.id.in_(ids))).all()
    }
    results = current_results(session, ids)
    tasks: dict[int, set[str]] = {}
    for study_id, task in session.execute(
        select(Series.study_pk, Job.task)
        .join(Job, and_(Job.series_pk == Series.id, Job.revision == Series.revision))
        .where(Series.study_pk.in_(ids), Job.task.is_not(None))
    ):
        tasks.setdefault(study_id, set()).add(task)
    rows = []
    for study_id, status, review_state in keys:
        study, patient = studies[study_id]
        found = results.get(study_id, [])
        headline = _headline(found)
        rows.append(
            WorklistRow(
                study_id=study_id,
                patient_name=patient.patient_name,
                patient_id=patient.patient_id,
                accession_number=study.accession_number,
                study_description=study.study_description,
                received_at=study.created_at,
                status=status,
                review_state=review_state,
                finding=headline.label if headline else None,
                probability=headline.probability if headline else None,
                reason=headline.reason if headline else None,
                model_version=headline.model_version if headline else None,
                tasks=sorted(tasks.get(study_id, ())),
                results=found,
            )
        )
    return rows


def _headline(results: list[SeriesResult]) -> SeriesResult | None:
    """The result a study's row shows: the most probable suspected finding, else an indeterminate result (it asks
    for a look more than a negative one), else the most probable result."""
    if not results:
        return None
    return max(results, key=lambda r: (r.suspected, r.label == INDETERMINATE, r.probability or 0.0))


def current_results(session: Session, study_ids: list[int]) -> dict[int, list[SeriesResult]]:
    """Current results of the given studies' series with each result's latest review, by study id."""
    newer = aliased(Review)
    query = (
        select(Series.study_pk, Result, Review.decision, Review.label)
        .join(Result, and_(Result.series_pk == Series.id, Result.superseded_by_pk.is_(None)))
        .outerjoin(
            Review,
            and_(Review.result_pk == Result.id,
                 ~exists().where(newer.result_pk == Review.result_pk, newer.id > Review.id)),
        )
        .where(Series.study_pk.in_(study_ids))
        .order_by(Series.series_number, Series.id, Result.id)
    )
    out: dict[int, list[SeriesResult]] = {}
    for study_id, result, decision, review_label in session.execute(query):
        out.setdefault(study_id, []).append(
            SeriesResult(
                result_id=result.id,
                series_id=result.series_pk,
                task=result.task,
                label=result.label,
                probability=_label_probability(result),
                suspected=is_suspected(result.task, result.label),
                reason=result.reason,
                model_name=result.model_name,
                model_version=result.model_version,
                review_decision=decision,
                review_label=review_label,
            )
        )
    return out


def _label_probability(result: Result) -> float | None:
    if result.label == INDETERMINATE:
        return None
    return float(result.probabilities.get(result.label, 0.0))


def study_status(session: Session, study_id: int) -> tuple[str, str] | None:
    """(status, review state) of one study, by the worklist's rules; ``None`` if there is no such study."""
    studies = _aggregate().where(Study.id == study_id).subquery()
    row = session.execute(select(studies.c.status_rank, _review_state_sql(studies))).first()
    return None if row is None else (_STATUS_ORDER[row[0]].value, row[1])
