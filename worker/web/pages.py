"""Server-rendered pages: login, worklist, study, decisions, images and the admin pages."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import select

from models.tasks import INDETERMINATE, get_task
from worker.db import AuditEvent, Instance, Result, User
from worker.db.review import Role, audit
from worker.db.triage import ModelResultCount
from worker.web import auth
from worker.web.auth import Principal, checked_form, page_admin, page_radiologist, page_user
from worker.web.decisions import DecisionError, decide
from worker.web.params import (
    AuditBefore, AxialSlice, FindingFilter, Frame, InstanceId, PageCursor, PlanId, ResultId, ReviewFilter,
    StatusFilter, StudyId, TaskFilter, UserId,
)
from worker.web.rendering import RenderError
from worker.web.study import load_study, reformatted_slices
from worker.web.users import UserError, add_user, list_users, set_active
from worker.web.worklist import FILTER_CHOICES, PAGE_SIZE, WorklistFilter, load_worklist

router = APIRouter(include_in_schema=False)
IMAGE_CACHE_CONTROL = "private, max-age=86400"
#: How often the worklist page reloads itself (seconds).
WORKLIST_REFRESH_SECONDS = 30
#: How often the backfill page reloads itself (seconds).
BACKFILL_REFRESH_SECONDS = 10


def _state(request: Request) -> Any:
    return request.app.state.web


def _render(request: Request, template: str, who: Principal | None, **context: Any) -> Response:
    return _state(request).templates.TemplateResponse(request, template, {"who": who, **context})


def parse_filters(status: str | None, task: str | None, finding: str | None, review: str | None) -> WorklistFilter:
    """The worklist filter of filter parameters already validated (:mod:`worker.web.params`); "" means any."""
    return WorklistFilter(status=status or None, task=task or None, finding=finding or None, review=review or None)


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    if auth.principal(request) is not None:
        return RedirectResponse(auth.safe_next(next), status_code=303)
    binding, is_new = auth.prelogin_binding(request)
    page = _render(request, "login.html", None, csrf_token=_state(request).signer.csrf_token(binding),
                   next=auth.safe_next(next), error=None)
    if is_new:
        auth.set_prelogin_cookie(request, page, binding)
    return page


@router.post("/login")
def login(request: Request, form: dict[str, str] = Depends(checked_form)) -> Response:
    target = auth.safe_next(form.get("next"))
    try:
        cookie = auth.authenticate(request, form.get("username", ""), form.get("password", ""))
    except auth.LoginThrottled as throttled:
        wait = throttled.refusal.retry_after
        why = "locked after too many failed logins" if throttled.refusal.locked else "too many failed logins"
        page = _render(request, "login.html", None, csrf_token=form.get(auth.CSRF_FIELD, ""), next=target,
                       error=f"Login {why}: try again in {wait} s.")
        page.status_code = 429
        page.headers["Retry-After"] = str(wait)
        return page
    if cookie is None:
        page = _render(request, "login.html", None, csrf_token=form.get(auth.CSRF_FIELD, ""), next=target,
                       error="Wrong user name or password.")
        page.status_code = 401
        return page
    response = RedirectResponse(target, status_code=303)
    auth.set_session_cookie(request, response, cookie)
    return response


@router.post("/logout")
def logout(request: Request, _who: Principal = Depends(page_user), _form: dict[str, str] = Depends(checked_form)) -> Response:
    response = RedirectResponse("/login", status_code=303)
    auth.end_session(request, response)
    return response


@router.get("/")
def worklist_page(
    request: Request,
    status: StatusFilter = None,
    task: TaskFilter = None,
    finding: FindingFilter = None,
    review: ReviewFilter = None,
    cursor: PageCursor = None,
    who: Principal = Depends(page_user),
) -> Response:
    filters = parse_filters(status, task, finding, review)
    with _state(request).database.read_session() as session:
        result = load_worklist(session, filters, page_size=PAGE_SIZE, cursor=cursor)  # type: ignore[arg-type]
    query = {k: v for k, v in vars(filters).items() if v}
    return _render(
        request, "worklist.html", who, worklist=result, filters=filters, choices=FILTER_CHOICES,
        refresh=WORKLIST_REFRESH_SECONDS,
        # Links carry the filters and a cursor; the first page has none.
        page_link=lambda to: "/?" + urlencode({**query, **({"cursor": to.encode()} if to else {})}),
    )


@router.get("/studies/{study_id}")
def study_page(
    request: Request, study_id: StudyId, report_failed: bool = False, who: Principal = Depends(page_user)
) -> Response:
    with _state(request).database.session() as session:
        study = load_study(session, study_id)
        if study is None:
            raise HTTPException(404, f"no study {study_id}")
        audit(session, session.get(User, who.user_id), "view.study", f"study:{study_id}")
    return _render(request, "study.html", who, study=study, can_decide=who.role is Role.RADIOLOGIST,
                   report_failed=report_failed)


@router.post("/results/{result_id}/decision")
def decision_form(
    request: Request,
    result_id: ResultId,
    who: Principal = Depends(page_radiologist),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    try:
        outcome = decide(
            _state(request).database, result_id, who.user_id, form.get("decision", ""), form.get("label"),
            form.get("comment", ""), _state(request).on_correction,
        )
    except DecisionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    notice = "?report_failed=1" if outcome.report_error else ""
    return RedirectResponse(f"/studies/{outcome.study_id}{notice}#result-{result_id}", status_code=303)


def _instance_file(request: Request, instance_id: int) -> tuple[str, Path]:
    with _state(request).database.read_session() as session:
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise HTTPException(404, f"no instance {instance_id}")
        return instance.sop_instance_uid, Path(instance.archive_path)


@router.get("/thumbnails/{instance_id}/{frame}.png")
def thumbnail(
    request: Request, instance_id: InstanceId, frame: Frame, _who: Principal = Depends(page_user)
) -> Response:
    sop_uid, path = _instance_file(request, instance_id)
    try:
        png = _state(request).images.thumbnail(sop_uid, path, frame)
    except RenderError as exc:
        raise HTTPException(422, str(exc)) from None
    return FileResponse(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE_CONTROL})


@router.get("/reformats/{result_id}/{number}.png")
def axial_slice(
    request: Request, result_id: ResultId, number: AxialSlice, _who: Principal = Depends(page_user)
) -> Response:
    """Axial slice ``number`` of the volume a result read as axial slices cut from it, as the model saw it."""
    with _state(request).database.read_session() as session:
        result = session.get(Result, result_id)
        if result is None or not reformatted_slices(result):
            raise HTTPException(404, "no result read axial slices cut from a volume under this id")
        task = result.task
        rows = session.execute(select(Instance.sop_instance_uid, Instance.archive_path)
                               .where(Instance.series_pk == result.series_pk)
                               .order_by(Instance.instance_number, Instance.id)).all()
    # The cache's name for the volume: its instances, so a series that grew is cut again.
    key = hashlib.sha256("\n".join(sorted(uid for uid, _ in rows)).encode()).hexdigest()[:32]
    try:
        png = _state(request).images.axial_slice(key, task, [Path(path) for _, path in rows], number)
    except RenderError as exc:
        raise HTTPException(422, str(exc)) from None
    return FileResponse(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE_CONTROL})


@router.get("/heatmaps/{result_id}/{instance_id}/{frame}.png")
def heatmap(
    request: Request, result_id: ResultId, instance_id: InstanceId, frame: Frame, who: Principal = Depends(page_user)
) -> Response:
    sop_uid, path = _instance_file(request, instance_id)
    with _state(request).database.read_session() as session:
        result = session.get(Result, result_id)
        instance_series = session.scalar(select(Instance.series_pk).where(Instance.id == instance_id))
        if result is None or result.series_pk != instance_series:
            raise HTTPException(404, "no such result for this instance")
        model_uid, task, label = result.model_uid, result.task, result.label
        reformatted = reformatted_slices(result)
    if reformatted:
        # The model read axial slices cut from the volume (worker.decoding.slice_key), not this acquired frame.
        raise HTTPException(422, "no heat map: the model read this volume as axial slices cut from it, not its "
                                 "acquired frames")
    if label == INDETERMINATE:
        # Grad-CAM explains one class, and the model named none; a map of its likeliest class would look like an
        # explanation of a decision it did not make.
        raise HTTPException(422, "no heat map: the model judged this series indeterminate and named no class "
                                 "to explain")
    if label == get_task(task).untyped_finding:
        # Likewise: the type was not assessed on this sequence, and a map of one tumour class would explain it.
        raise HTTPException(422, "no heat map: the model gave no tumour type on this sequence, so no class to "
                                 "explain")
    try:
        png = _state(request).images.heatmap(model_uid, task, label, sop_uid, path, frame)
    except RenderError as exc:
        raise HTTPException(422, str(exc)) from None
    return FileResponse(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE_CONTROL})


@router.get("/admin/users")
def users_page(request: Request, who: Principal = Depends(page_admin), error: str | None = None) -> Response:
    with _state(request).database.read_session() as session:
        users = list_users(session)
    return _render(request, "admin_users.html", who, users=users, roles=[r.value for r in Role], error=error)


@router.post("/admin/users")
def users_add(request: Request, who: Principal = Depends(page_admin), form: dict[str, str] = Depends(checked_form)) -> Response:
    try:
        with _state(request).database.session() as session:
            add_user(session, form.get("username", ""), form.get("role", ""), form.get("password", ""),
                     by=session.get(User, who.user_id))
    except UserError as exc:
        with _state(request).database.read_session() as session:
            users = list_users(session)
        page = _render(request, "admin_users.html", who, users=users, roles=[r.value for r in Role], error=str(exc))
        page.status_code = 422
        return page
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/admin/users/{user_id}/active")
def users_set_active(
    request: Request, user_id: UserId, who: Principal = Depends(page_admin),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    if user_id == who.user_id:
        raise HTTPException(422, "you cannot disable yourself")
    try:
        with _state(request).database.session() as session:
            set_active(session, user_id, form.get("active") == "1", by=session.get(User, who.user_id))
    except UserError as exc:
        raise HTTPException(404, str(exc)) from None
    return RedirectResponse("/admin/users", status_code=303)


@router.get("/admin/models")
def models_page(request: Request, who: Principal = Depends(page_admin)) -> Response:
    """The registry's models per task (state, every evaluation split of its card) and how many results each model
    produced."""
    from worker.registry import describe, list_models
    from worker.web.admin_models import evaluation_splits

    with _state(request).database.read_session() as session:
        registered = [describe(model) for model in list_models(session)]
        # Kept by the database on every result (worker.db.triage), not counted over the results table.
        counts = {uid: n for uid, n in session.execute(select(ModelResultCount.model_uid, ModelResultCount.results))}
    evaluations = {model["model_uid"]: evaluation_splits(model["metrics"]) for model in registered}
    return _render(request, "admin_models.html", who, registered=registered, counts=counts,
                   evaluations=evaluations, gates=_last_gates(_state(request).database))


@router.get("/admin/drift")
def drift_page(request: Request, who: Principal = Depends(page_admin)) -> Response:
    """Per task and week: predicted class shares, indeterminate and correction rates, mean confidence, warnings.
    A page of its own: it reads weeks of results, which the models page (timed at a million studies) must not."""
    from worker.drift import drift_report

    state = _state(request)
    return _render(request, "admin_drift.html", who, drift=drift_report(state.database, state.settings))


@router.get("/admin/backfill")
def backfill_page(request: Request, who: Principal = Depends(page_admin)) -> Response:
    """Each backfill plan as ``backfill status`` reports it (:func:`worker.backfill.plan_status`: counts per state,
    failures with reasons, progress, ETA, pause for live ingest), with a cancel button while it may still run and a
    retry button while studies failed."""
    from worker.backfill import CANCELLABLE, plan_status

    return _render(request, "admin_backfill.html", who, plans=plan_status(_state(request).database),
                   cancellable=CANCELLABLE, refresh=BACKFILL_REFRESH_SECONDS)


@router.post("/admin/backfill/{plan_id}/cancel")
def backfill_cancel(request: Request, plan_id: PlanId, who: Principal = Depends(page_admin),
                    _form: dict[str, str] = Depends(checked_form)) -> Response:
    """``backfill cancel`` from the page: studies not yet retrieving are not retrieved (404 no such plan, 409 a plan
    already done or cancelled)."""
    from worker.backfill import BackfillError, PlanNotFound, cancel_plan

    database = _state(request).database
    try:
        cancel_plan(database, plan_id)
    except PlanNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except BackfillError as exc:
        raise HTTPException(409, str(exc)) from None
    with database.session() as session:
        audit(session, session.get(User, who.user_id), "backfill.cancel", f"backfill_plan:{plan_id}")
    return RedirectResponse("/admin/backfill", status_code=303)


@router.post("/admin/backfill/{plan_id}/retry")
def backfill_retry(request: Request, plan_id: PlanId, who: Principal = Depends(page_admin),
                   _form: dict[str, str] = Depends(checked_form)) -> Response:
    """``backfill retry`` from the page: the plan's failed studies planned again, not those a cancel failed (the CLI's
    ``--include-cancelled`` is not offered here); a done or cancelled plan runs again (404 no such plan)."""
    from worker.backfill import PlanNotFound, retry_plan

    database = _state(request).database
    try:
        retry_plan(database, plan_id)
    except PlanNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    with database.session() as session:
        audit(session, session.get(User, who.user_id), "backfill.retry", f"backfill_plan:{plan_id}")
    return RedirectResponse("/admin/backfill", status_code=303)


def _last_gates(database: Any) -> dict[str, dict[str, Any]]:
    """Each model's latest gate verdict (a refusal, or the one its promotion passed or was forced past), from the
    registry's events: what the models page shows beside it."""
    from worker.db.registry import ModelEvent, RegisteredModel

    verdicts: dict[str, dict[str, Any]] = {}
    with database.read_session() as session:
        rows = session.execute(
            select(RegisteredModel.model_uid, ModelEvent.action, ModelEvent.reason, ModelEvent.details)
            .join(ModelEvent, ModelEvent.model_pk == RegisteredModel.id)
            .where(ModelEvent.action.in_(("promotion_refused", "promote", "promote_forced")))
            .order_by(ModelEvent.id))
        for uid, action, reason, details in rows:
            gate = (details or {}).get("gate")
            if gate:
                verdicts[uid] = {"action": action, "reason": reason, **gate}
    return verdicts


AUDIT_PAGE_SIZE = 200


@router.get("/admin/audit")
def audit_page(request: Request, who: Principal = Depends(page_admin), before: AuditBefore = None) -> Response:
    """The audit log, newest first, ``AUDIT_PAGE_SIZE`` events a page (``before``: an event id to page back from)."""
    query = (
        select(AuditEvent.id, AuditEvent.created_at, User.name, AuditEvent.action, AuditEvent.target)
        .outerjoin(User, User.id == AuditEvent.user_pk)
        .order_by(AuditEvent.id.desc())
        .limit(AUDIT_PAGE_SIZE)
    )
    if before is not None:
        query = query.where(AuditEvent.id < before)
    with _state(request).database.read_session() as session:
        events = session.execute(query).all()
    older = events[-1].id if len(events) == AUDIT_PAGE_SIZE else None
    return _render(request, "admin_audit.html", who, events=events, older=older)
