"""``/healthz``, ``/readyz`` and ``/metrics`` on the web app, for load balancers, container health checks and
Prometheus. No login: they show no patient data (check names and counts only), and a probe has no session.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from worker.health import Readiness, readiness_response

router = APIRouter(include_in_schema=False)


def _readiness(request: Request) -> Readiness:
    readiness: Readiness = request.app.state.readiness
    return readiness


@router.get("/healthz")
def healthz() -> JSONResponse:
    return JSONResponse({"alive": True})


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    status, body = readiness_response(_readiness(request))
    return JSONResponse(body, status_code=status)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    from worker.metrics import CONTENT_TYPE, StateCollector, metrics_text

    from worker.drift import DriftCollector

    state = request.app.state.web
    # One drift collector per app: it caches its weeks of figures between scrapes.
    drift = getattr(request.app.state, "drift_collector", None)
    if drift is None:
        drift = request.app.state.drift_collector = DriftCollector(state.settings, state.database)
    text = metrics_text([StateCollector(state.settings, state.database), _readiness(request).collector(), drift])
    return Response(text, media_type=CONTENT_TYPE)
