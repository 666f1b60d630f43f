"""Everything the study page and ``GET /api/studies/{id}`` show about one study."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from models.tasks import TASKS
from worker.db import Instance, Job, Patient, Result, Review, Series, SrDocument, Study, User
from worker.web.worklist import SeriesResult, current_results, study_status

MAX_SR_ITEMS = 500


@dataclass
class Slice:
    instance_id: int
    frame: int
    #: The result's per-slice probabilities in class order, when the slice was classified.
    probabilities: list[float] | None
    #: Why the model left this slice out of the series decision (``None``: it counted, or was not classified).
    excluded: str | None = None


@dataclass
class AxialSliceView:
    """An axial slice cut from the volume (``worker.decoding.slice_key``) and the result's figures for it."""

    number: int
    #: z in mm.
    position: float
    probabilities: list[float]
    excluded: str | None = None


@dataclass
class ReviewView:
    decision: str
    label: str
    comment: str
    user: str
    created_at: datetime


@dataclass
class ResultView:
    summary: SeriesResult
    class_names: tuple[str, ...]
    probabilities: dict[str, float]
    model_uid: str
    created_at: datetime
    reviews: list[ReviewView]
    sr_items: list[tuple[int, str, str]]  # (depth, concept, value) of its latest SR


@dataclass
class SeriesView:
    series_id: int
    series_number: int | None
    modality: str
    description: str
    job_state: str | None
    job_reason: str
    slices: list[Slice]
    results: list[ResultView] = field(default_factory=list)
    #: How many axial slices cut from the volume the latest result read (0: it read the acquired frames).
    reformatted_slices: int = 0
    #: Those slices, foot to head, with their probabilities (empty when it read the acquired frames).
    axial_slices: list[AxialSliceView] = field(default_factory=list)
    #: The result whose axial slices those are (their pictures are cut again from its series).
    axial_result_id: int | None = None


@dataclass
class StudyView:
    study_id: int
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    study_date: str
    description: str
    received_at: datetime
    status: str
    review_state: str
    series: list[SeriesView]


def load_study(session: Session, study_id: int) -> StudyView | None:
    found = session.execute(select(Study, Patient).join(Patient).where(Study.id == study_id)).first()
    if found is None:
        return None
    study, patient = found
    status, review_state = study_status(session, study_id) or ("received", "no_result")
    summaries = {s.result_id: s for s in current_results(session, [study_id]).get(study_id, [])}
    results = {r.id: r for r in session.scalars(select(Result).where(Result.id.in_(list(summaries))))}
    series_rows = session.execute(
        select(Series, Job)
        .outerjoin(Job, and_(Job.series_pk == Series.id, Job.revision == Series.revision))
        .where(Series.study_pk == study_id)
        .order_by(Series.series_number, Series.id)
    ).all()
    instances: dict[int, list[Instance]] = {}
    for instance in session.scalars(
        select(Instance)
        .join(Series)
        .where(Series.study_pk == study_id)
        .order_by(Instance.instance_number, Instance.id)
    ):
        instances.setdefault(instance.series_pk, []).append(instance)
    reviews: dict[int, list[ReviewView]] = {}
    for review, user_name in session.execute(
        select(Review, User.name).join(User).where(Review.result_pk.in_(list(summaries))).order_by(Review.id)
    ):
        reviews.setdefault(review.result_pk, []).append(
            ReviewView(review.decision, review.label, review.comment, user_name, review.created_at)
        )
    srs = _latest_srs(session, list(summaries))
    views = []
    for series, job in series_rows:
        series_results = [results[s.result_id] for s in summaries.values() if s.series_id == series.id]
        latest = series_results[0] if series_results else None
        axial = axial_slices(latest)
        view = SeriesView(
            series_id=series.id,
            series_number=series.series_number,
            modality=series.modality,
            description=series.series_description,
            job_state=job.state.value if job else None,
            job_reason=job.reason if job else "",
            slices=_slices(instances.get(series.id, []), latest),
            reformatted_slices=len(axial),
            axial_slices=axial,
            axial_result_id=latest.id if latest is not None and axial else None,
        )
        for result in series_results:
            task = TASKS.get(result.task)
            view.results.append(
                ResultView(
                    summary=summaries[result.id],
                    class_names=task.class_names if task else tuple(result.probabilities),
                    probabilities={k: float(v) for k, v in result.probabilities.items()},
                    model_uid=result.model_uid,
                    created_at=result.created_at,
                    reviews=reviews.get(result.id, []),
                    sr_items=srs.get(result.id, []),
                )
            )
        views.append(view)
    return StudyView(
        study_id=study.id,
        patient_name=patient.patient_name,
        patient_id=patient.patient_id,
        birth_date=patient.birth_date,
        sex=patient.sex,
        accession_number=study.accession_number,
        study_date=study.study_date,
        description=study.study_description,
        received_at=study.created_at,
        status=status,
        review_state=review_state,
        series=views,
    )


def _slices(instances: list[Instance], result: Result | None) -> list[Slice]:
    """The series' frames: in the result's (spatial) order with its probabilities, else by instance number."""
    by_uid = {i.sop_instance_uid: i for i in instances}
    out: list[Slice] = []
    seen: set[tuple[int, int]] = set()
    for item in (result.slice_probabilities if result else []) or []:
        instance = by_uid.get(str(item.get("sop_instance_uid", "")))
        if instance is not None:
            frame = int(item.get("frame", 1))
            excluded = item.get("excluded")
            out.append(Slice(instance.id, frame, [float(p) for p in item.get("probabilities", [])],
                             str(excluded) if excluded is not None else None))
            seen.add((instance.id, frame))
    for instance in instances:
        for frame in range(1, max(1, instance.number_of_frames) + 1):
            if (instance.id, frame) not in seen:
                out.append(Slice(instance.id, frame, None))
    return out


def axial_slices(result: Result | None) -> list[AxialSliceView]:
    """The axial slices cut from the volume that ``result`` read, in its (foot to head) order."""
    return [
        AxialSliceView(int(item["slice"]), float(item.get("position", 0.0)),
                       [float(p) for p in item.get("probabilities", [])],
                       str(item["excluded"]) if item.get("excluded") is not None else None)
        for item in (result.slice_probabilities if result else []) or [] if "reformat" in item
    ]


def reformatted_slices(result: Result | None) -> int:
    """The axial slices cut from the volume that ``result`` read (see ``worker.decoding.slice_key``), or 0."""
    return sum(1 for item in (result.slice_probabilities if result else []) or [] if "reformat" in item)


def _latest_srs(session: Session, result_ids: list[int]) -> dict[int, list[tuple[int, str, str]]]:
    latest: dict[int, SrDocument] = {}
    for document in session.scalars(
        select(SrDocument).where(SrDocument.result_pk.in_(result_ids)).order_by(SrDocument.id)
    ):
        latest[document.result_pk] = document
    return {result_id: sr_content(Path(doc.archive_path)) for result_id, doc in latest.items()}


def sr_content(path: Path) -> list[tuple[int, str, str]]:
    """A Structured Report's content tree as (depth, concept name, value) lines, for display (text, not HTML)."""
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        return [(0, "unreadable report", type(exc).__name__)]
    lines: list[tuple[int, str, str]] = []
    _walk(ds, 0, lines)
    return lines


def _walk(item: Dataset, depth: int, lines: list[tuple[int, str, str]]) -> None:
    for child in item.get("ContentSequence", []):
        if len(lines) >= MAX_SR_ITEMS:
            return
        lines.append((depth, _meaning(child.get("ConceptNameCodeSequence")), _value(child)))
        _walk(child, depth + 1, lines)


def _meaning(codes: Any) -> str:
    return str(codes[0].get("CodeMeaning", "")) if codes else ""


def _value(item: Dataset) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if measured:
            unit = _meaning(measured[0].get("MeasurementUnitsCodeSequence"))
            return f"{measured[0].get('NumericValue', '')} {unit}".strip()
        return ""
    if kind in ("UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
        return str(item.get(
            {"UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date", "TIME": "Time", "PNAME": "PersonName"}[kind], ""
        ))
    return kind.lower() if kind != "CONTAINER" else ""
