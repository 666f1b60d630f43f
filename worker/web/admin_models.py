"""Admin pages and JSON API of the model registry: start a retraining, follow it, compare, promote, roll back.

Pages live under ``/admin/registry``, the JSON API under ``/api/admin``; both need the admin role, and every write
carries the CSRF token (form field or ``X-CSRF-Token``). A candidate's page shows its reference-set metrics and
confusion matrix beside the active model's, its training curves, and the gate's verdict before promoting.

Every evaluation split a model card records (``testing``, ``testing_dedup``, ``holdout``, ``external``, cross-
validation such as ``cv5`` ...) is shown, by :func:`evaluation_splits`: cards of different tasks and recipes
evaluate on differently named splits, so no page may assume one name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from models.tasks import TASKS
from training.cli import ARCHITECTURE_NAMES
from worker.db import User
from worker.db.review import Role, audit
from worker.export import label_counts
from worker.registry import (
    PromotionRefused,
    RegistryError,
    describe,
    gate_decision,
    get_model,
    list_models,
    model_card,
    model_events,
    promote,
    register_installed_models,
    rollback,
)
from worker.retraining import (
    MAX_TIME_BUDGET_MINUTES,
    RetrainOptions,
    RunView,
    load_runs,
    make_send,
    request_retraining,
)
from worker.web.auth import Principal, api_csrf, api_user, checked_form, page_admin
from worker.web.errors import error_responses
from worker.web.params import NO_NUL, ModelStateFilter, ModelTaskFilter, ModelUid, RunId

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/admin", tags=["admin"])
TASK_NAMES = tuple(TASKS)
_FIGURE_NAME = re.compile(r"^[\w.-]+\.png$")
#: How often a running retraining's page reloads itself (seconds).
RUN_REFRESH_SECONDS = 3


def api_admin(who: Principal = Depends(api_user)) -> Principal:
    if who.role is not Role.ADMIN:
        raise HTTPException(403, "this needs the admin role")
    return who


def _state(request: Request) -> Any:
    return request.app.state.web


def _render(request: Request, template: str, who: Principal, status: int = 200, **context: Any) -> Response:
    response = _state(request).templates.TemplateResponse(request, template, {"who": who, **context})
    response.status_code = status
    return response


def _send(request: Request) -> Any:
    # One Celery app per web app, made on the first retraining request (the web process needs no broker before).
    send = getattr(request.app.state, "retraining_send", None)
    if send is None:
        from worker.celery_app import create_celery_app

        send = request.app.state.retraining_send = make_send(create_celery_app(_state(request).settings))
    return send


def _audit(request: Request, who: Principal, action: str, target: str) -> None:
    with _state(request).database.session() as session:
        audit(session, session.get(User, who.user_id), action, target)


def _overview(request: Request) -> dict[str, Any]:
    state = _state(request)
    register_installed_models(state.database, state.settings)
    with state.database.read_session() as session:
        models = [describe(m) for m in list_models(session)]
    # What a retraining would learn from, shown before one starts: reviewed labels, and the unreviewed results
    # left out unless the admin includes them.
    labels = {name: label_counts(state.database, TASKS[name]) for name in TASK_NAMES}
    return {"models": models, "runs": load_runs(state.database), "label_counts": labels}


@dataclass(frozen=True)
class SplitEvaluation:
    """One evaluation split of a model card's ``metrics``: what the model pages show of it."""

    split: str
    accuracy: float
    #: Images evaluated (``None`` where the card does not say, e.g. cross-validation).
    n: int | None = None
    macro_f1: float | None = None
    #: Standard deviation of the accuracy over folds (cross-validation).
    std: float | None = None


def evaluation_splits(metrics: Mapping[str, Any]) -> list[SplitEvaluation]:
    """Every split of a card's ``metrics`` that has an accuracy, in the card's order.

    Entries without a numeric accuracy are not evaluations (a card may hold notes there) and are left out, so a
    malformed card cannot break the page.
    """
    splits = []
    for split, values in metrics.items():
        if not isinstance(values, Mapping) or not _is_number(values.get("accuracy")):
            continue
        splits.append(
            SplitEvaluation(
                split=str(split),
                accuracy=float(values["accuracy"]),
                n=int(values["n"]) if _is_number(values.get("n")) else None,
                macro_f1=float(values["macro_f1"]) if _is_number(values.get("macro_f1")) else None,
                std=float(values["std"]) if _is_number(values.get("std")) else None,
            )
        )
    return splits


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reference(model: dict[str, Any]) -> dict[str, Any] | None:
    """The model's latest reference-set evaluation (the registry keeps one per reference content)."""
    evaluations = list(model["reference_metrics"].values())
    return evaluations[-1] if evaluations else None


def _comparison(request: Request, uid: str) -> dict[str, Any]:
    """A model, its events and card, and the task's active model beside it with the gate's verdict if both were
    evaluated on the same reference set."""
    state = _state(request)
    with state.database.read_session() as session:
        model = get_model(session, uid)
        shown = describe(model)
        shown["card"], shown["data_manifest"] = model.card, model.data_manifest
        shown["evaluations"] = [asdict(e) for e in evaluation_splits(shown["metrics"])]
        shown["events"] = [_event_json(e) for e in model_events(session, model)]
        active_row = next(iter(list_models(session, model.task, "active")), None)
        active = describe(active_row) if active_row else None
        active_card = active_row.card if active_row else {}
    mine, theirs = _reference(shown), _reference(active) if active else None
    verdict = None
    if mine and theirs and active and active["model_uid"] != uid:
        try:
            decision = gate_decision(mine, theirs, state.settings.promotion_tolerance)
            # The external real-DICOM split too, as the promotion will compare it.
            verdict = decision.with_external(model_card(shown["model_dir"], shown["card"]),
                                             model_card(active["model_dir"], active_card)).to_dict()
        except ValueError:
            verdict = None  # evaluated on different reference sets: the promotion re-evaluates
    return {"model": shown, "active": active, "reference": mine, "active_reference": theirs, "verdict": verdict,
            "figures": _figures(Path(shown["model_dir"]))}


def _event_json(event: Any) -> dict[str, Any]:
    return {"action": event.action, "actor": event.actor, "reason": event.reason,
            "at": event.created_at.isoformat(timespec="seconds"), "details": event.details}


def _figures(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("*.png") if _FIGURE_NAME.match(p.name))


def _options(body: RetrainIn) -> RetrainOptions:
    try:
        return RetrainOptions(
            epochs=body.epochs,
            architecture=body.architecture,
            input_size=body.input_size,
            batch_size=body.batch_size,
            confirmed_only=body.confirmed_only,
            since=body.since,
            start_from_active=body.start_from_active,
            time_budget_minutes=body.time_budget_minutes,
        )
    except (TypeError, ValueError) as exc:
        raise HTTPException(422, f"bad retraining options: {exc}") from None


def _retrain_form(form: dict[str, str]) -> RetrainIn:
    """The retraining form read by the API's model, so that a bad value gets the API's 422 (an empty field is
    one left out)."""
    try:
        return RetrainIn.model_validate({k: v for k, v in form.items() if v != "" and k in RetrainIn.model_fields},
                                        strict=False)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _start(request: Request, who: Principal, task: str, options: RetrainOptions) -> int:
    if task not in TASKS:
        raise HTTPException(422, f"unknown task {task!r}; known: {', '.join(TASKS)}")
    try:
        run_id = request_retraining(_state(request).database, _send(request), task, options, who.name)
    except Exception as exc:  # the broker is unreachable: the run is marked failed; tell the admin
        raise HTTPException(503, f"the retraining could not be queued: {exc}") from None
    _audit(request, who, "model.retrain", f"run:{run_id}")
    return run_id


def _promote(request: Request, who: Principal, uid: str, force_reason: str | None) -> Any:
    state = _state(request)
    outcome = promote(state.database, state.settings, uid, who.name, force_reason=force_reason)
    _audit(request, who, "model.promote_forced" if outcome.forced else "model.promote", f"model:{uid}")
    return outcome


def _rollback(request: Request, who: Principal, task: str, reason: str) -> Any:
    if task not in TASKS:
        raise HTTPException(404, f"unknown task {task!r}")
    outcome = rollback(_state(request).database, task, who.name, reason)
    _audit(request, who, "model.rollback", f"model:{outcome.replaced_uid}")
    return outcome


# --- pages ---------------------------------------------------------------------------------------------------


@router.get("/admin/registry")
def registry_page(request: Request, who: Principal = Depends(page_admin)) -> Response:
    return _render(request, "admin_models_registry.html", who, tasks=list(TASKS), architectures=ARCHITECTURE_NAMES,
                   **_overview(request))


@router.post("/admin/registry/retrain")
def retrain_form(request: Request, who: Principal = Depends(page_admin),
                 form: dict[str, str] = Depends(checked_form)) -> Response:
    body = _retrain_form(form)
    run_id = _start(request, who, body.task, _options(body))
    return RedirectResponse(f"/admin/registry/runs/{run_id}", status_code=303)


@router.get("/admin/registry/runs/{run_id}")
def run_page(request: Request, run_id: RunId, who: Principal = Depends(page_admin)) -> Response:
    runs = load_runs(_state(request).database, run_id)
    if not runs:
        raise HTTPException(404, f"no training run {run_id}")
    run = runs[0]
    refresh = RUN_REFRESH_SECONDS if run.state in ("queued", "running") else None
    return _render(request, "admin_models_run.html", who, run=run, refresh=refresh)


@router.get("/admin/registry/models/{uid}")
def model_page(request: Request, uid: ModelUid, who: Principal = Depends(page_admin),
               error: str | None = None) -> Response:
    try:
        context = _comparison(request, uid)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _render(request, "admin_models_model.html", who, error=error, refused=None, **context)


@router.get("/admin/registry/models/{uid}/figures/{name}")
def model_figure(request: Request, uid: ModelUid, name: str, _who: Principal = Depends(page_admin)) -> Response:
    with _state(request).database.read_session() as session:
        try:
            folder = Path(get_model(session, uid).model_dir)
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
    if not _FIGURE_NAME.match(name) or not (folder / name).is_file():
        raise HTTPException(404, f"no figure {name}")
    return FileResponse(folder / name, media_type="image/png")


@router.post("/admin/registry/models/{uid}/promote")
def promote_form(request: Request, uid: ModelUid, who: Principal = Depends(page_admin),
                 form: dict[str, str] = Depends(checked_form)) -> Response:
    force = form.get("force") == "1"
    reason = form.get("reason", "").strip()
    if force and not reason:
        return model_page(request, uid, who, error="A forced promotion needs a reason.")
    try:
        _promote(request, who, uid, reason if force else None)
    except PromotionRefused as exc:
        context = _comparison(request, uid)
        return _render(request, "admin_models_model.html", who, status=409, error=str(exc),
                       refused=exc.decision.to_dict(), **context)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return RedirectResponse(f"/admin/registry/models/{uid}", status_code=303)


@router.post("/admin/registry/tasks/{task}/rollback")
def rollback_form(request: Request, task: str, who: Principal = Depends(page_admin),
                  form: dict[str, str] = Depends(checked_form)) -> Response:
    try:
        _rollback(request, who, task, form.get("reason", ""))
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return RedirectResponse("/admin/registry", status_code=303)


# --- JSON API ------------------------------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    # JSON has one number type: 2.0 is the integer 2 to a JSON Schema, and strict validation alone refuses it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class RetrainIn(BaseModel):
    """A retraining request: the JSON body of ``POST /api/admin/retrain`` and the fields of the registry page's
    form (:func:`_retrain_form`), checked by this one model. Strict for JSON (``0`` is no boolean there); the form,
    whose values are all text, is read leniently ("20", "1")."""

    model_config = ConfigDict(strict=True)

    task: Literal[TASK_NAMES]  # type: ignore[valid-type]
    epochs: JsonInt = Field(default=20, ge=1, le=1000)
    architecture: Literal[ARCHITECTURE_NAMES] = "triage-cnn"  # type: ignore[valid-type]
    input_size: str | None = Field(default=None, pattern=r"^[0-9]+x[0-9]+(x[13])?$", description="HxW or HxWxC")
    batch_size: JsonInt = Field(default=32, ge=1, le=4096)
    confirmed_only: bool = True
    since: str | None = Field(default=None, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                              json_schema_extra={"format": "date"},
                              description="only series received since this day (YYYY-MM-DD)")
    start_from_active: bool = False
    time_budget_minutes: float | None = Field(default=None, gt=0, le=MAX_TIME_BUDGET_MINUTES)

    @field_validator("since")
    @classmethod
    def _a_day(cls, value: str | None) -> str | None:
        if value is not None:
            date.fromisoformat(value)  # the pattern admits 2024-02-31; this names it
        return value


class PromoteIn(BaseModel):
    model_config = ConfigDict(strict=True)

    force: bool = False
    reason: str = Field(default="", max_length=2000, pattern=NO_NUL,
                        description="needed (not blank) when force is true")


class RollbackIn(BaseModel):
    model_config = ConfigDict(strict=True)

    reason: str = Field(default="", max_length=2000, pattern=NO_NUL)


# --- the API's answers (FastAPI checks each against its model, and the schema describes them) -----------------


class ModelOut(BaseModel):
    """A registered model (:func:`worker.registry.describe`)."""

    model_uid: str
    task: str
    state: str
    name: str
    version: str
    architecture: str
    model_dir: str
    created_at: str
    promoted_at: str | None
    promoted_by: str | None
    parent_uid: str | None
    metrics: dict[str, Any] = Field(description="the card's metrics by evaluation split")
    reference_metrics: dict[str, Any] = Field(description="evaluations on the task's reference set, by its hash")


class EvaluationOut(BaseModel):
    split: str
    accuracy: float
    n: int | None
    macro_f1: float | None
    std: float | None


class EventOut(BaseModel):
    action: str
    actor: str
    reason: str
    at: str
    details: dict[str, Any]


class ModelDetailOut(ModelOut):
    card: dict[str, Any]
    data_manifest: dict[str, Any]
    evaluations: list[EvaluationOut]
    events: list[EventOut]


class GateCheckOut(BaseModel):
    metric: str
    candidate: float
    active: float
    passed: bool
    higher_is_better: bool = True


class GateOut(BaseModel):
    passed: bool
    tolerance: float
    checks: list[GateCheckOut]
    missing: list[str] = Field(default_factory=list, description="refusals that compare no figures")
    failures: list[str]


class ComparisonOut(BaseModel):
    model: ModelDetailOut
    active: ModelOut | None = Field(description="the task's active model")
    reference: dict[str, Any] | None = Field(description="the model's latest reference-set evaluation")
    active_reference: dict[str, Any] | None
    verdict: GateOut | None = Field(description="the gate's verdict, when both were evaluated on one reference set")
    figures: list[str]


class RetrainOut(BaseModel):
    run_id: int


class PromoteOut(BaseModel):
    model_uid: str
    task: str
    replaced_uid: str | None
    forced: bool
    gate: GateOut | None


class PromotionRefusedOut(BaseModel):
    detail: str
    gate: GateOut | None = Field(default=None, description="the gate's findings, when the gate refused")


class RollbackOut(BaseModel):
    model_uid: str
    task: str
    replaced_uid: str | None


@api_router.get("/models", response_model=list[ModelOut], responses=error_responses(403, 422))
def api_models(request: Request, task: ModelTaskFilter = None, state: ModelStateFilter = None,
               _who: Principal = Depends(api_admin)) -> list[dict[str, Any]]:
    register_installed_models(_state(request).database, _state(request).settings)
    with _state(request).database.read_session() as session:
        return [describe(m) for m in list_models(session, task or None, state or None)]


@api_router.get("/models/{uid}", response_model=ComparisonOut, responses=error_responses(403, 404, 422))
def api_model(request: Request, uid: ModelUid, _who: Principal = Depends(api_admin)) -> dict[str, Any]:
    try:
        return _comparison(request, uid)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None


@api_router.post("/retrain", dependencies=[Depends(api_csrf)], response_model=RetrainOut,
                 responses=error_responses(400, 403, 422, 503))
def api_retrain(request: Request, body: RetrainIn, who: Principal = Depends(api_admin)) -> dict[str, Any]:
    options = _options(body)
    return {"run_id": _start(request, who, body.task, options)}


@api_router.get("/runs/{run_id}", response_model=RunView, responses=error_responses(403, 404, 422))
def api_run(request: Request, run_id: RunId, _who: Principal = Depends(api_admin)) -> RunView:
    runs = load_runs(_state(request).database, run_id)
    if not runs:
        raise HTTPException(404, f"no training run {run_id}")
    return runs[0]  # a dataclass: FastAPI describes and serialises it as it would a Pydantic model


_PROMOTE_CONFLICT = {"model": PromotionRefusedOut, "description": "the gate refused, or the model is already active"}


@api_router.post("/models/{uid}/promote", dependencies=[Depends(api_csrf)], response_model=PromoteOut,
                 responses={**error_responses(400, 403, 404, 422), 409: _PROMOTE_CONFLICT})
def api_promote(request: Request, uid: ModelUid, body: PromoteIn, who: Principal = Depends(api_admin)) -> Any:
    if body.force and not body.reason.strip():
        raise HTTPException(422, "a forced promotion needs a reason")
    try:
        outcome = _promote(request, who, uid, body.reason if body.force else None)
    except PromotionRefused as exc:
        return JSONResponse({"detail": str(exc), "gate": exc.decision.to_dict()}, status_code=409)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"model_uid": outcome.model_uid, "task": outcome.task, "replaced_uid": outcome.replaced_uid,
            "forced": outcome.forced, "gate": outcome.decision.to_dict() if outcome.decision else None}


@api_router.post("/tasks/{task}/rollback", dependencies=[Depends(api_csrf)], response_model=RollbackOut,
                 responses=error_responses(400, 403, 404, 409, 422))
def api_rollback(request: Request, task: str, body: RollbackIn, who: Principal = Depends(api_admin)) -> dict:
    try:
        outcome = _rollback(request, who, task, body.reason)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"model_uid": outcome.model_uid, "task": outcome.task, "replaced_uid": outcome.replaced_uid}


__all__ = ["api_router", "router"]
