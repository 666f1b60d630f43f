"""Backfill from a PACS: plan (C-FIND), run (C-MOVE to our own AE, paced and resumable), status and cancel.

``backfill plan`` stores what the PACS matched; ``backfill run`` marks a plan running, and the
:class:`BackfillRunner` thread of ``serve`` (or ``listen``) retrieves it: one series at a time by C-MOVE, at most
``max_in_flight`` studies moved but not yet classified, at most ``per_minute`` studies started a minute. Every
state is in the database (:mod:`worker.db.backfill`), so a restarted ``serve`` resumes where it was: a series
whose C-MOVE succeeded is never moved again. What arrives takes the normal path (archive, series completion,
classification); :func:`is_backfill_study` tells the rest of the worker that a study came from a backfill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Destination, Settings
from dicom_io.dicomweb import is_dicomweb_url
from dicom_io.retrieve import Peer, SeriesMatch, StudyMatch, find_series, find_studies, move_series
from dicom_io.scu import AssociationError
from worker.db import Database, Job, JobState, Series, Study, utcnow
from worker.db.backfill import BackfillPlan, BackfillSeries, BackfillStudy, PlanState, StudyState

log = logging.getLogger(__name__)

#: States of a study that count against a plan's ``max_in_flight``: moved or moving, not yet classified.
IN_FLIGHT = (StudyState.MOVING.value, StudyState.RECEIVED.value)
FINAL_JOB_STATES = [state for state in JobState if state.is_final]
ACTIVE_JOB_STATES = [state for state in JobState if not state.is_final]


class BackfillError(ValueError):
    """A plan that does not exist or cannot do what was asked."""


def is_backfill_study(session: Session, study_instance_uid: str) -> bool:
    """Whether a backfill plan retrieves (or retrieved) this study."""
    return session.scalar(select(BackfillStudy.id).where(
        BackfillStudy.study_instance_uid == study_instance_uid).limit(1)) is not None


def is_backfill_job(database: Database, job_id: int) -> bool:
    """Whether the job classifies a series of a backfilled study (its classification waits behind live ones)."""
    with database.read_session() as session:
        study_uid = session.scalar(select(Study.study_instance_uid).join(Series, Series.study_pk == Study.id)
                                   .join(Job, Job.series_pk == Series.id).where(Job.id == job_id))
        return study_uid is not None and is_backfill_study(session, study_uid)


def live_work_pending(session: Session) -> bool:
    """Whether a live (not backfilled) series waits for or is being classified: backfill retrievals pause."""
    backfilled = select(BackfillStudy.study_instance_uid)
    return session.scalar(select(Job.id).join(Series, Job.series_pk == Series.id)
                          .join(Study, Series.study_pk == Study.id)
                          .where(Job.state.in_(ACTIVE_JOB_STATES), Study.study_instance_uid.not_in(backfilled))
                          .limit(1)) is not None


def peer_of(text: str) -> Peer:
    destination = Destination.parse(text)
    return Peer(destination.ae_title, destination.host, destination.port)


@dataclass(frozen=True)
class PlanSummary:
    plan_id: int
    studies: int
    series: int
    instances: int | None  # None where the PACS did not count some series's instances


def make_plan(database: Database, settings: Settings, source: str, modality: str, study_date: str,
              description: str = "", limit: int | None = None) -> PlanSummary:
    """C-FIND studies, then their series of ``modality``, and store them as a new plan."""
    peer = peer_of(source)
    studies = find_studies(peer, modality, study_date, description, calling_ae=settings.ae_title)
    studies.sort(key=lambda s: (s.study_date, s.study_instance_uid))
    if limit is not None:
        studies = studies[:limit]
    found = [(study, find_series(peer, study.study_instance_uid, modality, calling_ae=settings.ae_title))
             for study in studies]
    query = f"modality={modality} study_date={study_date} description={description or '*'} limit={limit or '-'}"
    return store_plan(database, str(peer), query, found)


def store_plan(database: Database, source: str, query: str,
               found: list[tuple[StudyMatch, list[SeriesMatch]]]) -> PlanSummary:
    """Store what a source matched as a new plan (``planned``); the summary of its counts."""
    with database.session() as session:
        plan = BackfillPlan(source=source, query=query, state=PlanState.PLANNED.value)
        session.add(plan)
        session.flush()
        for study, series in found:
            row = BackfillStudy(plan_pk=plan.id, study_instance_uid=study.study_instance_uid)
            session.add(row)
            session.flush()
            session.add_all(BackfillSeries(study_pk=row.id, series_instance_uid=s.series_instance_uid,
                                           planned_instances=s.instances) for s in series)
        plan_id = plan.id
    counts = [s.instances for _, series in found for s in series]
    return PlanSummary(plan_id, len(found), len(counts),
                       None if any(c is None for c in counts) else sum(c for c in counts if c is not None))


def _plan(session: Session, plan_id: int) -> BackfillPlan:
    plan = session.get(BackfillPlan, plan_id)
    if plan is None:
        raise BackfillError(f"no backfill plan {plan_id}")
    return plan


def start_plan(database: Database, plan_id: int, max_in_flight: int | None, per_minute: float | None) -> None:
    """Mark a plan running (serve's runner takes it up); a running plan gets the new limits."""
    with database.session() as session:
        plan = _plan(session, plan_id)
        if plan.state in (PlanState.CANCELLED.value, PlanState.DONE.value):
            raise BackfillError(f"backfill plan {plan_id} is {plan.state}")
        plan.state = PlanState.RUNNING.value
        plan.started_at = plan.started_at or utcnow()
        if max_in_flight is not None:
            plan.max_in_flight = max_in_flight
        if per_minute is not None:
            plan.per_minute = per_minute


def cancel_plan(database: Database, plan_id: int) -> int:
    """Stop a plan: studies not yet moving fail as cancelled; returns how many."""
    with database.session() as session:
        plan = _plan(session, plan_id)
        plan.state = PlanState.CANCELLED.value
        plan.finished_at = utcnow()
        studies = session.scalars(select(BackfillStudy).where(
            BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.PLANNED.value)).all()
        for study in studies:
            study.state, study.reason, study.updated_at = StudyState.FAILED.value, "cancelled", utcnow()
        return len(studies)


def plan_status(database: Database, plan_id: int | None = None) -> list[dict[str, Any]]:
    """Each plan (or one): its state, study counts per state, failures with reasons, and an ETA in seconds."""
    with database.read_session() as session:
        plans = [_plan(session, plan_id)] if plan_id is not None else session.scalars(
            select(BackfillPlan).order_by(BackfillPlan.id)).all()
        report = []
        for plan in plans:
            counts = dict(session.execute(select(BackfillStudy.state, func.count()).where(
                BackfillStudy.plan_pk == plan.id).group_by(BackfillStudy.state)).all())
            failures = [{"study_instance_uid": uid, "reason": reason} for uid, reason in session.execute(
                select(BackfillStudy.study_instance_uid, BackfillStudy.reason).where(
                    BackfillStudy.plan_pk == plan.id, BackfillStudy.state == StudyState.FAILED.value))]
            report.append({
                "plan_id": plan.id, "source": plan.source, "query": plan.query, "state": plan.state,
                "max_in_flight": plan.max_in_flight, "per_minute": plan.per_minute,
                "studies": {state.value: int(counts.get(state.value, 0)) for state in StudyState},
                "failures": failures, "eta_seconds": _eta(plan, counts),
            })
        return report


def _eta(plan: BackfillPlan, counts: dict[str, int]) -> float | None:
    done = counts.get(StudyState.CLASSIFIED.value, 0) + counts.get(StudyState.FAILED.value, 0)
    left = sum(counts.values()) - done
    if plan.state != PlanState.RUNNING.value or plan.started_at is None or not done:
        return None
    elapsed = (utcnow() - plan.started_at).total_seconds()
    return round(elapsed / done * left, 1)


#: Retrieves one series of a plan into our archive: (plan id, study UID, series UID) -> the failure's reason, or ""
#: when every instance is stored here. :class:`worker.backfill_dicomweb.DicomwebRetriever` is one.
SeriesRetriever = Callable[[int, str, str], str]


class BackfillRunner:
    """Retrieves the running plans (a thread of the process that owns our DICOM listener): by C-MOVE, or through
    ``dicomweb`` for a plan whose source is a DICOMweb URL."""

    def __init__(self, settings: Settings, database: Database, poll_seconds: float = 1.0,
                 dicomweb: SeriesRetriever | None = None) -> None:
        self.settings = settings
        self.database = database
        self.poll_seconds = poll_seconds
        self.dicomweb = dicomweb
        self._last_start: dict[int, float] = {}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once(stop)
            except Exception:
                log.exception("backfill round failed; retrying")
            stop.wait(self.poll_seconds)

    def run_once(self, stop: threading.Event) -> None:
        with self.database.read_session() as session:
            plan_ids = session.scalars(select(BackfillPlan.id).where(
                BackfillPlan.state == PlanState.RUNNING.value).order_by(BackfillPlan.id)).all()
        for plan_id in plan_ids:
            if stop.is_set():
                return
            self._advance(plan_id, stop)

    def _advance(self, plan_id: int, stop: threading.Event) -> None:
        self._mark_classified(plan_id)
        with self.database.session() as session:
            plan = session.get(BackfillPlan, plan_id)
            assert plan is not None
            in_flight = session.scalar(select(func.count()).where(
                BackfillStudy.plan_pk == plan_id, BackfillStudy.state.in_(IN_FLIGHT))) or 0
            # A study left moving by an earlier run first (its received series are not moved again).
            study = session.scalars(select(BackfillStudy).where(
                BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.MOVING.value)
                .order_by(BackfillStudy.id).limit(1)).first()
            if study is None:
                waiting = session.scalars(select(BackfillStudy).where(
                    BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.PLANNED.value)
                    .order_by(BackfillStudy.id).limit(1)).first()
                if waiting is None:
                    if not in_flight:
                        plan.state, plan.finished_at = PlanState.DONE.value, utcnow()
                        log.info("backfill plan %d done", plan_id)
                    return
                paced = time.monotonic() - self._last_start.get(plan_id, -1e9) >= 60.0 / plan.per_minute
                if in_flight >= plan.max_in_flight or not paced or live_work_pending(session):
                    return  # live ingest first: no new study is moved while a live series waits
                study = waiting
                study.state, study.updated_at = StudyState.MOVING.value, utcnow()
                self._last_start[plan_id] = time.monotonic()
            study_pk, retrieve = study.id, self._retriever(plan)
        self._move_study(study_pk, retrieve, stop)

    def _retriever(self, plan: BackfillPlan) -> Callable[[str, str], str]:
        """How a plan's series are retrieved: (study UID, series UID) -> the failure's reason, or ""."""
        if is_dicomweb_url(plan.source):
            if self.dicomweb is None:
                raise BackfillError(f"backfill plan {plan.id}: no DICOMweb retriever in this process")
            return partial(self.dicomweb, plan.id)
        return partial(self._move_one, peer_of(plan.source))

    def _move_study(self, study_pk: int, retrieve: Callable[[str, str], str], stop: threading.Event) -> None:
        with self.database.read_session() as session:
            study = session.get(BackfillStudy, study_pk)
            assert study is not None
            study_uid = study.study_instance_uid
            series = session.execute(select(BackfillSeries.id, BackfillSeries.series_instance_uid).where(
                BackfillSeries.study_pk == study_pk, BackfillSeries.received.is_(False))
                .order_by(BackfillSeries.id)).all()
        for series_pk, series_uid in series:
            if stop.is_set() or self._cancelled(study_pk):
                return  # resumed (or left) as it is: this series was not moved
            with self.database.session() as session:
                row = session.get(BackfillSeries, series_pk)
                assert row is not None
                row.moves += 1
            reason = retrieve(study_uid, series_uid)
            with self.database.session() as session:
                study_row = session.get(BackfillStudy, study_pk)
                assert study_row is not None
                if reason:
                    study_row.state, study_row.reason, study_row.updated_at = StudyState.FAILED.value, reason, utcnow()
                    log.warning("backfill study %d failed: %s", study_pk, reason)
                    return
                row = session.get(BackfillSeries, series_pk)
                assert row is not None
                row.received = True
        with self.database.session() as session:
            study_row = session.get(BackfillStudy, study_pk)
            assert study_row is not None
            study_row.state, study_row.updated_at = StudyState.RECEIVED.value, utcnow()
        log.info("backfill study %d received", study_pk)

    def _move_one(self, peer: Peer, study_uid: str, series_uid: str) -> str:
        """C-MOVE one series; the failure's reason, or "" when every instance was stored here."""
        try:
            outcome = move_series(peer, study_uid, series_uid, self.settings.ae_title, calling_ae=self.settings.ae_title)
        except (AssociationError, OSError, RuntimeError) as exc:
            return f"C-MOVE of series {series_uid}: {exc}"
        if not outcome.succeeded:
            return (f"C-MOVE of series {series_uid}: status 0x{outcome.status:04X} "
                    f"({outcome.completed} completed, {outcome.failed} failed)")
        if outcome.completed == 0:
            return f"C-MOVE of series {series_uid}: the PACS sent no instance"
        return ""

    def _cancelled(self, study_pk: int) -> bool:
        with self.database.read_session() as session:
            return session.scalar(select(BackfillPlan.state).join(
                BackfillStudy, BackfillStudy.plan_pk == BackfillPlan.id).where(
                BackfillStudy.id == study_pk)) != PlanState.RUNNING.value

    def _mark_classified(self, plan_id: int) -> None:
        """Received studies whose every series has a final job become classified."""
        with self.database.session() as session:
            received = session.scalars(select(BackfillStudy).where(
                BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.RECEIVED.value)).all()
            for study in received:
                uids = session.scalars(select(BackfillSeries.series_instance_uid).where(
                    BackfillSeries.study_pk == study.id)).all()
                final = session.scalar(select(func.count(func.distinct(Series.id))).join(
                    Job, Job.series_pk == Series.id).where(
                    Series.series_instance_uid.in_(uids),
                    Job.state.in_(FINAL_JOB_STATES))) or 0
                if final >= len(uids):
                    study.state, study.updated_at = StudyState.CLASSIFIED.value, utcnow()


def format_status(report: list[dict[str, Any]]) -> str:
    lines = []
    for plan in report:
        counts = ", ".join(f"{n} {state}" for state, n in plan["studies"].items())
        eta = f", ETA {plan['eta_seconds']:.0f} s" if plan["eta_seconds"] is not None else ""
        lines.append(f"plan {plan['plan_id']} from {plan['source']} [{plan['state']}]: {counts}{eta}")
        lines.extend(f"  failed {f['study_instance_uid']}: {f['reason']}" for f in plan["failures"])
    return "\n".join(lines) or "no backfill plans"
