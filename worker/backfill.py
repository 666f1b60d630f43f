"""Backfill from a PACS: plan (C-FIND), run (C-MOVE to our own AE, paced and resumable), status, cancel and retry.

``backfill plan`` stores what the PACS matched; ``backfill run`` marks a plan running, and the
:class:`BackfillRunner` thread of ``serve`` (or ``listen``) retrieves it: one series at a time by C-MOVE (or C-GET,
``backfill_retrieve = "get"``), at most ``max_in_flight`` studies moved but not yet classified, at most
``per_minute`` studies started a minute, none started while live ingest is busy (:func:`live_ingest_busy`). Every
state is in the database (:mod:`worker.db.backfill`), so a restarted ``serve`` resumes where it was: a series
whose retrieval succeeded is never retrieved again. Several runners may share one database: each claims a study
atomically (:func:`claim_planned_study`) and names itself on it, so no study is retrieved twice. What arrives takes
the normal path (archive, series completion, classification); :func:`is_backfill_study` tells the rest of the
worker that a study came from a backfill.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from pydicom import Dataset
from pynetdicom.events import Event
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from config import Destination, Settings
from dicom_io.archive import Archive
from dicom_io.dicomweb import is_dicomweb_url
from dicom_io.listener import StoreHandler
from dicom_io.retrieve import (MoveOutcome, Peer, SeriesMatch, StudyMatch, find_series_of_studies, find_studies,
                               get_series, move_series)
from dicom_io.scu import AssociationError
from worker.db import Database, Instance, Job, JobState, Series, Study, utcnow
from worker.db.backfill import BackfillPlan, BackfillSeries, BackfillStudy, PlanState, StudyState
from worker.ingest import DatabaseSink
from worker.workers import other_process_alive

log = logging.getLogger(__name__)

#: States of a study that count against a plan's ``max_in_flight``: moved or moving, not yet classified.
IN_FLIGHT = (StudyState.MOVING.value, StudyState.RECEIVED.value)
FINAL_JOB_STATES = [state for state in JobState if state.is_final]
ACTIVE_JOB_STATES = [state for state in JobState if not state.is_final]


class BackfillError(ValueError):
    """A plan that does not exist or cannot do what was asked."""


class PlanNotFound(BackfillError):
    """No plan has this id."""


#: Plan states a cancel applies to (a done or cancelled plan cannot be cancelled).
CANCELLABLE = (PlanState.PLANNED.value, PlanState.RUNNING.value)
#: The reasons of studies failed by a cancel: before their retrieval started, and between two of their series.
CANCELLED = "cancelled"
CANCELLED_DURING_RETRIEVAL = "cancelled during retrieval"


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


def _live_studies() -> Any:
    """The studies no backfill plan names (a correlated ``NOT IN``, for the live-ingest measures)."""
    return Study.study_instance_uid.not_in(select(BackfillStudy.study_instance_uid))


def live_ingest_busy(session: Session, settings: Settings) -> str:
    """Why backfill retrievals should wait now ("" when they need not): more than ``backfill_pause_live_series``
    live series waiting for or in classification, or more than ``backfill_pause_live_instances`` live instances
    received in the last ``backfill_pause_window_seconds``."""
    waiting = session.scalar(select(func.count(func.distinct(Job.series_pk))).join(
        Series, Job.series_pk == Series.id).join(Study, Series.study_pk == Study.id).where(
        Job.state.in_(ACTIVE_JOB_STATES), _live_studies())) or 0
    if waiting > settings.backfill_pause_live_series:
        return f"{waiting} live series waiting for or in classification (bound {settings.backfill_pause_live_series})"
    window = settings.backfill_pause_window_seconds
    if window > 0:
        since = utcnow() - timedelta(seconds=window)
        # Only series still receiving (pending, touched in the window: an indexed range) are counted in.
        receiving = select(Series.id).join(Study, Series.study_pk == Study.id).where(
            Series.pending.is_(True), Series.last_received_at >= since, _live_studies())
        arrived = session.scalar(select(func.count(Instance.id)).where(
            Instance.series_pk.in_(receiving), Instance.received_at >= since)) or 0
        if arrived > settings.backfill_pause_live_instances:
            return (f"{arrived} live instances received in the last {window:g} s "
                    f"(bound {settings.backfill_pause_live_instances})")
    return ""


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
    most = settings.backfill_max_matches
    studies = find_studies(peer, modality, study_date, description, calling_ae=settings.ae_title, max_matches=most)
    studies.sort(key=lambda s: (s.study_date, s.study_instance_uid))
    if limit is not None:
        studies = studies[:limit]
    series_of = find_series_of_studies(peer, [study.study_instance_uid for study in studies], modality,
                                       calling_ae=settings.ae_title, max_matches=most)
    found = [(study, series_of[study.study_instance_uid]) for study in studies]
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
        raise PlanNotFound(f"no backfill plan {plan_id}")
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
        plan = _locked_plan(session, plan_id)
        if plan is None:
            raise PlanNotFound(f"no backfill plan {plan_id}")
        if plan.state not in CANCELLABLE:
            raise BackfillError(f"backfill plan {plan_id} is {plan.state}")
        now = utcnow()
        plan.state, plan.finished_at = PlanState.CANCELLED.value, now
        _end_pause(plan, now)
        # One statement, only studies still planned: one a runner claims meanwhile fails when it sees the plan
        # cancelled before its next series.
        cancelled = session.execute(update(BackfillStudy).where(
            BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.PLANNED.value
        ).values(state=StudyState.FAILED.value, reason=CANCELLED, updated_at=now))
        return int(cancelled.rowcount)  # type: ignore[attr-defined]


def retry_plan(database: Database, plan_id: int, include_cancelled: bool = False) -> int:
    """Put a plan's failed studies back to planned and return how many: not those a cancel failed unless
    ``include_cancelled``. Their series already received stay received (never retrieved again). A done or cancelled
    plan with studies planned again runs again; a planned or running one keeps its state."""
    with database.session() as session:
        plan = _locked_plan(session, plan_id)
        if plan is None:
            raise PlanNotFound(f"no backfill plan {plan_id}")
        failed = [BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.FAILED.value]
        if not include_cancelled:
            failed.append(BackfillStudy.reason.not_in([CANCELLED, CANCELLED_DURING_RETRIEVAL]))
        updated = session.execute(update(BackfillStudy).where(*failed).values(
            state=StudyState.PLANNED.value, reason="", runner=None, updated_at=utcnow()))
        retried = int(updated.rowcount)  # type: ignore[attr-defined]
        if retried and plan.state in (PlanState.DONE.value, PlanState.CANCELLED.value):
            plan.state, plan.finished_at = PlanState.RUNNING.value, None
        log.info("backfill plan %d: %d failed studies planned again", plan_id, retried)
        return retried


def plan_status(database: Database, plan_id: int | None = None) -> list[dict[str, Any]]:
    """Each plan (or one): its state, study counts per state, failures with reasons, progress (the share of its
    studies classified or failed), an ETA in seconds, and its pause for live ingest. ``backfill status`` and the
    admin backfill page both show this."""
    with database.read_session() as session:
        plans = [_plan(session, plan_id)] if plan_id is not None else session.scalars(
            select(BackfillPlan).order_by(BackfillPlan.id)).all()
        now = utcnow()
        report = []
        for plan in plans:
            counts = dict(session.execute(select(BackfillStudy.state, func.count()).where(
                BackfillStudy.plan_pk == plan.id).group_by(BackfillStudy.state)).all())
            failures = [{"study_instance_uid": uid, "reason": reason} for uid, reason in session.execute(
                select(BackfillStudy.study_instance_uid, BackfillStudy.reason).where(
                    BackfillStudy.plan_pk == plan.id, BackfillStudy.state == StudyState.FAILED.value)
                .order_by(BackfillStudy.id))]
            total = sum(counts.values())
            paused_now = (now - plan.paused_since).total_seconds() if plan.paused_since is not None else 0.0
            report.append({
                "plan_id": plan.id, "source": plan.source, "query": plan.query, "state": plan.state,
                "max_in_flight": plan.max_in_flight, "per_minute": plan.per_minute,
                "studies": {state.value: int(counts.get(state.value, 0)) for state in StudyState},
                "failures": failures,
                "progress": round(_done(counts) / total, 4) if total else 1.0,
                "eta_seconds": _eta(plan, counts, now),
                "paused": None if plan.paused_since is None else {
                    "since": plan.paused_since.isoformat(), "reason": plan.pause_reason},
                "paused_seconds": round(plan.paused_seconds + paused_now, 1),
            })
        return report


def _done(counts: dict[str, int]) -> int:
    return counts.get(StudyState.CLASSIFIED.value, 0) + counts.get(StudyState.FAILED.value, 0)


def _eta(plan: BackfillPlan, counts: dict[str, int], now: datetime) -> float | None:
    done = _done(counts)
    left = sum(counts.values()) - done
    if plan.state != PlanState.RUNNING.value or plan.started_at is None or not done:
        return None
    elapsed = (now - plan.started_at).total_seconds()
    return round(elapsed / done * left, 1)


def runner_name() -> str:
    """This process's name as a backfill runner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


def claim_planned_study(session: Session, plan_id: int, runner: str) -> int | None:
    """Take the plan's oldest planned study for ``runner`` (state ``moving``); its id, or None when none is left.

    Atomic however many runners share the database: the update only changes a study still ``planned`` and its
    row count says whether this runner got it (on PostgreSQL the candidate is also read ``FOR UPDATE SKIP LOCKED``,
    so concurrent claimers pick different rows instead of queueing on one)."""
    candidate = select(BackfillStudy.id).where(
        BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.PLANNED.value
    ).order_by(BackfillStudy.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    for _ in range(3):  # a study another runner took between the read and the update: try the next one
        study_pk = session.scalar(candidate)
        if study_pk is None:
            return None
        taken = session.execute(update(BackfillStudy).where(
            BackfillStudy.id == study_pk, BackfillStudy.state == StudyState.PLANNED.value
        ).values(state=StudyState.MOVING.value, runner=runner, updated_at=utcnow()))
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return study_pk
    return None


def _runner_gone(owner: str | None, updated_at: datetime, stale_before: datetime) -> bool:
    """Whether the runner that claimed a moving study is gone: on this host its process is not running (or it is
    this process, from before a restart); elsewhere it has not advanced the study since ``stale_before``."""
    if owner is None:
        return True
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not other_process_alive(int(pid))
    return updated_at < stale_before


def take_over_study(session: Session, plan_id: int, runner: str, stale_before: datetime) -> int | None:
    """A moving study of the plan whose runner is gone (or ``runner`` itself), now claimed by ``runner``: resumed
    with the series it has not received. None when there is none."""
    moving = session.execute(select(BackfillStudy.id, BackfillStudy.runner, BackfillStudy.updated_at).where(
        BackfillStudy.plan_pk == plan_id, BackfillStudy.state == StudyState.MOVING.value
    ).order_by(BackfillStudy.id)).all()
    for study_pk, owner, updated_at in moving:
        if owner != runner and not _runner_gone(owner, updated_at, stale_before):
            continue
        claimed_by = BackfillStudy.runner.is_(None) if owner is None else BackfillStudy.runner == owner
        taken = session.execute(update(BackfillStudy).where(
            BackfillStudy.id == study_pk, BackfillStudy.state == StudyState.MOVING.value, claimed_by
        ).values(runner=runner, updated_at=utcnow()))
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            if owner != runner:
                log.info("backfill study %d taken over from runner %s", study_pk, owner)
            return study_pk
    return None


def _locked_plan(session: Session, plan_id: int) -> BackfillPlan | None:
    """The plan, its row locked on PostgreSQL (SQLite's write transactions are already serial): runners of one
    plan decide in turn, so ``max_in_flight`` and ``per_minute`` hold across them."""
    return session.get(BackfillPlan, plan_id, with_for_update=session.get_bind().dialect.name == "postgresql")


#: Retrieves one series of a plan into our archive: (plan id, study UID, series UID) -> the failure's reason, or ""
#: when every instance is stored here. :class:`worker.backfill_dicomweb.DicomwebRetriever` is one.
SeriesRetriever = Callable[[int, str, str], str]


class BackfillRunner:
    """Retrieves the running plans (a thread of the process that owns our DICOM listener): by C-MOVE or C-GET, or
    through ``dicomweb`` for a plan whose source is a DICOMweb URL."""

    def __init__(self, settings: Settings, database: Database, poll_seconds: float = 1.0,
                 name: str | None = None, dicomweb: SeriesRetriever | None = None) -> None:
        self.settings = settings
        self.database = database
        self.poll_seconds = poll_seconds
        self.dicomweb = dicomweb
        #: What this runner writes on the studies it claims (several runners may share the database).
        self.name = name or runner_name()
        self._store: StoreHandler | None = None  # C-GET's, made on the first C-GET

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
        now = utcnow()
        with self.database.session() as session:
            plan = _locked_plan(session, plan_id)
            if plan is None or plan.state != PlanState.RUNNING.value:
                return
            # A study left moving by a runner that is gone first (its received series are not retrieved again).
            stale_before = now - timedelta(seconds=self.settings.backfill_claim_stale_seconds)
            study_pk = take_over_study(session, plan_id, self.name, stale_before)
            if study_pk is None:
                study_pk = self._start_next(session, plan, now)
                if study_pk is None:
                    return
            retrieve = self._retriever(plan)
        self._move_study(study_pk, retrieve, stop)

    def _retriever(self, plan: BackfillPlan) -> Callable[[str, str], str]:
        """How a plan's series are retrieved: (study UID, series UID) -> the failure's reason, or ""."""
        if is_dicomweb_url(plan.source):
            if self.dicomweb is None:
                raise BackfillError(f"backfill plan {plan.id}: no DICOMweb retriever in this process")
            return partial(self.dicomweb, plan.id)
        return partial(self._move_one, peer_of(plan.source))

    def _start_next(self, session: Session, plan: BackfillPlan, now: datetime) -> int | None:
        """Claim the plan's next planned study if its limits and live ingest allow one to start now."""
        in_flight = session.scalar(select(func.count()).where(
            BackfillStudy.plan_pk == plan.id, BackfillStudy.state.in_(IN_FLIGHT))) or 0
        planned = session.scalar(select(BackfillStudy.id).where(
            BackfillStudy.plan_pk == plan.id, BackfillStudy.state == StudyState.PLANNED.value).limit(1))
        if planned is None:
            if not in_flight:
                plan.state, plan.finished_at = PlanState.DONE.value, now
                _end_pause(plan, now)
                log.info("backfill plan %d done", plan.id)
            return None
        paced = plan.last_started_at is None or (now - plan.last_started_at).total_seconds() >= 60.0 / plan.per_minute
        if in_flight >= plan.max_in_flight or not paced:
            return None
        busy = live_ingest_busy(session, self.settings)
        if busy:
            if plan.paused_since is None:
                plan.paused_since, plan.pause_reason = now, busy
                log.info("backfill plan %d paused: %s", plan.id, busy)
                return None
            plan.pause_reason = busy
            if (now - plan.paused_since).total_seconds() < self.settings.backfill_max_pause_seconds:
                return None  # live ingest first: checked again next round
            log.warning("backfill plan %d paused %.0f s for live ingest; one study starts anyway", plan.id,
                        (now - plan.paused_since).total_seconds())
        _end_pause(plan, now)
        study_pk = claim_planned_study(session, plan.id, self.name)
        if study_pk is not None:
            plan.last_started_at = now
        return study_pk

    def _move_study(self, study_pk: int, retrieve: Callable[[str, str], str], stop: threading.Event) -> None:
        with self.database.read_session() as session:
            study = session.get(BackfillStudy, study_pk)
            assert study is not None
            study_uid = study.study_instance_uid
            series = session.execute(select(BackfillSeries.id, BackfillSeries.series_instance_uid).where(
                BackfillSeries.study_pk == study_pk, BackfillSeries.received.is_(False))
                .order_by(BackfillSeries.id)).all()
        for series_pk, series_uid in series:
            if stop.is_set():
                return  # resumed as it is: this series was not retrieved
            with self.database.session() as session:
                study_row = session.get(BackfillStudy, study_pk)
                assert study_row is not None
                if study_row.runner != self.name:
                    return  # taken over by another runner (this one was presumed gone)
                plan = session.get(BackfillPlan, study_row.plan_pk)
                if plan is None or plan.state != PlanState.RUNNING.value:
                    study_row.state, study_row.reason = StudyState.FAILED.value, CANCELLED_DURING_RETRIEVAL
                    study_row.updated_at = utcnow()
                    return
                study_row.updated_at = utcnow()  # the claim is alive (runners on other hosts judge by it)
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
        """Retrieve one series (C-MOVE, or C-GET per ``backfill_retrieve``); the failure's reason, or "" when every
        instance was stored here."""
        if self.settings.backfill_retrieve == "get":
            return self._get_one(peer, study_uid, series_uid)
        try:
            outcome = move_series(peer, study_uid, series_uid, self.settings.ae_title,
                                  calling_ae=self.settings.ae_title,
                                  timeout_seconds=self.settings.backfill_retrieve_timeout_seconds)
        except (AssociationError, OSError, RuntimeError) as exc:
            return f"C-MOVE of series {series_uid}: {exc}"
        if not outcome.succeeded:
            return f"C-MOVE of series {series_uid}: {_counts(outcome)}"
        if outcome.completed == 0:
            return f"C-MOVE of series {series_uid}: the PACS sent no instance"
        # Our listener cannot tell a C-MOVE's instances from a push: what arrived of this series must account for
        # what the PACS says it sent (instances of other series stay stored, as live pushes).
        with self.database.read_session() as session:
            arrived = session.scalar(select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id)
                                     .where(Series.series_instance_uid == series_uid)) or 0
        if outcome.completed is not None and arrived < outcome.completed:
            return (f"C-MOVE of series {series_uid}: the PACS reported {outcome.completed} instance(s) sent, "
                    f"{arrived} of this series arrived (the others were not of the series asked for)")
        return ""

    def _get_one(self, peer: Peer, study_uid: str, series_uid: str) -> str:
        """C-GET one series; its instances are stored as the listener stores a C-STORE's, and instances of any other
        series are refused and recorded as rejected (the requested ones are kept)."""
        strays: list[str] = []
        store = self._store_handler()

        def on_store(event: Event) -> Dataset | int:
            return store(event, peer.ae_title, only_series=series_uid, strays=strays)

        try:
            outcome = get_series(peer, study_uid, series_uid, on_store, calling_ae=self.settings.ae_title,
                                 timeout_seconds=self.settings.backfill_retrieve_timeout_seconds)
        except (AssociationError, OSError, RuntimeError) as exc:
            return f"C-GET of series {series_uid}: {exc}"
        assert outcome.stored is not None and outcome.refused is not None
        failed_here = outcome.refused - len(strays)
        if failed_here:
            return (f"C-GET of series {series_uid}: {failed_here} instance(s) could not be stored here "
                    f"({_counts(outcome)})")
        # The strays we refused are the PACS's failed sub-operations too; any other failure is the PACS's own.
        if outcome.status not in (0x0000, 0xB000) or (outcome.failed or 0) > len(strays):
            return f"C-GET of series {series_uid}: {_counts(outcome)}"
        if outcome.stored == 0:
            return f"C-GET of series {series_uid}: the PACS sent no instance"
        if strays:
            log.warning("C-GET of series %s: refused %d instance(s) of other series", series_uid, len(strays))
        return ""

    def _store_handler(self) -> StoreHandler:
        """The listener's C-STORE handling, on a sink of this runner's own (durable commits)."""
        if self._store is None:
            settings = self.settings
            sink = DatabaseSink(Archive(settings.archive_dir), self.database)
            self._store = StoreHandler(sink, settings.min_free_disk_mb * 1024 * 1024, settings.archive_dir)
        return self._store

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


def _end_pause(plan: BackfillPlan, now: datetime) -> None:
    if plan.paused_since is not None:
        plan.paused_seconds += (now - plan.paused_since).total_seconds()
        plan.paused_since, plan.pause_reason = None, ""


def _counts(outcome: MoveOutcome) -> str:
    return f"status 0x{outcome.status:04X} ({outcome.completed} completed, {outcome.failed} failed)"


def format_status(report: list[dict[str, Any]]) -> str:
    lines = []
    for plan in report:
        counts = ", ".join(f"{n} {state}" for state, n in plan["studies"].items())
        eta = f", ETA {plan['eta_seconds']:.0f} s" if plan["eta_seconds"] is not None else ""
        lines.append(f"plan {plan['plan_id']} from {plan['source']} [{plan['state']}]: {counts}; "
                     f"{100 * plan['progress']:.0f}% done{eta}")
        if plan["paused"]:
            lines.append(f"  paused since {plan['paused']['since']}: {plan['paused']['reason']}")
        lines.extend(f"  failed {f['study_instance_uid']}: {f['reason']}" for f in plan["failures"])
    return "\n".join(lines) or "no backfill plans"
