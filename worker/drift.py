"""Drift watch: per task and ISO week, what the models answer and how often radiologists disagree.

For each task and ISO week (Monday to Sunday, UTC) of the current results (not superseded): how many series, the
share of each predicted class, the indeterminate rate, the correction rate (of the results a radiologist reviewed,
the share whose latest review is a correction) and the mean confidence (the probability of the predicted class, over
classified results). Each week is compared with the mean of the weeks before it (``drift_baseline_weeks``); a
change beyond the configured bounds is a :class:`DriftWarning`:

* a class's share at least ``drift_share_ratio`` times its baseline share (a COVID share tripling);
* the correction rate at least ``drift_correction_ratio`` times the baseline's (doubling), on enough reviews;
* the indeterminate rate up by more than ``drift_indeterminate_rise`` (absolute);
* the mean confidence down by more than ``drift_confidence_drop`` (absolute).

Weeks with fewer than ``drift_min_series`` series are shown but neither judged nor used as a baseline: a quiet
week's shares are noise. The admin models page shows the table and the warnings; ``/metrics`` exports the latest
week's figures and one warning gauge per task and figure (:class:`DriftCollector`), which the alert
``DicomTriageModelDrift`` (deploy/prometheus/alerts.yml) watches. Only counts, shares, task and class names: no
patient data.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Float, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from models.tasks import INDETERMINATE, TASKS, Task

if TYPE_CHECKING:
    from config import Settings
    from worker.db import Database

#: The figure names of :class:`DriftWarning` (the ``figure`` label of the warning gauge).
FIGURES = ("class_share", "correction_rate", "indeterminate_rate", "mean_confidence")
#: Floors under baseline rates, so a share or rate of zero before does not make any later one "infinitely" higher.
_SHARE_FLOOR, _CORRECTION_FLOOR = 0.05, 0.02
#: The fewest reviewed results in a week (and in its baseline) for its correction rate to be judged.
_MIN_REVIEWS = 5


@dataclass(frozen=True)
class DriftBounds:
    """The configured bounds (``drift_*`` settings, where their defaults are defined)."""

    weeks: int
    baseline_weeks: int
    min_series: int
    share_ratio: float
    correction_ratio: float
    indeterminate_rise: float
    confidence_drop: float

    @classmethod
    def from_settings(cls, settings: "Settings") -> "DriftBounds":
        return cls(settings.drift_weeks, settings.drift_baseline_weeks, settings.drift_min_series,
                   settings.drift_share_ratio, settings.drift_correction_ratio, settings.drift_indeterminate_rise,
                   settings.drift_confidence_drop)


@dataclass(frozen=True)
class DriftWarning:
    figure: str
    #: The class for ``class_share``, else empty.
    class_name: str
    value: float
    baseline: float
    message: str


@dataclass
class WeekFigures:
    """One task's figures for one ISO week."""

    week: str  # "2026-W49"
    start: date
    series: int = 0
    class_shares: dict[str, float] = field(default_factory=dict)
    indeterminate_rate: float = 0.0
    reviewed: int = 0
    correction_rate: float | None = None
    mean_confidence: float | None = None
    warnings: list[DriftWarning] = field(default_factory=list)


def iso_week(moment: datetime) -> tuple[str, date]:
    """``("2026-W49", Monday of that week)`` of a UTC moment."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    day = moment.date()
    year, week, weekday = day.isocalendar()
    return f"{year}-W{week:02d}", day - timedelta(days=weekday - 1)


class _LabelProbability(FunctionElement[float]):
    """``probabilities[label]`` of a result row, as a number (NULL where the key is missing), computed by the
    database so that weeks of results are aggregated there instead of decoded one by one in Python."""

    type = Float()
    name = "label_probability"
    inherit_cache = True


@compiles(_LabelProbability, "sqlite")
def _label_probability_sqlite(element: _LabelProbability, compiler: Any, **kw: Any) -> str:
    probabilities, label = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"json_extract({probabilities}, '$.\"' || {label} || '\"')"


@compiles(_LabelProbability, "postgresql")
def _label_probability_postgresql(element: _LabelProbability, compiler: Any, **kw: Any) -> str:
    probabilities, label = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"CAST(({probabilities} ->> {label}) AS DOUBLE PRECISION)"


@dataclass
class _WeekTotals:
    """What the database sums up for one week: series per label, confidence sum and count over classified results,
    latest reviews and corrections."""

    labels: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0
    confidences: int = 0
    reviewed: int = 0
    corrected: int = 0


def _week_totals(database: "Database", task: Task, mondays: list[date]) -> dict[int, _WeekTotals]:
    """Per index into ``mondays`` (the weeks' starts, consecutive), the totals of ``task``'s current results
    created in that week; weeks without results are absent. Two grouped queries, whatever the number of results."""
    from worker.db import Result, Review
    from worker.db.review import Decision

    bounds = [datetime(d.year, d.month, d.day, tzinfo=timezone.utc) for d in [*mondays, mondays[-1] + timedelta(7)]]
    week = case(*[(Result.created_at < end, index) for index, end in enumerate(bounds[1:])]).label("week")
    current = (Result.task == task.name, Result.superseded_by_pk.is_(None), Result.created_at >= bounds[0],
               Result.created_at < bounds[-1])
    confidence = _LabelProbability(Result.probabilities, Result.label)
    totals: dict[int, _WeekTotals] = defaultdict(_WeekTotals)
    with database.read_session() as session:
        for index, label, count, confidence_sum, confidences in session.execute(
            select(week, Result.label, func.count(), func.sum(confidence), func.count(confidence))
            .where(*current).group_by(week, Result.label)
        ):
            totals[index].labels[label] = count
            if label in task.class_names:  # the confidence of a classified result
                totals[index].confidence_sum += float(confidence_sum or 0.0)
                totals[index].confidences += confidences
        latest = (select(func.max(Review.id).label("id")).join(Result, Review.result_pk == Result.id)
                  .where(*current).group_by(Review.result_pk).subquery())  # a result's latest review counts
        for index, reviewed, corrected in session.execute(
            select(week, func.count(), func.sum(case((Review.decision == Decision.CORRECT.value, 1), else_=0)))
            .select_from(Review).join(latest, Review.id == latest.c.id).join(Result, Review.result_pk == Result.id)
            .group_by(week)
        ):
            totals[index].reviewed, totals[index].corrected = reviewed, int(corrected or 0)
    return totals


def weekly_figures(database: "Database", task: Task, bounds: DriftBounds, now: datetime | None = None
                   ) -> list[WeekFigures]:
    """The last ``bounds.weeks`` ISO weeks of ``task`` (oldest first; weeks without results left out), judged."""
    now = now or datetime.now(timezone.utc)
    _, this_monday = iso_week(now)
    mondays = [this_monday - timedelta(weeks=bounds.weeks - 1 - index) for index in range(bounds.weeks)]
    totals = _week_totals(database, task, mondays)
    weeks = [_figures(mondays[index], totals[index], task) for index in sorted(totals)]
    for index, week in enumerate(weeks):
        baseline = [w for w in weeks[:index] if w.series >= bounds.min_series][-bounds.baseline_weeks:]
        if week.series >= bounds.min_series and baseline:
            week.warnings = judge(week, baseline, bounds)
    return weeks


def _figures(monday: date, totals: _WeekTotals, task: Task) -> WeekFigures:
    total = sum(totals.labels.values())
    return WeekFigures(
        week=iso_week(datetime(monday.year, monday.month, monday.day, tzinfo=timezone.utc))[0], start=monday,
        series=total,
        class_shares={name: totals.labels.get(name, 0) / total for name in task.labels},
        indeterminate_rate=totals.labels.get(INDETERMINATE, 0) / total,
        reviewed=totals.reviewed,
        correction_rate=(totals.corrected / totals.reviewed) if totals.reviewed else None,
        mean_confidence=(totals.confidence_sum / totals.confidences) if totals.confidences else None,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def judge(week: WeekFigures, baseline: list[WeekFigures], bounds: DriftBounds) -> list[DriftWarning]:
    """The week's changes beyond ``bounds`` against the mean of the ``baseline`` weeks."""
    warnings: list[DriftWarning] = []
    for name, share in week.class_shares.items():
        before = _mean([w.class_shares.get(name, 0.0) for w in baseline])
        if share >= bounds.share_ratio * max(before, _SHARE_FLOOR) and share > before:
            warnings.append(DriftWarning("class_share", name, share, before,
                                         f"{name} share {share:.0%} is {share / max(before, 1e-9):.1f}x the "
                                         f"baseline {before:.0%} (bound {bounds.share_ratio:g}x)"))
    reviewed_before = [w for w in baseline if w.correction_rate is not None]
    if week.correction_rate is not None and week.reviewed >= _MIN_REVIEWS and \
            sum(w.reviewed for w in reviewed_before) >= _MIN_REVIEWS:
        before = _mean([w.correction_rate for w in reviewed_before if w.correction_rate is not None])
        if week.correction_rate >= bounds.correction_ratio * max(before, _CORRECTION_FLOOR):
            warnings.append(DriftWarning("correction_rate", "", week.correction_rate, before,
                                         f"correction rate {week.correction_rate:.0%} is at least "
                                         f"{bounds.correction_ratio:g}x the baseline {before:.0%}"))
    before = _mean([w.indeterminate_rate for w in baseline])
    if week.indeterminate_rate - before > bounds.indeterminate_rise:
        warnings.append(DriftWarning("indeterminate_rate", "", week.indeterminate_rate, before,
                                     f"indeterminate rate {week.indeterminate_rate:.0%} is up from the baseline "
                                     f"{before:.0%} (bound +{bounds.indeterminate_rise:.0%})"))
    confident = [w.mean_confidence for w in baseline if w.mean_confidence is not None]
    if week.mean_confidence is not None and confident:
        before = _mean(confident)
        if before - week.mean_confidence > bounds.confidence_drop:
            warnings.append(DriftWarning("mean_confidence", "", week.mean_confidence, before,
                                         f"mean confidence {week.mean_confidence:.2f} is down from the baseline "
                                         f"{before:.2f} (bound -{bounds.confidence_drop:.2f})"))
    return warnings


def drift_report(database: "Database", settings: "Settings", now: datetime | None = None
                 ) -> dict[str, list[WeekFigures]]:
    """Every task's weekly figures (what the admin page shows)."""
    bounds = DriftBounds.from_settings(settings)
    return {name: weekly_figures(database, task, bounds, now) for name, task in TASKS.items()}


class DriftCollector(Collector):
    """The latest week's drift figures and warnings as gauges, recomputed at most every ``cache_seconds`` (the
    scrape interval is much shorter than a week, and the figures read weeks of results)."""

    def __init__(self, settings: "Settings", database: "Database", cache_seconds: float = 300.0) -> None:
        self.settings, self.database, self.cache_seconds = settings, database, cache_seconds
        self._cached: tuple[float, dict[str, list[WeekFigures]]] | None = None

    def _report(self) -> dict[str, list[WeekFigures]]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self.cache_seconds:
            self._cached = (now, drift_report(self.database, self.settings))
        return self._cached[1]

    def collect(self) -> Iterator[Metric]:
        try:
            report = self._report()
        except Exception:  # the database is away: the state collector's database_up says so
            return
        share = GaugeMetricFamily("dicom_triage_drift_class_share",
                                  "Share of the latest week's series per predicted class", labels=["task", "class"])
        indeterminate = GaugeMetricFamily("dicom_triage_drift_indeterminate_rate",
                                          "Indeterminate share of the latest week's series", labels=["task"])
        corrections = GaugeMetricFamily("dicom_triage_drift_correction_rate",
                                        "Share of the latest week's reviewed results that were corrected",
                                        labels=["task"])
        confidence = GaugeMetricFamily("dicom_triage_drift_mean_confidence",
                                       "Mean probability of the predicted class, latest week", labels=["task"])
        warning = GaugeMetricFamily("dicom_triage_drift_warning",
                                    "1 where the latest week's figure changed beyond its drift bound",
                                    labels=["task", "figure"])
        for task, weeks in sorted(report.items()):
            latest = weeks[-1] if weeks else None
            flagged = {w.figure for w in latest.warnings} if latest else set()
            for figure in FIGURES:
                warning.add_metric([task, figure], 1.0 if figure in flagged else 0.0)
            if latest is None:
                continue
            for name, value in sorted(latest.class_shares.items()):
                share.add_metric([task, name], value)
            indeterminate.add_metric([task], latest.indeterminate_rate)
            if latest.correction_rate is not None:
                corrections.add_metric([task], latest.correction_rate)
            if latest.mean_confidence is not None:
                confidence.add_metric([task], latest.mean_confidence)
        yield from (share, indeterminate, corrections, confidence, warning)


def as_dict(week: WeekFigures) -> dict[str, Any]:
    return {"week": week.week, "start": week.start.isoformat(), "series": week.series,
            "class_shares": week.class_shares, "indeterminate_rate": week.indeterminate_rate,
            "reviewed": week.reviewed, "correction_rate": week.correction_rate,
            "mean_confidence": week.mean_confidence, "warnings": [vars(w) for w in week.warnings]}


__all__ = ["DriftBounds", "DriftCollector", "DriftWarning", "FIGURES", "WeekFigures", "as_dict", "drift_report",
           "iso_week", "judge", "weekly_figures"]
