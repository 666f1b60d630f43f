"""The worklist: one page of studies in triage order, the same on SQLite and PostgreSQL, at a cost that does not
grow with the archive.

A study's row summarises its series: the latest job of each series (``jobs.revision = series.revision``), the
current results (``superseded_by_pk IS NULL``) and each result's latest review. Triage order: suspected findings
not yet fully reviewed first, then other studies awaiting a result or a review, then reviewed studies; within
each group the longest waiting (earliest received) first. An indeterminate result (``models.tasks.INDETERMINATE``:
the model could not judge the series) is no finding: it awaits review like a negative one, shows its reason, and
``finding=indeterminate`` filters for it.

The summary and the order's key are kept by the database (:mod:`worker.db.triage`), so a page is an index walk:

* Pages are keyset pages: a :class:`Cursor` names the last row shown (the next page: the rows after it) or the
  first (the previous page: the rows before it), and the page starts past it. No OFFSET: page 50 costs what page 1 costs, and a study arriving meanwhile neither
  repeats nor hides a row of the pages that follow.
* A filter walks its tag's index (``study_tags``); several filters walk the one matching the fewest studies and
  check the others by primary key.
* The total is counted up to :data:`TOTAL_CAP` studies (``total_exact`` false beyond: "1000+"), never over the
  whole table; with several filters it is the rows seen up to this page (a lower bound, "more" beyond).
* The rows' details (patient, study, current results and reviews) come in one query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Select, and_, exists, func, literal, select, tuple_
from sqlalchemy.orm import Session, aliased

from models.tasks import INDETERMINATE, TASKS
from worker.db.models import JobState, Patient, Result, Review, Series, Study
from worker.db.triage import ReviewState, StudyTag, StudyTriage, tag

PAGE_SIZE = 50
#: Totals are counted up to this many studies; beyond, a page says "1000+" instead of counting the archive. Each
#: count walks up to this many index entries (a few at most: one per filter, one for filters together), so it
#: is what a page costs beyond its rows: 10,000 made a page with two filters 2.4x slower at 200,000 studies than
#: at 10,000 (bench/worklist.py), where fewer studies matched.
TOTAL_CAP = 1_000


def is_suspected(task: str, label: str) -> bool:
    """Whether ``label`` is a finding: one of the task's classes that is not negative, or its untyped finding
    (indeterminate is none)."""
    known = TASKS.get(task)
    return known is not None and known.is_finding(label)


#: The values each worklist filter accepts. ``finding`` is a result's label: a class, an untyped finding, or
#: ``indeterminate``.
FILTER_CHOICES: dict[str, tuple[str, ...]] = {
    "status": tuple(s.value for s in JobState),
    "task": tuple(TASKS),
    "finding": (*sorted({c for t in TASKS.values() for c in t.labels}), INDETERMINATE),
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
    #: A class name, an untyped finding (``tumor``), or ``indeterminate``.
    label: str
    #: The label's probability (an untyped finding's: the finding classes' together); ``None`` for an indeterminate
    #: label, which is no class.
    probability: float | None
    suspected: bool
    #: Why the label is indeterminate, or why the finding has no type (``None`` for a class label).
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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
#: A cursor as it travels in a URL: ``{a|b}page.group.microseconds.study`` (see :class:`Cursor`). Every string
#: that matches decodes: the pattern is the whole contract, so a schema-valid request is never refused.
CURSOR_PATTERN = r"^[ab][1-9][0-9]{0,8}\.[0-2]\.[0-9]{1,17}\.[1-9][0-9]{0,9}$"
_DB_ID_MAX = 2**31 - 1


@dataclass(frozen=True)
class Cursor:
    """A position in triage order: the key of one row (triage group, received time, study id), the direction of
    the page it leads to (``forward``: the rows after it; else the rows before it) and that page's ordinal (for
    display; the key alone finds the page)."""

    forward: bool
    page: int
    triage_group: int
    received_at: datetime
    study_id: int

    def encode(self) -> str:
        micros = (self.received_at - _EPOCH) // _MICROSECOND
        return f"{'a' if self.forward else 'b'}{self.page}.{self.triage_group}.{micros}.{self.study_id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor ``text`` encodes; ``ValueError`` if it does not match :data:`CURSOR_PATTERN`."""
        if not re.fullmatch(CURSOR_PATTERN, text):
            raise ValueError("not a worklist cursor")
        page, group, micros, study = (int(p) for p in text[1:].split("."))
        # 17 digits of microseconds stay within the calendar (year 5138). No study has an id beyond the column's
        # range, so a larger one is the same position as the largest (and binds on PostgreSQL's integer).
        return cls(text[0] == "a", page, group, _EPOCH + micros * _MICROSECOND, min(study, _DB_ID_MAX))


@dataclass
class WorklistPage:
    rows: list[WorklistRow]
    #: The page's ordinal (1: the first page).
    page: int
    page_size: int
    #: Studies matching the filters, counted up to :data:`TOTAL_CAP` (several filters: the rows up to this page):
    #: exact when ``total_exact``, else a lower bound.
    total: int
    total_exact: bool
    #: The cursors of the next page and of the previous one; ``None`` when there is none.
    next: Cursor | None = None
    previous: Cursor | None = None

    @property
    def pages(self) -> int | None:
        """How many pages there are, when the total is exact."""
        return max(1, -(-self.total // self.page_size)) if self.total_exact else None


def _filter_tags(filters: WorklistFilter) -> list[str]:
    return [tag(name, value) for name, value in vars(filters).items() if value is not None]


def _capped_count(session: Session, query: Select[Any]) -> tuple[int, bool]:
    """(count, exact): the rows of ``query`` counted up to :data:`TOTAL_CAP`."""
    cap = TOTAL_CAP
    n = session.scalar(select(func.count()).select_from(query.limit(cap + 1).subquery())) or 0
    return min(n, cap), n <= cap


def _others(source: Any, tags: list[str]) -> list[ColumnElement[bool]]:
    """The other filters, each a primary-key probe of ``study_tags``."""
    conditions = []
    for other in tags:
        probe = aliased(StudyTag)
        conditions.append(exists().where(probe.study_pk == source.study_pk, probe.tag == other))
    return conditions


def _source(
    session: Session, filters: WorklistFilter
) -> tuple[Any, list[ColumnElement[bool]], tuple[int, bool] | None]:
    """What to walk in triage order (``study_triage``, or one filter's rows of ``study_tags``), the conditions on
    it, and the capped total with whether it is exact (``None`` for several filters: see :func:`load_worklist`)."""
    tags = _filter_tags(filters)
    if not tags:
        return StudyTriage, [], _capped_count(session, select(StudyTriage.study_pk))
    # Each filter's rows are one range of the tag index: counted up to the cap, read in index order.
    counts = {name: _capped_count(session, select(StudyTag.study_pk).where(StudyTag.tag == name)) for name in tags}
    # Walk the filter matching the fewest studies: the others reject as few of its rows as possible.
    driver = min(tags, key=lambda name: counts[name][0])
    source = aliased(StudyTag, name="driver")
    conditions: list[ColumnElement[bool]] = [source.tag == driver, *_others(source, [t for t in tags if t != driver])]
    return source, conditions, counts[driver] if len(tags) == 1 else None


def _key(source: Any) -> tuple[Any, Any, Any]:
    return source.triage_group, source.received_at, source.study_pk


def _keys(
    session: Session, source: Any, conditions: list[ColumnElement[bool]], cursor: Cursor | None, forward: bool,
    limit: int,
) -> list[tuple[int, datetime, int]]:
    """The keys of up to ``limit`` rows past ``cursor`` (from the start without one), in walking order."""
    key = _key(source)
    query = select(*key).where(*conditions)
    if cursor is not None:
        position = tuple_(*key)
        at = tuple_(*(
            literal(value, column.type)
            for column, value in zip(key, (cursor.triage_group, cursor.received_at, cursor.study_id), strict=True)
        ))
        query = query.where(position > at if forward else position < at)
    order = key if forward else tuple(column.desc() for column in key)
    return [tuple(row) for row in session.execute(query.order_by(*order).limit(limit))]  # type: ignore[misc]


def load_worklist(
    session: Session, filters: WorklistFilter, page_size: int = PAGE_SIZE, cursor: Cursor | None = None
) -> WorklistPage:
    """One page of the worklist in triage order: the first, or the one a cursor leads to."""
    if not 1 <= page_size <= 500:
        raise ValueError("page_size must be 1..500")
    source, conditions, counted = _source(session, filters)
    page, keys, more = 1, [], False
    if cursor is not None and not cursor.forward:
        back = _keys(session, source, conditions, cursor, forward=False, limit=page_size + 1)
        if len(back) > page_size:
            # Rows before these ones: a page between the first and the cursor's, and the cursor's row after it.
            page, keys, more = max(2, cursor.page), back[:page_size][::-1], True
        else:
            cursor = None  # nothing before these rows: that is the first page, shown whole from the start
    if cursor is None or cursor.forward:
        if cursor is not None:
            page = max(2, cursor.page)
        fetched = _keys(session, source, conditions, cursor, forward=True, limit=page_size + 1)
        more, keys = len(fetched) > page_size, fetched[:page_size]
    if counted is not None:
        total, exact = counted
    else:
        # Several filters: counting them together probes a row per study of the rarest one, at random places of
        # a large table (1.9x slower at 1,000,000 studies than at 10,000 on SQLite, bench/worklist.py), so the
        # page says what it has seen: the rows up to its own, "more" when there is a next page.
        total, exact = (page - 1) * page_size + len(keys), page == 1 and not more
    rows = _detail_rows(session, [k[2] for k in keys])
    return WorklistPage(
        rows=rows, page=page, page_size=page_size, total=total, total_exact=exact,
        next=Cursor(True, page + 1, *keys[-1]) if more and keys else None,
        previous=Cursor(False, page - 1, *keys[0]) if page > 1 and keys else None,
    )


def _result_columns() -> tuple[Any, ...]:
    # The columns a summary shows: not the per-slice probabilities, which can be large.
    return (Result.id, Result.series_pk, Result.task, Result.label, Result.probabilities, Result.reason,
            Result.model_name, Result.model_version)


def _latest_review() -> ColumnElement[bool]:
    newer = aliased(Review)
    return and_(Review.result_pk == Result.id,
                ~exists().where(newer.result_pk == Review.result_pk, newer.id > Review.id))


def label_probability(task: str, label: str, probabilities: dict[str, float]) -> float | None:
    """The probability shown for a result's label: its class', an untyped finding's (the task's suspicion: the
    probability of some finding), ``None`` for an indeterminate label."""
    known = TASKS.get(task)
    if label in probabilities:
        return float(probabilities[label])
    if known is not None and label == known.untyped_finding:
        return float(known.suspicion(np.array([probabilities.get(name, 0.0) for name in known.class_names])))
    return None


def _series_result(row: Any) -> SeriesResult:
    result_id, series_pk, task, label, probabilities, reason, model_name, model_version, decision, review_label = row
    return SeriesResult(
        result_id=result_id,
        series_id=series_pk,
        task=task,
        label=label,
        probability=label_probability(task, label, probabilities),
        suspected=is_suspected(task, label),
        reason=reason,
        model_name=model_name,
        model_version=model_version,
        review_decision=decision,
        review_label=review_label,
    )


def _detail_rows(session: Session, ids: list[int]) -> list[WorklistRow]:
    """Patient, study, summary and current-result details of the studies ``ids``, in that order: one query."""
    if not ids:
        return []
    query = (
        select(
            StudyTriage.study_pk, StudyTriage.status, StudyTriage.review_state, StudyTriage.tasks,
            Study.accession_number, Study.study_description, Study.created_at,
            Patient.patient_name, Patient.patient_id,
            *_result_columns(), Review.decision, Review.label,
        )
        .select_from(StudyTriage)
        .join(Study, Study.id == StudyTriage.study_pk)
        .join(Patient, Patient.id == Study.patient_pk)
        .outerjoin(Series, Series.study_pk == StudyTriage.study_pk)
        .outerjoin(Result, and_(Result.series_pk == Series.id, Result.superseded_by_pk.is_(None)))
        .outerjoin(Review, _latest_review())
        .add_columns(Series.series_number)
        .where(StudyTriage.study_pk.in_(ids))
    )
    rows: dict[int, WorklistRow] = {}
    # Ordered here, not by the database: a page's few rows, and a plan with no sort step (see the tests).
    for row in sorted(session.execute(query), key=lambda r: (r[0], *_series_order(r.series_number, r.series_pk, r.id))):
        study_id = row[0]
        if study_id not in rows:
            rows[study_id] = WorklistRow(
                study_id=study_id,
                patient_name=row.patient_name,
                patient_id=row.patient_id,
                accession_number=row.accession_number,
                study_description=row.study_description,
                received_at=row.created_at,
                status=row.status,
                review_state=row.review_state,
                finding=None,
                probability=None,
                reason=None,
                model_version=None,
                tasks=sorted(t for t in (row.tasks or "").split(",") if t),
            )
        if row.id is not None:
            rows[study_id].results.append(_series_result(row[9:19]))
    for found in rows.values():
        headline = _headline(found.results)
        if headline is not None:
            found.finding, found.probability = headline.label, headline.probability
            found.reason, found.model_version = headline.reason, headline.model_version
    return [rows[study_id] for study_id in ids if study_id in rows]


def _series_order(series_number: int | None, series_id: int | None, result_id: int | None) -> tuple[Any, ...]:
    # By series number, series without one last, then as stored.
    return (series_number is None, series_number or 0, series_id or 0, result_id or 0)


def _headline(results: list[SeriesResult]) -> SeriesResult | None:
    """The result a study's row shows: the most probable suspected finding, else an indeterminate result (it asks
    for a look more than a negative one), else the most probable result."""
    if not results:
        return None
    return max(results, key=lambda r: (r.suspected, r.label == INDETERMINATE, r.probability or 0.0))


def current_results(session: Session, study_ids: list[int]) -> dict[int, list[SeriesResult]]:
    """Current results of the given studies' series with each result's latest review, by study id."""
    query = (
        select(Series.study_pk, *_result_columns(), Review.decision, Review.label)
        .join(Result, and_(Result.series_pk == Series.id, Result.superseded_by_pk.is_(None)))
        .outerjoin(Review, _latest_review())
        .add_columns(Series.series_number)
        .where(Series.study_pk.in_(study_ids))
    )
    out: dict[int, list[SeriesResult]] = {}
    for row in sorted(session.execute(query), key=lambda r: _series_order(r.series_number, r.series_pk, r.id)):
        out.setdefault(row[0], []).append(_series_result(row[1:11]))
    return out


def study_status(session: Session, study_id: int) -> tuple[str, str] | None:
    """(status, review state) of one study, by the worklist's rules; ``None`` if there is no such study."""
    row = session.execute(
        select(StudyTriage.status, StudyTriage.review_state).where(StudyTriage.study_pk == study_id)
    ).first()
    return None if row is None else (row[0], row[1])


__all__ = [
    "CURSOR_PATTERN", "FILTER_CHOICES", "PAGE_SIZE", "TOTAL_CAP", "Cursor", "ReviewState", "SeriesResult",
    "WorklistFilter", "WorklistPage", "WorklistRow", "current_results", "is_suspected", "label_probability",
    "load_worklist",
    "study_status",
]
