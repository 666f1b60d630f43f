"""The web app's parameter contract (:mod:`worker.web.params`) through HTTP on a real migrated database: a bad
id, cursor or filter gets the same 4xx from the page and from the JSON API (an error page for a browser, JSON for
the API), never a 500; the bounds hold on PostgreSQL, whose ``integer`` ids are the narrower; the retraining form
and the API refuse the same bad value alike."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from test_web_helpers import add_users, make_database, make_settings, seed_study
from web_fuzz_helpers import Login, log_in
from worker.db import Database, Result, Review
from worker.retraining import load_runs
from worker.web.app import create_app
from worker.web.params import DB_ID_MAX

HTML = {"Accept": "text/html"}


class Env:
    def __init__(self, tmp: Path, database: Database | None = None) -> None:
        self.settings = make_settings(tmp)
        self.database = database or make_database(self.settings)
        add_users(self.database)
        self.study, _ = seed_study(self.database, self.settings, cls="glioma", label="glioma", slices=1)
        self.app = create_app(self.settings, self.database, on_correction=lambda _review: None)

    def client(self, user: str) -> tuple[TestClient, Login]:
        client = TestClient(self.app, follow_redirects=False, raise_server_exceptions=False)
        return client, log_in(client, user)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("params"))
    yield environment
    environment.database.dispose()


HUGE = "99999999999999999999"  # beyond 64 bits: it reached SQLite and answered 500
#: The largest cursor but its direction: page, triage group, microseconds (year 5138) and study id at their bounds.
LAST = f"999999999.2.99999999999999999.{DB_ID_MAX}"


@pytest.mark.parametrize(
    ("page", "api", "status"),
    [
        (f"/?cursor={HUGE}", f"/api/worklist?cursor={HUGE}", 422),
        ("/?cursor=a-1.1.1.1", "/api/worklist?cursor=a-1.1.1.1", 422),
        ("/?cursor=a0.1.1.1", "/api/worklist?cursor=a0.1.1.1", 422),
        ("/?cursor=two", "/api/worklist?cursor=two", 422),
        ("/?cursor=a2.1.123456789012345678.1", "/api/worklist?cursor=a2.1.123456789012345678.1", 422),
        # Beyond the id column: the same position as its largest id (no study has a larger one), not a 500.
        ("/?cursor=a2.1.1.9999999999", "/api/worklist?cursor=a2.1.1.9999999999", 200),
        (f"/?cursor=a{LAST}", f"/api/worklist?cursor=a{LAST}", 200),
        (f"/?cursor=b{LAST}", f"/api/worklist?cursor=b{LAST}", 200),
        ("/?status=lost", "/api/worklist?status=lost", 422),
        ("/?status=&finding=", "/api/worklist?status=&finding=", 200),  # a form's "any"
        (f"/studies/{HUGE}", f"/api/studies/{HUGE}", 422),
        ("/studies/0", "/api/studies/0", 422),
        ("/studies/-3", "/api/studies/-3", 422),
        (f"/studies/{DB_ID_MAX + 1}", f"/api/studies/{DB_ID_MAX + 1}", 422),
        (f"/studies/{DB_ID_MAX}", f"/api/studies/{DB_ID_MAX}", 404),
    ],
)
def test_page_and_api_answer_a_bad_value_alike(
    env: Env, page: str, api: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = env.client("rad")
    caplog.set_level(logging.ERROR)
    shown = client.get(page, headers=HTML)
    answered = client.get(api)
    assert (shown.status_code, answered.status_code) == (status, status), (shown.text[:300], answered.text)
    if status == 422:
        assert shown.headers["content-type"].startswith("text/html") and "invalid request" in shown.text
        assert isinstance(answered.json()["detail"], list)  # FastAPI's validation answer, as the schema says
    # No traceback logged. Other levels are not this test's business: an earlier test in the session may have
    # left a library logger (httpx) at INFO, whose records then reach caplog whatever its own level.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_largest_id_and_cursor_work_on_postgresql(tmp_path: Path, postgres_database: Database) -> None:
    """PostgreSQL's ``integer`` ids are why ids stop at 2**31 - 1: one above was a DataError (500) there."""
    client, _ = Env(tmp_path, postgres_database).client("rad")
    assert client.get(f"/api/studies/{DB_ID_MAX}").status_code == 404
    assert client.get(f"/studies/{DB_ID_MAX}", headers=HTML).status_code == 404
    assert client.get(f"/api/worklist?cursor=a{LAST}&page_size=500").json()["items"] == []
    assert client.get(f"/?cursor=b{LAST}", headers=HTML).status_code == 200


@pytest.mark.parametrize(
    "bad", [{"epochs": "0"}, {"since": "2024-02-31"}, {"architecture": "unet"}, {"task": "knee"},
            {"input_size": "64x64x2"}, {"confirmed_only": "perhaps"}],
)
def test_retraining_form_and_api_refuse_a_bad_value_alike(env: Env, bad: dict[str, str]) -> None:
    client, login = env.client("boss")
    fields = {"task": "brain-tumor", "epochs": "3", **bad}
    form = client.post("/admin/registry/retrain", data={**fields, "csrf_token": login.csrf_token}, headers=HTML)
    body = {k: int(v) if k == "epochs" else v for k, v in fields.items()}
    api = client.post("/api/admin/retrain", json=body, headers=login.headers())
    assert (form.status_code, api.status_code) == (422, 422), (form.text[:300], api.text)
    assert load_runs(env.database) == []


def test_stored_text_with_nul_is_refused_on_postgresql(tmp_path: Path, postgres_database: Database) -> None:
    """PostgreSQL's text cannot hold NUL: a name, comment or reason with one was a DataError (500) there."""
    env = Env(tmp_path, postgres_database)
    with postgres_database.read_session() as session:
        result = session.scalar(select(Result.id))
    anonymous = TestClient(env.app, follow_redirects=False, raise_server_exceptions=False)
    token = anonymous.get("/login").text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert anonymous.post("/login", data={"username": "rad\x00", "password": "x" * 12,
                                          "csrf_token": token}).status_code == 422
    rad, login = env.client("rad")
    assert rad.post(f"/results/{result}/decision", data={"decision": "confirm", "comment": "a\x00b",
                                                         "csrf_token": login.csrf_token}).status_code == 422
    api = rad.post(f"/api/results/{result}/decision", json={"decision": "confirm", "comment": "a\x00b"},
                   headers=login.headers())
    assert api.status_code == 422 and api.json()["detail"][0]["loc"] == ["body", "comment"]
    boss, admin = env.client("boss")
    for url in ("/api/admin/tasks/brain-tumor/rollback", f"/api/admin/models/{'2.25.1'}/promote"):
        assert boss.post(url, json={"reason": "\x00"}, headers=admin.headers()).status_code == 422
    with postgres_database.read_session() as session:
        assert session.scalar(select(func.count(Review.id))) == 0
