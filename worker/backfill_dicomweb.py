"""Backfill from a DICOMweb source: ``backfill plan --from-dicomweb URL`` (QIDO-RS) and the retrieval of a plan's
series by WADO-RS (:class:`DicomwebRetriever`, which ``serve``'s :class:`worker.backfill.BackfillRunner` calls).

The plan is stored like a C-FIND plan (same tables, same per-study states; the URL and token in
:mod:`worker.db.dicomweb_sources`), so ``backfill run|status|cancel`` work unchanged. Retrieved instances are
streamed one at a time into the STOW-RS/C-STORE ingest path (:class:`worker.ingest.DatabaseSink`: archive, database
row, series completion, classification); they are backfill because their study belongs to a plan. A retrieval that
breaks mid-series is resumed where it stopped: only the instances not yet stored here are asked for again, one by
one; after ``tries`` attempts the study fails with the last reason.
"""

from __future__ import annotations

import logging
import time

from pydicom import Dataset
from sqlalchemy import select

from config import Settings
from dicom_io.archive import Archive
from dicom_io.dicomweb import DicomwebError, DicomwebSource, is_dicomweb_url, shown_url
from dicom_io.listener import validate_file_instance
from dicom_io.retrieve import QueryError
from dicom_io.validation import STATUS_CANNOT_UNDERSTAND, InvalidInstance
from worker.backfill import BackfillError, PlanSummary, store_plan
from worker.db import Database, Instance, Series
from worker.db.backfill import BackfillPlan, BackfillStudy
from worker.db.dicomweb_sources import DicomwebPlanSource
from worker.ingest import DatabaseSink

log = logging.getLogger(__name__)

#: The calling AE recorded for instances retrieved over DICOMweb (there is no association to name one).
CALLING_AE = "DICOMWEB"
_SOURCE_WIDTH = 128  # backfill_plans.source


def make_dicomweb_plan(database: Database, url: str, token: str | None, modality: str, study_date: str,
                       description: str = "", limit: int | None = None) -> PlanSummary:
    """QIDO-RS studies, then their series of ``modality``, and store them as a new plan (the oldest first, as
    :func:`worker.backfill.make_plan`). Raises :class:`DicomwebError` or :class:`QueryError` from the source."""
    if not is_dicomweb_url(url):
        raise BackfillError(f"{url!r} is not an http(s) URL of a DICOMweb service")
    source = DicomwebSource(url, token)
    studies = source.find_studies(modality, study_date, description)
    studies.sort(key=lambda s: (s.study_date, s.study_instance_uid))
    if limit is not None:
        studies = studies[:limit]
    found = [(study, source.find_series(study.study_instance_uid, modality)) for study in studies]
    query = f"modality={modality} study_date={study_date} description={description or '*'} limit={limit or '-'}"
    shown = shown_url(url)
    shown = shown if len(shown) <= _SOURCE_WIDTH else shown[:_SOURCE_WIDTH - 3] + "..."
    summary = store_plan(database, shown, query, found)
    with database.session() as session:
        session.add(DicomwebPlanSource(plan_pk=summary.plan_id, url=url, token=token))
    return summary


class DicomwebRetriever:
    """Retrieves one series of a DICOMweb plan into our archive (a :data:`worker.backfill.SeriesRetriever`)."""

    def __init__(self, settings: Settings, database: Database, tries: int = 3, backoff_seconds: float = 1.0) -> None:
        self.database = database
        self.tries = tries
        self.backoff_seconds = backoff_seconds
        self.sink = DatabaseSink(Archive(settings.archive_dir), database)

    def __call__(self, plan_id: int, study_uid: str, series_uid: str) -> str:
        with self.database.read_session() as session:
            row = session.get(DicomwebPlanSource, plan_id)
            if row is None:
                return f"plan {plan_id} has no DICOMweb source"
            source = DicomwebSource(row.url, row.token)
        reason = ""
        for attempt in range(1, self.tries + 1):
            try:
                return self._retrieve(source, study_uid, series_uid)
            except (DicomwebError, QueryError) as exc:
                reason = f"{exc} (attempt {attempt} of {self.tries})"
            log.warning("backfill plan %d, series %s: %s", plan_id, series_uid, reason)
            self._note(plan_id, study_uid, reason)
            if attempt < self.tries:
                time.sleep(self.backoff_seconds * attempt)
        return reason

    def _retrieve(self, source: DicomwebSource, study_uid: str, series_uid: str) -> str:
        """One attempt: the whole series in one streamed response when none of it is here, else the missing
        instances one by one. The failure's reason, or "" when the series is complete here."""
        stored = self._stored(series_uid)
        if not stored:
            received = sum(self._ingest(ds, study_uid, series_uid) for ds in source.iter_series(study_uid, series_uid))
            return "" if received else f"{source}: WADO-RS of series {series_uid}: the source sent no instance"
        missing = sorted(set(source.find_instances(study_uid, series_uid)) - stored)
        for sop_uid in missing:
            self._ingest(source.retrieve_instance(study_uid, series_uid, sop_uid), study_uid, series_uid)
        return ""

    def _stored(self, series_uid: str) -> set[str]:
        with self.database.read_session() as session:
            return set(session.scalars(select(Instance.sop_instance_uid).join(Series, Instance.series_pk == Series.id)
                                       .where(Series.series_instance_uid == series_uid)))

    def _ingest(self, ds: Dataset, study_uid: str, series_uid: str) -> bool:
        """Validate and store one retrieved instance; whether it was stored. An instance that is not of the series
        asked for, or is invalid, is recorded as rejected (with its reason) and not stored."""
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        try:
            if (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))) != (study_uid, series_uid):
                raise InvalidInstance(STATUS_CANNOT_UNDERSTAND, f"not of series {series_uid}, which was asked for")
            validate_file_instance(ds)
        except InvalidInstance as exc:
            log.warning("backfill: refused instance %s of series %s: %s", sop_uid or "?", series_uid, exc.reason)
            self.sink.reject(CALLING_AE, sop_uid or None, exc.reason)
            return False
        self.sink.accept(ds, CALLING_AE)
        return True

    def _note(self, plan_id: int, study_uid: str, reason: str) -> None:
        """Record the latest retrieval problem on the study (it stays ``moving`` while attempts remain)."""
        with self.database.session() as session:
            study = session.scalars(select(BackfillStudy).join(BackfillPlan, BackfillStudy.plan_pk == BackfillPlan.id)
                                    .where(BackfillPlan.id == plan_id,
                                           BackfillStudy.study_instance_uid == study_uid)).first()
            if study is not None:
                study.reason = reason


__all__ = ["CALLING_AE", "DicomwebRetriever", "make_dicomweb_plan"]
