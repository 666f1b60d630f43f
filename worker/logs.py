"""How every dicom-triage process logs: the human format (unchanged), or with ``--log-format json`` one JSON object a
line, for a log shipper: ``time`` (UTC, ISO 8601), ``level``, ``process`` (role and pid), ``logger``, ``message``
and ``ids`` (row ids, job ids, model UIDs passed as ``extra={"ids": {...}}``; never patient data).

The format travels to child processes in ``DICOM_TRIAGE_LOG_FORMAT`` (a setting like any other), so the workers and
listener processes ``serve`` starts log as it does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV = "DICOM_TRIAGE_LOG_FORMAT"
FORMATS = ("text", "json")
#: Loggers whose lines at INFO say nothing useful in production (alembic's per-start plugin chatter, pynetdicom's
#: lines per association and per instance) and cost time at hundreds of instances a second.
NOISY = ("alembic", "pynetdicom")


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
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if chosen == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return chosen


def uvicorn_log_config(log_format: str | None = None) -> dict[str, Any] | None:
    """uvicorn's ``log_config``: its own (the human format) for text; for JSON, none, so its loggers propagate to
    the root's JSON handler."""
    if chosen_format(log_format) != "json":
        from uvicorn.config import LOGGING_CONFIG

        return LOGGING_CONFIG
    return None


__all__ = ["JsonFormatter", "configure_logging", "chosen_format", "uvicorn_log_config"]
