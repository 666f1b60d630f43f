"""What the model registry adds to the schema: registered models, their event log and retraining runs.

A model row points at its folder (``model.keras`` + ``card.json``) and copies what admins compare: the card,
metrics, the training data manifest and lineage. Migration ``reg0001`` creates these tables.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from worker.db.models import UID, Base, utcnow


class ModelState(str, enum.Enum):
    """``candidate`` (trained, not serving) -> ``active`` (serving its task; one per task) -> ``retired``."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class RunState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class RegisteredModel(Base):
    """A trained model of one task, with everything needed to judge it and trace its data."""

    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_uid: Mapped[str] = mapped_column(UID, unique=True)
    task: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    #: The folder holding ``model.keras`` and ``card.json`` (shared by every worker, like the archive).
    model_dir: Mapped[str] = mapped_column(Text)
    card: Mapped[dict[str, Any]]
    #: ``{"series": [{"pseudo_series_id", "series_instance_uid", "label", "split", "images"}], "external": [...]}``.
    data_manifest: Mapped[dict[str, Any]]
    #: The model that was active for the task when this one was trained (what it was meant to replace).
    parent_uid: Mapped[str | None] = mapped_column(UID)
    #: ``{reference manifest sha256: metrics}``: evaluations on the task's fixed reference set, for the gate.
    reference_metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    promoted_by: Mapped[str | None] = mapped_column(String(128))

    # At most one active model per task is kept by the registry's row locks; this index serves its lookups.
    __table_args__ = (Index("ix_registered_models_task_state", "task", "state"),)


class ModelEvent(Base):
    """The registry's log: registrations, promotions (forced ones with their reason), refusals and rollbacks."""

    __tablename__ = "model_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_pk: Mapped[int] = mapped_column(ForeignKey("registered_models.id"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """One retraining: requested, queued on the ``training`` queue, run with progress, ending in a candidate."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=RunState.QUEUED.value, index=True)
    #: The retraining's options (epochs, architecture, confirmed_only, since, external sources).
    options: Mapped[dict[str, Any]]
    requested_by: Mapped[str] = mapped_column(String(128))
    #: 0..1, and what is happening now (``exporting``, ``epoch 3/10``, ...).
    progress: Mapped[float] = mapped_column(default=0.0)
    phase: Mapped[str] = mapped_column(String(128), default="queued")
    #: Per-epoch ``{"loss": [...], "accuracy": [...], "val_loss": [...], ...}`` as training reports it.
    history: Mapped[dict[str, Any]]
    error: Mapped[str] = mapped_column(Text, default="")
    #: ``host:pid`` of the training worker running it (a run whose worker died is failed when one starts again).
    claimed_by: Mapped[str] = mapped_column(String(300), default="")
    model_uid: Mapped[str | None] = mapped_column(UID)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


__all__ = ["ModelEvent", "ModelState", "RegisteredModel", "RunState", "TrainingRun"]
