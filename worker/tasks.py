"""The ``classify_series`` Celery task and the job transitions it makes.

The task takes a job id. It is idempotent: a job already ``done``, ``failed`` or ``not_applicable`` is skipped, a
job another live worker holds (or this process is classifying already) is skipped, and a result is unique per
(series, model UID, revision), so a message delivered twice (a re-sent job, a broker redelivery) never makes a
second result. Transient errors (the database or the file system briefly failing) are retried with exponential
backoff; anything else fails the job with its reason.

Batching across series: with its own job the task claims other ``queued`` jobs of the same task, up to
``settings.inference_group_frames`` frames, and classifies them together (:class:`worker.inference.SeriesBatcher`),
so model batches are full and each job's fixed costs are shared; each job is finished as soon as its frames are
predicted. The messages of the jobs it took along are skipped when they arrive. A job taken along that fails
transiently is put back on the queue with a backoff (failed after :data:`MAX_RETRIES` tries); one that the task
could not settle (the process failing mid-way) is put back too, and a process that dies leaves it to the
scheduler's orphan re-queue.

SRs are made after the results, when the worker has no series to classify (:class:`SrQueue`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery, Task
from celery.signals import worker_shutdown
from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from config import Settings
from models.card import ModelCard
from worker.celery_app import CLASSIFY_SERIES
from worker.db import Database, Instance, Job, JobState, Result, Series, utcnow
from worker.decoding import DecodePool, default_decode_processes
from worker.inference import ModelCache, SeriesBatcher, SeriesClassification
from worker.logs import uid_hash
from worker.metrics import JOB_LATENCY, JOBS_FINISHED
from worker.reporting import publish_result

log = logging.getLogger(__name__)

MAX_RETRIES = 6
RETRY_BASE_SECONDS = 2.0
RETRY_MAX_SECONDS = 120.0
#: Queued jobs examined when a task looks for others to classify with its own.
GROUP_CANDIDATES = 64


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the database unreachable or locked, I/O failing (a missing file is not transient)."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError))


def retry_delay(retries: int) -> float:
    """Exponential backoff with jitter: 2, 4, 8 ... seconds, capped at two minutes."""
    return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**retries) * random.uniform(0.75, 1.25)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    task: str
    series_instance_uid: str
    paths: list[Path]
    #: Frames in the series (multi-frame instances count each frame).
    frames: int = 0
    #: Times this job has been claimed, this claim included.
    attempts: int = 1


class SrQueue:
    """Makes the SRs of finished jobs in a background thread, after classification.

    Building an SR (highdicom, reading every source header) costs more CPU than classifying the series, and on a
    small machine it competes with the listener too. So while series arrive or wait it would delay results; an SR
    is made once this worker has run no job for ``idle_seconds`` and ``pipeline_busy()`` (if given) says no series
    is pending or queued, or at the latest ``max_delay_seconds`` after its result: results first, reports right
    after the burst. What still waits when the worker shuts down is made then (:meth:`drain`); if the process
    dies, the next worker's start makes it (:func:`worker.reporting.publish_missing`).
    """

    def __init__(self, publish: Callable[[int], None], pipeline_busy: Callable[[], bool] | None = None,
                 idle_seconds: float = 0.5, max_delay_seconds: float = 30.0) -> None:
        self._publish = publish
        self._pipeline_busy = pipeline_busy
        self.idle_seconds = idle_seconds
        self.max_delay_seconds = max_delay_seconds
        self._waiting: deque[tuple[int, float]] = deque()
        self._active = 0
        self._last_active = time.monotonic()
        self._draining = False
        self._publishing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sr-publisher", daemon=True)
        self._thread.start()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Marks classification running (SRs wait meanwhile)."""
        with self._changed:
            self._active += 1
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                self._last_active = time.monotonic()
                self._changed.notify_all()

    def submit(self, job_id: int) -> None:
        with self._changed:
            self._waiting.append((job_id, time.monotonic()))
            self._changed.notify_all()

    def drain(self, timeout: float = 30.0) -> bool:
        """Make every waiting SR now; True when none is left within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._draining = True
            self._changed.notify_all()
            while self._waiting or self._publishing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _head(self) -> tuple[int, bool]:
        """Wait for an SR whose turn it is by this process's state; returns it and whether it is due regardless
        of the rest of the pipeline (overdue, or draining). Called with the lock held."""
        while True:
            now = time.monotonic()
            if self._waiting:
                job_id, since = self._waiting[0]
                due = since + self.max_delay_seconds
                if self._draining or now >= due:
                    return job_id, True
                ready_at = due if self._active else min(due, self._last_active + self.idle_seconds)
                if now >= ready_at:
                    return job_id, False
                self._changed.wait(ready_at - now)
            else:
                self._changed.wait()

    def _next(self) -> int:
        while True:
            with self._changed:
                job_id, forced = self._head()
            try:
                wait = not forced and self._pipeline_busy is not None and self._pipeline_busy()
            except Exception:  # the database briefly away: do not hold the SR back for it
                log.exception("could not tell whether series are waiting; making the SR now")
                wait = False
            with self._changed:
                if not wait:
                    self._waiting.popleft()  # still job_id: only this thread takes from the queue
                    self._publishing = True
                    return job_id
                self._changed.wait(self.idle_seconds)

    def _run(self) -> None:
        while True:
            job_id = self._next()
            try:
                self._publish(job_id)
            finally:
                with self._changed:
                    self._publishing = False
                    self._changed.notify_all()


def series_waiting(database: Database) -> bool:
    """Whether any series is still receiving (pending) or any job waits for a worker."""
    with database.read_session() as session:
        pending = session.scalar(select(exists().where(Series.pending.is_(True))))
        return bool(pending) or bool(session.scalar(
            select(exists().where(Job.state.in_((JobState.RECEIVED, JobState.QUEUED))))
        ))


@dataclass
class WorkerContext:
    """What a worker process's tasks share: settings, database, the models loaded once, its registration id."""

    settings: Settings
    database: Database
    models: ModelCache
    worker_pk: int
    #: Sends ``classify_series(job_id)`` after ``countdown`` seconds (set by :func:`register_tasks`).
    resend: Callable[[int, float], None] | None = None
    #: Jobs this process is classifying now: their duplicate messages are skipped.
    in_flight: set[int] = field(default_factory=set)
    claim_lock: threading.Lock = field(default_factory=threading.Lock)
    sr_queue: SrQueue = field(init=False)
    #: Decodes and preprocesses series ahead of the model (``settings.decode_processes``).
    decoder: DecodePool[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sr_queue = SrQueue(lambda job_id: publish_job_sr(self, job_id), lambda: series_waiting(self.database))
        processes = self.settings.decode_processes
        self.decoder = DecodePool(default_decode_processes() if processes is None else processes,
                                  self.settings.decode_frames_in_flight)


def _series_files(session: Session, series_pk: int) -> tuple[list[Path], int]:
    """The archive paths of a series' instances and its number of frames."""
    rows = session.execute(
        select(Instance.archive_path, Instance.number_of_frames)
        .where(Instance.series_pk == series_pk)
        .order_by(Instance.instance_number, Instance.sop_instance_uid)
    ).all()
    return [Path(path) for path, _ in rows], sum(max(1, frames or 1) for _, frames in rows)


def claim_job(database: Database, job_id: int, worker_pk: int, busy: Collection[int] = ()) -> ClaimedJob | None:
    """Mark the job ``running`` for this worker and return what to classify, or ``None`` to skip it (final, held
    by another worker, or in ``busy``: being classified by this process)."""
    with database.session() as session:
        return _claim(session, job_id, worker_pk, busy)


def _claim(session: Session, job_id: int, worker_pk: int, busy: Collection[int] = (), only_queued: bool = False
           ) -> ClaimedJob | None:
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        log.warning("job %d does not exist; message dropped", job_id, extra={"ids": {"job_id": job_id}})
        return None
    if job.state.is_final or job_id in busy or (only_queued and job.state != JobState.QUEUED):
        return None
    if job.state == JobState.RUNNING and job.worker_pk not in (None, worker_pk):
        return None  # a duplicate message; the worker holding the job is alive (else it is re-queued)
    if job.task is None:
        raise ValueError(f"job {job_id} has no task")
    job.state = JobState.RUNNING
    job.worker_pk = worker_pk
    job.attempts += 1
    job.started_at = utcnow()
    series_uid = session.scalar(select(Series.series_instance_uid).where(Series.id == job.series_pk))
    paths, frames = _series_files(session, job.series_pk)
    return ClaimedJob(job.id, job.task, str(series_uid), paths, frames, job.attempts)


def claim_group(context: WorkerContext, job_id: int) -> list[ClaimedJob]:
    """Claim job ``job_id`` and, in the same transaction, other ``queued`` jobs of its task (oldest first) while
    their frames fit in ``settings.inference_group_frames``; register them all as in flight. ``[]``: skip."""
    budget = context.settings.inference_group_frames
    with context.claim_lock, context.database.session() as session:
        first = _claim(session, job_id, context.worker_pk, context.in_flight)
        if first is None:
            return []
        group, frames = [first], first.frames
        candidates = session.execute(
            select(Job.id, Job.series_pk)
            .where(Job.state == JobState.QUEUED, Job.task == first.task, Job.id != job_id)
            .order_by(Job.queued_at, Job.id)
            .limit(GROUP_CANDIDATES)
        ).all()
        counts = dict(
            session.execute(
                select(Instance.series_pk, func.sum(Instance.number_of_frames))
                .where(Instance.series_pk.in_([series_pk for _, series_pk in candidates]))
                .group_by(Instance.series_pk)
            ).all()
        ) if candidates else {}
        for other, series_pk in candidates:
            if frames + int(counts.get(series_pk) or 0) > budget:
                break
            # Only while still queued: another worker may have claimed it since the select (PostgreSQL).
            claimed = _claim(session, other, context.worker_pk, context.in_flight, only_queued=True)
            if claimed is not None:
                group.append(claimed)
                frames += claimed.frames
        context.in_flight.update(job.job_id for job in group)
    return group


@dataclass(frozen=True)
class Finished:
    """A classified job, ready to be recorded."""

    job_id: int
    classification: SeriesClassification
    model_name: str
    model_version: str
    model_uid: str
    seconds: float


def finish_job(
    database: Database,
    job_id: int,
    classification: SeriesClassification,
    model_name: str,
    model_version: str,
    model_uid: str,
    seconds: float,
) -> None:
    """Store the result, supersede the series' older results (or be superseded by a newer one) and mark done."""
    finish_jobs(database, [Finished(job_id, classification, model_name, model_version, model_uid, seconds)])


def finish_jobs(database: Database, finished: Collection[Finished]) -> None:
    """:func:`finish_job` for several jobs in one transaction (one commit); counted once committed."""
    with database.session() as session:
        latencies = [latency for item in finished if (latency := _finish(session, item)) is not None]
    for task, seconds in latencies:
        JOBS_FINISHED.labels(task, "done").inc()
        JOB_LATENCY.labels(task).observe(seconds)


def _finish(session: Session, item: Finished) -> tuple[str, float] | None:
    """Record the result; returns the job's task and its latency (last instance received to now), or None when
    the job had already ended."""
    job = session.get_one(Job, item.job_id, with_for_update=True)
    if job.state.is_final:
        return None
    classification = item.classification
    existing = session.scalar(
        select(Result.id).where(
            Result.series_pk == job.series_pk, Result.model_uid == item.model_uid, Result.revision == job.revision
        )
    )
    if existing is None:
        session.add(
            Result(
                job_pk=job.id,
                series_pk=job.series_pk,
                revision=job.revision,
                task=job.task or "",
                label=classification.label,
                probabilities=classification.probabilities,
                slice_probabilities=classification.slice_probabilities,
                aggregation=classification.aggregation,
                model_name=item.model_name,
                model_version=item.model_version,
                model_uid=item.model_uid,
                inference_seconds=item.seconds,
                reason=classification.reason,
            )
        )
        session.flush()
    latest = session.scalar(
        select(Result.id).where(Result.series_pk == job.series_pk).order_by(Result.revision.desc()).limit(1)
    )
    session.execute(
        update(Result)
        .where(Result.series_pk == job.series_pk, Result.id != latest)
        .values(superseded_by_pk=latest)
    )
    job.state = JobState.DONE
    job.reason = job_summary(classification, item.model_name, item.model_version)
    job.finished_at = utcnow()
    job.worker_pk = None
    return job.task or "", max(0.0, (job.finished_at - job.series_last_received_at).total_seconds())


def job_summary(classification: SeriesClassification, model_name: str, model_version: str) -> str:
    """A done job's reason: ``glioma (0.91) by NAME VERSION``, or ``indeterminate (WHY) by NAME VERSION``.

    An indeterminate label or an untyped finding (``tumor``) is no class, so it has no probability of its own to
    show; its reason takes that place.
    """
    if classification.label not in classification.probabilities:
        detail = classification.reason or "no reason given"
    else:
        detail = f"{classification.probabilities[classification.label]:.2f}"
    return f"{classification.label} ({detail}) by {model_name} {model_version}"


def fail_job(database: Database, job_id: int, reason: str) -> None:
    with database.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.FAILED, reason=reason[:2000], finished_at=utcnow(), worker_pk=None)
        )
        task = session.scalar(select(Job.task).where(Job.id == job_id))
    JOBS_FINISHED.labels(task or "", "failed").inc()


def note_retry(database: Database, job_id: int, reason: str) -> None:
    """Record why the job waits for a retry; it stays ``running`` on this worker so it is not re-sent meanwhile."""
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(reason=reason[:2000]))


def release_job(context: WorkerContext, job: ClaimedJob, reason: str, countdown: float) -> None:
    """Put a job this task took along but did not settle back on the queue: ``queued`` again, and a new message
    after ``countdown`` seconds. The message is sent even if the database cannot be updated: a job still
    ``running`` on this live worker but no longer in flight is claimed again by it."""
    try:
        with context.database.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job.job_id, Job.state == JobState.RUNNING, Job.worker_pk == context.worker_pk)
                .values(state=JobState.QUEUED, worker_pk=None, queued_at=utcnow(), reason=reason[:2000])
            )
    except OperationalError:
        log.exception("job %d could not be put back in the database; re-sending it anyway", job.job_id)
    finally:
        if context.resend is not None:
            context.resend(job.job_id, countdown)


class _Group:
    """One task's claimed jobs and what became of each (finished, failed, put back, or left to the retry)."""

    def __init__(self, context: WorkerContext, jobs: list[ClaimedJob]) -> None:
        self.context = context
        self.jobs = jobs
        self.primary = jobs[0]
        self.settled: set[int] = set()
        self.card: ModelCard | None = None
        #: The transient error of the task's own job: re-raised so that Celery retries it with backoff.
        self.retry: BaseException | None = None

    def error(self, job: ClaimedJob, exc: BaseException) -> None:
        database = self.context.database
        if not is_transient(exc):
            log.warning("job %d (series %s) failed: %s", job.job_id, job.series_instance_uid, exc,
                        extra={"ids": {"job_id": job.job_id, "series_uid_hash": uid_hash(job.series_instance_uid)}})
            fail_job(database, job.job_id, f"{type(exc).__name__}: {exc}")
        elif job is self.primary:
            self.retry = exc
        elif job.attempts > MAX_RETRIES:
            fail_job(database, job.job_id, f"gave up after {job.attempts} attempts: {exc}")
        else:
            delay = retry_delay(job.attempts - 1)
            release_job(self.context, job, f"transient error, retry {job.attempts} in {delay:.0f} s: {exc}", delay)
        self.settled.add(job.job_id)

    def finish(self, done: list[tuple[int, SeriesClassification]], started: dict[int, float]) -> None:
        if not done:
            return
        by_id = {job.job_id: job for job in self.jobs}
        card = self.card
        assert card is not None, "the model is loaded before any job finishes"
        now = time.perf_counter()
        finish_jobs(self.context.database, [
            Finished(job_id, classification, card.name or card.architecture, card.version, card.uid,
                     now - started[job_id])
            for job_id, classification in done
        ])
        for job_id, classification in done:
            job = by_id[job_id]
            self.settled.add(job_id)
            log.info("job %d: series %s is %s", job.job_id, job.series_instance_uid, classification.label,
                     extra={"ids": {"job_id": job.job_id, "model_uid": card.uid,
                                    "series_uid_hash": uid_hash(job.series_instance_uid)}})
            # If the process dies before the SR is made, the next worker's start-up makes it (publish_missing).
            self.context.sr_queue.submit(job.job_id)

    def release_unsettled(self, reason: str) -> None:
        for job in self.jobs:
            if job.job_id not in self.settled and job is not self.primary:
                release_job(self.context, job, reason, 0.0)
                self.settled.add(job.job_id)


def run_job(context: WorkerContext, job_id: int) -> None:
    """Classify the job's series, with other queued ones (:func:`claim_group`). Transient errors of this job
    propagate (to be retried); others fail the job."""
    jobs = claim_group(context, job_id)
    if not jobs:
        return
    group = _Group(context, jobs)
    try:
        with context.sr_queue.busy():
            _classify(group)
    finally:
        try:
            group.release_unsettled("the task classifying it stopped; re-queued")
        finally:
            with context.claim_lock:
                context.in_flight.difference_update(job.job_id for job in jobs)
    if group.retry is not None:
        raise group.retry


def _classify(group: _Group) -> None:
    context = group.context
    try:
        classifier = context.models.get(group.primary.task)
    except Exception as exc:
        for job in group.jobs:
            group.error(job, exc)
        return
    group.card = classifier.card
    batcher: SeriesBatcher[int] = SeriesBatcher(classifier, context.settings.inference_batch_size)
    started: dict[int, float] = {}
    by_id = {job.job_id: job for job in group.jobs}

    def series() -> Iterator[tuple[int, list[Path], int]]:
        for job in group.jobs:
            started[job.job_id] = time.perf_counter()  # a job's time runs from its decoding's start
            yield job.job_id, job.paths, job.frames or len(job.paths)

    try:
        # The decoding processes work on the next series while the model predicts the batches filled so far.
        for job_id, prepared in context.decoder.prepare_all(series(), classifier.task.name,
                                                            classifier.card.input_spec):
            if isinstance(prepared, BaseException):
                group.error(by_id[job_id], prepared)
                continue
            group.finish(batcher.add(job_id, prepared), started)
        group.finish(batcher.flush(), started)
    except OperationalError:
        raise  # the database failed: the task's retry (and the release of the others) deal with it
    except Exception as exc:  # the model itself failed: every job still waiting for it fails alike
        for job in group.jobs:
            if job.job_id not in group.settled:
                group.error(job, exc)


def publish_job_sr(context: WorkerContext, job_id: int) -> None:
    """The job's result as an SR, queued for delivery. A failure here never fails the finished job: it is logged,
    and the worker's start-up makes any missing SR (:func:`worker.reporting.publish_missing`)."""
    try:
        with context.database.session() as session:
            result_pk = session.scalar(select(Result.id).where(Result.job_pk == job_id))
        if result_pk is not None:
            publish_result(context.database, context.settings, result_pk)
    except Exception:
        log.exception("job %d: no SR made for its result", job_id, extra={"ids": {"job_id": job_id}})


def register_tasks(app: Celery, context: WorkerContext) -> None:
    """Add ``classify_series`` to ``app``, bound to this worker process's ``context``; trace its models first."""
    context.models.warm_up(context.settings.inference_batch_size)
    context.decoder.start()

    # shared=False: a shared task would be copied into every Celery app made later in this process, bound to
    # this context (another database) and shadowing that app's own registration.
    @app.task(
        bind=True, name=CLASSIFY_SERIES, acks_late=True, ignore_result=True, max_retries=MAX_RETRIES, shared=False
    )
    def classify_series(self: Task, job_id: int) -> None:
        try:
            run_job(context, job_id)
        except Exception as exc:
            if not is_transient(exc):
                raise
            retries = self.request.retries
            if retries >= MAX_RETRIES:
                fail_job(context.database, job_id, f"gave up after {retries + 1} attempts: {exc}")
                return
            delay = retry_delay(retries)
            try:
                note_retry(context.database, job_id, f"transient error, retry {retries + 1} in {delay:.0f} s: {exc}")
            except OperationalError:
                pass  # the database itself is what failed; the retry still goes ahead
            raise self.retry(exc=exc, countdown=delay)

    def resend(job_id: int, countdown: float) -> None:
        classify_series.apply_async(args=[job_id], countdown=countdown or None)

    context.resend = resend

    # A warm shutdown makes the SRs still waiting before the process exits (bounded: the process ends within
    # worker.lifetime.WORKER_STOP_SECONDS of its stop signal whatever it is doing; the next start makes the rest).
    @worker_shutdown.connect(weak=False)
    def _drain_srs(**_: object) -> None:
        context.sr_queue.drain()
        context.decoder.close()
