"""Liveness, readiness and the status each long-running process reports.

``/healthz`` answers 200 while the process runs. ``/readyz`` runs the process's checks now and answers 200 when all
pass, else 503 with every failing check named: ``database`` (reachable, schema at the newest migration),
``broker`` (reachable), ``archive`` (writable, free space above ``min_free_disk_mb``), ``models`` (a worker's models
loaded) and ``dicom`` (a listener's port accepting a connection). The web app serves both (and ``/metrics``); a
``listen`` or ``worker`` process serves them on ``health_port`` (loopback unless ``health_host`` says otherwise;
0: off) with :class:`HealthServer`.

Every process also writes its readiness to ``data_dir/run/status/<host>-<pid>.json`` every few seconds
(:class:`StatusReporter`): the data directory is shared by every process of a deployment (the archive), so
``dicom-triage status`` sees each of them, on any host, without knowing their ports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config import Settings
    from worker.db import Database

log = logging.getLogger(__name__)

#: How long one check may take (a database or broker that does not answer is not ready).
CHECK_TIMEOUT_SECONDS = 3.0
#: How often each process writes its status file; ``status`` counts a file older than 4 of these as silent.
REPORT_SECONDS = 5.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


Check = Callable[[], CheckResult]


def _run(name: str, probe: Callable[[], str]) -> CheckResult:
    """``probe`` returns a detail when it passes and raises when it fails; the failure's text is the detail."""
    try:
        return CheckResult(name, True, probe())
    except Exception as exc:  # any failure is the check's answer, not the endpoint's
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckResult(name, False, text[:300])


def database_check(database: "Database") -> Check:
    """Reachable, and its schema at the newest migration this code knows."""

    def probe() -> str:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        from worker.db.migrate import alembic_config

        heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
        with database.engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
        if current != heads:
            raise RuntimeError(f"schema at {sorted(current) or 'none'}, code expects {sorted(heads)}")
        return f"migrated ({', '.join(sorted(heads))})"

    return lambda: _run("database", probe)


def broker_check(settings: "Settings") -> Check:
    """Redis or AMQP: a connection opens; the filesystem broker: its queue folder is writable."""

    def probe() -> str:
        url = settings.effective_broker_url
        if url.startswith("filesystem://"):
            folder = settings.broker_dir / "queue"
            if not os.access(folder, os.W_OK):
                raise RuntimeError(f"broker folder {folder} is not writable")
            return "filesystem"
        from kombu import Connection

        with Connection(url, connect_timeout=CHECK_TIMEOUT_SECONDS,
                        transport_options={"socket_timeout": CHECK_TIMEOUT_SECONDS}) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT_SECONDS)
            if url.startswith(("redis://", "rediss://")):
                connection.default_channel.client.ping()
        return url.split("://", 1)[0]

    return lambda: _run("broker", probe)


def archive_check(settings: "Settings") -> Check:
    """The archive folder takes a file, and its file system has more free space than the watermark."""

    def probe() -> str:
        folder = settings.archive_dir
        folder.mkdir(parents=True, exist_ok=True)
        probe_file = folder / f".ready-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe_file.write_bytes(b"ok")
        finally:
            probe_file.unlink(missing_ok=True)
        free = shutil.disk_usage(folder).free
        floor = settings.min_free_disk_mb * 1024 * 1024
        if free < floor:
            raise RuntimeError(f"{free // 2**20} MB free, below the watermark of {settings.min_free_disk_mb} MB")
        return f"{free // 2**20} MB free"

    return lambda: _run("archive", probe)


def dicom_port_check(port: Callable[[], int], accepting: Callable[[], str]) -> Check:
    """The listener's port is in the kernel's LISTEN state and the listener (or every listener process) runs.

    Not a test connection: a TCP connection closed before an A-ASSOCIATE is an aborted association to the listener
    (a warning in its log at every probe)."""

    def probe() -> str:
        number = port()
        if not port_listening(number):
            raise RuntimeError(f"nothing listens on port {number}")
        if problem := accepting():
            raise RuntimeError(problem)
        return f"port {number} accepting"

    return lambda: _run("dicom", probe)


def port_listening(port: int) -> bool:
    """Whether a TCP socket of this network namespace listens on ``port`` (Linux ``/proc/net/tcp``, ``tcp6``)."""
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    if not found_table:  # no /proc (not Linux): ask the port itself
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=CHECK_TIMEOUT_SECONDS):
                return True
        except OSError:
            return False
    return False


def models_check(loaded: Callable[[], dict[str, str]], expected: Sequence[str]) -> Check:
    """Every task the routing rules name has a model loaded (``loaded``: task -> model uid)."""

    def probe() -> str:
        have = loaded()
        missing = sorted(set(expected) - set(have))
        if missing:
            raise RuntimeError(f"no model loaded for {', '.join(missing)}")
        return ", ".join(f"{task} {uid}" for task, uid in sorted(have.items()))

    return lambda: _run("models", probe)


class Readiness:
    """A process's checks, run on demand (each ``/readyz``) and by the status reporter."""

    def __init__(self, role: str, checks: Sequence[Check] = ()) -> None:
        self.role = role
        self.checks = list(checks)
        self.last: dict[str, Any] = {"ready": False, "checks": [], "failing": ["starting"]}

    def add(self, check: Check) -> None:
        self.checks.append(check)

    def evaluate(self) -> dict[str, Any]:
        results = [check() for check in self.checks]
        failing = [r.name for r in results if not r.ok]
        self.last = {"ready": not failing, "failing": failing, "checks": [asdict(r) for r in results]}
        return self.last

    def collector(self) -> Any:
        """A Prometheus collector of the last evaluation: ``dicom_triage_ready{check}`` 1 or 0."""
        from prometheus_client.core import GaugeMetricFamily

        readiness = self

        class _Collector:
            def collect(self) -> Any:
                family = GaugeMetricFamily("dicom_triage_ready", "Readiness checks of the scraped process (1: pass)",
                                           labels=["role", "check"])
                for check in readiness.evaluate()["checks"]:
                    family.add_metric([readiness.role, check["name"]], 1 if check["ok"] else 0)
                yield family

        return _Collector()


def readiness_response(readiness: Readiness) -> tuple[int, dict[str, Any]]:
    """``/readyz``'s status code and body."""
    answer = readiness.evaluate()
    return (200 if answer["ready"] else 503), {"role": readiness.role, **answer}


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` over HTTP for a process without the web app (listener, workers),
    in a daemon thread. Port 0 in the settings means off; ``port`` here may be 0 to pick a free one (tests)."""

    def __init__(self, host: str, port: int, readiness: Readiness, metrics: Callable[[], bytes]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    outer._send(self, 200, b'{"alive": true}\n', "application/json")
                elif path == "/readyz":
                    status, body = readiness_response(readiness)
                    outer._send(self, status, (json.dumps(body) + "\n").encode(), "application/json")
                elif path == "/metrics":
                    from worker.metrics import CONTENT_TYPE

                    outer._send(self, 200, metrics(), CONTENT_TYPE)
                else:
                    outer._send(self, 404, b'{"detail": "not found"}\n', "application/json")

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s are not news
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> "HealthServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def status_dir(data_dir: Path) -> Path:
    return data_dir / "run" / "status"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


class StatusReporter:
    """Writes this process's role, pid, health URL and readiness to its status file every :data:`REPORT_SECONDS`
    (a daemon thread); :meth:`stop` removes the file."""

    def __init__(self, data_dir: Path, readiness: Readiness, url: str | None = None,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.readiness = readiness
        self.url = url
        self.extra = extra
        self.path = status_dir(data_dir) / f"{_host()}-{os.getpid()}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-report", daemon=True)

    def start(self) -> "StatusReporter":
        _remove_dead(self.path.parent)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.write()
            except Exception:  # a full or read-only disk: the archive check says so; keep the process going
                log.warning("cannot write the status file %s", self.path, exc_info=True)
            if self._stop.wait(REPORT_SECONDS):
                return

    def write(self) -> None:
        answer = self.readiness.evaluate()
        data = {"role": self.readiness.role, "host": socket.gethostname(), "pid": os.getpid(), "url": self.url,
                "time": time.time(), **answer, **(self.extra() if self.extra else {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=0.5)  # not longer: a check hanging on an away database must not delay a stop
        self.path.unlink(missing_ok=True)


def _remove_dead(folder: Path) -> None:
    """Remove the status files this host's ended processes left (killed ones cannot remove their own)."""
    from worker.lifetime import process_start_time

    for path in folder.glob(f"{_host()}-*.json"):
        pid = path.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and process_start_time(int(pid)) is None:
            path.unlink(missing_ok=True)


def read_statuses(data_dir: Path, now: float | None = None) -> list[dict[str, Any]]:
    """Every process's last status; one whose file is older than four report periods is marked ``silent`` (it
    died without removing it, or it hangs)."""
    now = time.time() if now is None else now
    statuses = []
    for path in sorted(status_dir(data_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("pid")
        if data.get("host") == socket.gethostname() and isinstance(pid, int):
            from worker.lifetime import process_start_time

            if process_start_time(pid) is None:  # ended on this host (a bounded stop exits without cleaning up)
                continue
        data["age_seconds"] = round(now - float(data.get("time", 0)), 1)
        data["silent"] = data["age_seconds"] > 4 * REPORT_SECONDS
        if data["silent"]:
            data["ready"] = False
        statuses.append(data)
    return statuses


__all__ = [
    "CheckResult", "HealthServer", "Readiness", "StatusReporter", "archive_check", "broker_check",
    "database_check", "dicom_port_check", "models_check", "read_statuses", "readiness_response",
]


class ProcessHealth:
    """A long-running process's health: its status file always, and with ``settings.health_port`` its
    :class:`HealthServer` (``/metrics`` there: this process's counters, or its tree's in multiprocess mode, and its
    readiness; ``extra`` adds collectors)."""

    def __init__(self, settings: "Settings", readiness: Readiness, extra: Sequence[Any] = (),
                 url: str | None = None) -> None:
        self.settings = settings
        self.readiness = readiness
        self.extra = list(extra)
        self.url = url
        self.server: HealthServer | None = None
        self.reporter: StatusReporter | None = None

    def start(self) -> "ProcessHealth":
        from worker.metrics import metrics_text

        if self.settings.health_port:
            try:
                self.server = HealthServer(self.settings.health_host, self.settings.health_port, self.readiness,
                                           lambda: metrics_text([self.readiness.collector(), *self.extra])).start()
            except OSError as exc:
                from worker.errors import StartupError

                where = f"{self.settings.health_host}:{self.settings.health_port}"
                raise StartupError(f"cannot serve health checks on {where}: {exc.strerror or exc}") from exc
            host = self.settings.health_host
            self.url = self.url or f"http://{'[' + host + ']' if ':' in host else host}:{self.server.port}"
        self.reporter = StatusReporter(self.settings.data_dir, self.readiness, self.url).start()
        return self

    def stop(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        if self.server is not None:
            self.server.stop()


def standard_checks(settings: "Settings", database: "Database") -> list[Check]:
    """What every process needs: its database, its broker and the archive."""
    return [database_check(database), broker_check(settings), archive_check(settings)]
