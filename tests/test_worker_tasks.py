"""The classify_series task on a real Celery worker and broker (filesystem, as embedded) with a real model:
transient errors are retried with backoff, others fail the job with the reason, duplicates change nothing, queued
jobs are classified together, lost messages are sent again; SRs wait for the burst to end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from sqlalchemy import func, select, update

from config import Settings, load_settings
from dicom_factory import brain_images
from dicom_io.archive import Archive
from dicom_io.synthesis import mr_series
from models.architectures import build_model, default_input_spec, fit_threshold_model
from models.card import ModelCard
from models.tasks import BRAIN_TUMOR
from worker.celery_app import INFERENCE_QUEUE, create_celery_app, make_enqueue
from worker.db import Database, Instance, Job, JobState, Result, upgrade_database
from worker.inference import ModelCache
from worker.ingest import DatabaseSink
from worker.series import SeriesScheduler
from worker.tasks import SrQueue, WorkerContext, claim_group, register_tasks
from worker.workers import WorkerRegistration


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "brain-tumor"
    folder.mkdir()
    spec = default_input_spec("threshold", BRAIN_TUMOR)
    model = build_model("threshold", BRAIN_TUMOR, spec)
    fit_threshold_model(model, np.linspace(0, 255, 4 * 16).reshape(4, 4, 4, 1).repeat(64, 1).repeat(64, 2)
                        .astype(np.float32)[:, :spec.height, :spec.width], np.arange(4))
    model.save(folder / "model.keras")
    ModelCard(task="brain-tumor", class_names=list(BRAIN_TUMOR.class_names), architecture="threshold",
              input_spec=spec, name="tiny").save(folder)
    return folder.parent


class Pipeline:
    """Listener-side (sink, scheduler) and a real Celery worker thread, sharing one SQLite database."""

    worker_pk: int

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self.app = create_celery_app(settings)
        self.sink = DatabaseSink(Archive(settings.archive_dir), database)
        self.enqueue = make_enqueue(self.app)
        self.scheduler = SeriesScheduler(settings, database, self.enqueue,
                                         clock=lambda: datetime.now(timezone.utc) + timedelta(seconds=60))
        #: The job id of every classify_series message the worker finished with, in order: "nothing happened"
        #: checks wait until the worker has consumed the message instead of sleeping.
        self.consumed: list[int] = []
        task_postrun.connect(self._consumed, weak=False)

    def _consumed(self, task: Any = None, args: Any = None, **_: Any) -> None:
        if task is not None and task.app is self.app and args:
            self.consumed.append(int(args[0]))

    def wait_consumed(self, job_id: int, times: int) -> None:
        """Until the worker has finished with ``times`` messages for ``job_id``."""
        wait_for(lambda: self.consumed.count(job_id) >= times, timeout=30)

    def close(self) -> None:
        task_postrun.disconnect(self._consumed)

    def job(self) -> Job:
        with self.database.session() as session:
            return session.scalars(select(Job)).one()

    def jobs(self) -> dict[int, Job]:
        with self.database.session() as session:
            return {job.id: job for job in session.scalars(select(Job))}

    def queue_without_messages(self, count: int, slices: int = 2) -> list[int]:
        """``count`` series of ``slices`` received and their jobs queued, but no message sent (as if lost)."""
        for index in range(count):
            for ds in mr_series(brain_images(slices, seed=40 + index)):
                self.sink.accept(ds, "PACS")
        lost: list[int] = []
        ids = SeriesScheduler(self.settings, self.database, lost.append, clock=self.scheduler.clock).run_once()
        assert sorted(lost) == sorted(ids) and len(ids) == count
        return sorted(ids)


@pytest.fixture
def pipeline(tmp_path: Path, models_dir: Path) -> Iterator[Pipeline]:
    # One decoding process whatever the cores: jobs and their errors (transient or not) cross the process boundary.
    settings = load_settings(env={}, data_dir=tmp_path, models_dir=models_dir, decode_processes=1)
    upgrade_database(settings.effective_database_url)
    database = Database(settings.effective_database_url)
    registration = WorkerRegistration(database)
    line = Pipeline(settings, database)
    line.worker_pk = registration.id
    context = WorkerContext(settings, database, ModelCache(models_dir), registration.id)
    register_tasks(line.app, context)
    with start_worker(line.app, pool="threads", concurrency=1, perform_ping_check=False,
                      queues=[INFERENCE_QUEUE], shutdown_timeout=30):
        yield line
    context.decoder.close()  # its decoding processes (settings.decode_processes)
    line.close()
    registration.close()
    database.dispose()


def wait_for(condition: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_transient_error_is_retried_then_succeeds(pipeline: Pipeline, tmp_path: Path) -> None:
    for ds in mr_series(brain_images(2)):
        pipeline.sink.accept(ds, "PACS")
    # The file system fails for one instance (a directory replaced by a file: NotADirectoryError, an OSError).
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pipeline.database.session() as session:
        instance = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert instance is not None
        real_path = instance.archive_path
        instance.archive_path = str(blocker / "instance.dcm")
    pipeline.scheduler.run_once()
    job = wait_for(lambda: (j := pipeline.job()).reason.startswith("transient error") and j)
    assert job.state == JobState.RUNNING and "retry 1 in" in job.reason
    with pipeline.database.session() as session:
        session.execute(update(Instance).where(Instance.id == instance.id).values(archive_path=real_path))
    job = wait_for(lambda: (j := pipeline.job()).state.is_final and j, timeout=30)
    assert (job.state, job.attempts) == (JobState.DONE, 2), job.reason

    # The same message again (a broker redelivery, a re-sent job) changes nothing.
    before = pipeline.consumed.count(job.id)
    pipeline.enqueue(job.id)
    pipeline.wait_consumed(job.id, before + 1)
    with pipeline.database.session() as session:
        assert session.scalar(select(func.count(Result.id))) == 1
        assert session.get_one(Job, job.id).attempts == 2


def test_bad_data_fails_the_job_with_its_reason(pipeline: Pipeline, tmp_path: Path) -> None:
    for ds in mr_series(brain_images(1)):
        pipeline.sink.accept(ds, "PACS")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not DICOM" * 10)
    with pipeline.database.session() as session:
        session.execute(update(Instance).values(archive_path=str(garbage)))
    pipeline.scheduler.run_once()
    job = wait_for(lambda: (j := pipeline.job()).state.is_final and j)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert "InvalidDicomError" in job.reason


def test_a_lost_message_is_sent_again_once_per_timeout(pipeline: Pipeline) -> None:
    # The broker loses the message of a queued job (Celery's filesystem broker can): the scheduler's sweep sends
    # it again once it has been queued for the timeout without starting, and the real worker classifies it once.
    for ds in mr_series(brain_images(2)):
        pipeline.sink.accept(ds, "PACS")
    settings = load_settings(env={}, data_dir=pipeline.settings.data_dir, models_dir=pipeline.settings.models_dir,
                             queued_job_timeout_seconds=30)
    now = datetime.now(timezone.utc) + timedelta(seconds=60)
    lost: list[int] = []

    def scheduler(enqueue: Callable[[int], None], at: datetime) -> SeriesScheduler:
        return SeriesScheduler(settings, pipeline.database, enqueue, clock=lambda: at)

    [job_id] = scheduler(lost.append, now).run_once()
    assert lost == [job_id]
    # A message for a job that does not exist, sent after the lost one would have been: once the worker (one thread,
    # first in first out) is done with it, any message for the lost job would have been taken first.
    marker = job_id + 1000
    pipeline.enqueue(marker)
    pipeline.wait_consumed(marker, 1)
    assert job_id not in pipeline.consumed
    assert pipeline.job().state == JobState.QUEUED  # nothing will ever run it
    assert scheduler(lost.append, now + timedelta(seconds=29)).resend_lost_jobs() == 0  # not yet
    later = now + timedelta(seconds=31)
    assert scheduler(lost.append, later).resend_lost_jobs() == 1  # lost once more
    assert scheduler(lost.append, later).resend_lost_jobs() == 0  # once per timeout, not every round
    assert lost == [job_id, job_id] and "sent again" in pipeline.job().reason

    sweeper = scheduler(pipeline.enqueue, later + timedelta(seconds=31))
    assert sweeper.run_once() == []  # no new job: the sweep sends the lost one
    job = wait_for(lambda: (j := pipeline.job()).state.is_final and j)
    assert job.state == JobState.DONE and job.attempts == 1
    assert sweeper.resend_lost_jobs() == 0  # a finished job is never sent again
    with pipeline.database.session() as session:
        assert session.scalar(select(func.count(Result.id))) == 1


def test_one_message_classifies_the_queued_jobs_together(pipeline: Pipeline) -> None:
    ids = pipeline.queue_without_messages(3)
    pipeline.enqueue(ids[0])  # the task takes the other two queued jobs along
    jobs = wait_for(lambda: all((js := pipeline.jobs())[i].state.is_final for i in ids) and js)
    assert [(jobs[i].state, jobs[i].attempts) for i in ids] == [(JobState.DONE, 1)] * 3
    for job_id in ids[1:]:  # their own messages come later and change nothing
        pipeline.enqueue(job_id)
    for job_id in ids[1:]:
        pipeline.wait_consumed(job_id, 1)
    assert [pipeline.jobs()[i].attempts for i in ids] == [1, 1, 1]
    with pipeline.database.session() as session:
        assert session.scalar(select(func.count(Result.id))) == 3


def test_a_group_keeps_to_its_frame_budget_and_skips_jobs_in_flight(pipeline: Pipeline, models_dir: Path) -> None:
    ids = pipeline.queue_without_messages(3)  # two frames each
    settings = load_settings(env={}, data_dir=pipeline.settings.data_dir, models_dir=models_dir,
                             inference_group_frames=4)
    context = WorkerContext(settings, pipeline.database, ModelCache(models_dir), pipeline.worker_pk)
    group = claim_group(context, ids[0])
    assert [job.job_id for job in group] == ids[:2] and [job.frames for job in group] == [2, 2]
    assert context.in_flight == set(ids[:2])
    assert claim_group(context, ids[1]) == []  # its duplicate message while this process classifies it
    jobs = pipeline.jobs()
    assert [jobs[i].state for i in ids] == [JobState.RUNNING, JobState.RUNNING, JobState.QUEUED]


def test_a_job_taken_along_that_fails_transiently_is_queued_again(pipeline: Pipeline, tmp_path: Path) -> None:
    first, second = pipeline.queue_without_messages(2)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pipeline.database.session() as session:  # the second series' files are briefly unreadable
        series_pk = session.get_one(Job, second).series_pk
        instance = session.scalars(select(Instance).where(Instance.series_pk == series_pk)).first()
        assert instance is not None
        real_path = instance.archive_path
        instance.archive_path = str(blocker / "instance.dcm")
    pipeline.enqueue(first)
    job = wait_for(lambda: (j := pipeline.jobs()[second]).reason.startswith("transient error") and j)
    assert job.state == JobState.QUEUED and job.worker_pk is None and "retry 1 in" in job.reason
    # The group's other job still finishes (its result may be recorded just after the failure is).
    assert wait_for(lambda: pipeline.jobs()[first].state == JobState.DONE, timeout=10)
    with pipeline.database.session() as session:
        session.execute(update(Instance).where(Instance.id == instance.id).values(archive_path=real_path))
    job = wait_for(lambda: (j := pipeline.jobs()[second]).state.is_final and j, timeout=30)
    assert (job.state, job.attempts) == (JobState.DONE, 2), job.reason


def test_srs_wait_for_the_burst_to_end() -> None:
    made: list[int] = []
    series_waiting = [True]
    asked: list[float] = []  # when the queue asked whether series still wait: it considers making the SR

    def pipeline_busy() -> bool:
        asked.append(time.monotonic())
        return series_waiting[0]

    queue = SrQueue(made.append, pipeline_busy, idle_seconds=0.1, max_delay_seconds=30)
    with queue.busy():
        queue.submit(1)
        time.sleep(0.4)  # a job being classified
    busy_ended = time.monotonic()
    # The queue considers the SR (asks, holds it, asks again) only once classification has been idle for a while,
    # and makes none while series wait.
    wait_for(lambda: len(asked) >= 2, timeout=5)
    assert made == []
    assert asked[0] - busy_ended >= 0.09  # idle_seconds after the job, less the lock's hand-over
    series_waiting[0] = False
    wait_for(lambda: made == [1], timeout=5)

    overdue = SrQueue(made.append, lambda: True, idle_seconds=0.1, max_delay_seconds=0.3)
    overdue.submit(2)
    wait_for(lambda: made == [1, 2], timeout=5)  # at the latest after the maximum delay

    stopping = SrQueue(made.append, lambda: True, idle_seconds=0.1, max_delay_seconds=60)
    stopping.submit(3)
    assert stopping.drain(timeout=5) and made == [1, 2, 3]  # a shutting-down worker makes what waits
