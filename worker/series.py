"""Series completion: the scheduler that turns quiet series into jobs and keeps the queue honest.

A series is ready when no instance arrived for ``settings.series_quiet_seconds``. The scheduler then, in one
transaction, clears the series' ``pending`` flag (only if no instance arrived since it looked: the update names
the last-received time it saw), routes it and creates the next job revision (``received``, or ``not_applicable``
with the reason). After the commit it sends ``received`` jobs to the ``inference`` queue and marks them
``queued``. Everything lives in the database, so a restart of any process loses nothing: a job created but not
yet sent is sent by the next round, a ``running`` job whose worker process died is sent again, and a job left
``queued`` for ``settings.queued_job_timeout_seconds`` without a worker starting it (its message lost by the
broker) is sent again.

Several schedulers (several ``listen`` processes) may run against one database; a job may then be sent twice,
which the idempotent task tolerates. What a round only reads is read without the write lock (SQLite), so an idle
round never holds up the listener's commits; every change is conditional on what was read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import exists, func, or_, select, update

from config import Settings
from worker.db import Database, Instance, Job, JobState, Series, Study, WorkerProcess, utcnow
from worker.logs import uid_hash
from worker.routing import SeriesFacts, route
from worker.workers import STALE_AFTER

log = logging.getLogger(__name__)

#: Sends ``classify_series(job_id)`` to the inference queue (see :func:`worker.celery_app.make_enqueue`).
Enqueue = Callable[[int], None]

#: Series examined per round; a backlog is worked off over several rounds.
BATCH = 500


class SeriesScheduler:
    """Creates jobs for quiet series, sends them to the queue and re-sends the jobs of dead workers."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        enqueue: Enqueue,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.database = database
        self.enqueue = enqueue
        self.clock = clock
        self.quiet = timedelta(seconds=settings.series_quiet_seconds)
        #: Seconds between rounds at most. Half the quiet time loses nothing: a series that starts arriving after a
        #: round becomes ready a whole quiet time later, so the next round sees it pending and :meth:`run` wakes at
        #: the moment it is ready.
        self.poll_seconds = min(1.0, max(0.05, settings.series_quiet_seconds / 2))
        self.queued_timeout = timedelta(seconds=settings.queued_job_timeout_seconds)
        self.next_ready: datetime | None = None

    def run_once(self) -> list[int]:
        """One round; returns the ids of the jobs created."""
        created = self.open_ready_series()
        self.requeue_orphans()
        self.resend_lost_jobs()
        self.send_received_jobs()
        return created

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set; errors (database or broker briefly away) are logged and retried.

        Between rounds it sleeps the poll period, or less when a pending series becomes quiet sooner: a series is
        taken the moment its quiet time ends, not up to a poll period later."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduler round failed; retrying")
                stop.wait(min(5.0, 10 * self.poll_seconds))
                continue
            wait = self.poll_seconds
            if self.next_ready is not None:
                wait = min(wait, max(0.01, (self.next_ready - self.clock()).total_seconds()))
            stop.wait(wait)

    def open_ready_series(self) -> list[int]:
        cutoff = self.clock() - self.quiet
        with self.database.read_session() as session:
            ready = session.execute(
                select(Series.id, Series.last_received_at)
                .where(Series.pending.is_(True), Series.last_received_at <= cutoff)
                .order_by(Series.last_received_at)
                .limit(BATCH)
            ).all()
            waiting = session.scalar(
                select(func.min(Series.last_received_at)).where(
                    Series.pending.is_(True), Series.last_received_at > cutoff
                )
            )
        # When the next pending series becomes quiet (None: none is waiting).
        self.next_ready = waiting + self.quiet if waiting is not None else None
        created = []
        for series_pk, seen in ready:
            job_id = self._open_job(series_pk, seen)
            if job_id is not None:
                created.append(job_id)
        return created

    def _open_job(self, series_pk: int, seen: datetime) -> int | None:
        now = self.clock()
        with self.database.session() as session:
            claimed = session.execute(
                update(Series)
                .where(Series.id == series_pk, Series.pending.is_(True), Series.last_received_at == seen)
                .values(pending=False, revision=Series.revision + 1)
            )
            if claimed.rowcount == 0:
                return None  # an instance arrived meanwhile, or another scheduler took it
            series = session.get_one(Series, series_pk)
            study_description = session.scalar(select(Study.study_description).where(Study.id == series.study_pk))
            sop_classes = frozenset(session.scalars(
                select(Instance.sop_class_uid).where(Instance.series_pk == series_pk).distinct()
            ))
            instances, frames = session.execute(
                select(func.count(Instance.id), func.coalesce(func.sum(Instance.number_of_frames), 0)).where(
                    Instance.series_pk == series_pk
                )
            ).one()
            facts = SeriesFacts(
                modality=series.modality,
                body_part_examined=series.body_part_examined,
                study_description=study_description or "",
                series_description=series.series_description,
                image_types=frozenset(t for t in series.image_types.split("\\") if t),
                slice_count=int(frames),
                sop_classes=sop_classes,
            )
            decision = route(facts, self.settings.routing_rules)
            job = Job(
                series_pk=series_pk,
                revision=series.revision,
                state=JobState.RECEIVED if decision.task else JobState.NOT_APPLICABLE,
                task=decision.task,
                reason=decision.reason,
                instance_count=int(instances),
                series_last_received_at=seen,
                created_at=now,
                finished_at=None if decision.task else now,
            )
            session.add(job)
            session.flush()
            log.info("series %s revision %d: %s", series.series_instance_uid, job.revision, decision.reason,
                     extra={"ids": {"job_id": job.id, "series_id": series.id,
                                    "series_uid_hash": uid_hash(series.series_instance_uid)}})
            return job.id

    def requeue_orphans(self) -> int:
        """Put ``running`` jobs whose worker process is gone back to ``received``; returns how many."""
        stale = self.clock() - STALE_AFTER
        orphans = select(Job.id).outerjoin(WorkerProcess, Job.worker_pk == WorkerProcess.id).where(
            Job.state == JobState.RUNNING,
            or_(WorkerProcess.id.is_(None), WorkerProcess.heartbeat_at < stale),
        )
        with self.database.read_session() as session:  # the usual answer, none, without the write lock
            if session.scalar(select(exists(orphans))) is not True:
                return 0
        with self.database.session() as session:
            ids = list(session.scalars(orphans))
            if ids:
                session.execute(
                    update(Job)
                    .where(Job.id.in_(ids), Job.state == JobState.RUNNING)
                    .values(state=JobState.RECEIVED, worker_pk=None, reason="worker process lost; re-queued")
                )
                log.warning("re-queued %d job(s) whose worker process died", len(ids))
        return len(ids)

    def resend_lost_jobs(self) -> int:
        """Send again every job ``queued`` longer than the timeout that no worker has started; returns how many.

        Its ``queued_at`` is moved to now in the same transaction (only if it is still the one seen), so the job is
        sent once per timeout, not every round, and two schedulers do not both send it. A duplicate message is
        harmless: the task skips a job that is final or held by a live worker.
        """
        cutoff = self.clock() - self.queued_timeout
        with self.database.read_session() as session:
            stale = session.execute(
                select(Job.id, Job.queued_at)
                .where(Job.state == JobState.QUEUED, Job.queued_at <= cutoff)
                .order_by(Job.id)
                .limit(BATCH)
            ).all()
        sent = 0
        for job_id, seen in stale:
            with self.database.session() as session:
                claimed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.QUEUED, Job.queued_at == seen)
                    .values(queued_at=self.clock(), reason="queued too long without starting; sent again")
                )
                if claimed.rowcount == 0:
                    continue  # a worker started it meanwhile, or another scheduler re-sent it
                # Sent inside the transaction: if the broker refuses, nothing is marked and the next round retries.
                self.enqueue(job_id)
            sent += 1
        if sent:
            log.warning("sent %d job(s) again that stayed queued for %s without starting", sent, self.queued_timeout)
        return sent

    def send_received_jobs(self) -> int:
        """Send every ``received`` job to the queue and mark them ``queued``; returns how many were sent.

        All are marked in one transaction after sending (one commit, not one per job): if this process dies in
        between, they stay ``received`` and are sent again, which the idempotent task tolerates.
        """
        with self.database.read_session() as session:
            ids = list(
                session.scalars(select(Job.id).where(Job.state == JobState.RECEIVED).order_by(Job.id).limit(BATCH))
            )
        if not ids:
            return 0
        for job_id in ids:
            self.enqueue(job_id)
        with self.database.session() as session:
            # A fast worker may already have moved one on; only a still-received job becomes queued.
            session.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.state == JobState.RECEIVED)
                .values(state=JobState.QUEUED, queued_at=self.clock())
            )
        return len(ids)
