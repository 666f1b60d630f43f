"""The DICOM receiving side of ``listen`` and ``serve``: one listener in this process, or several processes sharing
the port.

A :class:`Receiver` is a :class:`~dicom_io.listener.StorageListener` with its own :class:`~worker.ingest.DatabaseSink`.
With ``listen_processes`` N > 1, a :class:`ListenerGroup` binds the port itself and starts N child processes, each
a Receiver accepting on that one listening socket, so ingest is no longer bound to one core by the GIL. A new
association goes to a child that is free to accept it: the busy ones are slower to wake, a stopped or hung one
takes none, and connections waiting while a child restarts stay queued on the socket. (SO_REUSEPORT, used before,
hands each connection to one child by a hash of the peer's port: 8 associations split 6 to 2 in some runs, and those
hashed to a stuck child waited on it.) Each child accepts up to ``max_associations``, as a single listener does, so a
burst of up to that many is never refused for landing unevenly; the group may hold up to N x max. The parent
(which keeps the series scheduler) restarts a child that dies; a restarted child's sink re-records what the dead
one may have left without a row (its ``.ingest-open-<pid>`` marker names a process that is gone).

Children are spawned, not forked: the parent already runs threads (scheduler, web) and holds database connections;
the listening socket is passed to them. A second ``dicom-triage`` on the same port fails with "address in use".

With ``dicom_tls_port`` each Receiver runs a second listener, on the TLS port, sharing its sink (and the group a
second listening socket); ``dicom_plain = false`` leaves the TLS one alone. Its certificate files are read at start:
a missing or mismatched file is a :class:`~worker.errors.StartupError` naming it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import ssl
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent

from config import Settings
from dicom_io.archive import Archive
from dicom_io.listener import StorageListener
from dicom_io.tls import TLSConfigError, server_context
from worker.db import Database
from worker.errors import StartupError
from worker.ingest import DatabaseSink
from worker.lifetime import KILL_AFTER_SECONDS, die_with_parent, exit_after, exit_now
from worker.logs import configure_logging

log = logging.getLogger(__name__)

#: A child that started less than this long ago is not restarted yet (a child failing at once does not spin).
RESTART_SECONDS = 3.0
#: How long the group waits for all children to listen at start.
START_TIMEOUT_SECONDS = 120.0
#: How long a stopping listener lets the stores in flight finish before it closes its sink (their associations
#: were aborted: the peer sends again what was not acknowledged).
SINK_CLOSE_SECONDS = 2.0


class Receiver:
    """A listener and its database sink in this process.

    The sink has its own engine with relaxed commits on SQLite (see :mod:`worker.ingest`): its archive files are
    fsynced before each commit, and a start after an unclean end re-records any file whose row was lost.
    """

    def __init__(self, settings: Settings, *, listening_socket: socket.socket | None = None,
                 tls_listening_socket: socket.socket | None = None) -> None:
        self.settings = settings
        tls = dicom_tls_context(settings)  # before anything is opened: a bad file ends the start here
        self._database = Database(settings.effective_database_url, durable_commits=False)
        archive = Archive(settings.archive_dir, files_ahead=settings.archive_files_ahead)
        self.sink = DatabaseSink(archive, self._database)
        common = dict(ae_title=settings.ae_title, host=settings.dicom_host, sink=self.sink,
                      allowed_calling_aes=settings.allowed_calling_aes, max_associations=settings.max_associations,
                      min_free_bytes=settings.min_free_disk_mb * 1024 * 1024, archive_root=settings.archive_dir,
                      required_subjects=settings.dicom_tls_subjects)
        #: The plain listener (if ``dicom_plain``), then the TLS one (if ``dicom_tls_port``).
        self.listeners: list[StorageListener] = []
        if settings.dicom_plain:
            self.listeners.append(StorageListener(port=settings.dicom_port, listening_socket=listening_socket,
                                                  **common))  # type: ignore[arg-type]
        if tls is not None and settings.dicom_tls_port is not None:
            self.listeners.append(StorageListener(port=settings.dicom_tls_port, ssl_context=tls,
                                                  listening_socket=tls_listening_socket,
                                                  **common))  # type: ignore[arg-type]

    @property
    def listener(self) -> StorageListener:
        """The first listener: the plain one, or the TLS one when it is alone."""
        return self.listeners[0]

    def start(self) -> None:
        try:
            self.sink.open()  # before the first association: recovery, then this process's marker
        except OSError as exc:
            raise StartupError(f"cannot use archive {self.settings.archive_dir}: {exc}") from exc
        for listener in self.listeners:
            try:
                listener.start()
            except OSError as exc:
                for started in self.listeners:
                    started.stop()
                where = f"{self.settings.dicom_host}:{listener.port}"
                raise StartupError(f"cannot listen for DICOM on {where}: {exc.strerror or exc}") from exc

    def stop(self) -> None:
        for listener in self.listeners:
            listener.stop()
        self.sink.close(timeout=SINK_CLOSE_SECONDS)
        self.sink.archive.close()
        self._database.dispose()


def dicom_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS listener's context from the settings, or None without ``dicom_tls_port``; a file that is missing or
    does not match is a :class:`StartupError` naming it."""
    if settings.dicom_tls_port is None:
        return None
    assert settings.dicom_tls_cert is not None and settings.dicom_tls_key is not None  # Settings checks
    try:
        return server_context(settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca,
                              settings.require_client_certificate)
    except TLSConfigError as exc:
        raise StartupError(f"cannot listen for DICOM TLS on port {settings.dicom_tls_port}: {exc}") from None


def _child_main(settings: Settings, index: int, ready: ProcessEvent, parent: int,
                listening_socket: socket.socket | None, tls_listening_socket: socket.socket | None) -> None:
    """A listener child: serve until SIGTERM or SIGINT (the parent, Ctrl-C on the process group, or the kernel when
    the parent ``parent`` is gone: an orphan would keep the shared socket open, and a restarted service could not
    bind), then stop within :data:`~worker.lifetime.KILL_AFTER_SECONDS`."""
    configure_logging(role=f"listener-{index}", text_format=f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    die_with_parent(parent)  # after the handler: the parent's death is a SIGTERM like any other
    try:
        # Each takes the whole limit (module's note).
        receiver = Receiver(settings, listening_socket=listening_socket, tls_listening_socket=tls_listening_socket)
        receiver.start()
    except StartupError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    ready.set()
    try:
        # In steps: Python runs a signal's handler in the main thread, and a signal the kernel delivered to another
        # thread does not interrupt a wait without a timeout.
        while not stop.wait(0.5):
            pass
    finally:
        exit_after(KILL_AFTER_SECONDS, why="the listener process did not stop")  # a stop that hangs ends anyway
        receiver.stop()
    exit_now(0)  # its sink and archive are closed: nothing is left for the interpreter's slow teardown to do


class _Child:
    """One listener process of the group (a new process each time it is started)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.ready: ProcessEvent | None = None
        self.started = 0.0
        self.announced = False  # its listening was logged (after a restart)


class ListenerGroup:
    """``settings.listen_processes`` listener processes on one port, supervised from this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._children = [_Child(index) for index in range(settings.listen_processes)]
        self._socket: socket.socket | None = None
        self._tls_socket: socket.socket | None = None

    @property
    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children if c.process is not None and c.process.pid is not None]

    def _spawn(self, child: _Child) -> None:
        child.ready = self._context.Event()
        child.process = self._context.Process(
            target=_child_main,
            args=(self.settings, child.index, child.ready, os.getpid(), self._socket, self._tls_socket),
            name=f"listener-{child.index}",
            daemon=False,
        )
        child.process.start()
        child.started = time.monotonic()
        child.announced = False

    def start(self) -> None:
        """Bind the port, start every child and return once all listen; :class:`StartupError` if the port cannot
        be bound or a child exits first (the others are stopped)."""
        dicom_tls_context(self.settings)  # a bad certificate file is reported here, not by every child
        if self.settings.dicom_plain:
            self._socket = _listening_socket(self.settings.dicom_host, self.settings.dicom_port)
        if self.settings.dicom_tls_port is not None:
            try:
                self._tls_socket = _listening_socket(self.settings.dicom_host, self.settings.dicom_tls_port)
            except StartupError:
                self.stop()
                raise
        for child in self._children:
            self._spawn(child)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            for child in self._children:
                assert child.process is not None and child.ready is not None
                while not child.ready.wait(0.1):
                    if not child.process.is_alive():
                        raise StartupError(
                            f"listener process {child.index} exited with {child.process.exitcode} before listening"
                            " (its error is logged above)"
                        )
                    if time.monotonic() > deadline:
                        raise StartupError(f"listener process {child.index} not listening after "
                                           f"{START_TIMEOUT_SECONDS:.0f} s")
                child.announced = True
        except StartupError:
            self.stop()
            raise

    def alive(self) -> int:
        """How many listener processes run now."""
        return sum(1 for c in self._children if c.process is not None and c.process.is_alive())

    def ensure_running(self) -> None:
        """Restart any child that has died (at most every :data:`RESTART_SECONDS`); log when a restarted one
        listens again. Call often from the supervising loop."""
        for child in self._children:
            process = child.process
            if process is None:
                continue
            if process.is_alive():
                if not child.announced and child.ready is not None and child.ready.is_set():
                    child.announced = True
                    log.info("listener process %d listening again (pid %d)", child.index, process.pid)
                continue
            if time.monotonic() - child.started < RESTART_SECONDS:
                continue
            log.error("listener process %d (pid %s) exited with %s; restarting it", child.index, process.pid,
                      process.exitcode)
            process.close()
            self._spawn(child)

    def stop(self) -> None:
        """SIGTERM to every child at once, then wait for them (killed after
        :data:`~worker.lifetime.KILL_AFTER_SECONDS`)."""
        running = [c.process for c in self._children if c.process is not None and c.process.is_alive()]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + KILL_AFTER_SECONDS
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("listener process pid %s did not stop within %.0f s; killing it", process.pid,
                          KILL_AFTER_SECONDS)
                process.kill()
                process.join()
        for child in self._children:
            child.process = None
        for sock in (self._socket, self._tls_socket):
            if sock is not None:
                sock.close()
        self._socket = self._tls_socket = None


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, for the children to accept on."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        # A backlog for a PACS's burst of associations while every child is busy (socketserver's default is 5).
        return socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
    except OSError as exc:
        raise StartupError(f"cannot listen for DICOM on {host}:{port}: {exc.strerror or exc}") from exc


__all__ = ["ListenerGroup", "Receiver"]
