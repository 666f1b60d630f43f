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
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from models.tasks import TASKS
from training.cli import ARCHITECTURE_NAMES
from worker.db import User
from worker.db.review import Role, audit
from worker.registry import (
    PromotionRefused,
    RegistryError,
    describe,
    gate_decision,
    get_model,
    list_models,
    model_events,
    promote,
    register_installed_models,
    rollback,
)
from worker.retraining import MAX_TIME_BUDGET_MINUTES, RetrainOptions, load_runs, make_send, request_retraining
from worker.web.auth import Principal, api_csrf, api_user, checked_form, page_admin

router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/admin", tags=["admin"])
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
    return {"models": models, "runs": load_runs(state.database)}


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
        active = next((describe(m) for m in list_models(session, model.task, "active")), None)
    mine, theirs = _reference(shown), _reference(active) if active else None
    verdict = None
    if mine and theirs and active and active["model_uid"] != uid:
        try:
            verdict = gate_decision(mine, theirs, state.settings.promotion_tolerance).to_dict()
        except ValueError:
            verdict = None  # evaluated on different reference sets: the promotion re-evaluates
    return {"model": shown, "active": active, "reference": mine, "active_reference": theirs, "verdict": verdict,
            "figures": _figures(Path(shown["model_dir"]))}


def _event_json(event: Any) -> dict[str, Any]:
    return {"action": event.action, "actor": event.actor, "reason": event.reason,
            "at": event.created_at.isoformat(timespec="seconds"), "details": event.details}


def _figures(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("*.png") if _FIGURE_NAME.match(p.name))


def _flag(fields: dict[str, Any], name: str, default: str) -> bool:
    """A form or JSON yes/no field: false for 0, false or empty."""
    return str(fields.get(name, default)) not in ("0", "false", "False", "")


def _options(fields: dict[str, Any]) -> RetrainOptions:
    try:
        return RetrainOptions(
            epochs=int(fields.get("epochs") or 20),
            architecture=str(fields.get("architecture") or "triage-cnn"),
            input_size=str(fields["input_size"]) if fields.get("input_size") else None,
            batch_size=int(fields.get("batch_size") or 32),
            confirmed_only=_flag(fields, "confirmed_only", "1"),
            since=str(fields["since"]) if fields.get("since") else None,
            start_from_active=_flag(fields, "start_from_active", "0"),
            time_budget_minutes=float(fields["time_budget_minutes"]) if fields.get("time_budget_minutes") else None,
        )
    except (TypeError, ValueError) as exc:
        raise HTTPException(422, f"bad retraining options: {exc}") from None


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
    run_id = _start(request, who, form.get("task", ""), _options(form))
    return RedirectResponse(f"/admin/registry/runs/{run_id}", status_code=303)


@router.get("/admin/registry/runs/{run_id}")
def run_page(request: Request, run_id: int, who: Principal = Depends(page_admin)) -> Response:
    runs = load_runs(_state(request).database, run_id)
    if not runs:
        raise HTTPException(404, f"no training run {run_id}")
    run = runs[0]
    refresh = RUN_REFRESH_SECONDS if run.state in ("queued", "running") else None
    return _render(request, "admin_models_run.html", who, run=run, refresh=refresh)


@router.get("/admin/registry/models/{uid}")
def model_page(request: Request, uid: str, who: Principal = Depends(page_admin), error: str | None = None) -> Response:
    try:
        context = _comparison(request, uid)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _render(request, "admin_models_model.html", who, error=error, refused=None, **context)


@router.get("/admin/registry/models/{uid}/figures/{name}")
def model_figure(request: Request, uid: str, name: str, _who: Principal = Depends(page_admin)) -> Response:
    with _state(request).database.read_session() as session:
        try:
            folder = Path(get_model(session, uid).model_dir)
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
    if not _FIGURE_NAME.match(name) or not (folder / name).is_file():
        raise HTTPException(404, f"no figure {name}")
    return FileResponse(folder / name, media_type="image/png")


@router.post("/admin/registry/models/{uid}/promote")
def promote_form(request: Request, uid: str, who: Principal = Depends(page_admin),
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


class RetrainIn(BaseModel):
    task: str
    epochs: int = Field(default=20, ge=1, le=1000)
    architecture: str = "triage-cnn"
    input_size: str | None = None
    batch_size: int = Field(default=32, ge=1, le=4096)
    confirmed_only: bool = True
    since: str | None = None
    start_from_active: bool = False
    time_budget_minutes: float | None = Field(default=None, gt=0, le=MAX_TIME_BUDGET_MINUTES)


class PromoteIn(BaseModel):
    force: bool = False
    reason: str = Field(default="", max_length=2000)


class RollbackIn(BaseModel):
    reason: str = Field(default="", max_length=2000)


@api_router.get("/models")
def api_models(request: Request, task: str | None = None, state: str | None = None,
               _who: Principal = Depends(api_admin)) -> list[dict[str, Any]]:
    register_installed_models(_state(request).database, _state(request).settings)
    try:
        with _state(request).database.read_session() as session:
            return [describe(m) for m in list_models(session, task, state)]
    except (KeyError, ValueError) as exc:
        raise HTTPException(422, str(exc)) from None


@api_router.get("/models/{uid}")
def api_model(request: Request, uid: str, _who: Principal = Depends(api_admin)) -> dict[str, Any]:
    try:
        return _comparison(request, uid)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None


@api_router.post("/retrain", dependencies=[Depends(api_csrf)])
def api_retrain(request: Request, body: RetrainIn, who: Principal = Depends(api_admin)) -> dict[str, Any]:
    options = _options(body.model_dump(exclude={"task"}))
    return {"run_id": _start(request, who, body.task, options)}


@api_router.get("/runs/{run_id}")
def api_run(request: Request, run_id: int, _who: Principal = Depends(api_admin)) -> dict[str, Any]:
    runs = load_runs(_state(request).database, run_id)
    if not runs:
        raise HTTPException(404, f"no training run {run_id}")
    return vars(runs[0])


@api_router.post("/models/{uid}/promote", dependencies=[Depends(api_csrf)])
def api_promote(request: Request, uid: str, body: PromoteIn, who: Principal = Depends(api_admin)) -> Any:
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


@api_router.post("/tasks/{task}/rollback", dependencies=[Depends(api_csrf)])
def api_rollback(request: Request, task: str, body: RollbackIn, who: Principal = Depends(api_admin)) -> dict:
    try:
        outcome = _rollback(request, who, task, body.reason)
    except RegistryError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"model_uid": outcome.model_uid, "task": outcome.task, "replaced_uid": outcome.replaced_uid}


__all__ = ["api_router", "router"]
