"""Supervised processes live and die with their supervisor, and every process stops within a known time.

A child of ``serve`` (or of ``listen --processes N``) calls :func:`die_with_parent` first thing: on Linux the kernel
sends it SIGTERM when its parent ends, however it ended (SIGKILL, the OOM killer, a crash), through
``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread watches ``os.getppid()``. The kernel only signals a death that
happens after the call, so the parent is checked once more right after it: a child whose parent died while it was
starting exits at once instead of running as an orphan. Without this, a killed ``serve`` left its Celery workers
running (re-parented to init) beside the next ``serve``'s, consuming the same queues with stale settings.

The parent-death signal is tied to the *thread* that started the child: supervisors start their children from
their main thread, which lives as long as the process.

The stop bounds (:data:`TASK_GRACE_SECONDS`, :data:`WORKER_STOP_SECONDS`, :data:`KILL_AFTER_SECONDS`) are chosen so
that ``serve`` ends well inside a container's default grace period (10 s before Docker's SIGKILL): a Celery worker
(:class:`BoundedStop`) lets a running task finish for :data:`TASK_GRACE_SECONDS`, then hands its work back (jobs go
back to the queue through the database, as a dead worker's do) and exits; a supervisor signals all its children at
once and kills what still runs after :data:`KILL_AFTER_SECONDS`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

from worker.logs import flush_captured_output

log = logging.getLogger(__name__)

#: A task running when its worker is told to stop gets this long to finish before its job is handed back.
TASK_GRACE_SECONDS = 2.0
#: A Celery worker process has ended this long after its stop signal, whatever it was doing.
WORKER_STOP_SECONDS = 4.0
#: A supervisor kills (SIGKILL) a child that still runs this long after its SIGTERM.
KILL_AFTER_SECONDS = 6.0
#: What we promise: every dicom-triage process ends this long after SIGTERM at most (the kill above, then the
#: supervisor's own exit). docker-compose.yml's stop_grace_period is this; measured: 1-4 s.
STOP_BOUND_SECONDS = 8.0
#: How often the fallback watch (no prctl) looks at the parent.
WATCH_SECONDS = 0.5
#: Exit status of a child that found its supervisor gone before it started.
EXIT_PARENT_GONE = 3

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent ends; False where it cannot (not Linux,
    no C library with ``prctl``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM, *, use_prctl: bool = True) -> str:
    """Make this process receive ``signum`` when ``parent_pid``, its parent, ends; return how (``"prctl"`` or
    ``"watch"``). If the parent is already gone, exit now with :data:`EXIT_PARENT_GONE`.

    ``signum`` (SIGTERM) starts the process's own bounded stop, so a child that loses its parent still hands its
    work back. ``use_prctl=False`` forces the watch thread (for tests of the fallback)."""
    how = "prctl" if use_prctl and set_parent_death_signal(signum) else "watch"
    # After prctl: a parent that dies from now on is signalled by the kernel; one that died before is seen here.
    if os.getppid() != parent_pid:
        log.error("the supervising process %d is gone before this one started; exiting", parent_pid)
        logging.shutdown()
        os._exit(EXIT_PARENT_GONE)
    if how == "watch":
        threading.Thread(target=_watch_parent, args=(parent_pid, signum), name="parent-watch", daemon=True).start()
    return how


def _watch_parent(parent_pid: int, signum: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_SECONDS)
    log.error("the supervising process %d is gone; stopping", parent_pid)
    os.kill(os.getpid(), signum)


def preexec_die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that gives the child ``signum`` when this process ends (for children
    that cannot call :func:`die_with_parent` themselves). It runs in the forked child before exec; the parent-death
    signal survives the exec."""
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(signum)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(EXIT_PARENT_GONE)

    return preexec


def exit_after(seconds: float, status: int = 1, why: str = "did not stop in time") -> threading.Thread:
    """End this process with ``status`` after ``seconds`` unless it has ended by then (a stop that hangs must
    not outlive its bound). Returns the (daemon) thread."""

    def run() -> None:
        time.sleep(seconds)
        log.error("%s within %.1f s; exiting now", why, seconds)
        exit_now(status)

    thread = threading.Thread(target=run, name="exit-deadline", daemon=True)
    thread.start()
    return thread


def exit_now(status: int) -> NoReturn:
    """Flush the standard streams, the log handlers and the JSON relays, then end this process with ``status`` at once, skipping
    the interpreter's teardown. For a process whose stop has closed what it holds (files fsynced, sessions
    committed or rolled back): tearing down the ~1000 modules a listener or worker imports took 2-4 s on a loaded
    2-core machine after a stop that itself took 0.3 s, half of a child's stop bound."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    flush_captured_output()  # with JSON logs, what others wrote to fds 1 and 2 (an atexit hook, which _exit skips)
    os._exit(status)


class BoundedStop:
    """Ends a Celery worker process within :data:`WORKER_STOP_SECONDS` of its stop signal.

    Celery's warm shutdown waits for running tasks however long they take (a retraining run takes an hour) and,
    even when idle, takes 2-4 s (its consumer loop polls in 2 s steps, then the interpreter and TensorFlow tear
    down). :meth:`begin`, called when the warm shutdown starts, lets a running task finish for
    :data:`TASK_GRACE_SECONDS`, then calls ``handback`` with its deadline (a ``time.monotonic()``: release the jobs
    this process holds, so the scheduler queues them again; make what it can of the rest by then) and exits with
    status 0. What the handback
    does not finish is done by the next worker's start, as after a crash: the database, not Celery's messages,
    is what keeps pending work (see :mod:`worker.workers`).
    """

    def __init__(self, busy: Callable[[], bool], handback: Callable[[float], None], *,
                 grace: float = TASK_GRACE_SECONDS, limit: float = WORKER_STOP_SECONDS) -> None:
        self.busy = busy
        self.handback = handback
        self.grace = grace
        self.limit = limit
        self._lock = threading.Lock()
        self._started = False

    def begin(self) -> None:
        """Start the bounded stop (once; safe to call from a signal handler)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        exit_after(self.limit, status=1, why="the worker's hand-back did not end")
        threading.Thread(target=self._run, name="bounded-stop", daemon=True).start()

    def _run(self) -> None:
        start = time.monotonic()
        while self.busy() and time.monotonic() - start < self.grace:
            time.sleep(0.02)
        if self.busy():
            log.warning("a task still runs %.1f s after the stop signal; handing its work back", self.grace)
        try:
            self.handback(start + self.limit - 0.5)  # half a second is kept for the exit itself
        except Exception:
            log.exception("hand-back on stop failed; the next start recovers the work")
        log.info("stopped %.1f s after the stop signal", time.monotonic() - start)
        exit_now(0)


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), which with the pid names one
    process (pids are reused); ``None`` if it is gone or there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, field 2, is in parentheses and may hold spaces: the fields after its last ')' are fixed.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # a zombie has ended; it only waits for its parent to read its status
        return None
    return int(fields[19])


def stop_processes(pids: Iterable[int], timeout: float = KILL_AFTER_SECONDS) -> list[int]:
    """SIGTERM (and SIGCONT, for a stopped one) to every process in ``pids`` at once, SIGKILL to those still running
    after ``timeout`` s; return the pids that had to be killed. For processes that are not our children (we cannot
    wait for them): ended means gone from ``/proc`` or a zombie."""
    started = {pid: process_start_time(pid) for pid in pids}
    running = {pid for pid, start in started.items() if start is not None}
    for pid in running:
        for signum in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def alive(pid: int) -> bool:
        return process_start_time(pid) == started[pid]

    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        running = {pid for pid in running if alive(pid)}
        time.sleep(0.05)
    killed = sorted(pid for pid in running if alive(pid))
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


__all__ = [
    "EXIT_PARENT_GONE",
    "KILL_AFTER_SECONDS",
    "STOP_BOUND_SECONDS",
    "TASK_GRACE_SECONDS",
    "WORKER_STOP_SECONDS",
    "BoundedStop",
    "die_with_parent",
    "exit_after",
    "exit_now",
    "preexec_die_with_parent",
    "process_start_time",
    "set_parent_death_signal",
    "stop_processes",
]
