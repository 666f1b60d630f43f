"""One supervising process (``serve`` or ``listen``) per data directory on a host, and what it leaves behind.

The supervisor holds an exclusive ``flock`` on ``data_dir/run/<host>.lock`` for its lifetime (the kernel drops it
however the process ends) and keeps ``data_dir/run/<host>.json`` naming itself and its children, each by pid and
start time (a pid alone may since name another process). A second ``serve`` or ``listen`` on the same data
directory is refused while the lock is held, instead of running a second set of listeners and workers. A start that
takes the lock stops the children the previous holder recorded that still run (left by a supervisor that died where
the parent-death signal did not reach them, or stopped with SIGSTOP) before starting its own.

Per host: listeners and workers on several machines may share one data directory (NFS), and each host's
supervisor can only see and stop its own processes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.errors import StartupError
from worker.lifetime import KILL_AFTER_SECONDS, process_start_time, stop_processes

log = logging.getLogger(__name__)


def _host_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


class SupervisorLock:
    """The data directory's supervisor lock and record for ``command`` (``serve`` or ``listen``) on this host."""

    def __init__(self, data_dir: Path, command: str) -> None:
        self.folder = data_dir / "run"
        self.command = command
        self.lock_path = self.folder / f"{_host_name()}.lock"
        self.record_path = self.folder / f"{_host_name()}.json"
        self._fd: int | None = None
        self._recorded: list[int] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StartupError` naming the supervisor that holds it; then stop what an
        earlier, dead holder left running."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot use {self.folder}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StartupError(f"cannot lock {self.lock_path}: {exc.strerror or exc}") from exc
            earlier = self._read_record()
            who = f"dicom-triage {earlier.get('command', 'serve')} (pid {earlier.get('pid', '?')})"
            raise StartupError(
                f"another {who} is running on data directory {self.folder.parent}; stop it first, or use another "
                "--data-dir"
            ) from None
        self._fd = fd
        self._stop_leftovers()
        self.record([])

    def _read_record(self) -> dict[str, Any]:
        try:
            data = json.loads(self.record_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stop_leftovers(self) -> None:
        earlier = self._read_record()
        children = earlier.get("children", [])
        alive = [int(c["pid"]) for c in children if isinstance(c, dict) and "pid" in c
                 and c.get("start") is not None and process_start_time(int(c["pid"])) == c["start"]]
        if not alive:
            return
        log.warning("stopping %d process(es) left running by an earlier dicom-triage %s (pid %s) on this data "
                    "directory: pids %s", len(alive), earlier.get("command", "?"), earlier.get("pid", "?"),
                    ", ".join(map(str, alive)))
        killed = stop_processes(alive, KILL_AFTER_SECONDS)
        if killed:
            log.warning("killed pids %s, which ignored SIGTERM for %.0f s", ", ".join(map(str, killed)),
                        KILL_AFTER_SECONDS)

    def record(self, children: Iterable[int]) -> None:
        """Write this process and ``children`` (their pids now) to the record, if they changed."""
        pids = sorted(children)
        if pids == self._recorded:
            return
        data = {
            "command": self.command,
            "pid": os.getpid(),
            "children": [{"pid": pid, "start": process_start_time(pid)} for pid in pids],
        }
        temporary = self.record_path.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(data))
            os.replace(temporary, self.record_path)  # whole or not at all: a reader never sees half a record
        except OSError as exc:
            log.warning("cannot write %s: %s", self.record_path, exc)
            return
        self._recorded = pids

    def release(self) -> None:
        """After a clean stop (every child ended): drop the record and the lock."""
        if self._fd is None:
            return
        self.record_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


__all__ = ["SupervisorLock"]
