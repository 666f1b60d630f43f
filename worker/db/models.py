"""The database schema: SQLAlchemy 2 typed ORM classes.

One row per patient, study, series and instance received; one job per (series, revision) with its state machine;
one result per job; rejected instances with the reason. Structured Reports and their deliveries (SR issue) and
users, reviews and the audit log (review issue) have their tables here too so that the schema grows by migration.

Times are stored as timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)  # DICOM UIDs are at most 64 characters


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        return None if value is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return None if value is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class JobState(str, enum.Enum):
    """A job's life: ``received`` (routed, not yet on the queue) -> ``queued`` -> ``running`` -> ``done`` or
    ``failed``; or ``not_applicable`` when no routing rule matches the series."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"

    @property
    def is_final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.NOT_APPLICABLE)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (no native enum type) so that adding a state is a code change, not a migration.
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    # PatientID is unique only together with its issuer; both as received (may be empty).
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    studies: Mapped[list["Study"]] = relationship(back_populates="patient")

    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_identity"),)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    #: The ImageType values seen on any instance, backslash-separated (for routing's LOCALIZER/SCOUT exclusion).
    image_types: Mapped[str] = mapped_column(String(256), default="")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: True while instances arrived that no job has covered yet; the scheduler clears it when it creates a job.
    pending: Mapped[bool] = mapped_column(default=True)
    #: The number of the latest job created for this series (0: none yet).
    revision: Mapped[int] = mapped_column(default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")
    jobs: Mapped[list["Job"]] = relationship(back_populates="series", order_by="Job.revision")

    __table_args__ = (Index("ix_series_pending_last_received", "pending", "last_received_at"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(default=1)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    archive_path: Mapped[str] = mapped_column(Text)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One classification run of a series: revision 1 for the first, one more for each re-run after late
    instances."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    revision: Mapped[int]
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), index=True)
    task: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    #: Number of instances (and frames) the job was created for.
    instance_count: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    #: The worker process holding the job while ``running`` (see :class:`WorkerProcess`).
    worker_pk: Mapped[int | None] = mapped_column(ForeignKey("worker_processes.id", ondelete="SET NULL"))
    #: When the series' last instance (covered by this job) arrived: the start of the result latency.
    series_last_received_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    series: Mapped[Series] = relationship(back_populates="jobs")
    result: Mapped["Result | None"] = relationship(back_populates="job")

    __table_args__ = (UniqueConstraint("series_pk", "revision", name="uq_jobs_series_revision"),)


class WorkerProcess(Base):
    """A live Celery worker process; its heartbeat tells the scheduler whether its running jobs are orphaned."""

    __tablename__ = "worker_processes"

    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Result(Base):
    """A classification of a series by one model. A later revision's result supersedes the earlier one.

    ``label`` is one of the task's class names, ``models.tasks.INDETERMINATE`` with the ``reason`` why, or the
    task's untyped finding (``tumor``) with the ``reason`` its type is not given; the
    probabilities hold every class either way."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    revision: Mapped[int]
    task: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    #: ``{class name: probability}`` for the series, by the aggregation named in ``aggregation``.
    probabilities: Mapped[dict[str, Any]]
    #: ``[{"sop_instance_uid", "frame", "probabilities": [..in class order..]}]`` one per slice.
    slice_probabilities: Mapped[list[Any]]
    aggregation: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_uid: Mapped[str] = mapped_column(UID)
    inference_seconds: Mapped[float] = mapped_column(default=0.0)
    #: Why the model could not judge the series when ``label`` is ``models.tasks.INDETERMINATE`` (out of domain:
    #: no lung in the field, not a brain ...), or why an untyped finding has no type; ``None`` for a class label.
    #: Plain text, no patient data.
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded_by_pk: Mapped[int | None] = mapped_column(ForeignKey("results.id"))

    job: Mapped[Job] = relationship(back_populates="result")

    __table_args__ = (
        UniqueConstraint("series_pk", "model_uid", "revision", name="uq_results_series_model_revision"),
    )


class RejectedInstance(Base):
    """An instance (or, with no SOP Instance UID, an association) the listener refused, and why."""

    __tablename__ = "rejected_instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class SrDocument(Base):
    """A Structured Report we wrote for a result; a revised one names its predecessor."""

    __tablename__ = "sr_documents"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_pk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    archive_path: Mapped[str] = mapped_column(Text)
    predecessor_pk: Mapped[int | None] = mapped_column(ForeignKey("sr_documents.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    deliveries: Mapped[list["SrDelivery"]] = relationship(back_populates="document")


class SrDelivery(Base):
    """The state of sending one SR to one destination (``AE@HOST:PORT``)."""

    __tablename__ = "sr_deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    document_pk: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(32), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    document: Mapped[SrDocument] = relationship(back_populates="deliveries")

    __table_args__ = (UniqueConstraint("document_pk", "destination", name="uq_sr_deliveries_destination"),)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Review(Base):
    """A radiologist's decision on a result: ``confirm`` or ``correct`` (with the corrected label)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_pk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    decision: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_pk: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
