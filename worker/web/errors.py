"""The JSON API's error answers, as the OpenAPI schema declares them.

Every refusal is ``{"detail": ...}``: a sentence for the app's own refusals (``HTTPException``), a list of the
parameters at fault for a request FastAPI's validation refused (422). Routes declare which of these they answer
with :func:`error_responses`, so a client (and the schema fuzzer in CI) can rely on the shape of every answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ValidationIssue(BaseModel):
    """One parameter a request got wrong (FastAPI's validation error item)."""

    model_config = ConfigDict(extra="allow")  # FastAPI adds input and ctx where it has them

    loc: list[str | int] = Field(description="where: path, query, header, cookie or body, then the name")
    msg: str
    type: str


class ErrorOut(BaseModel):
    detail: str | list[ValidationIssue]


#: What each status means on every route that answers it.
_MEANINGS = {
    400: "the body cannot be read (not UTF-8 text)",
    401: "not logged in",
    403: "the user lacks the role this needs, or the CSRF token is missing or wrong",
    404: "no such row",
    409: "the request conflicts with the current state",
    422: "a parameter or the body is invalid",
    503: "a service this needs (the broker) does not answer",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: 401 always (every route needs a login), plus ``statuses``. A route with
    parameters lists 422: it replaces FastAPI's own 422 entry, which knows only the list form of ``detail``."""
    return {status: {"model": ErrorOut, "description": _MEANINGS[status]} for status in sorted({401, *statuses})}
