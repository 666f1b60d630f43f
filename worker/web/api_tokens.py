"""Auth of a sending system on the DICOMweb endpoints (STOW-RS, QIDO-RS, WADO-RS): ``Authorization: Bearer TOKEN``,
a token made by ``dicom-triage tokens add NAME`` (:mod:`worker.db.tokens`). No token or an unknown one: 401."""

from __future__ import annotations

from fastapi import HTTPException, Request

from worker.db.tokens import token_owner

_AUTH = {"WWW-Authenticate": 'Bearer realm="dicomweb"'}


def require_api_token(request: Request) -> str:
    """The name of the system whose token the request bears; 401 without one or with an unknown one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "a bearer token is required (dicom-triage tokens add NAME)", headers=_AUTH)
    with request.app.state.web.database.read_session() as session:
        name = token_owner(session, token.strip())
    if name is None:
        raise HTTPException(401, "unknown token", headers=_AUTH)
    return name


__all__ = ["require_api_token"]
