"""How every dicom-triage process logs: the human format (unchanged), or with ``--log-format json`` one JSON object a
line, for a log shipper: ``time`` (UTC, ISO 8601), ``level``, ``process`` (role and pid), ``logger``, ``message``
and ``ids`` (row ids, job ids, model UIDs passed as ``extra={"ids": {...}}``; never patient data).

The format travels to child processes in ``DICOM_TRIAGE_LOG_FORMAT`` (a setting like any other), so the workers and
listener processes ``serve`` starts log as it does.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV = "DICOM_TRIAGE_LOG_FORMAT"
FORMATS = ("text", "json")
#: Loggers whose lines at INFO say nothing useful in production (alembic's per-start plugin chatter, pynetdicom's
#: lines per association and per instance) and cost time at hundreds of instances a second.
NOISY = ("alembic", "pynetdicom")


#: Our own packages' loggers: their lines are written to name rows and UIDs only, never a header value.
OURS = ("worker", "dicom_io", "models", "training", "config", "__main__")
#: uvicorn's request lines quote the request line (paths carry row ids and UIDs only): kept as they are, but for
#: the values of a query string (a QIDO-RS search names a PatientID or PatientName).
VERBATIM = ("uvicorn.access",)
_QUERY_VALUE = re.compile(r"=[^&]*")
#: A value quoted in a message: how libraries (highdicom, pydicom, Python's warnings) name the value they judge,
#: e.g. highdicom's 'The string "DOE" is unlikely to represent the intended person name' on every SR of a
#: scanner's single-component patient name.
_QUOTED = re.compile(r'"[^"\n]*"|\'[^\'\n]*\'')
REDACTED = '"<redacted>"'


def uid_hash(uid: str) -> str:
    """A short stable digest of a study or series UID for the ``ids`` of a JSON log line: lines about one series
    are found together by a field that is the same length for every UID (the UID itself is in the message)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def redact_quoted(text: str) -> str:
    return _QUOTED.sub(REDACTED, text)


class NoPhiFilter(logging.Filter):
    """Keeps patient data out of every log line (issue 18), on each root handler: a library's message (not one of
    :data:`OURS`) has its quoted values replaced, and so has the message line of any exception, ours included
    (an exception may quote the value it refused); the traceback's file and code lines stay. What our loggers
    say is up to us: row ids and UIDs only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in VERBATIM and isinstance(record.args, tuple) and len(record.args) > 2:
            # uvicorn's access line: (client, method, path with its query, HTTP version, status).
            path, _, query = str(record.args[2]).partition("?")
            if query:
                record.args = (*record.args[:2], f"{path}?{_QUERY_VALUE.sub('=<redacted>', query)}", *record.args[3:])
        if not record.name.startswith(OURS) and record.name not in VERBATIM:
            message = record.getMessage()
            redacted = redact_quoted(message)
            if redacted != message:
                record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            lines = traceback.format_exception(*record.exc_info)
            # Indented lines are the traceback's places and source; the others say what was raised.
            record.exc_text = "".join(line if line.startswith(" ") else redact_quoted(line) for line in lines).rstrip()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped by JSON)."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": f"{self.role or record.processName}[{record.process}]",
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = getattr(record, "ids", None)
        if isinstance(ids, dict) and ids:
            entry["ids"] = ids
        if record.exc_info:
            entry["exception"] = record.exc_text or "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str, ensure_ascii=False)


def chosen_format(requested: str | None = None) -> str:
    """``requested`` (a command-line flag), else the environment's, else ``text``; unknown values are refused by
    the settings check, and read as ``text`` here so that the error itself is printed."""
    value = (requested or os.environ.get(ENV) or "text").strip().lower()
    return value if value in FORMATS else "text"


def configure_logging(log_format: str | None = None, role: str = "", text_format: str = TEXT_FORMAT) -> str:
    """Set up the root logger for this process; returns the format used. Called once at start (and in each spawned
    listener process, which starts with no logging set up)."""
    chosen = chosen_format(log_format)
    if chosen == "json":
        handler = logging.StreamHandler(_json_stderr(role))
        handler.setFormatter(JsonFormatter(role))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(text_format))
    handler.addFilter(NoPhiFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Python's warnings (highdicom's and pydicom's quote header values) become records of "py.warnings", which
    # the filter sees, instead of lines written straight to stderr.
    logging.captureWarnings(True)
    root.setLevel(logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return chosen


_captured: dict[int, Any] = {}
#: What ends each relay (see :func:`flush_captured_output`).
_finishers: list[Any] = []
#: The one line a supervisor prints on standard output for scripts and tests to wait for; kept as it is.
READY_PREFIX = "dicom-triage ready:"


def _json_stderr(role: str) -> Any:
    """With JSON logs, what is written to file descriptors 1 and 2 by anything but our handler (TensorFlow's C++
    logging, Celery's shutdown line, Python's warnings, a thread's uncaught traceback) is wrapped into objects too:
    each becomes a pipe read by a thread that passes JSON lines (and the ready line) through and wraps the others.
    Returns the stream the handler writes to (the original stderr). Once per process."""
    if 2 not in _captured:
        _captured[1] = _relay(1, role)
        _captured[2] = _relay(2, role)
    return _captured[2]


def _relay(fd: int, role: str) -> Any:
    original = os.dup(fd)
    out = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    process = f"{role or 'python'}[{os.getpid()}]"

    def relay() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                if not (text.startswith(READY_PREFIX) or (text.startswith("{") and _is_json(text))):
                    # glog's first letter is the level (TensorFlow's "I0000 ...", "E0000 ...").
                    level = {"W": "WARNING", "E": "ERROR", "F": "CRITICAL"}.get(text[:1], "INFO") \
                        if text[1:5].isdigit() else "INFO"
                    text = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                                       "level": level, "process": process, "logger": f"fd{fd}", "message": text},
                                      ensure_ascii=False)
                out.write(text + "\n")
                out.flush()

    thread = threading.Thread(target=relay, name=f"fd{fd}-json", daemon=True)
    thread.start()

    def finish() -> None:  # at exit: end the pipe so the relay writes what is left
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(original, fd)
        thread.join(timeout=1.0)

    _finishers.append(finish)
    atexit.register(finish)
    return out


def flush_captured_output() -> None:
    """End the JSON relays of file descriptors 1 and 2, so that what was written to them is out (at most 1 s each);
    done at exit, and by a process that ends with ``os._exit`` (:func:`worker.lifetime.exit_now`), which skips it."""
    while _finishers:
        _finishers.pop()()


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def uvicorn_log_config(log_format: str | None = None) -> dict[str, Any] | None:
    """uvicorn's ``log_config``: its own (the human format) for text; for JSON, none, so its loggers propagate to
    the root's JSON handler."""
    if chosen_format(log_format) != "json":
        import copy

        from uvicorn.config import LOGGING_CONFIG

        # uvicorn's own handlers get the patient-data filter too (an ASGI exception's text passes through them).
        config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
        config.setdefault("filters", {})["no_phi"] = {"()": NoPhiFilter}
        for handler in config["handlers"].values():
            handler.setdefault("filters", []).append("no_phi")
        return config
    return None


__all__ = ["JsonFormatter", "NoPhiFilter", "configure_logging", "redact_quoted", "uid_hash", "chosen_format",
           "uvicorn_log_config"]
