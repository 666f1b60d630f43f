"""The Celery application, configured from the settings.

Embedded default: Celery's filesystem broker under ``data_dir/broker`` (no server) and no result backend (results
go to our database). Scale-out: a Redis (or AMQP) broker by URL. Either way: late acknowledgement, one message
prefetched per worker slot, and the ``inference`` queue for :data:`CLASSIFY_SERIES`; jobs of backfilled studies
go to :data:`BACKFILL_QUEUE`, which inference workers consume after it (issue 19): with Redis strictly after (the
``priority`` queue order), with the filesystem broker alternately (kombu's virtual transports cycle fairly), so a
live series waits behind at most one backfill task per worker slot, never behind the whole backfill.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down

from config import Settings
from worker.filesystem_broker import TRANSPORT as FILESYSTEM_TRANSPORT
from worker.lifetime import BoundedStop
from worker.logs import chosen_format

INFERENCE_QUEUE = "inference"
#: Classification of series that a backfill retrieved: consumed by the same workers, after live series.
BACKFILL_QUEUE = "inference-backfill"
#: The queues an inference worker consumes, the first first.
INFERENCE_QUEUES = (INFERENCE_QUEUE, BACKFILL_QUEUE)
CLASSIFY_SERIES = "dicom_triage.classify_series"


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options; for the filesystem broker, its folders (created here) and a short polling interval."""
    if settings.effective_broker_url.startswith("filesystem://"):
        folders = {name: settings.broker_dir / name for name in ("queue", "control", "taken", "rejected")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            # Producer and consumer share one folder: that folder is the queue.
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            # worker.filesystem_broker: a consumer renames a message here to take it; undecodable ones are kept.
            "taken_folder": str(folders["taken"]),
            "rejected_folder": str(folders["rejected"]),
            # The default 1 s poll would add up to a second to every result's latency.
            "polling_interval": 0.1,
        }
    # Redis: BRPOP over the queues in the order given, so live jobs are always taken before backfill ones.
    return {"queue_order_strategy": "priority"}


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``; :func:`worker.tasks.register_tasks` adds the task in worker processes."""
    app = Celery("dicom_triage", broker=settings.effective_broker_url, backend=settings.result_backend_url)
    filesystem = settings.effective_broker_url.startswith("filesystem://")
    app.conf.update(
        # kombu's own filesystem transport loses messages when processes share its folder (worker.filesystem_broker).
        broker_transport=FILESYSTEM_TRANSPORT if filesystem else None,
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=INFERENCE_QUEUE,
        task_routes={CLASSIFY_SERIES: {"queue": INFERENCE_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acknowledged after the task ran, so a worker that dies mid-task does not lose it
        # (brokers with acknowledgement; for the filesystem broker the database's job state covers it).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Remote control needs broadcast, which the filesystem broker can only poll for: not worth the load.
        worker_enable_remote_control=not filesystem,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def run_celery_worker(app: Celery, name: str, queue: str | tuple[str, ...], pool: str, concurrency: int,
                      handback: Callable[[float], None] | None = None) -> int:
    """Consume ``queue`` in this process until signalled; return the worker's exit code. The worker is named
    ``NAME-PID@HOST``. Without gossip, mingle and heartbeat events: liveness is in our database, not the broker.

    A stop signal (SIGTERM, SIGINT) ends the process within :data:`~worker.lifetime.WORKER_STOP_SECONDS`
    (:class:`~worker.lifetime.BoundedStop`): a running task gets a short grace, then ``handback(deadline)``
    gives its work back to the queue, and the process exits."""
    # Celery's own record of the requests executing now, in this process (threads and solo pools).
    from celery.worker import state as worker_state

    stopping = BoundedStop(lambda: bool(worker_state.active_requests), handback or (lambda _deadline: None))
    # Sent from Celery's signal handler as its warm shutdown begins.
    worker_shutting_down.connect(lambda **_: stopping.begin(), weak=False)
    worker = app.Worker(
        hostname=f"{name}-{os.getpid()}@{socket.gethostname()}",
        queues=[queue] if isinstance(queue, str) else list(queue),
        pool=pool,
        concurrency=concurrency,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel="INFO",
        # Celery's start-up banner is printed, not logged: with JSON logs every line must be an object.
        quiet=chosen_format() == "json",
    )
    worker.start()
    return int(worker.exitcode or 0)


def make_enqueue(app: Celery, is_backfill: Callable[[int], bool] = lambda _job_id: False) -> Callable[[int], None]:
    """A function sending ``classify_series(job_id)`` to the inference queue, or to :data:`BACKFILL_QUEUE` for a
    job that ``is_backfill`` (the scheduler's ``enqueue``)."""

    def enqueue(job_id: int) -> None:
        app.send_task(CLASSIFY_SERIES, args=[job_id], queue=BACKFILL_QUEUE if is_backfill(job_id) else INFERENCE_QUEUE)

    return enqueue
