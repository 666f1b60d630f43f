"""The JSON API (``/api``): worklist, study details, decisions. Cookie sessions as the pages; writes need the
``X-CSRF-Token`` header (its value comes from ``GET /api/me``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from worker.db import User
from worker.db.review import audit
from worker.web.auth import Principal, api_csrf, api_radiologist, api_user
from worker.web.decisions import MAX_COMMENT, DecisionError, decide
from worker.web.pages import parse_filters
from worker.web.study import load_study
from worker.web.worklist import PAGE_SIZE, load_worklist

router = APIRouter(prefix="/api", tags=["api"])


class Me(BaseModel):
    name: str
    role: str
    csrf_token: str = Field(description="send as X-CSRF-Token with every write")


class ResultOut(BaseModel):
    result_id: int
    series_id: int
    task: str
    label: str
    probability: float
    suspected: bool
    model_name: str
    model_version: str
    review_decision: str | None
    review_label: str | None


class WorklistItem(BaseModel):
    study_id: int
    patient_name: str
    patient_id: str
    accession_number: str
    study_description: str
    received_at: datetime
    status: str
    review_state: str
    finding: str | None
    probability: float | None
    model_version: str | None
    tasks: list[str]
    results: list[ResultOut]


class WorklistOut(BaseModel):
    page: int
    page_size: int
    total: int
    pages: int
    items: list[WorklistItem]


class SliceOut(BaseModel):
    instance_id: int
    frame: int
    probabilities: list[float] | None
    thumbnail_url: str


class ReviewOut(BaseModel):
    decision: str
    label: str
    comment: str
    user: str
    created_at: datetime


class StudyResultOut(ResultOut):
    class_names: list[str]
    probabilities: dict[str, float]
    model_uid: str
    created_at: datetime
    reviews: list[ReviewOut]
    structured_report: list[tuple[int, str, str]] = Field(description="(depth, concept, value) of the latest SR")


class SeriesOut(BaseModel):
    series_id: int
    series_number: int | None
    modality: str
    description: str
    job_state: str | None
    job_reason: str
    slices: list[SliceOut]
    results: list[StudyResultOut]


class StudyOut(BaseModel):
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
    series: list[SeriesOut]


class DecisionIn(BaseModel):
    decision: Literal["confirm", "correct"]
    label: str | None = Field(default=None, description="the corrected class (for correct)")
    comment: str = Field(default="", max_length=MAX_COMMENT)


class DecisionOut(BaseModel):
    review_id: int
    study_id: int
    label: str
    report_error: str | None = Field(default=None, description="set when the revised SR could not be made")


@router.get("/me", response_model=Me)
def me(who: Principal = Depends(api_user)) -> Me:
    return Me(name=who.name, role=who.role.value, csrf_token=who.csrf_token)


@router.get("/worklist", response_model=WorklistOut)
def worklist(
    request: Request,
    status: str | None = None,
    task: str | None = None,
    finding: str | None = None,
    review: str | None = None,
    page: int = Query(1, ge=1),
    page_size: int = Query(PAGE_SIZE, ge=1, le=500),
    _who: Principal = Depends(api_user),
) -> WorklistOut:
    filters = parse_filters(status, task, finding, review)
    with request.app.state.web.database.session() as session:
        result = load_worklist(session, filters, page=page, page_size=page_size)
    items = [
        WorklistItem(**{k: v for k, v in vars(row).items() if k != "results"},
                     results=[ResultOut(**vars(r)) for r in row.results])
        for row in result.rows
    ]
    return WorklistOut(page=result.page, page_size=result.page_size, total=result.total, pages=result.pages,
                       items=items)


@router.get("/studies/{study_id}", response_model=StudyOut)
def study(request: Request, study_id: int, who: Principal = Depends(api_user)) -> StudyOut:
    with request.app.state.web.database.session() as session:
        view = load_study(session, study_id)
        if view is None:
            raise HTTPException(404, f"no study {study_id}")
        audit(session, session.get(User, who.user_id), "view.study", f"study:{study_id}")
    return StudyOut(
        **{k: v for k, v in vars(view).items() if k != "series"},
        series=[_series_out(s) for s in view.series],
    )


def _series_out(series: Any) -> SeriesOut:
    return SeriesOut(
        **{k: v for k, v in vars(series).items() if k not in ("slices", "results")},
        slices=[
            SliceOut(**vars(s), thumbnail_url=f"/thumbnails/{s.instance_id}/{s.frame}.png") for s in series.slices
        ],
        results=[
            StudyResultOut(
                **vars(r.summary),
                class_names=list(r.class_names),
                probabilities=r.probabilities,
                model_uid=r.model_uid,
                created_at=r.created_at,
                reviews=[ReviewOut(**vars(v)) for v in r.reviews],
                structured_report=r.sr_items,
            )
            for r in series.results
        ],
    )


@router.post("/results/{result_id}/decision", response_model=DecisionOut, dependencies=[Depends(api_csrf)])
def post_decision(
    request: Request, result_id: int, body: DecisionIn, who: Principal = Depends(api_radiologist)
) -> DecisionOut:
    state = request.app.state.web
    try:
        outcome = decide(state.database, result_id, who.user_id, body.decision, body.label, body.comment,
                         state.on_correction)
    except DecisionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return DecisionOut(review_id=outcome.review_id, study_id=outcome.study_id, label=outcome.label,
                       report_error=outcome.report_error)
