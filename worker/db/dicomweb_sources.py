"""The DICOMweb source of a backfill plan (migration ``dw0001``): its service URL and bearer token.

A plan's ``source`` column holds the URL for display (cut to its width); the whole URL and the token live here,
one row per DICOMweb plan, read by ``serve``'s backfill runner when it retrieves. The token is the source's own
credential, which we must present, so it is stored as given (not hashed): protect the database accordingly.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, Text
from sqlalchemy.orm import Mapped, mapped_column

from worker.db.models import Base


class DicomwebPlanSource(Base):
    __tablename__ = "backfill_dicomweb_sources"

    plan_pk: Mapped[int] = mapped_column(ForeignKey("backfill_plans.id"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    token: Mapped[str | None] = mapped_column(Text)


__all__ = ["DicomwebPlanSource"]
