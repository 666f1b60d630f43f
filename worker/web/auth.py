"""Who is asking: session cookies, login and logout, role checks and CSRF checks as FastAPI dependencies.

Pages answer an anonymous visitor with a redirect to the login page; the JSON API answers 401. A logged-in user
without the needed role gets 403 either way. Every state-changing request carries a CSRF token: a form field
``csrf_token`` for forms, an ``X-CSRF-Token`` header for the JSON API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyCookie, APIKeyHeader
from sqlalchemy import delete, select

from worker.db import User, utcnow
from worker.db.review import Role, WebSession, audit
from worker.web import throttle
from worker.web.security import new_token, needs_rehash, hash_password, token_digest, verify_dummy, verify_password

SESSION_COOKIE = "dt_session"
PRELOGIN_COOKIE = "dt_prelogin"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_LIFETIME = timedelta(hours=12)
# Declared as dependencies only so that the OpenAPI schema names the session cookie every API route needs and the
# header every write needs; the checks themselves are principal() and check_csrf() (auto_error off: they answer).
SESSION_SCHEME = APIKeyCookie(name=SESSION_COOKIE, scheme_name="session", auto_error=False,
                              description="set by POST /login")
CSRF_SCHEME = APIKeyHeader(name=CSRF_HEADER, scheme_name="csrf", auto_error=False,
                           description="the csrf_token of GET /api/me; every write needs it")


@dataclass(frozen=True)
class Principal:
    """The logged-in user of a request (a detached copy of the row) and the CSRF token for its forms."""

    user_id: int
    name: str
    role: Role
    csrf_token: str
    session_token: str


class LoginRequired(Exception):
    """Raised by page dependencies for an anonymous visitor; the app turns it into a redirect to /login."""


def _cookie_args(request: Request) -> dict[str, Any]:
    # Secure whenever the browser reached us over https (directly or via a proxy uvicorn trusts).
    return {"httponly": True, "samesite": "lax", "secure": request.url.scheme == "https", "path": "/"}


def principal(request: Request) -> Principal | None:
    """The request's user from its session cookie, or ``None`` (missing, forged, expired or revoked)."""
    cached = getattr(request.state, "principal", False)
    if cached is not False:
        return cached
    app = request.app.state.web
    token = app.signer.unsign(request.cookies.get(SESSION_COOKIE))
    found: Principal | None = None
    if token is not None:
        with app.database.read_session() as session:
            row = session.execute(
                select(User.id, User.name, User.role)
                .join(WebSession, WebSession.user_pk == User.id)
                .where(WebSession.token_sha256 == token_digest(token), WebSession.expires_at > utcnow())
                .where(User.active.is_(True))
            ).first()
        if row is not None:
            found = Principal(row.id, row.name, Role(row.role), app.signer.csrf_token(token), token)
    request.state.principal = found
    return found


def _require(role: Role | None, api: bool) -> Callable[..., Principal]:
    def dependency(request: Request, _cookie: str | None = Security(SESSION_SCHEME)) -> Principal:
        who = principal(request)
        if who is None:
            if api:
                raise HTTPException(401, "login required", headers={"WWW-Authenticate": "Cookie"})
            raise LoginRequired()
        if role is not None and who.role is not role:
            raise HTTPException(403, f"this needs the {role.value} role")
        return who

    return dependency


page_user = _require(None, api=False)
page_radiologist = _require(Role.RADIOLOGIST, api=False)
page_admin = _require(Role.ADMIN, api=False)
api_user = _require(None, api=True)
api_radiologist = _require(Role.RADIOLOGIST, api=True)


def api_csrf(
    request: Request, token: str | None = Security(CSRF_SCHEME), _who: Principal = Depends(api_user)
) -> None:
    """JSON API writes: the ``X-CSRF-Token`` header must match the session (checked after login, so an anonymous
    write is a 401)."""
    check_csrf(request, token)


def login_redirect(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?next={quote(target, safe='')}"


def safe_next(target: str | None) -> str:
    """Only same-site paths are followed after login (no ``//evil.example`` open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def checked_form(request: Request) -> dict[str, str]:
    """The submitted form, after its CSRF token is checked against the session (or pre-login) cookie, and with
    no NUL in any field (what a form stores is text, which PostgreSQL cannot hold with NUL): a 422 as the JSON
    bodies' ``NO_NUL`` pattern answers."""
    form = await request.form()
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    check_csrf(request, fields.get(CSRF_FIELD))
    if with_nul := [key for key, value in fields.items() if "\x00" in value]:
        raise RequestValidationError([{"type": "string_pattern_mismatch", "loc": ("body", key),
                                       "msg": "must not contain a NUL character"} for key in with_nul])
    return fields


def check_csrf(request: Request, token: str | None) -> None:
    signer = request.app.state.web.signer
    who = principal(request)
    binding = who.session_token if who else signer.unsign(request.cookies.get(PRELOGIN_COOKIE))
    if not signer.check_csrf(binding, token):
        raise HTTPException(403, "CSRF token missing or invalid; reload the page and try again")


def prelogin_binding(request: Request) -> tuple[str, bool]:
    """What the login form's CSRF token is bound to: the pre-login cookie's value, or a new one (``True``)."""
    binding = request.app.state.web.signer.unsign(request.cookies.get(PRELOGIN_COOKIE))
    return (binding, False) if binding is not None else (new_token(), True)


def set_prelogin_cookie(request: Request, response: Response, binding: str) -> None:
    signed = request.app.state.web.signer.sign(binding)
    response.set_cookie(PRELOGIN_COOKIE, signed, max_age=3600, **_cookie_args(request))


class LoginThrottled(Exception):
    """A login attempt refused without checking the password: too many recent failures for the account name or
    the client address (:mod:`worker.web.throttle`)."""

    def __init__(self, refusal: throttle.Refusal) -> None:
        super().__init__(f"retry after {refusal.retry_after} s")
        self.refusal = refusal


def client_address(request: Request) -> str:
    # uvicorn has already replaced it with X-Forwarded-For's when the peer is a proxy it trusts.
    return request.client.host if request.client else "unknown"


def authenticate(request: Request, name: str, password: str) -> str | None:
    """Check a name and password; on success open a session and return its cookie value, else ``None``; raise
    :class:`LoginThrottled` while the name or the client address must wait.

    Every outcome is audited (failures with no user and the attempted name as target, truncated; with the client
    address), and so is each lockout.
    """
    app = request.app.state.web
    policy = throttle.Policy.from_settings(app.settings)
    address = client_address(request)
    keys = [throttle.account_key(name), throttle.address_key(address)]
    with app.database.session() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is not None and not user.active:
            user = None  # a disabled user is treated as an unknown name, in time and in answers
        who = f"user:{user.id}" if user is not None else f"name:{name[:64]}"
        origin = f"addr:{address[:64]}"
        refusal = throttle.check(session, policy, keys, utcnow())
        if refusal is not None:
            audit(session, user, "login.throttled", f"{who} {origin}")
        elif user is None or not verify_password(user.password_hash, password):
            if user is None:
                verify_dummy()  # same time as a wrong password: names cannot be probed by timing
            audit(session, user, "login.failed", f"{who} {origin}")
            for key in throttle.record_failure(session, policy, keys, utcnow()):
                locked = f"{who} {origin}" if key.startswith(throttle.NAME_PREFIX) else origin
                audit(session, user, "login.locked", locked)
            return None
        else:
            throttle.clear(session, throttle.account_key(name))
            if needs_rehash(user.password_hash):
                user.password_hash = hash_password(password)
            now = utcnow()
            session.execute(delete(WebSession).where(WebSession.expires_at <= now))
            token = new_token()
            session.add(WebSession(token_sha256=token_digest(token), user_pk=user.id,
                                   expires_at=now + SESSION_LIFETIME))
            audit(session, user, "login", f"user:{user.id}")
    if refusal is not None:  # raised after the block, so that its audit event is committed
        raise LoginThrottled(refusal)
    return app.signer.sign(token)


def set_session_cookie(request: Request, response: Response, cookie_value: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, cookie_value, max_age=int(SESSION_LIFETIME.total_seconds()), **_cookie_args(request)
    )
    response.delete_cookie(PRELOGIN_COOKIE, path="/")


def end_session(request: Request, response: Response) -> None:
    """Revoke the request's session in the database and clear its cookie."""
    who = principal(request)
    if who is not None:
        with request.app.state.web.database.session() as session:
            session.execute(delete(WebSession).where(WebSession.token_sha256 == token_digest(who.session_token)))
            user = session.get(User, who.user_id)
            audit(session, user, "logout", f"user:{who.user_id}")
    response.delete_cookie(SESSION_COOKIE, path="/")


