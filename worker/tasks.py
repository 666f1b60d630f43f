"""The ``classify_series`` Celery task and the job transitions it makes.

The task takes a job id. It is idempotent: a job already ``done``, ``failed`` or ``not_applicable`` is skipped, a
job another live worker holds is skipped, and a result is unique per (series, model UID, revision), so a message
delivered twice (a re-sent job, a broker redelivery) never makes a second result. Transient errors (the database or
the file system briefly failing) are retried with exponential backoff; anything else fails the job with its reason.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery, Task
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from config import Settings
from worker.celery_app import CLASSIFY_SERIES
from worker.db import Database, Instance, Job, JobState, Result, Series, utcnow
from worker.inference import ModelCache, SeriesClassification, classify_series_files
from worker.reporting import publish_result

log = logging.getLogger(__name__)

MAX_RETRIES = 6
RETRY_BASE_SECONDS = 2.0
RETRY_MAX_SECONDS = 120.0


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


@dataclass
class WorkerContext:
    """What a worker process's tasks share: settings, database, the models loaded once, its registration id."""

    settings: Settings
    database: Database
    models: ModelCache
    worker_pk: int
    #: Makes the SRs of finished jobs beside inference, so the next series does not wait for highdicom.
    sr_publisher: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="sr-publisher")
    )


def claim_job(database: Database, job_id: int, worker_pk: int) -> ClaimedJob | None:
    """Mark the job ``running`` for this worker and return what to classify, or ``None`` to skip it."""
    with database.session() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            log.warning("job %d does not exist; message dropped", job_id)
            return None
        if job.state.is_final:
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
        paths = session.scalars(
            select(Instance.archive_path)
            .where(Instance.series_pk == job.series_pk)
            .order_by(Instance.instance_number, Instance.sop_instance_uid)
        ).all()
        return ClaimedJob(job.id, job.task, str(series_uid), [Path(p) for p in paths])


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
    with database.session() as session:
        job = session.get_one(Job, job_id, with_for_update=True)
        if job.state.is_final:
            return
        existing = session.scalar(
            select(Result.id).where(
                Result.series_pk == job.series_pk, Result.model_uid == model_uid, Result.revision == job.revision
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
                    model_name=model_name,
                    model_version=model_version,
                    model_uid=model_uid,
                    inference_seconds=seconds,
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
        probability = classification.probabilities[classification.label]
        job.state = JobState.DONE
        job.reason = f"{classification.label} ({probability:.2f}) by {model_name} {model_version}"
        job.finished_at = utcnow()
        job.worker_pk = None


def fail_job(database: Database, job_id: int, reason: str) -> None:
    with database.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.FAILED, reason=reason[:2000], finished_at=utcnow(), worker_pk=None)
        )


def note_retry(database: Database, job_id: int, reason: str) -> None:
    """Record why the job waits for a retry; it stays ``running`` on this worker so it is not re-sent meanwhile."""
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(reason=reason[:2000]))


def run_job(context: WorkerContext, job_id: int) -> None:
    """Classify the job's series. Transient errors propagate (to be retried); others fail the job."""
    claimed = claim_job(context.database, job_id, context.worker_pk)
    if claimed is None:
        return
    started = time.perf_counter()
    try:
        classifier = context.models.get(claimed.task)
        classification = classify_series_files(claimed.paths, classifier, context.settings.inference_batch_size)
    except Exception as exc:
        if is_transient(exc):
            raise
        log.warning("job %d (series %s) failed: %s", job_id, claimed.series_instance_uid, exc)
        fail_job(context.database, job_id, f"{type(exc).__name__}: {exc}")
        return
    card = classifier.card
    finish_job(
        context.database,
        job_id,
        classification,
        model_name=card.name or card.architecture,
        model_version=card.version,
        model_uid=card.uid,
        seconds=time.perf_counter() - started,
    )
    log.info("job %d: series %s is %s", job_id, claimed.series_instance_uid, classification.label)
    # If the process dies before the SR is made, the next worker's start-up makes it (publish_missing).
    context.sr_publisher.submit(publish_job_sr, context, job_id)


def publish_job_sr(context: WorkerContext, job_id: int) -> None:
    """The job's result as an SR, queued for delivery. A failure here never fails the finished job: it is logged,
    and the worker's start-up makes any missing SR (:func:`worker.reporting.publish_missing`)."""
    try:
        with context.database.session() as session:
            result_pk = session.scalar(select(Result.id).where(Result.job_pk == job_id))
        if result_pk is not None:
            publish_result(context.database, context.settings, result_pk)
    except Exception:
        log.exception("job %d: no SR made for its result", job_id)


def register_tasks(app: Celery, context: WorkerContext) -> None:
    """Add ``classify_series`` to ``app``, bound to this worker process's ``context``."""

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
