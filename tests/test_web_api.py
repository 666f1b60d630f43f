"""The web app's routes through HTTP (Starlette's TestClient), on a real migrated database with real DICOM files.

Covers login/logout, 401/403 for anonymous and wrong-role users on every route, CSRF rejection, escaping of
markup from DICOM headers, worklist order/filters/pagination (SQLite and PostgreSQL), study details, cached
thumbnails and heat maps, decisions and their audit trail, the users CLI.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from test_web_helpers import (
    PASSWORD, XSS_DESCRIPTION, XSS_NAME, add_users, csrf, install_model, login, make_database, make_settings,
    seed_study,
)
from dicom_io.sr import read_classification_sr
from pydicom import dcmread
from worker.db import AuditEvent, Database, Instance, JobState, Review, Series, SrDocument, User
from worker.db.review import TrainingExample
from worker.registry import register_installed_models
from worker.reporting import publish_result
from worker.web.app import create_app, person_name
from worker.web.security import SECRET_FILE
from worker.web.worklist import WorklistFilter, load_worklist

ROOT = Path(__file__).resolve().parents[1]


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = make_settings(tmp_path)
        self.database = make_database(self.settings)
        add_users(self.database)
        self._clients: dict[str, TestClient] = {}
        self.app = create_app(self.settings, self.database)  # corrections publish revised SRs for real
        self.model_uid = install_model(self.settings)
        # The triage-relevant cases: an old negative, a newer suspected finding, one still running, the XSS one.
        self.old_negative, self.negative_result = seed_study(
            self.database, self.settings, cls="notumor", label="notumor", model_uid=self.model_uid, age_minutes=60)
        self.suspected, self.suspected_result = seed_study(
            self.database, self.settings, cls="glioma", label="glioma", model_uid=self.model_uid, age_minutes=5)
        self.running, _ = seed_study(
            self.database, self.settings, cls="meningioma", label="meningioma", state=JobState.RUNNING,
            age_minutes=30)
        self.xss, self.xss_result = seed_study(
            self.database, self.settings, cls="pituitary", label="pituitary", patient_name=XSS_NAME,
            description=XSS_DESCRIPTION, model_uid="2.25.999", age_minutes=1)

    def as_user(self, user: str) -> TestClient:
        """A logged-in client kept for the whole module (a login costs an Argon2 verification)."""
        if user not in self._clients:
            self._clients[user] = self.client(user)
        return self._clients[user]

    def client(self, user: str | None = None) -> TestClient:
        client = TestClient(self.app, follow_redirects=False)
        if user is not None:
            login(client, user)
        return client


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Shared by the tests that only read: none of them changes what another one sees."""
    environment = Env(tmp_path_factory.mktemp("web"))
    yield environment
    environment.database.dispose()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Env]:
    """An environment of the test's own (under a second to make), for tests that decide, add or count: each passes
    alone and in any order."""
    environment = Env(tmp_path)
    yield environment
    environment.database.dispose()


PAGE_ROUTES = ["/", "/studies/1", "/admin/users", "/admin/models", "/admin/drift", "/admin/backfill", "/admin/audit", "/thumbnails/1/1.png", "/heatmaps/1/1/1.png"]
API_ROUTES = ["/api/me", "/api/worklist", "/api/studies/1", "/openapi.json"]


@pytest.mark.parametrize("path", PAGE_ROUTES)
def test_anonymous_pages_redirect_to_login(env: Env, path: str) -> None:
    response = env.client().get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


@pytest.mark.parametrize("path", API_ROUTES)
def test_anonymous_api_is_401(env: Env, path: str) -> None:
    assert env.client().get(path).status_code == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/api/results/1/decision"), ("post", "/results/1/decision"), ("post", "/logout"),
     ("post", "/admin/users"), ("post", "/admin/users/1/active")],
)
def test_anonymous_writes_are_refused(env: Env, method: str, path: str) -> None:
    def counts() -> tuple[int, int]:
        with env.database.session() as session:
            return (session.scalar(select(func.count(Review.id))) or 0,
                    session.scalar(select(func.count(User.id)).where(User.active.is_(True))) or 0)

    before = counts()
    response = getattr(env.client(), method)(path, data={"decision": "confirm", "username": "x", "role": "admin",
                                                          "password": PASSWORD, "active": "0"})
    if path.startswith("/api/"):
        assert response.status_code == 401
    else:
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
    assert counts() == before


def test_login_needs_csrf_and_right_password(env: Env) -> None:
    client = env.client()
    client.get("/login")
    no_token = client.post("/login", data={"username": "rad", "password": PASSWORD})
    assert no_token.status_code == 403
    assert "dt_session" not in client.cookies
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]  # type: ignore[index]
    wrong = client.post("/login", data={"username": "rad", "password": "wrong-password", "csrf_token": token})
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    unknown = client.post("/login", data={"username": "nobody", "password": PASSWORD, "csrf_token": token})
    assert unknown.status_code == 401
    with env.database.session() as session:
        assert (session.scalar(select(func.count(AuditEvent.id)).where(AuditEvent.action == "login.failed")) or 0) >= 2


def test_session_cookie_flags_and_security_headers(env: Env) -> None:
    client = env.client()
    client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)[1]  # type: ignore[index]
    response = client.post("/login", data={"username": "rad", "password": PASSWORD, "csrf_token": token})
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("dt_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "secure" not in cookie.lower()  # plain HTTP (a localhost trial): the cookie must still be sent back
    page = client.get("/")
    assert "strict-transport-security" not in page.headers  # HSTS only over HTTPS (tests/test_web_https.py)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    secret = env.settings.data_dir / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_forged_cookie_is_anonymous(env: Env) -> None:
    client = env.client("rad")
    value = client.cookies["dt_session"]
    client.cookies.set("dt_session", value[:-2] + ("00" if not value.endswith("00") else "11"))
    assert client.get("/api/me").status_code == 401


def test_logout_revokes_the_session(env: Env) -> None:
    client = env.client("rad2")
    cookie = client.cookies["dt_session"]
    token = csrf(client)
    assert client.post("/logout", data={}).status_code == 403  # no CSRF token: refused, still logged in
    assert client.get("/api/me").status_code == 200
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    replay = env.client()
    replay.cookies.set("dt_session", cookie)
    assert replay.get("/api/me").status_code == 401


def test_worklist_page_escapes_dicom_header_markup(env: Env) -> None:
    page = env.as_user("rad").get("/")
    assert page.status_code == 200
    assert '<meta http-equiv="refresh" content="30">' in page.text  # the worklist refreshes itself
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert "&lt;script&gt;alert(&#39;pn&#39;)&lt;/script&gt;, Evil" in page.text  # PN shown as "Family, Given"
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    study = env.as_user("rad").get(f"/studies/{env.xss}")
    assert study.status_code == 200
    assert "<script>alert" not in study.text and "&lt;script&gt;" in study.text


@pytest.mark.parametrize(
    ("stored", "shown"),
    [("Doe^Jane", "Doe, Jane"), ("Doe^Jane^Q^Dr^MD", "Doe, Jane Q"), ("Doe", "Doe"), ("^Jane", "Jane"),
     ("Yamada^Tarou=山田^太郎", "Yamada, Tarou"), ("", "")],
)
def test_person_name_display(stored: str, shown: str) -> None:
    assert person_name(stored) == shown


def test_api_returns_header_text_verbatim_as_json(env: Env) -> None:
    data = env.as_user("rad").get(f"/api/studies/{env.xss}").json()
    assert data["patient_name"] == XSS_NAME
    assert data["description"] == XSS_DESCRIPTION


def test_worklist_triage_order_and_fields(fresh: Env) -> None:
    items = fresh.as_user("rad").get("/api/worklist").json()["items"]
    order = [item["study_id"] for item in items]
    # Suspected, unreviewed findings first (oldest first), then the rest by waiting time.
    assert order[:2] == [fresh.suspected, fresh.xss]
    assert order[2:] == [fresh.old_negative, fresh.running]
    by_id = {item["study_id"]: item for item in items}
    assert by_id[fresh.suspected]["finding"] == "glioma"
    assert by_id[fresh.suspected]["probability"] == pytest.approx(0.91)
    assert by_id[fresh.suspected]["model_version"] == "7"
    assert by_id[fresh.suspected]["status"] == "done"
    assert by_id[fresh.running]["status"] == "running" and by_id[fresh.running]["finding"] is None
    assert by_id[fresh.running]["review_state"] == "no_result"
    assert by_id[fresh.old_negative]["review_state"] == "pending"  # a result nobody has decided on yet


@pytest.mark.parametrize(
    ("query", "expected"),
    [("status=running", "running"), ("finding=glioma", "suspected"), ("task=brain-tumor", None),
     ("review=no_result", "running")],
)
def test_worklist_filters(fresh: Env, query: str, expected: str | None) -> None:
    items = fresh.as_user("rad").get(f"/api/worklist?{query}").json()["items"]
    ids = {item["study_id"] for item in items}
    if expected is None:
        assert ids == {fresh.suspected, fresh.xss, fresh.old_negative, fresh.running}
    else:
        assert ids == {getattr(fresh, expected)}


@pytest.mark.parametrize("query", ["status=bogus", "finding=<b>", "review=x", "cursor=a0.1.2.3", "cursor=b1.7.2.3",
                                   "cursor=c1.1.1.1", "page_size=100000"])
def test_bad_filters_are_422(env: Env, query: str) -> None:
    response = env.as_user("rad").get(f"/api/worklist?{query}")
    assert response.status_code == 422
    # The page validates the same parameters alike; it has no page size, so that one is not its parameter.
    page_status = 200 if query.startswith("page_size=") else 422
    assert env.as_user("rad").get(f"/?{query}", headers={"accept": "text/html"}).status_code == page_status


def test_worklist_pagination(fresh: Env) -> None:
    client = fresh.as_user("rad")
    first = client.get("/api/worklist?page_size=3").json()
    assert first["total"] == 4 and first["total_exact"] and first["pages"] == 2 and first["previous"] is None
    second = client.get(f"/api/worklist?page_size=3&cursor={first['next']}").json()
    assert (second["page"], second["next"], len(first["items"]), len(second["items"])) == (2, None, 3, 1)
    assert {i["study_id"] for i in first["items"]} | {i["study_id"] for i in second["items"]} == {
        fresh.suspected, fresh.xss, fresh.old_negative, fresh.running}
    # Back from the second page: the first again, whole.
    back = client.get(f"/api/worklist?page_size=3&cursor={second['previous']}").json()
    assert back["page"] == 1 and back["items"] == first["items"]
    # A filter on the summary: counted from its tag; past the end (a cursor after the last row), nothing.
    done = client.get("/api/worklist?status=done&page_size=2").json()
    assert done["total"] == 3 and len(done["items"]) == 2
    rest = client.get(f"/api/worklist?status=done&page_size=2&cursor={done['next']}").json()
    assert rest["total"] == 3 and len(rest["items"]) == 1 and rest["next"] is None
    assert client.get("/api/worklist?cursor=a9.2.99999999999999999.2147483647").json()["items"] == []


def test_study_detail_thumbnails_are_cached(env: Env) -> None:
    client = env.as_user("rad")
    data = client.get(f"/api/studies/{env.suspected}").json()
    series = data["series"][0]
    assert [r["label"] for r in series["results"]] == ["glioma"]
    assert len(series["slices"]) == 2 and series["slices"][0]["probabilities"][0] == pytest.approx(0.91)
    url = series["slices"][0]["thumbnail_url"]
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(first.content))
    assert image.mode == "L" and max(image.size) <= 256 and image.getextrema()[1] > 100
    cached = list((env.settings.data_dir / "web-cache" / "thumbnails").rglob("*.png"))
    assert cached
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    assert client.get(url).content == first.content
    assert {p: p.stat().st_mtime_ns for p in cached} == mtimes  # served from the cache, not re-rendered
    assert client.get("/thumbnails/999999/1.png").status_code == 404
    instance = series["slices"][0]["instance_id"]
    assert client.get(f"/thumbnails/{instance}/9.png").status_code == 422


def test_heatmap_is_rendered_once_and_refused_for_another_model(env: Env) -> None:
    client = env.as_user("rad")
    data = client.get(f"/api/studies/{env.suspected}").json()
    result = data["series"][0]["results"][0]["result_id"]
    instance = data["series"][0]["slices"][0]["instance_id"]
    url = f"/heatmaps/{result}/{instance}/1.png"
    response = client.get(url)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGB"
    files = list((env.settings.data_dir / "web-cache" / "heatmaps").rglob("*.png"))
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns
    assert client.get(url).content == response.content and files[0].stat().st_mtime_ns == before
    # The XSS study's result was made by a model that is not installed: no heat map from a different model.
    xss = client.get(f"/api/studies/{env.xss}").json()["series"][0]
    refused = client.get(f"/heatmaps/{xss['results'][0]['result_id']}/{xss['slices'][0]['instance_id']}/1.png")
    assert refused.status_code == 422 and "no longer installed" in refused.json()["detail"]
    assert client.get(f"/heatmaps/{result}/{xss['slices'][0]['instance_id']}/1.png").status_code == 404


def test_api_decision_needs_csrf_and_radiologist_role(fresh: Env) -> None:
    rad = fresh.as_user("rad")
    url = f"/api/results/{fresh.negative_result}/decision"
    assert rad.post(url, json={"decision": "confirm"}).status_code == 403  # no token
    assert rad.post(url, json={"decision": "confirm"}, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    admin = fresh.as_user("boss")
    assert admin.post(url, json={"decision": "confirm"}, headers={"X-CSRF-Token": csrf(admin)}).status_code == 403
    # Another user's token does not work with this session.
    assert rad.post(url, json={"decision": "confirm"}, headers={"X-CSRF-Token": csrf(admin)}).status_code == 403
    with fresh.database.session() as session:
        assert session.scalar(select(Review.id).where(Review.result_pk == fresh.negative_result)) is None


def test_api_confirm_and_correct(fresh: Env) -> None:
    rad = fresh.as_user("rad")
    headers = {"X-CSRF-Token": csrf(rad)}
    bad = rad.post(f"/api/results/{fresh.xss_result}/decision", json={"decision": "correct", "label": "cat"},
                   headers=headers)
    assert bad.status_code == 422
    same = rad.post(f"/api/results/{fresh.xss_result}/decision", json={"decision": "correct", "label": "pituitary"},
                    headers=headers)
    assert same.status_code == 422
    assert rad.post("/api/results/999999/decision", json={"decision": "confirm"}, headers=headers).status_code == 404
    ok = rad.post(f"/api/results/{fresh.negative_result}/decision", json={"decision": "confirm"}, headers=headers)
    assert ok.status_code == 200 and ok.json()["label"] == "notumor"
    first_sr = publish_result(fresh.database, fresh.settings, fresh.xss_result)  # what the pipeline sent before review
    assert first_sr is not None
    fixed = rad.post(f"/api/results/{fresh.xss_result}/decision",
                     json={"decision": "correct", "label": "meningioma", "comment": "<b>dural tail</b>"},
                     headers=headers)
    assert fixed.status_code == 200 and fixed.json()["report_error"] is None
    review_id = fixed.json()["review_id"]
    states = {i["study_id"]: i["review_state"] for i in rad.get("/api/worklist").json()["items"]}
    assert states[fresh.old_negative] == "confirmed" and states[fresh.xss] == "corrected"
    assert rad.get("/api/worklist?review=corrected").json()["total"] == 1
    page = rad.get(f"/studies/{fresh.xss}")
    assert "&lt;b&gt;dural tail&lt;/b&gt;" in page.text and "<b>dural tail" not in page.text
    with fresh.database.session() as session:
        example = session.scalar(select(TrainingExample).join(Review).where(Review.id == review_id))
        assert example is not None and example.label == "meningioma"
        actions = set(session.scalars(select(AuditEvent.action)))
        assert {"decision.confirm", "decision.correct", "view.study", "login"} <= actions
        # The correction sent a revised SR that names its predecessor and reports the corrected class.
        revised = session.scalars(select(SrDocument).where(SrDocument.result_pk == fresh.xss_result)
                                  .order_by(SrDocument.id)).all()
        assert [d.id for d in revised][0] == first_sr.document_pk and len(revised) == 2
        assert revised[1].predecessor_pk == first_sr.document_pk
        assert read_classification_sr(dcmread(revised[1].archive_path)).finding == "meningioma"
    assert "Structured Report" in page.text


def test_correction_is_kept_when_the_revised_sr_fails(fresh: Env) -> None:
    study, result = seed_study(fresh.database, fresh.settings, cls="glioma", label="glioma", model_uid=fresh.model_uid,
                               age_minutes=90, slices=1)
    with fresh.database.session() as session:
        for path in session.scalars(select(Instance.archive_path).join(Series).where(Series.study_pk == study)):
            Path(path).unlink()  # the source instances are gone: no SR can reference them
    rad = fresh.as_user("rad")
    response = rad.post(f"/results/{result}/decision",
                        data={"decision": "correct", "label": "notumor", "csrf_token": csrf(rad)})
    assert response.status_code == 303 and "report_failed=1" in response.headers["location"]
    assert "revised report could not be made" in rad.get(response.headers["location"]).text
    with fresh.database.session() as session:
        assert session.scalar(select(Review.label).where(Review.result_pk == result)) == "notumor"
        assert session.scalar(select(SrDocument.id).where(SrDocument.result_pk == result)) is None


def test_form_decision(fresh: Env) -> None:
    rad = fresh.as_user("rad")
    url = f"/results/{fresh.suspected_result}/decision"
    assert rad.post(url, data={"decision": "confirm"}).status_code == 403
    admin = fresh.as_user("boss")
    assert admin.post(url, data={"decision": "confirm", "csrf_token": csrf(admin)}).status_code == 403
    response = rad.post(url, data={"decision": "confirm", "csrf_token": csrf(rad)})
    assert response.status_code == 303 and response.headers["location"].startswith(f"/studies/{fresh.suspected}")
    assert "confirmed as glioma" in rad.get(f"/studies/{fresh.suspected}").text
    # The decided study drops behind the ones still awaiting review.
    order = [i["study_id"] for i in rad.get("/api/worklist").json()["items"]]
    assert order.index(fresh.suspected) > order.index(fresh.running)


def test_admin_pages(fresh: Env) -> None:
    rad = fresh.as_user("rad")
    for path in ("/admin/users", "/admin/models", "/admin/drift", "/admin/audit"):
        assert rad.get(path).status_code == 403
    assert rad.post("/admin/users", data={"csrf_token": csrf(rad), "username": "x", "role": "admin",
                                          "password": PASSWORD}).status_code == 403
    admin = fresh.as_user("boss")
    assert "rad2" in admin.get("/admin/users").text
    register_installed_models(fresh.database, fresh.settings)
    models = admin.get("/admin/models")
    assert models.status_code == 200 and fresh.model_uid in models.text and "active" in models.text
    assert admin.post("/admin/users", data={"username": "new", "role": "radiologist",
                                            "password": PASSWORD}).status_code == 403
    added = admin.post("/admin/users", data={"csrf_token": csrf(admin), "username": "new", "role": "radiologist",
                                             "password": PASSWORD})
    assert added.status_code == 303
    again = admin.post("/admin/users", data={"csrf_token": csrf(admin), "username": "new", "role": "radiologist",
                                             "password": PASSWORD})
    assert again.status_code == 422 and "already exists" in again.text
    login(fresh.client(), "new")
    audit_log = admin.get("/admin/audit")
    assert audit_log.status_code == 200
    fresh.as_user("rad").get(f"/studies/{fresh.suspected}")
    audit_log = admin.get("/admin/audit")
    assert "user.add" in audit_log.text and "view.study" in audit_log.text and "login" in audit_log.text


def test_openapi_schema_lists_the_api_for_admins_only(env: Env) -> None:
    assert env.as_user("rad").get("/openapi.json").status_code == 403
    schema = env.as_user("boss").get("/openapi.json").json()
    assert {"/api/worklist", "/api/studies/{study_id}", "/api/results/{result_id}/decision"} <= set(schema["paths"])
    # A write needs the session cookie and the CSRF header together, not either.
    decision = schema["paths"]["/api/results/{result_id}/decision"]["post"]
    assert decision["security"] == [{"csrf": [], "session": []}]


def test_no_patient_data_in_logs(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = env.as_user("rad")
    client.get("/")
    client.get(f"/studies/{env.xss}")
    client.get(f"/api/studies/{env.xss}")
    assert "Evil" not in caplog.text and "PID-" not in caplog.text and "Doe" not in caplog.text


def test_disabled_user_loses_access(fresh: Env) -> None:
    admin = fresh.as_user("boss")
    added = admin.post("/admin/users", data={"csrf_token": csrf(admin), "username": "new", "role": "radiologist",
                                             "password": PASSWORD})
    assert added.status_code == 303
    client = fresh.client("new")
    assert client.get("/api/me").status_code == 200
    with fresh.database.session() as session:
        user_id = session.scalar(select(User.id).where(User.name == "new"))
    assert admin.post(f"/admin/users/{user_id}/active", data={"csrf_token": csrf(admin), "active": "0"}).status_code == 303
    assert client.get("/api/me").status_code == 401


def test_users_cli(tmp_path: Path) -> None:
    script = (
        "import argparse, sys; from worker.web.cli import register; p = argparse.ArgumentParser(); "
        "s = p.add_subparsers(); register(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))"
    )
    data = tmp_path / "data"

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, *args, "--data-dir", str(data)], input=stdin,
                              capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "DICOM_TRIAGE_CONFIG": ""})

    added = run("users", "add", "alice", "--role", "radiologist", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert run("users", "add", "alice", "--role", "radiologist", stdin=PASSWORD + "\n").returncode == 2
    short = run("users", "add", "bob", "--role", "admin", stdin="short\n")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    assert run("users", "add", "carol", "--role", "janitor", stdin=PASSWORD + "\n").returncode == 2
    listing = run("users", "list")
    assert listing.stdout.split() == ["alice", "radiologist", "active"]
    assert PASSWORD not in listing.stdout
    database = Database(f"sqlite:///{data / 'triage.sqlite3'}")
    with database.session() as session:
        stored = session.scalar(select(User.password_hash).where(User.name == "alice"))
        assert stored is not None and stored.startswith("$argon2id$")
    database.dispose()


def test_worklist_query_on_postgresql(tmp_path: Path, postgres_database: Database) -> None:
    settings = make_settings(tmp_path)
    negative, _ = seed_study(postgres_database, settings, cls="notumor", label="notumor", age_minutes=60, slices=1)
    suspected, _ = seed_study(postgres_database, settings, cls="glioma", label="glioma", age_minutes=5, slices=1)
    running, _ = seed_study(postgres_database, settings, cls="meningioma", label="meningioma",
                            state=JobState.RUNNING, age_minutes=30, slices=1)
    with postgres_database.session() as session:
        page = load_worklist(session, WorklistFilter())
        assert [r.study_id for r in page.rows] == [suspected, negative, running]
        assert [r.status for r in page.rows] == ["done", "done", "running"]
        assert load_worklist(session, WorklistFilter(review="no_result")).total == 1
        assert [r.study_id for r in load_worklist(session, WorklistFilter(finding="glioma")).rows] == [suspected]


def test_server_in_a_thread_serves_and_stops(tmp_path: Path) -> None:
    """What ``serve`` runs beside the listener: uvicorn on 127.0.0.1:web_port in a thread, stopped on request."""
    import socket
    import urllib.error
    import urllib.request

    from worker.web.cli import start_in_thread

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp_path, web_port=port)
    database = make_database(settings)
    server, thread = start_in_thread(settings, database)
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as response:
            assert response.status == 200 and b"Log in" in response.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/worklist", timeout=5)
        assert refused.value.code == 401
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        database.dispose()
    assert not thread.is_alive()
