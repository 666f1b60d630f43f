"""The JSON API (``/api``): worklist, study details, decisions. Cookie sessions as the pages; writes need the
``X-CSRF-Token`` header (its value comes from ``GET /api/me``)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Literal, get_type_hints

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, create_model

from worker.db import User
from worker.db.review import audit
from worker.web.auth import Principal, api_csrf, api_radiologist, api_user
from worker.web.decisions import MAX_COMMENT, DecisionError, decide
from worker.web.errors import error_responses
from worker.web.pages import parse_filters
from worker.web.params import (
    NO_NUL, FindingFilter, PageCursor, PageSize, ResultId, ReviewFilter, StatusFilter, StudyId, TaskFilter,

)
from worker.web.study import AxialSliceView, ReviewView, SeriesView, Slice, StudyView, load_study
from worker.web.worklist import PAGE_SIZE, TOTAL_CAP, SeriesResult, WorklistRow, load_worklist

router = APIRouter(prefix="/api", tags=["api"])


class Me(BaseModel):
    name: str
    role: str
    csrf_token: str = Field(description="send as X-CSRF-Token with every write")


def _model_of(view: type, name: str, **changed: Any) -> type[BaseModel]:
    """A response model with the fields of the dataclass ``view``, in its order, all required; ``changed`` gives
    fields of other types (the API's own models for nested views) as ``(type, default)``. The API thus sends
    exactly what the queries return, declared once."""
    hints = get_type_hints(view)
    fields: dict[str, Any] = {f.name: (hints[f.name], ...) for f in dataclasses.fields(view)}
    return create_model(name, **{**fields, **changed})


ResultOut = _model_of(SeriesResult, "ResultOut")
WorklistItem = _model_of(WorklistRow, "WorklistItem", results=(list[ResultOut], ...))


class WorklistOut(BaseModel):
    page: int = Field(description="the page's ordinal, 1 for the first")
    page_size: int
    total: int = Field(description=f"matching studies, counted up to {TOTAL_CAP}: a lower bound unless total_exact")
    total_exact: bool
    pages: int | None = Field(description="how many pages, when the total is exact")
    next: str | None = Field(description="the next page's cursor (pass as cursor); null on the last page")
    previous: str | None = Field(description="the previous page's cursor (pass as cursor); null on the first")
    items: list[WorklistItem]  # type: ignore[valid-type]


SliceOut = _model_of(Slice, "SliceOut", thumbnail_url=(str, ...))
AxialSliceOut = _model_of(AxialSliceView, "AxialSliceOut", image_url=(str, ...))
ReviewOut = _model_of(ReviewView, "ReviewOut")


class StudyResultOut(ResultOut):  # type: ignore[valid-type,misc]
    class_names: list[str]
    probabilities: dict[str, float]
    model_uid: str
    created_at: datetime
    reviews: list[ReviewOut]  # type: ignore[valid-type]
    structured_report: list[tuple[int, str, str]] = Field(description="(depth, concept, value) of the latest SR")


SeriesOut = _model_of(SeriesView, "SeriesOut", slices=(list[SliceOut], ...), results=(list[StudyResultOut], ...),
                      axial_slices=(list[AxialSliceOut], ...))
StudyOut = _model_of(StudyView, "StudyOut", series=(list[SeriesOut], ...))


class DecisionIn(BaseModel):
    model_config = ConfigDict(strict=True)

    decision: Literal["confirm", "correct"]
    label: str | None = Field(default=None, description="the corrected class (for correct)")
    comment: str = Field(default="", max_length=MAX_COMMENT, pattern=NO_NUL)


class DecisionOut(BaseModel):
    review_id: int
    study_id: int
    label: str
    report_error: str | None = Field(default=None, description="set when the revised SR could not be made")


@router.get("/me", response_model=Me, responses=error_responses())
def me(who: Principal = Depends(api_user)) -> Me:
    return Me(name=who.name, role=who.role.value, csrf_token=who.csrf_token)


@router.get("/worklist", response_model=WorklistOut, responses=error_responses(422))
def worklist(
    request: Request,
    status: StatusFilter = None,
    task: TaskFilter = None,
    finding: FindingFilter = None,
    review: ReviewFilter = None,
    cursor: PageCursor = None,
    page_size: PageSize = PAGE_SIZE,
    _who: Principal = Depends(api_user),
) -> WorklistOut:
    filters = parse_filters(status, task, finding, review)
    with request.app.state.web.database.read_session() as session:
        result = load_worklist(session, filters, page_size=page_size, cursor=cursor)  # type: ignore[arg-type]
    items = [
        WorklistItem(**{k: v for k, v in vars(row).items() if k != "results"},
                     results=[ResultOut(**vars(r)) for r in row.results])
        for row in result.rows
    ]
    return WorklistOut(
        page=result.page, page_size=result.page_size, total=result.total, total_exact=result.total_exact,
        pages=result.pages, next=result.next.encode() if result.next else None,
        previous=result.previous.encode() if result.previous else None, items=items,
    )


@router.get("/studies/{study_id}", response_model=StudyOut, responses=error_responses(404, 422))
def study(request: Request, study_id: StudyId, who: Principal = Depends(api_user)) -> StudyOut:
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
        **{k: v for k, v in vars(series).items() if k not in ("slices", "results", "axial_slices")},
        slices=[
            SliceOut(**vars(s), thumbnail_url=f"/thumbnails/{s.instance_id}/{s.frame}.png") for s in series.slices
        ],
        axial_slices=[
            AxialSliceOut(**vars(s), image_url=f"/reformats/{series.axial_result_id}/{s.number}.png")
            for s in series.axial_slices
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


@router.post("/results/{result_id}/decision", response_model=DecisionOut, dependencies=[Depends(api_csrf)],
             responses=error_responses(400, 403, 404, 409, 422))
def post_decision(
    request: Request, result_id: ResultId, body: DecisionIn, who: Principal = Depends(api_radiologist)
) -> DecisionOut:
    state = request.app.state.web
    try:
        outcome = decide(state.database, result_id, who.user_id, body.decision, body.label, body.comment,
                         state.on_correction)
    except DecisionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return DecisionOut(review_id=outcome.review_id, study_id=outcome.study_id, label=outcome.label,
                       report_error=outcome.report_error)
