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
