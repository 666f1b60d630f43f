"""Prometheus metrics (the official ``prometheus_client``): what each process counts, and what is read from the
database when scraped.

Events are counted where they happen (instances received and rejected, associations, bytes archived, jobs finished
and their latency, inference batches, SR delivery attempts). ``serve`` and ``listen`` run several processes (Celery
workers, listener processes): they set ``PROMETHEUS_MULTIPROC_DIR`` (:func:`use_multiprocess_dir`) before this
module is imported, so every process of the tree writes its counters to files there and the supervisor's
``/metrics`` adds them up. State (series by state, queue depth and age, deliveries by status, active model per task,
disk free) is the database's and the file system's: :class:`StateCollector` reads it at scrape time, in the process
that answers the scrape only, so no process keeps a gauge another one could contradict.

Labels are bounded and carry no patient data: task, queue, state, outcome, a rejection *category* (never the
free-text reason, which may quote element values), the calling AE title (configuration, not a person) and SR
destinations as configured.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

if TYPE_CHECKING:
    from config import Settings
    from worker.db import Database

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # worker.multiproc sets it, before this module is imported

INSTANCES_RECEIVED = Counter(
    "dicom_triage_instances_received", "Instances archived and recorded (C-STORE success)", ["calling_ae"])
INSTANCES_REJECTED = Counter(
    "dicom_triage_instances_rejected", "Instances refused with a failure status", ["reason", "calling_ae"])
ASSOCIATIONS_ACCEPTED = Counter("dicom_triage_associations_accepted", "DICOM associations accepted", ["calling_ae"])
ASSOCIATIONS_REFUSED = Counter(
    "dicom_triage_associations_refused", "DICOM associations refused", ["reason", "calling_ae"])
#: Summed over the live listener processes (a dead process's associations died with it).
ASSOCIATIONS_OPEN = Gauge("dicom_triage_associations_open", "DICOM associations open now", multiprocess_mode="livesum")
ARCHIVED_BYTES = Counter("dicom_triage_archived_bytes", "Bytes of instances written to the archive")
JOBS_FINISHED = Counter("dicom_triage_jobs_finished", "Classification jobs ended", ["task", "outcome"])
JOB_LATENCY = Histogram(
    "dicom_triage_job_latency_seconds", "From a series' last received instance to its stored result", ["task"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
INFERENCE_BATCH = Histogram(
    "dicom_triage_inference_batch_seconds", "Model time of one inference batch", ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
INFERENCE_IMAGES = Counter("dicom_triage_inference_images", "Images classified (rate: images per second)", ["task"])
SR_DELIVERIES = Counter(
    "dicom_triage_sr_delivery_attempts", "SR delivery attempts by destination and outcome (sent, retry, failed)",
    ["destination", "outcome"])

WORKER_GPUS = Gauge("dicom_triage_worker_gpus", "GPUs a worker process's TensorFlow sees", ["queue"],
                    multiprocess_mode="max")

#: Rejection categories: the listener's reason texts (which may quote values) reduced to a bounded label.
_REJECTION_CATEGORIES = (
    ("not allowed", "calling_ae_not_allowed"),
    ("concurrent associations", "too_many_associations"),
    ("disk", "disk_full"),
    ("out of resources", "disk_full"),
    ("cannot store", "store_failed"),
    ("presentation context", "no_presentation_context"),
)


def rejection_category(reason: str) -> str:
    lowered = reason.lower()
    for needle, category in _REJECTION_CATEGORIES:
        if needle in lowered:
            return category
    return "invalid_instance"


def ae_label(calling_ae: str) -> str:
    """A calling AE title as a label: AE titles are 16 characters of configuration; anything else is cut."""
    return re.sub(r"[^\x20-\x7e]", "?", calling_ae.strip())[:16] or "unknown"


def count_rejection(calling_ae: str, sop_instance_uid: str | None, reason: str) -> None:
    """One refused instance, or (``sop_instance_uid`` None) one refused association."""
    counter = INSTANCES_REJECTED if sop_instance_uid else ASSOCIATIONS_REFUSED
    counter.labels(rejection_category(reason), ae_label(calling_ae)).inc()


def record_gpus(queue: str) -> int:
    """Set :data:`WORKER_GPUS` for this worker: the GPUs its Keras backend sees (already imported by a worker that
    loaded models)."""
    from models.inference import gpu_count

    count = gpu_count()
    WORKER_GPUS.labels(queue).set(count)
    return count


def _seconds_since(moment: Any, now: float) -> float:
    if moment is None:
        return 0.0
    return max(0.0, now - moment.timestamp())


class StateCollector(Collector):
    """Gauges read from the database and the archive's file system at each scrape."""

    def __init__(self, settings: "Settings", database: "Database") -> None:
        self.settings = settings
        self.database = database

    def collect(self) -> Iterator[Metric]:
        yield from self._disk()
        try:
            yield from self._database_state()
        except Exception:  # the database is away: /readyz says so; the scrape still answers with the rest
            up = GaugeMetricFamily("dicom_triage_database_up", "Whether the state gauges could be read")
            up.add_metric([], 0)
            yield up

    def _disk(self) -> Iterator[Metric]:
        from dicom_io.archive import free_bytes

        free = GaugeMetricFamily("dicom_triage_disk_free_bytes", "Free bytes on the archive's file system")
        watermark = GaugeMetricFamily(
            "dicom_triage_disk_watermark_bytes", "Below this free space C-STORE answers 0xA700 (min_free_disk_mb)")
        try:
            free.add_metric([], free_bytes(self.settings.archive_dir))
        except OSError:
            pass
        watermark.add_metric([], self.settings.min_free_disk_mb * 1024 * 1024)
        yield free
        yield watermark

    def _database_state(self) -> Iterator[Metric]:
        snapshot = state_snapshot(self.database)
        up = GaugeMetricFamily("dicom_triage_database_up", "Whether the state gauges could be read")
        up.add_metric([], 1)
        yield up
        series = GaugeMetricFamily("dicom_triage_series", "Series by state (receiving, or their job's state)",
                                   labels=["state"])
        for state, count in sorted(snapshot["series"].items()):
            series.add_metric([state], count)
        yield series
        depth = GaugeMetricFamily("dicom_triage_queue_depth", "Work waiting per queue", labels=["queue"])
        age = GaugeMetricFamily("dicom_triage_queue_oldest_age_seconds", "Age of the oldest waiting item per queue",
                                labels=["queue"])
        for queue, info in sorted(snapshot["queues"].items()):
            depth.add_metric([queue], info["depth"])
            age.add_metric([queue], info["oldest_age_seconds"])
        yield depth
        yield age
        deliveries = GaugeMetricFamily("dicom_triage_sr_deliveries", "SR deliveries by destination and status",
                                       labels=["destination", "status"])
        for (destination, status), count in sorted(snapshot["deliveries"].items()):
            deliveries.add_metric([destination, status], count)
        yield deliveries
        runs = GaugeMetricFamily("dicom_triage_training_runs", "Retraining runs by state", labels=["state"])
        for state, count in sorted(snapshot["training_runs"].items()):
            runs.add_metric([state], count)
        yield runs
        models = GaugeMetricFamily("dicom_triage_active_model_info", "The active model of each task (value 1)",
                                   labels=["task", "model_uid", "name", "version"])
        for task, model in sorted(snapshot["active_models"].items()):
            models.add_metric([task, model["model_uid"], model["name"], model["version"]], 1)
        yield models
        workers = GaugeMetricFamily("dicom_triage_worker_processes", "Inference worker processes with a fresh "
                                    "heartbeat")
        workers.add_metric([], snapshot["workers"])
        yield workers


def state_snapshot(database: "Database") -> dict[str, Any]:
    """Series by state, queue depths and oldest ages, deliveries, training runs, active models, live workers: the
    numbers ``/metrics`` and ``dicom-triage status`` share. Only counts, states, task names and model identities."""
    from sqlalchemy import func, select

    from worker.db import Job, JobState, Series, SrDelivery, SrDocument, WorkerProcess
    from worker.db.registry import RegisteredModel, TrainingRun
    from worker.workers import STALE_AFTER

    with database.read_session() as session:
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        receiving = session.scalar(select(func.count()).select_from(Series).where(Series.pending.is_(True))) or 0
        oldest_job = session.scalar(select(func.min(Job.queued_at)).where(Job.state == JobState.QUEUED))
        pending = session.execute(
            select(func.count(), func.min(SrDocument.created_at))
            .select_from(SrDelivery).join(SrDocument, SrDocument.id == SrDelivery.document_pk)
            .where(SrDelivery.status == "pending")
        ).one()
        deliveries = {(d, s): n for d, s, n in session.execute(
            select(SrDelivery.destination, SrDelivery.status, func.count())
            .group_by(SrDelivery.destination, SrDelivery.status)).all()}
        runs = dict(session.execute(select(TrainingRun.state, func.count()).group_by(TrainingRun.state)).all())
        active = {m.task: {"model_uid": m.model_uid, "name": m.name, "version": m.version}
                  for m in session.scalars(select(RegisteredModel).where(RegisteredModel.state == "active"))}
        from worker.db import utcnow

        workers = session.scalar(select(func.count()).select_from(WorkerProcess)
                                 .where(WorkerProcess.heartbeat_at >= utcnow() - STALE_AFTER)) or 0
    # After the reads: a job queued while they ran is younger than now, never clipped to an age of 0.
    now = time.time()
    series = {_state_name(state): int(count) for state, count in jobs.items()}
    series["receiving"] = int(receiving)
    return {
        "series": series,
        "queues": {
            "inference": {"depth": series.get("queued", 0), "oldest_age_seconds": _seconds_since(oldest_job, now)},
            "delivery": {"depth": int(pending[0]), "oldest_age_seconds": _seconds_since(pending[1], now)},
        },
        "deliveries": {(str(d), str(s)): int(n) for (d, s), n in deliveries.items()},
        "training_runs": {str(state): int(count) for state, count in runs.items()},
        "active_models": active,
        "workers": int(workers),
    }


def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state))


def metrics_text(extra: Iterable[Collector] = ()) -> bytes:
    """The exposition text of this process (or, in multiprocess mode, of every process of the tree) and ``extra``
    collectors (:class:`StateCollector`, readiness)."""
    if os.environ.get(MULTIPROC_ENV):
        own = CollectorRegistry()
        MultiProcessCollector(own)
    else:
        own = REGISTRY
    more = CollectorRegistry()
    for collector in extra:
        more.register(collector)
    return generate_latest(own) + generate_latest(more)  # the text format allows families one after another
