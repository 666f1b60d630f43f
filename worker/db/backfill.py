"""Backfill plans: what a C-FIND against a PACS found, and each study's retrieval state (migration ``bf0001``).

A study's state: ``planned`` -> ``moving`` (C-MOVE of its series under way) -> ``received`` (every series moved
and its instances recorded here) -> ``classified`` (every series's job final); or ``failed`` with the reason.
Each series keeps how many C-MOVEs were sent for it, so that a resumed run can show it retrieved nothing twice.
A moving study names its runner (``host:pid``, migration ``bf2001``): several runners share one database without
retrieving a study twice. A plan records the current pause for live ingest and the paused time so far.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from worker.db.models import UID, Base, utcnow


class PlanState(str, enum.Enum):
    PLANNED = "planned"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class StudyState(str, enum.Enum):
    PLANNED = "planned"
    MOVING = "moving"
    RECEIVED = "received"
    CLASSIFIED = "classified"
    FAILED = "failed"


class BackfillPlan(Base):
    """One ``backfill plan``: the source PACS, the query and the run's limits."""

    __tablename__ = "backfill_plans"

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(128))  # AE@HOST:PORT
    query: Mapped[str] = mapped_column(Text)  # the query as given (modality, dates, description pattern)
    state: Mapped[str] = mapped_column(String(16), default=PlanState.PLANNED.value, index=True)
    max_in_flight: Mapped[int] = mapped_column(default=2)
    per_minute: Mapped[float] = mapped_column(default=30.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: When a runner last started one of its studies (``per_minute`` holds across runners).
    last_started_at: Mapped[datetime | None]
    #: Since when retrievals wait for live ingest (None: not paused), why, and the seconds paused before that.
    paused_since: Mapped[datetime | None]
    pause_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    paused_seconds: Mapped[float] = mapped_column(default=0.0, server_default="0")


class BackfillStudy(Base):
    __tablename__ = "backfill_studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    plan_pk: Mapped[int] = mapped_column(ForeignKey("backfill_plans.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.PLANNED.value, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The runner (``host:pid``) that claimed the study while it is moving; see worker.backfill.
    runner: Mapped[str | None] = mapped_column(String(128))


class BackfillSeries(Base):
    __tablename__ = "backfill_series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("backfill_studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    #: NumberOfSeriesRelatedInstances as the PACS answered it; None where it did not say.
    planned_instances: Mapped[int | None]
    moves: Mapped[int] = mapped_column(default=0)
    received: Mapped[bool] = mapped_column(default=False)


__all__ = ["BackfillPlan", "BackfillSeries", "BackfillStudy", "PlanState", "StudyState"]
