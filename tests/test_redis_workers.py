"""The workers other than inference's happy path, on the real Redis broker and PostgreSQL (issue 24): the three
paths of the scale-out deployment that only ever ran on the filesystem broker in the other tests.

1. The SR delivery worker (``dicom-triage worker --queue delivery``) takes its messages from Redis and stores the
   SR in a real DICOM Storage SCP: our own StorageListener on 127.0.0.1 (dcmtk's storescp listens on every
   interface, so it would need a network namespace, from which Redis on the host's loopback is unreachable).
2. A SIGKILLed inference worker's job is run again by the next worker (the scheduler re-queues it, attempts 2),
   and Redis's own redelivery of the killed worker's unacknowledged message (after its visibility timeout, forced
   here) makes no second result.
3. The training worker (``dicom-triage training-worker``) takes a run queued by ``dicom-triage models retrain``
   from Redis and carries it to ``done``: a threshold model fitted on a few external images, in seconds.

Each test starts its processes on a scratch PostgreSQL database and Redis database :data:`REDIS_DB`, which no
other test file uses, so files running at once do not share a queue.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
from kombu import Connection
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import func, select

from config import Destination, load_settings
from databases import scratch_redis
from dicom_factory import SHARED_DATA, brain_images, ct_images, running_listener, storescu, write_files
from dicom_io.archive import Archive
from dicom_io.sr import read_classification_sr
from dicom_io.synthesis import ct_series, encode, mr_series
from models.tasks import COVID_CT
from processes import Child, celery_ready, free_port, serve_ready, triage_command, triage_environment, wait_for
from test_sr_delivery import record_result
from worker.celery_app import CLASSIFY_SERIES, INFERENCE_QUEUE
from worker.db import Database, Job, JobState, Result, Series, SrDelivery, upgrade_database
from worker.db.registry import RegisteredModel, TrainingRun
from worker.delivery import DELIVERY_QUEUE
from worker.ingest import DatabaseSink
from worker.reporting import publish_result
from worker.retraining import RETRAIN_MODEL, TRAINING_QUEUE

ROOT = Path(__file__).resolve().parents[1]
#: This file's Redis database (11 to 15 belong to other files).
REDIS_DB = 10
STARTUP_SECONDS = 180  # TensorFlow's import is slow on a loaded 2-core CI machine
OUR_AE = "DICOM_TRIAGE"
PSEUDONYM_KEY = "redis-workers-test-key-0123456789"
#: Where kombu's Redis transport keeps the messages delivered to a consumer and not yet acknowledged.
UNACKED = "unacked"


@pytest.fixture
def broker_url() -> Iterator[str]:
    with scratch_redis(REDIS_DB) as url:
        yield url


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """A client of the scratch Redis database, to look at the queues."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    yield client
    client.close()


def start(args: list[str], env: dict[str, str], name: str) -> Child:
    return Child(triage_command(*args), env, name=name)


def unacked_tasks(broker: redis.Redis) -> list[tuple[str, str, str]]:
    """(task name, arguments, message id) of every message a consumer took from Redis and has not acknowledged."""
    tasks = []
    for payload in broker.hvals(UNACKED):
        message, _exchange, _routing_key = json.loads(payload)
        headers = message["headers"]
        tasks.append((headers["task"], headers["argsrepr"], headers["id"]))
    return tasks


def queues_drained(broker: redis.Redis, *queues: str) -> bool:
    """No message waits in ``queues`` and none is held unacknowledged."""
    return all(broker.llen(queue) == 0 for queue in queues) and broker.hlen(UNACKED) == 0


def connected_to(worker: Child, url: str) -> bool:
    """Celery's start-up line naming the broker the worker consumes from (as kombu writes it, password masked)."""
    return any(f"Connected to {Connection(url).as_uri()}" in line for line in worker.lines)


# --- 1. SR delivery --------------------------------------------------------------------------------------------

def test_delivery_worker_takes_the_sr_from_redis_and_stores_it_in_the_destination(
    tmp_path: Path, processes: list[Child], postgres_url: str, broker_url: str, broker: redis.Redis
) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", database_url=postgres_url, broker_url=broker_url,
                             ae_title="TRIAGE_SR")
    database = Database(postgres_url)
    upgrade_database(database)
    # The delivery worker loads no model: an empty models folder keeps this test free of the session's models.
    (tmp_path / "models").mkdir()
    env = triage_environment(tmp_path / "models", database_url=postgres_url, broker_url=broker_url,
                             ae_title="TRIAGE_SR")
    worker = start(["worker", "--queue", "delivery", "--data-dir", str(settings.data_dir)], env, "worker")
    processes.append(worker)
    try:
        with running_listener(tmp_path / "pacs") as (listener, pacs):
            # A result recorded as the inference worker records it (the sink, then finish_job), while the worker
            # starts.
            series = mr_series(brain_images(3, seed=31))
            sink = DatabaseSink(Archive(settings.archive_dir), database)
            for ds in series:
                assert sink.accept(ds, "MODALITY") == 0
            result_pk = record_result(database, series, label="meningioma")
            destination = f"{listener.ae_title}@127.0.0.1:{listener.port}"
            published = publish_result(database, settings.model_copy(
                update={"sr_destinations": (Destination.parse(destination),)}), result_pk)
            assert published is not None and published.created

            def delivery() -> SrDelivery:
                with database.session() as session:
                    return session.scalars(
                        select(SrDelivery).where(SrDelivery.document_pk == published.document_pk)).one()

            wait_for(lambda: delivery().status != "pending", STARTUP_SECONDS, "the SR's delivery", worker)
            stored = list(pacs.stored)
        row = delivery()
        assert (row.destination, row.status, row.attempts, row.error) == (destination, "sent", 1, "")
        assert [s.sop_instance_uid for s in stored] == [published.sop_instance_uid]
        with database.session() as session:
            label = session.get_one(Result, result_pk).label
        assert label == "meningioma"
        assert read_classification_sr(pydicom.dcmread(stored[0].path)).finding == label
        # It came through Redis: the worker consumed this database, and the message is acknowledged.
        assert connected_to(worker, broker_url), worker.output[-3000:]
        wait_for(lambda: queues_drained(broker, DELIVERY_QUEUE), 30, "the delivery message acknowledged", worker)
        assert worker.terminate() == 0
    finally:
        database.dispose()


# --- 2. A killed inference worker ------------------------------------------------------------------------------

def test_a_killed_workers_job_is_run_again_once_on_redis(
    models_dir: Path, tmp_path: Path, processes: list[Child], postgres_url: str, broker_url: str,
    broker: redis.Redis
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    # Batches of one make the long series slow enough (seconds) to be caught mid-way.
    env = triage_environment(models_dir, database_url=postgres_url, broker_url=broker_url,
                             inference_batch_size="1")
    listen = start(["listen", "--data-dir", str(data_dir), "--dicom-port", str(port)], env, "listen")
    first_worker = start(["worker", "--data-dir", str(data_dir)], env, "worker")
    processes += [listen, first_worker]
    listen.wait_for_line(serve_ready, STARTUP_SECONDS)
    first_worker.wait_for_line(celery_ready, STARTUP_SECONDS)
    assert connected_to(first_worker, broker_url), first_worker.output[-3000:]

    long_series = [encode(ds, JPEG2000Lossless) for ds in ct_series(ct_images(60, seed=41))]
    files = write_files(long_series, tmp_path / "long")
    sent = storescu(port, files, "-xv", called_ae=OUR_AE)  # -xv: propose JPEG 2000, the files' syntax
    assert sent.returncode == 0 and sent.statuses == [0] * len(files), sent.output[-3000:]
    series_uid = long_series[0].SeriesInstanceUID
    database = Database(postgres_url)
    try:
        def job() -> tuple[int, JobState, int] | None:
            with database.session() as session:
                row = session.execute(
                    select(Job.id, Job.state, Job.attempts).join(Series, Job.series_pk == Series.id)
                    .where(Series.series_instance_uid == series_uid)
                ).first()
                return (row[0], row[1], row[2]) if row else None

        def results() -> int:
            with database.session() as session:
                return int(session.scalar(
                    select(func.count(Result.id)).join(Series, Result.series_pk == Series.id)
                    .where(Series.series_instance_uid == series_uid)) or 0)

        # Polled tightly, not with wait_for: the job runs for a few seconds only.
        deadline = time.monotonic() + STARTUP_SECONDS
        while (state := job()) is None or state[1:] != (JobState.RUNNING, 1):
            assert time.monotonic() < deadline, f"the job never ran: {state}\n{first_worker.output[-3000:]}"
            time.sleep(0.02)
        first_worker.kill()
        job_id = state[0]
        assert job() == (job_id, JobState.RUNNING, 1), "the job finished before its worker was killed"
        # The killed worker's message stays in Redis, taken and never acknowledged.
        [(task, args, killed_message)] = unacked_tasks(broker)
        assert (task, args) == (CLASSIFY_SERIES, f"[{job_id}]")

        # The next worker releases the dead one's job at its start; the scheduler sends it again.
        second_worker = start(["worker", "--data-dir", str(data_dir)], env, "worker 2")
        processes.append(second_worker)
        def final() -> bool:
            state = job()
            return state is not None and state[1].is_final

        wait_for(final, STARTUP_SECONDS + 60, "the job run again", listen, second_worker)
        assert job() == (job_id, JobState.DONE, 2)
        assert results() == 1

        # Redis redelivers an unacknowledged message once its visibility timeout (an hour) has passed; forced now
        # by kombu's own restore with a timeout of zero. The worker takes it and must skip the finished job.
        assert unacked_tasks(broker) == [(CLASSIFY_SERIES, f"[{job_id}]", killed_message)]
        with Connection(broker_url, transport_options={"visibility_timeout": 0}) as connection:
            connection.default_channel.qos.restore_visible(num=100)
        # Both waited for: the worker's log line reaches us through its output relay after the broker has seen the
        # acknowledgement (it once lagged behind it here).
        received = f"Task {CLASSIFY_SERIES}[{killed_message}] received"
        wait_for(lambda: received in second_worker.output and queues_drained(broker, INFERENCE_QUEUE), 60,
                 "the redelivered message received and acknowledged", second_worker)
        assert job() == (job_id, JobState.DONE, 2)
        assert results() == 1
    finally:
        database.dispose()
    assert second_worker.terminate() == 0
    assert listen.terminate() == 0


# --- 3. The training worker ------------------------------------------------------------------------------------

def test_training_worker_takes_a_retraining_from_redis_and_registers_its_candidate(
    tmp_path: Path, processes: list[Child], postgres_url: str, broker_url: str, broker: redis.Redis
) -> None:
    # Eight labelled images a class, linked from ../shared/data: a threshold model fits on them in seconds.
    external = tmp_path / "external"
    for class_name in COVID_CT.class_names:
        (external / class_name).mkdir(parents=True)
        for path in sorted((SHARED_DATA / "covid-ct" / class_name).glob("*.png"))[:8]:
            (external / class_name / path.name).symlink_to(path)
    # No installed model: the run trains from scratch, with no active model as its recipe or parent.
    (tmp_path / "models").mkdir()
    # The export of archive series (none here) refuses to run without the key of its pseudonyms.
    env = triage_environment(tmp_path / "models", data_dir=tmp_path / "data", database_url=postgres_url,
                             broker_url=broker_url, pseudonym_key=PSEUDONYM_KEY)
    training = start(["training-worker"], env, "training-worker")
    processes.append(training)
    # Queued while the worker starts: the message waits in Redis either way.
    queued = subprocess.run(
        triage_command("models", "retrain", "covid-ct", "--arch", "threshold", "--epochs", "1",
                       "--external", str(external), "--actor", "dana"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert (queued.returncode, queued.stdout.splitlines()[0]) == (0, "queued training run 1 on the training queue"), \
        queued.stderr
    training.wait_for_line(celery_ready, STARTUP_SECONDS)
    assert connected_to(training, broker_url), training.output[-3000:]

    database = Database(postgres_url)
    try:
        def run() -> TrainingRun:
            with database.session() as session:
                found = session.get_one(TrainingRun, 1)
                session.expunge(found)
                return found

        wait_for(lambda: run().state in ("done", "failed"), 120, "the run's end", training)
        finished = run()
        assert (finished.state, finished.phase, finished.progress, finished.error) == ("done", "done", 1.0, ""), \
            finished.error
        # Taken by this worker process, from Redis: the message is acknowledged and gone.
        assert finished.claimed_by == f"{socket.gethostname()}:{training.popen.pid}"
        wait_for(lambda: queues_drained(broker, TRAINING_QUEUE), 30, "the training message acknowledged", training)
        assert f"Task {RETRAIN_MODEL}[" in training.output
        with database.session() as session:
            model = session.scalars(select(RegisteredModel)).one()
            registered: dict[str, Any] = {"uid": model.model_uid, "task": model.task, "state": model.state,
                                          "architecture": model.architecture, "parent": model.parent_uid,
                                          "external": model.data_manifest["external"]}
        assert registered == {"uid": finished.model_uid, "task": "covid-ct", "state": "candidate",
                              "architecture": "threshold", "parent": None, "external": [str(external)]}
        assert (Path(env["DICOM_TRIAGE_DATA_DIR"]) / "training" / "run-1" / "model" / "model.keras").is_file()
    finally:
        database.dispose()
    assert training.terminate() == 0
