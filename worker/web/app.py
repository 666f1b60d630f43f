"""The radiologists' web worklist: a FastAPI app with server-rendered pages and a JSON API.

Build it with :func:`create_app`. Every page and API route needs a logged-in user; admin pages (and OpenAPI's
schema) need the admin role, decisions the radiologist role. Parameters are validated once for pages and API alike
(:mod:`worker.web.params`): a bad one is a 422, an error page for a browser and JSON for the API. Responses carry
a strict Content-Security-Policy (no inline script, nothing from other origins) and are not cached, since they
show patient data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from config import Settings
from worker.db import Database
from worker.db.review import Role
from worker.health import Readiness, archive_check, broker_check, database_check
from worker.web import dicomweb, ops, stow
from worker.web.auth import LoginRequired, login_redirect, principal
from worker.web.decisions import CorrectionHook
from worker.web.rendering import ImageCache
from worker.web.security import Signer, load_or_create_secret

_HERE = Path(__file__).resolve().parent

#: Browsers that once reached us over HTTPS use nothing else for a year.
HSTS = "max-age=31536000"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@dataclass
class WebState:
    """What the routes share: settings, database, cookie signer, templates, image cache, the correction hook."""

    settings: Settings
    database: Database
    signer: Signer
    templates: Jinja2Templates
    images: ImageCache
    on_correction: CorrectionHook | None


def person_name(value: str) -> str:
    """A DICOM PN (``Family^Given^Middle^Prefix^Suffix``, alphabetic group) as people write it: ``Family, Given
    Middle``. Plain text: the templates escape it like any other header value."""
    family, _, rest = value.split("=")[0].partition("^")
    given = " ".join(part for part in rest.split("^")[:2] if part)
    return f"{family}, {given}" if family and given else family or given


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),  # every template escapes, always
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda p: "" if p is None else f"{100.0 * float(p):.1f} %"
    env.filters["when"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")
    env.filters["person_name"] = person_name
    return Jinja2Templates(env=env)


def _model_dirs(settings: Settings, database: Database) -> Callable[[str, str], Path]:
    from worker.registry import RegistryError, get_model
    from worker.registry.store import installed_model_dir

    def model_dir_for(task: str, model_uid: str) -> Path:
        with database.read_session() as session:
            try:
                return Path(get_model(session, model_uid).model_dir)
            except RegistryError:
                return installed_model_dir(settings, task)  # results made before the registry knew the model

    return model_dir_for


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", "")


def _error_page(request: Request, status: int, detail: str, headers: dict[str, str] | None) -> Response:
    state: WebState = request.app.state.web
    return state.templates.TemplateResponse(
        request, "error.html", {"status": status, "detail": detail, "who": principal(request)},
        status_code=status, headers=headers,
    )


def _routes() -> FastAPI:
    """The app with its routes and no state yet: what the OpenAPI schema is made from."""
    from worker.web import admin_models, api, pages

    app = FastAPI(
        title="dicom-triage worklist",
        version="1",
        description="Radiologists' review of the AI triage results. Log in at /login; writes need X-CSRF-Token.",
        docs_url=None,  # Swagger UI would load script from a CDN; the schema is served at /openapi.json
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(admin_models.router)
    app.include_router(admin_models.api_router)
    return app


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI schema ``GET /openapi.json`` serves to admins, made without settings or a database (the
    schema fuzz tests load it before the app they test is started)."""
    return _openapi_schema(_routes())


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema, with each operation's security requirements as one object: FastAPI lists them
    as alternatives, but a write needs the session cookie *and* the CSRF header."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if operation.get("security"):
                operation["security"] = [{name: [] for needed in operation["security"] for name in needed}]
    return schema


def create_app(
    settings: Settings,
    database: Database | None = None,
    on_correction: CorrectionHook | None = None,
    readiness: Readiness | None = None,
) -> FastAPI:
    """The web app for ``settings``; the database must already be migrated (:func:`worker.db.upgrade_database`).

    ``on_correction(review_id)`` is called after each committed correction; by default it publishes the revised
    SR (:func:`worker.reporting.publish_review`, which names its predecessor and queues its deliveries). Heat maps
    are drawn by the model that made the result: the registry's folder for its uid, else the task's installed one.
    ``readiness``: the checks ``/readyz`` runs (default: database, broker, archive; ``serve`` adds its listener's).
    """
    database = database or Database(settings.effective_database_url)
    if on_correction is None:
        from worker.reporting import publish_review

        on_correction = functools.partial(publish_review, database, settings)
    app = _routes()
    app.state.web = WebState(
        settings=settings,
        database=database,
        signer=Signer(load_or_create_secret(settings.data_dir)),
        templates=_templates(),
        images=ImageCache(settings.data_dir / "web-cache", _model_dirs(settings, database)),
        on_correction=on_correction,
    )
    app.state.readiness = readiness or Readiness(
        "web", [database_check(database), broker_check(settings), archive_check(settings)])
    app.include_router(ops.router)
    app.include_router(stow.router)
    app.include_router(dicomweb.router)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        who = principal(request)
        if who is None:
            raise HTTPException(401, "login required")
        if who.role is not Role.ADMIN:
            raise HTTPException(403, "this needs the admin role")
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_schema(app)
        return JSONResponse(app.openapi_schema)

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, _exc: LoginRequired) -> Response:
        return RedirectResponse(login_redirect(request), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return _error_page(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if _wants_json(request):
            return await request_validation_exception_handler(request, exc)
        # The page says which parameter and why, not the value: it may be anything the browser was sent to.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in exc.errors())
        return _error_page(request, 422, f"invalid request: {problems}", None)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if request.url.scheme == "https":  # HSTS means nothing over plain HTTP (RFC 6797 8.1), and is ignored there
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        return response

    return app
