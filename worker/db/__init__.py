"""The database: schema (:mod:`worker.db.models`), engines and sessions, migrations."""

from worker.db.engine import Database, create_database_engine
from worker.db.migrate import upgrade_database
from worker.db.models import (
    AuditEvent,
    Base,
    Instance,
    Job,
    JobState,
    Patient,
    RejectedInstance,
    Result,
    Review,
    Series,
    SrDelivery,
    SrDocument,
    Study,
    User,
    WorkerProcess,
    utcnow,
)

# The other schema modules, so that Base.metadata (the migrations' target) holds every table.
from worker.db import backfill, dicomweb_sources, login, registry, review, tokens, triage  # noqa: E402,F401

__all__ = [
    "AuditEvent",
    "Base",
    "Database",
    "Instance",
    "Job",
    "JobState",
    "Patient",
    "RejectedInstance",
    "Result",
    "Review",
    "Series",
    "SrDelivery",
    "SrDocument",
    "Study",
    "User",
    "WorkerProcess",
    "create_database_engine",
    "upgrade_database",
    "utcnow",
]
