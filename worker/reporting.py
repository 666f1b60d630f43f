"""A Structured Report for every result: build it, archive it, record it, and queue its deliveries.

:func:`publish_result` reports a result's current state: the model's label, or the latest radiologist
correction of it. It is idempotent: when the series' latest SR (for the result's model) already reports that
result with that finding, nothing new is made, so a retried task or a repeated hook never makes a second SR. Any
change makes a new revision that names its predecessor (:mod:`dicom_io.sr` derives its UIDs from the source
series, the model UID and the revision number, which counts the series' earlier SRs by that model).

An indeterminate result is reported with the finding "Undetermined" and its reason, an untyped finding (a tumour
whose type the model does not assess on its sequence) with "Neoplasm of brain" and its reason (:mod:`dicom_io.codes`);
a radiologist's correction of either to a class makes a revision reporting that class.

A result that was superseded (late instances made a newer one) gets no SR: the newer result's SR reports the
series. The SR references exactly the instances the result classified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from dicom_io.archive import Archive
from dicom_io.codes import has_reason
from dicom_io.sr import AlgorithmInfo, ClassificationResult, SRError, build_classification_sr, read_classification_sr
from models.tasks import get_task
from worker.backfill import is_backfill_study
from worker.db import Database, Instance, Result, Review, Series, SrDelivery, SrDocument
from worker.db.review import Decision
from worker.delivery import DeliveryEnqueue, DeliveryStatus, delivery_enqueue

log = logging.getLogger(__name__)

#: The system writing the SRs (their Manufacturer; the model is the observer device).
MANUFACTURER = "dicom-triage"
#: How often :func:`publish_result` starts over when its result changed while the SR was being built.
PUBLISH_TRIES = 3


def _software_version() -> str:
    try:
        return version("dicom-triage")
    except PackageNotFoundError:  # running from a source checkout
        return "unknown"


@dataclass(frozen=True)
class PublishedSr:
    """An SR recorded for a result, and its deliveries' row ids."""

    document_pk: int
    sop_instance_uid: str
    archive_path: Path
    revision: int
    #: True when this call made it; False when the result's current state was already reported.
    created: bool
    delivery_pks: tuple[int, ...]


def _current_label(session: Session, result: Result) -> str:
    correction = session.scalar(
        select(Review.label)
        .where(Review.result_pk == result.id, Review.decision == Decision.CORRECT.value)
        .order_by(Review.id.desc())
        .limit(1)
    )
    return correction or result.label


def _source_paths(session: Session, result: Result) -> list[Path]:
    """The archive files of the instances the result classified (all of the series' if it does not say)."""
    classified = {str(s["sop_instance_uid"]) for s in result.slice_probabilities or [] if "sop_instance_uid" in s}
    query = select(Instance.sop_instance_uid, Instance.archive_path).where(Instance.series_pk == result.series_pk)
    rows = session.execute(query.order_by(Instance.instance_number, Instance.sop_instance_uid)).all()
    return [Path(path) for uid, path in rows if not classified or uid in classified]


def _classification(result: Result, label: str) -> ClassificationResult:
    """What the SR reports: ``label`` (the model's or a correction's) with every class' probability, and the
    result's reason when the reported label is indeterminate or an untyped finding (a correction to a class drops
    it)."""
    class_names = get_task(result.task).class_names
    missing = set(class_names) - set(result.probabilities)
    if missing:
        raise SRError(f"result {result.id} has no probability for {sorted(missing)}")
    return ClassificationResult(
        task=result.task,
        label=label,
        class_names=class_names,
        probabilities=tuple(float(result.probabilities[name]) for name in class_names),
        reason=(result.reason or "no reason given") if has_reason(label) else None,
    )


def _existing(document: SrDocument, session: Session) -> PublishedSr:
    deliveries = session.scalars(select(SrDelivery.id).where(SrDelivery.document_pk == document.id)).all()
    revision = session.scalar(
        select(func.count(SrDocument.id)).where(
            SrDocument.series_instance_uid == document.series_instance_uid, SrDocument.id < document.id
        )
    )
    return PublishedSr(document.id, document.sop_instance_uid, Path(document.archive_path), int(revision or 0),
                      False, tuple(deliveries))


@dataclass(frozen=True)
class _Plan:
    """What the SR of a result's current state needs, read in one short transaction."""

    result: Result  # detached, fully loaded
    label: str
    source_paths: tuple[Path, ...]
    #: The series' SRs by this model so far, oldest first: their number is the new SR's revision.
    previous: tuple[SrDocument, ...]

    @property
    def predecessor(self) -> SrDocument | None:
        return self.previous[-1] if self.previous else None

    @property
    def key(self) -> tuple[object, ...]:
        """What must not change between planning and recording the SR."""
        return self.label, self.source_paths, tuple(d.id for d in self.previous)


def _plan(session: Session, result_pk: int) -> _Plan | None:
    """The plan for result ``result_pk``, or ``None`` when it is superseded."""
    result = session.get(Result, result_pk, populate_existing=True)
    if result is None:
        raise SRError(f"no result {result_pk}")
    if result.superseded_by_pk is not None:
        return None
    previous = session.scalars(
        select(SrDocument)
        .join(Result, SrDocument.result_pk == Result.id)
        .where(Result.series_pk == result.series_pk, Result.model_uid == result.model_uid)
        .order_by(SrDocument.id)
    ).all()
    return _Plan(result, _current_label(session, result), tuple(_source_paths(session, result)), tuple(previous))


def _build(plan: _Plan, predecessor: pydicom.Dataset | None) -> pydicom.Dataset:
    result = plan.result
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in plan.source_paths]
    return build_classification_sr(
        sources,
        _classification(result, plan.label),
        AlgorithmInfo(
            name=result.model_name,
            version=result.model_version,
            uid=result.model_uid,
            manufacturer=MANUFACTURER,
            parameters=(("aggregation", result.aggregation),),
        ),
        revision=len(plan.previous),
        predecessor=predecessor,
        manufacturer=MANUFACTURER,
        software_version=_software_version(),
    )


def publish_result(
    database: Database, settings: Settings, result_pk: int, *, enqueue: DeliveryEnqueue | None = None
) -> PublishedSr | None:
    """Report result ``result_pk`` in an SR (unless its current state is reported already) and queue its
    delivery to every ``settings.sr_destinations``.

    Returns ``None`` for a superseded result. Raises :class:`~dicom_io.sr.SRError` when no valid SR can be made
    (an unknown result, no source instances), ``OSError`` when the archive fails; nothing is recorded then.
    ``enqueue`` sends the delivery messages (default: a Celery app for ``settings``).

    The SR is built outside any transaction (reading a long series' headers takes a while, and on SQLite a
    transaction holds the one write lock); the short transaction that records it locks the series and checks that
    nothing it was built from changed meanwhile, else it starts over.
    """
    for _ in range(PUBLISH_TRIES):
        with database.session() as session:
            plan = _plan(session, result_pk)
        if plan is None:
            log.info("result %d is superseded; its series is reported by the newer result", result_pk)
            return None
        predecessor = plan.predecessor
        predecessor_ds = pydicom.dcmread(predecessor.archive_path) if predecessor is not None else None
        if predecessor is not None and predecessor.result_pk == result_pk:
            if read_classification_sr(predecessor_ds).finding == plan.label:
                with database.session() as session:
                    return _existing(predecessor, session)
        sr = _build(plan, predecessor_ds)
        encoded = _encode(sr)
        with database.session() as session:
            session.get_one(Series, plan.result.series_pk, with_for_update=True)
            current = _plan(session, result_pk)
            if current is None or current.key != plan.key:
                continue
            published = _record(session, settings, plan, sr, encoded)
        log.info("SR %s (revision %d) reports result %d: %s", published.sop_instance_uid, published.revision,
                 result_pk, plan.label, extra={"ids": {"result_id": result_pk, "sr_uid": published.sop_instance_uid}})
        _enqueue_all(settings, published.delivery_pks, enqueue)
        return published
    raise SRError(f"result {result_pk} kept changing while its SR was made ({PUBLISH_TRIES} tries)")


def _encode(sr: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


def _record(session: Session, settings: Settings, plan: _Plan, sr: pydicom.Dataset, encoded: bytes) -> PublishedSr:
    """Archive ``sr`` (as ``encoded``) and add its document row and one pending delivery per destination."""
    archive = Archive(settings.archive_dir)
    target = archive.path_for(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    if target.exists():
        # No row names this UID (revision numbers only grow), so the file is left from a publish whose database
        # commit failed; it may report something else: replace it.
        target.unlink()
    stored = archive.store(sr, encoded=encoded)
    predecessor = plan.predecessor
    document = SrDocument(
        result_pk=plan.result.id,
        sop_instance_uid=stored.sop_instance_uid,
        series_instance_uid=stored.series_instance_uid,
        archive_path=str(stored.path),
        predecessor_pk=predecessor.id if predecessor is not None else None,
    )
    session.add(document)
    session.flush()
    destinations = settings.sr_destinations
    if not settings.backfill_sr_to_pacs and is_backfill_study(session, str(sr.StudyInstanceUID)):
        destinations = ()  # archived and shown, not sent (backfill_sr_to_pacs)
    deliveries = [
        SrDelivery(document_pk=document.id, destination=str(destination), status=DeliveryStatus.PENDING.value)
        for destination in dict.fromkeys(destinations)
    ]
    session.add_all(deliveries)
    session.flush()
    return PublishedSr(document.id, document.sop_instance_uid, stored.path, len(plan.previous), True,
                       tuple(d.id for d in deliveries))


def _enqueue_all(settings: Settings, delivery_pks: tuple[int, ...], enqueue: DeliveryEnqueue | None) -> None:
    if not delivery_pks:
        return
    send = enqueue or delivery_enqueue(settings)
    for delivery_pk in delivery_pks:
        try:
            send(delivery_pk, 0.0)
        except Exception:  # the broker is away: the row stays pending and the delivery worker's sweep finds it
            log.exception("could not queue SR delivery %d; the delivery worker will pick it up", delivery_pk)


def publish_review(
    database: Database, settings: Settings, review_pk: int, *, enqueue: DeliveryEnqueue | None = None
) -> PublishedSr | None:
    """After a radiologist's decision: a revised SR when it corrected the label (the web app's correction hook)."""
    with database.session() as session:
        result_pk = session.scalar(select(Review.result_pk).where(Review.id == review_pk))
    if result_pk is None:
        raise SRError(f"no review {review_pk}")
    return publish_result(database, settings, result_pk, enqueue=enqueue)


def publish_missing(database: Database, settings: Settings, *, enqueue: DeliveryEnqueue | None = None) -> int:
    """An SR for every current result that has none (a worker died between its result and its SR).

    Failures are logged, not raised; returns the number of SRs made.
    """
    with database.session() as session:
        result_pks = session.scalars(
            select(Result.id)
            .where(Result.superseded_by_pk.is_(None), ~Result.id.in_(select(SrDocument.result_pk)))
            .order_by(Result.id)
        ).all()
    made = 0
    for result_pk in result_pks:
        try:
            made += bool(publish_result(database, settings, result_pk, enqueue=enqueue))
        except Exception:  # one bad result must not keep the others (or the worker's start) from going on
            log.exception("no SR for result %d", result_pk)
    return made


def sr_summaries(session: Session, result_pks: list[int]) -> dict[int, dict[str, Any]]:
    """For ``results --json``: each result's latest SR and the state of its delivery to each destination."""
    latest: dict[int, SrDocument] = {}
    for document in session.scalars(
        select(SrDocument).where(SrDocument.result_pk.in_(result_pks)).order_by(SrDocument.id)
    ):
        latest[document.result_pk] = document
    deliveries: dict[int, list[SrDelivery]] = {}
    for delivery in session.scalars(
        select(SrDelivery)
        .where(SrDelivery.document_pk.in_([d.id for d in latest.values()]))
        .order_by(SrDelivery.id)
    ):
        deliveries.setdefault(delivery.document_pk, []).append(delivery)
    return {
        result_pk: {
            "sop_instance_uid": document.sop_instance_uid,
            "archive_path": document.archive_path,
            "deliveries": [
                {"destination": d.destination, "status": d.status, "attempts": d.attempts, "error": d.error or None}
                for d in deliveries.get(document.id, [])
            ],
        }
        for result_pk, document in latest.items()
    }


__all__ = ["PublishedSr", "publish_missing", "publish_result", "publish_review", "sr_summaries"]
