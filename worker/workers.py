"""Live worker processes, each with a heartbeat in the database.

A job in state ``running`` names the worker process that holds it. When that process stops heartbeating (it was
killed, or its machine went away) the scheduler puts the job back on the queue: this, not the broker, is what
makes pending work survive a crash, since Celery's filesystem broker forgets a message once it is fetched.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from sqlalchemy import delete, select, update

from dicom_io.archive import process_running
from worker.db import Database, Job, WorkerProcess, utcnow

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
#: A worker whose heartbeat is older than this is dead; its running jobs are re-queued.
STALE_AFTER = timedelta(seconds=6 * HEARTBEAT_SECONDS)


def other_process_alive(pid: int) -> bool:
    """Whether a process other than this one runs on this host with ``pid``. Our own pid counts as gone: it was
    recorded by an earlier process (before a container restart, pids start over)."""
    return pid != os.getpid() and process_running(pid)


class WorkerRegistration:
    """This process's row in ``worker_processes``, kept fresh by a heartbeat thread until :meth:`close`."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.hostname = socket.gethostname()[:255]
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._closing = threading.Lock()
        self._closed = False
        self._forget_dead_local_workers()
        with database.session() as session:
            row = WorkerProcess(hostname=self.hostname, pid=self.pid)
            session.add(row)
            session.flush()
            self.id: int = row.id
        self._thread = threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def _forget_dead_local_workers(self) -> None:
        # A previous worker on this host whose process is gone (or whose pid we now have, after a container
        # restart) is dead: release its jobs now rather than after STALE_AFTER.
        with self.database.session() as session:
            rows = session.scalars(select(WorkerProcess).where(WorkerProcess.hostname == self.hostname)).all()
            dead = [row.id for row in rows if not other_process_alive(row.pid)]
            if dead:
                session.execute(update(Job).where(Job.worker_pk.in_(dead)).values(worker_pk=None))
                session.execute(delete(WorkerProcess).where(WorkerProcess.id.in_(dead)))
                log.info("released jobs of %d dead worker process(es) on this host", len(dead))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                with self.database.session() as session:
                    session.execute(
                        update(WorkerProcess).where(WorkerProcess.id == self.id).values(heartbeat_at=utcnow())
                    )
            except Exception:  # the database may be briefly away; the next beat tries again
                log.exception("worker heartbeat failed")

    def close(self) -> None:
        """Stop the heartbeat and remove the row; jobs this process still holds become orphans at once. Once: a
        stopping worker may call it from its hand-back while its main thread ends (see :mod:`worker.lifetime`)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._close()

    def _close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_SECONDS)
        with self.database.session() as session:
            session.execute(update(Job).where(Job.worker_pk == self.id).values(worker_pk=None))
            session.execute(delete(WorkerProcess).where(WorkerProcess.id == self.id))


def worker_registered(database: Database, pid: int) -> bool:
    """True once the worker process ``pid`` on this host has registered (``serve`` reports readiness on it)."""
    with database.session() as session:
        found = session.scalar(
            select(WorkerProcess.id)
            .where(WorkerProcess.hostname == socket.gethostname()[:255], WorkerProcess.pid == pid)
            .limit(1)
        )
        return found is not None
