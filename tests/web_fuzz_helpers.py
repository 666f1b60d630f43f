"""Helpers for the web fuzz tests (no tests here): the real web app served by uvicorn on a loopback port, on a
migrated database (SQLite in a tmp dir, or a scratch PostgreSQL one) with real DICOM studies, a small installed
(registered) model, and the three roles' logins."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import select

from processes import free_port
from test_web_helpers import (
    PASSWORD, add_users, install_model, make_database, make_settings, seed_plans, seed_study,
)
from worker.db import Database, Instance, JobState, Series, User
from worker.registry import register_installed_models
from worker.web.auth import CSRF_HEADER, SESSION_COOKIE

#: The installed model's card UID (fixed, so that the schema's examples can name it before the app starts).
MODEL_UID = "2.25.26"
#: The logins the fuzzers use; "anonymous" sends no session cookie.
ROLES = ("anonymous", "radiologist", "admin")
USERS = {"radiologist": "rad", "admin": "boss"}


@dataclass
class Login:
    role: str
    cookies: dict[str, str] = field(default_factory=dict)
    csrf_token: str = ""

    def headers(self) -> dict[str, str]:
        return {CSRF_HEADER: self.csrf_token} if self.csrf_token else {}


@dataclass
class LiveApp:
    """The served app and the rows the fuzzers may aim at (so that some examples reach real data)."""

    base_url: str
    database: Database
    logins: dict[str, Login]
    study_id: int
    result_id: int
    instance_id: int
    model_uid: str
    #: Users a fuzzed form must not disable: the fuzzers' own logins.
    protected_user_ids: frozenset[int]


def log_in(client: httpx.Client, user: str, password: str = PASSWORD) -> Login:
    """Log ``client`` in as ``user`` through the login form (with its CSRF token); the session and its API CSRF
    token. ``client`` may be a Starlette ``TestClient`` (an httpx client) or one aimed at a live server."""
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert token, "the login page has no CSRF token"
    answer = client.post("/login", data={"username": user, "password": password, "csrf_token": token[1]})
    assert answer.status_code == 303, answer.text
    me = client.get("/api/me")
    assert me.status_code == 200, me.text
    return Login(role=me.json()["role"], cookies={SESSION_COOKIE: client.cookies[SESSION_COOKIE]},
                 csrf_token=me.json()["csrf_token"])


@contextmanager
def live_app(tmp: Path, database_url: str | None = None) -> Iterator[LiveApp]:
    """The web app as ``serve`` runs it (uvicorn in a thread), until the block ends; on ``database_url`` (an empty
    database), else on SQLite in ``tmp``."""
    from worker.web.cli import start_in_thread

    settings = make_settings(tmp, web_port=free_port(), **({"database_url": database_url} if database_url else {}))
    database = make_database(settings)
    add_users(database)
    model_uid = install_model(settings, uid=MODEL_UID)
    register_installed_models(database, settings)
    study_id, result_id = seed_study(database, settings, cls="glioma", label="glioma", slices=1, model_uid=model_uid)
    seed_study(database, settings, cls="notumor", label="notumor", slices=1, state=JobState.RUNNING)
    seed_plans(database)  # backfill plans 1 (running) and 2 (done)
    with database.read_session() as session:
        instance_id = session.scalar(select(Instance.id).join(Series).where(Series.study_pk == study_id))
        protected = frozenset(session.scalars(select(User.id).where(User.name.in_(list(USERS.values())))))
    server, thread = start_in_thread(settings, database)
    base_url = f"http://127.0.0.1:{settings.web_port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.05)
        logins = {"anonymous": Login("anonymous")}
        for role, user in USERS.items():
            with httpx.Client(base_url=base_url, follow_redirects=False, timeout=30) as client:
                logins[role] = log_in(client, user)
        assert result_id is not None and instance_id is not None
        yield LiveApp(base_url, database, logins, study_id, result_id, instance_id, model_uid, protected)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        database.dispose()

