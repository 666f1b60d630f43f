"""The long-running processes: ``listen`` (listener + scheduler), ``worker`` (Celery) and ``serve`` (both).

Each process brings the database schema up to date at start. ``serve`` runs the listener and scheduler in itself
and the Celery worker as a child process (TensorFlow stays out of the listener; a crashed worker is restarted).
SIGTERM and SIGINT shut every part down cleanly: the listener stops accepting, the worker finishes (Celery's warm
shutdown) or, if killed, leaves its jobs to be re-queued.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from config import Settings
from dicom_io.archive import Archive
from models.tasks import get_task
from worker.celery_app import INFERENCE_QUEUE, create_celery_app, make_enqueue, run_celery_worker
from worker.db import Database, upgrade_database
from worker.delivery import DELIVERY_QUEUE, run_delivery_worker
from worker.errors import StartupError
from worker.ingest import DatabaseSink
from worker.listeners import ListenerGroup, Receiver
from worker.registry import active_model_dirs, register_installed_models
from worker.reporting import publish_missing
from worker.series import SeriesScheduler
from worker.workers import WorkerRegistration, worker_registered

log = logging.getLogger(__name__)

#: Seconds a worker gets to finish its task on shutdown before it is killed (its job is then re-queued).
WORKER_SHUTDOWN_SECONDS = 60.0


def open_database(settings: Settings) -> Database:
    """The database, migrated; :class:`StartupError` if the data directory or the database cannot be used."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        database = Database(settings.effective_database_url)
        upgrade_database(database)
    except OSError as exc:
        raise StartupError(f"cannot use data directory {settings.data_dir}: {exc}") from exc
    except OperationalError as exc:
        raise StartupError(f"cannot open database {_safe_url(settings.effective_database_url)}: {exc.orig}") from exc
    return database


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (installed in the main thread)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


class Ingest:
    """The receiving side (a :class:`Receiver` in this process, or with ``listen_processes`` > 1 a supervised
    :class:`ListenerGroup` of processes) and the series scheduler (a background thread of this process).

    The listeners' sinks commit with relaxed durability on SQLite (see :mod:`worker.ingest`); every other writer,
    the scheduler included, keeps synchronous commits.
    """

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self.receiver = Receiver(settings) if settings.listen_processes == 1 else None
        self.group = ListenerGroup(settings) if settings.listen_processes > 1 else None
        self.scheduler = SeriesScheduler(settings, database, make_enqueue(create_celery_app(settings)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.scheduler.run, args=(self._stop,), name="scheduler", daemon=True)

    def start(self) -> None:
        if self.receiver is not None:
            self.receiver.start()
        else:
            assert self.group is not None
            # Recover what an earlier unclean end left once, here, before the children start (each would).
            try:
                DatabaseSink(Archive(self.settings.archive_dir), self.database).open()
            except OSError as exc:
                raise StartupError(f"cannot use archive {self.settings.archive_dir}: {exc}") from exc
            self.group.start()
        self._thread.start()

    def supervise(self) -> None:
        """Restart a listener process that died (call every half second or so)."""
        if self.group is not None:
            self.group.ensure_running()

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.group is not None:
            self.group.stop()
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)

    def describe(self) -> str:
        port = self.receiver.listener.port if self.receiver is not None else self.settings.dicom_port
        where = f"DICOM {self.settings.ae_title}@{self.settings.dicom_host}:{port}"
        if self.group is None:
            return where
        pids = ", ".join(map(str, self.group.pids))
        return f"{where} ({self.settings.listen_processes} listener processes, pids {pids})"


def _ready(message: str) -> None:
    print(f"dicom-triage ready: {message}", flush=True)


def run_listen(settings: Settings) -> int:
    """``dicom-triage listen``: receive, archive, record, and schedule series until signalled."""
    stop = stop_on_signals()
    database = open_database(settings)
    ingest = Ingest(settings, database)
    try:
        ingest.start()
        _ready(f"{ingest.describe()}, data {settings.data_dir}")
        while not stop.wait(0.5):
            ingest.supervise()
    finally:
        ingest.stop()
        database.dispose()
    return 0


def run_worker(settings: Settings, queue: str = INFERENCE_QUEUE) -> int:
    """``dicom-triage worker``: a Celery worker on the inference queue, models loaded once, until signalled;
    with ``queue`` ``delivery``, the SR delivery worker instead (:func:`worker.delivery.run_delivery_worker`)."""
    if queue == DELIVERY_QUEUE:
        return run_delivery_worker(settings)
    # Imported here: they bring TensorFlow, which the listener process never needs.
    from worker.inference import ModelCache
    from worker.tasks import WorkerContext, register_tasks

    database = open_database(settings)
    # The installed models become each task's first active model; later jobs follow the registry's active one.
    register_installed_models(database, settings)
    models = ModelCache(settings.models_dir, active_dir=active_model_dirs(database))
    for task in sorted({rule.task for rule in settings.routing_rules}):
        # Load at start so the first series does not wait for it; a task without a model fails its jobs.
        try:
            models.get(get_task(task).name)
        except (OSError, ValueError) as exc:
            log.error("no usable model for %s: %s", task, exc)
    if made := publish_missing(database, settings):
        log.info("made %d SR(s) missing for earlier results", made)
    registration = WorkerRegistration(database)
    app = create_celery_app(settings)
    register_tasks(app, WorkerContext(settings, database, models, registration.id))
    try:
        return run_celery_worker(app, "inference", INFERENCE_QUEUE, pool="threads",
                                 concurrency=settings.worker_concurrency)
    finally:
        registration.close()
        database.dispose()


def worker_command(settings: Settings, config_file: Path | None, queue: str = INFERENCE_QUEUE) -> list[str]:
    """The command line of a ``dicom-triage worker`` child with the same settings as this process."""
    command = [sys.executable, "-m", "worker.cli", "worker", "--data-dir", str(settings.data_dir), "--queue", queue]
    command += ["--ae-title", settings.ae_title]
    for destination in settings.sr_destinations:
        command += ["--sr-destination", str(destination)]
    if config_file is not None:
        command += ["--config", str(config_file)]
    return command


def training_worker_command(settings: Settings, config_file: Path | None) -> list[str]:
    """The command line of a ``dicom-triage training-worker`` child (the ``training`` queue's retraining runs)."""
    command = [sys.executable, "-m", "worker.cli", "training-worker", "--data-dir", str(settings.data_dir)]
    if config_file is not None:
        command += ["--config", str(config_file)]
    return command


class WorkerChild:
    """A ``dicom-triage worker`` subprocess, restarted if it dies (at most every few seconds)."""

    RESTART_SECONDS = 3.0

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.process: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def ensure_running(self) -> None:
        if self.process is not None:
            if self.process.poll() is None or time.monotonic() - self._started < self.RESTART_SECONDS:
                return
            log.error("worker process exited with %s; restarting it", self.process.returncode)
        self.process = subprocess.Popen(self.command)
        self._started = time.monotonic()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=WORKER_SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            log.error("worker did not stop within %.0f s; killing it", WORKER_SHUTDOWN_SECONDS)
            self.process.kill()
            self.process.wait()


def run_serve(settings: Settings, config_file: Path | None) -> int:
    """``dicom-triage serve``: listener, scheduler and the web worklist in this process; a worker child, an SR
    delivery child and a training child (retraining runs); prints one line when all are up."""
    from worker.web.cli import start_in_thread

    stop = stop_on_signals()
    database = open_database(settings)
    ingest = Ingest(settings, database)
    child = WorkerChild(worker_command(settings, config_file))
    delivery = WorkerChild(worker_command(settings, config_file, DELIVERY_QUEUE))
    training = WorkerChild(training_worker_command(settings, config_file))
    web = web_thread = None
    ready = False
    try:
        ingest.start()
        web, web_thread = start_in_thread(settings, database)
        child.ensure_running()
        delivery.ensure_running()
        training.ensure_running()
        while not stop.wait(0.5):
            if not web_thread.is_alive():  # uvicorn ends its thread when it cannot bind
                raise StartupError(f"cannot serve the web worklist on {settings.web_host}:{settings.web_port}")
            if not ready and web.started and child.pid is not None and worker_registered(database, child.pid):
                ready = True
                web_url = f"http://{settings.web_host}:{settings.web_port}"
                _ready(f"{ingest.describe()}, web {web_url}, worker pid {child.pid}, data {settings.data_dir}")
            ingest.supervise()
            child.ensure_running()
            delivery.ensure_running()
            training.ensure_running()
    finally:
        ingest.stop()
        if web is not None and web_thread is not None:
            web.should_exit = True
            web_thread.join(timeout=10)
        child.stop()
        delivery.stop()
        training.stop()
        database.dispose()
    return 0


__all__ = ["Ingest", "run_listen", "run_serve", "run_worker"]
