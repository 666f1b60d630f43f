"""The long-running processes: ``listen`` (listener + scheduler), ``worker`` (Celery) and ``serve`` (both).

Each process brings the database schema up to date at start. ``serve`` runs the listener and scheduler in itself
and the Celery workers as child processes (TensorFlow stays out of the listener; a crashed worker is restarted).
The children end with ``serve`` however it ends (:mod:`worker.lifetime`), and one ``serve`` or ``listen`` runs per
data directory (:mod:`worker.runlock`). SIGTERM and SIGINT shut every part down within a bound: the workers are
told first and all at once, the listener stops accepting and its sink is flushed meanwhile, a task still running
after a short grace has its job handed back to the queue, and what still runs after
:data:`~worker.lifetime.KILL_AFTER_SECONDS` is killed (its jobs are re-queued as a dead worker's are).
"""

from __future__ import annotations

import logging
import os
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
from worker.backfill import BackfillRunner, is_backfill_job
from worker.backfill_dicomweb import DicomwebRetriever
from worker.celery_app import INFERENCE_QUEUE, INFERENCE_QUEUES, create_celery_app, make_enqueue, run_celery_worker
from worker.db import Database, upgrade_database
from worker.delivery import DELIVERY_QUEUE, run_delivery_worker
from worker.errors import StartupError
from worker.health import ProcessHealth, Readiness, dicom_port_check, models_check, standard_checks
from worker.ingest import DatabaseSink
from worker.lifetime import KILL_AFTER_SECONDS
from worker.metrics import record_gpus
from worker.multiproc import remove_stale_multiprocess_dirs
from worker.listeners import ListenerGroup, Receiver
from worker.registry import active_model_dirs, register_installed_models
from worker.reporting import publish_missing
from worker.runlock import SupervisorLock
from worker.series import SeriesScheduler
from worker.workers import WorkerRegistration, worker_registered

log = logging.getLogger(__name__)

#: How long a stopping ``serve`` waits for its web server's open connections.
WEB_STOP_SECONDS = 2.0


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
        self.scheduler = SeriesScheduler(settings, database, make_enqueue(
            create_celery_app(settings), lambda job_id: is_backfill_job(database, job_id)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.scheduler.run, args=(self._stop,), name="scheduler", daemon=True)
        # Backfill retrievals C-MOVE to our own AE: they run where the listener does (WADO-RS ones store directly).
        runner = BackfillRunner(settings, database, dicomweb=DicomwebRetriever(settings, database))
        self._backfill = threading.Thread(target=runner.run, args=(self._stop,), name="backfill", daemon=True)

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
        self._backfill.start()

    def supervise(self) -> None:
        """Restart a listener process that died (call every half second or so)."""
        if self.group is not None:
            self.group.ensure_running()

    @property
    def child_pids(self) -> list[int]:
        """The listener processes' pids (none with a single listener in this process)."""
        return self.group.pids if self.group is not None else []

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.group is not None:
            self.group.stop()
        self._stop.set()
        if self._thread.ident is not None:  # started; a round in progress ends first (a daemon thread past that)
            self._thread.join(timeout=KILL_AFTER_SECONDS)
        if self._backfill.ident is not None:  # a C-MOVE under way is cut by the exit; its series is moved again
            self._backfill.join(timeout=1.0)

    def accepting(self) -> str:
        """Why associations cannot be taken now (``""``: they can), from this process's own state."""
        if self.receiver is not None:
            return "" if self.receiver.listener.serving else "the listener is not serving"
        assert self.group is not None
        alive = self.group.alive()
        return "" if alive == self.settings.listen_processes else (
            f"{alive} of {self.settings.listen_processes} listener processes running")

    def _ports(self) -> list[tuple[int, bool]]:
        """(port, over TLS) of each listener: the bound ones in this process, else as configured."""
        if self.receiver is not None:
            return [(listener.port, listener.ssl_context is not None) for listener in self.receiver.listeners]
        ports = [(self.settings.dicom_port, False)] if self.settings.dicom_plain else []
        if self.settings.dicom_tls_port is not None:
            ports.append((self.settings.dicom_tls_port, True))
        return ports

    def dicom_port(self) -> int:
        """The port associations are accepted on (the bound one, when the settings asked for 0): the plain one, or
        the TLS one when it is alone."""
        return self._ports()[0][0]

    def describe(self) -> str:
        ports = " and ".join(f"{port}{' (TLS)' if tls else ''}" for port, tls in self._ports())
        where = f"DICOM {self.settings.ae_title}@{self.settings.dicom_host}:{ports}"
        if self.group is None:
            return where
        pids = ", ".join(map(str, self.group.pids))
        return f"{where} ({self.settings.listen_processes} listener processes, pids {pids})"


def _ready(message: str) -> None:
    print(f"dicom-triage ready: {message}", flush=True)


def listener_readiness(role: str, settings: Settings, database: Database, ingest: Ingest) -> Readiness:
    """Database, broker, archive and the DICOM port accepting: a listener's (and ``serve``'s) readiness."""
    return Readiness(role, [*standard_checks(settings, database),
                            dicom_port_check(ingest.dicom_port, ingest.accepting)])


def run_listen(settings: Settings) -> int:
    """``dicom-triage listen``: receive, archive, record, and schedule series until signalled."""
    stop = stop_on_signals()
    database = open_database(settings)
    lock = SupervisorLock(settings.data_dir, "listen")
    try:
        lock.acquire()
        remove_stale_multiprocess_dirs(settings.data_dir / "run")
        ingest = Ingest(settings, database)
        health: ProcessHealth | None = None
        try:
            ingest.start()
            lock.record(ingest.child_pids)
            health = ProcessHealth(settings, listener_readiness("listen", settings, database, ingest)).start()
            _ready(f"{ingest.describe()}, data {settings.data_dir}")
            while not stop.wait(0.5):
                ingest.supervise()
                lock.record(ingest.child_pids)
        finally:
            if health is not None:
                health.stop()
            ingest.stop()
        lock.release()
    finally:
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
    context = WorkerContext(settings, database, models, registration.id)
    register_tasks(app, context)
    tasks = sorted({get_task(rule.task).name for rule in settings.routing_rules})
    readiness = Readiness("worker", [*standard_checks(settings, database), models_check(models.loaded_models, tasks)])
    record_gpus(INFERENCE_QUEUE)
    health = ProcessHealth(settings, readiness).start()

    def handback(deadline: float) -> None:
        # First the jobs this process holds (a task still running included): without its row they are orphans,
        # which the scheduler queues again at once. Then the SRs still waiting, as many as the time allows; the
        # next worker's start makes the rest (publish_missing).
        registration.close()
        if not context.sr_queue.drain(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("stopping with SRs still to make; the next worker start makes them")

    try:
        return run_celery_worker(app, "inference", INFERENCE_QUEUES, pool="threads",
                                 concurrency=settings.worker_concurrency, handback=handback)
    finally:
        health.stop()
        registration.close()
        database.dispose()


def worker_command(settings: Settings, config_file: Path | None, queue: str = INFERENCE_QUEUE) -> list[str]:
    """The command line of a ``dicom-triage worker`` child with the same settings as this process, which ends
    with it (``--supervisor-pid``)."""
    command = [sys.executable, "-m", "worker.cli", "worker", "--data-dir", str(settings.data_dir), "--queue", queue]
    command += ["--ae-title", settings.ae_title, "--supervisor-pid", str(os.getpid())]
    for destination in settings.sr_destinations:
        command += ["--sr-destination", str(destination)]
    if config_file is not None:
        command += ["--config", str(config_file)]
    return command


def training_worker_command(settings: Settings, config_file: Path | None) -> list[str]:
    """The command line of a ``dicom-triage training-worker`` child (the ``training`` queue's retraining runs)."""
    command = [sys.executable, "-m", "worker.cli", "training-worker", "--data-dir", str(settings.data_dir),
               "--supervisor-pid", str(os.getpid())]
    if config_file is not None:
        command += ["--config", str(config_file)]
    return command


class WorkerChild:
    """A ``dicom-triage worker`` subprocess, restarted if it dies (at most every few seconds). Started from the
    main thread only: its parent-death signal fires when the thread that started it ends (:mod:`worker.lifetime`)."""

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
        # One port per host: serve's children report through their status files and serve's web app, not a port.
        self.process = subprocess.Popen(self.command, env={**os.environ, "DICOM_TRIAGE_HEALTH_PORT": "0"})
        self._started = time.monotonic()

    def signal_stop(self) -> None:
        """SIGTERM, without waiting: the worker's bounded stop begins (see :func:`stop_children`)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


def stop_children(children: Sequence[WorkerChild], deadline: float) -> None:
    """Wait until every child (already signalled) has ended, killing those still running at ``deadline`` (a
    ``time.monotonic()``); a killed worker's jobs are re-queued as a dead worker's are."""
    for child in children:
        process = child.process
        if process is None:
            continue
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop within %.0f s; killing it", process.pid, KILL_AFTER_SECONDS)
            process.kill()
            process.wait()


def run_serve(settings: Settings, config_file: Path | None) -> int:
    """``dicom-triage serve``: listener, scheduler and the web worklist in this process; a worker child, an SR
    delivery child and a training child (retraining runs); prints one line when all are up."""
    stop = stop_on_signals()
    database = open_database(settings)
    lock = SupervisorLock(settings.data_dir, "serve")
    try:
        lock.acquire()
        remove_stale_multiprocess_dirs(settings.data_dir / "run")
        _serve(settings, config_file, database, lock, stop)
        lock.release()
    finally:
        database.dispose()
    return 0


def _serve(settings: Settings, config_file: Path | None, database: Database, lock: SupervisorLock,
           stop: threading.Event) -> None:
    from worker.web.cli import start_in_thread

    ingest = Ingest(settings, database)
    child = WorkerChild(worker_command(settings, config_file))
    delivery = WorkerChild(worker_command(settings, config_file, DELIVERY_QUEUE))
    training = WorkerChild(training_worker_command(settings, config_file))
    workers = [child, delivery, training]

    def record() -> None:
        lock.record([*ingest.child_pids, *(w.pid for w in workers if w.pid is not None)])

    web = web_thread = None
    ready = False
    health: ProcessHealth | None = None
    try:
        ingest.start()
        readiness = listener_readiness("serve", settings, database, ingest)
        web, web_thread = start_in_thread(settings, database, readiness=readiness)
        health = ProcessHealth(settings.model_copy(update={"health_port": 0}), readiness,
                               url=settings.web_url).start()
        for worker in workers:
            worker.ensure_running()
        record()
        while not stop.wait(0.5):
            if not web_thread.is_alive():  # uvicorn ends its thread when it cannot bind
                raise StartupError(f"cannot serve the web worklist on {settings.web_host}:{settings.web_port}")
            if not ready and web.started and child.pid is not None and worker_registered(database, child.pid):
                ready = True
                _ready(f"{ingest.describe()}, web {settings.web_url}, worker pid {child.pid}, data {settings.data_dir}")
            ingest.supervise()
            for worker in workers:
                worker.ensure_running()
            record()
    finally:
        # The workers first and all at once: theirs is the longest stop (a running task's grace, then the
        # hand-back), and it runs while the listener stops accepting and its sink is flushed here.
        stopping = time.monotonic()
        for worker in workers:
            worker.signal_stop()
        if health is not None:
            health.stop()
        ingest.stop()
        if web is not None and web_thread is not None:
            web.should_exit = True
            web_thread.join(timeout=WEB_STOP_SECONDS)  # a daemon thread: a client holding a connection is cut
        stop_children(workers, stopping + KILL_AFTER_SECONDS)
        log.info("stopped %.1f s after the stop signal", time.monotonic() - stopping)


__all__ = ["Ingest", "run_listen", "run_serve", "run_worker"]
