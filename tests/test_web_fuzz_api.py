"""Schemathesis over the whole JSON API, from the app's own OpenAPI schema, against the real app (uvicorn on a
loopback port, a scratch PostgreSQL database with a real DICOM study and a registered model), once per role:
anonymous, radiologist, admin.

Every operation and method of the schema gets Schemathesis' example, coverage (boundary values, wrong types,
missing parameters) and fuzzing phases, with a fixed seed and a bounded number of examples. Each answer must be
no server error, conform to the schema (status, content type, headers, body), and come from a route the role may
reach: anonymous gets 401 everywhere, a radiologist 403 on admin routes, an admin 403 on decisions. Logged-in
roles send their CSRF token, so writes get past it to their validation and their work. Schemathesis' own
``ignored_auth`` check also resends logged-in requests without the cookie and with a wrong one.

The schema is made without an app (:func:`worker.web.app.openapi_schema`, the one ``/openapi.json`` serves, which
a test here checks), because Schemathesis' pytest integration wants it when tests are collected. One operation
alone: ``pytest tests/test_web_fuzz_api.py -k "admin and retrain"`` (the items share a node id).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, CheckContext, Response

from databases import scratch_postgres
from web_fuzz_helpers import MODEL_UID, LiveApp, Login, live_app
from worker.web.auth import CSRF_HEADER, SESSION_COOKIE
from worker.web.app import openapi_schema

#: The role each API operation needs (None: any logged-in user). An operation missing here fails a test, so a
#: new route has to say who may use it.
NEEDS: dict[str, str | None] = {
    "GET /api/me": None,
    "GET /api/worklist": None,
    "GET /api/studies/{study_id}": None,
    "POST /api/results/{result_id}/decision": "radiologist",
    "GET /api/admin/models": "admin",
    "GET /api/admin/models/{uid}": "admin",
    "POST /api/admin/retrain": "admin",
    "GET /api/admin/runs/{run_id}": "admin",
    "POST /api/admin/models/{uid}/promote": "admin",
    "POST /api/admin/tasks/{task}/rollback": "admin",
}
SEED = 26
#: Examples per operation in the fuzzing phase (the example and coverage phases add their own, fewer).
MAX_EXAMPLES = 25
#: Rows that exist in the fuzzed app (a fresh database numbers from 1), named as each parameter's example so that
#: some requests reach real studies, results and models, not only 404s.
EXAMPLES = {"study_id": 1, "result_id": 1, "uid": MODEL_UID, "task": "brain-tumor", "run_id": 1}


def _with_examples(raw: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(raw)
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in EXAMPLES:
                    parameter["example"] = EXAMPLES[parameter["name"]]
    return schema


schema = schemathesis.openapi.from_dict(
    _with_examples(openapi_schema()),
    config=schemathesis.Config.from_dict({
        "seed": SEED,
        # Values worth trying, beside the random ones: what the databases cannot hold (ids past 32 and 64 bits, in
        # every integer; NUL, in free text), and what people try (markup, SQL, path traversal).
        "dictionaries": {
            "awkward-text": {"values": ["\x00", "a\x00b", "<script>alert(1)</script>", "' OR 1=1 --",
                                        "../../etc/passwd", "\u202e", " "]},
            "integer-edges": {"values": [0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**20]},
        },
        "generation": {
            "max-examples": MAX_EXAMPLES, "database": "none", "deterministic": True,
            "dictionaries": {"integer": {"dictionary": "integer-edges", "probability": 0.1}},
        },
        # Free text only: in a header or cookie, NUL or U+202E is no HTTP request at all (uvicorn refuses it, the
        # client cannot send it), and the enumerated strings have their own values.
        "parameters": {name: {"dictionary": "awkward-text", "probability": 0.2}
                       for name in ("body.comment", "body.reason")},
        # Where the answer depends on the rows, not the schema, a schema-valid request may be refused with a 422:
        # a correction must name a class of the result's own task, and a promotion needs the reference set
        # configured (or a reason to force it).
        "operations": [{
            "include-path-regex": "^/api/(results/.*/decision|admin/models/.*/promote)$",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", "401", "403", "404", "409",
                                                                          "422"]}},
        }],
    }),
)
#: The logged-in roles' sessions, filled when the app starts (auth providers read them).
LOGINS: dict[str, Login] = {}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    # On PostgreSQL, the production database, whose limits are the narrower (32-bit ids, no NUL in text); the
    # page fuzzer runs on SQLite, the embedded default.
    with scratch_postgres() as url, live_app(tmp_path_factory.mktemp("fuzz-api"), url) as served:
        assert served.study_id == EXAMPLES["study_id"] and served.result_id == EXAMPLES["result_id"]
        LOGINS.update(served.logins)
        yield served
        LOGINS.clear()


def test_the_fuzzed_schema_is_the_served_one(app: LiveApp) -> None:
    served = httpx.get(app.base_url + "/openapi.json", cookies=app.logins["admin"].cookies)
    assert served.status_code == 200, served.text
    assert served.json() == openapi_schema()


def test_every_operation_says_which_role_it_needs() -> None:
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == set(NEEDS)


def _session_of(role: str) -> type:
    """A Schemathesis auth provider logging each case in as ``role``: its session cookie, and its CSRF token on
    writes. As configured auth, Schemathesis' ignored_auth check also resends the request without it and with a
    wrong one. Schemathesis applies auth to its coverage cases when tests are collected, before the app runs, so
    the provider sets stand-ins that :func:`_logged_in` replaces with the live session."""

    class Session:
        def get(self, case: Case, ctx: schemathesis.AuthContext) -> str:
            return role

        def set(self, case: Case, role: str, ctx: schemathesis.AuthContext) -> None:
            case.cookies = {**(case.cookies or {}), SESSION_COOKIE: _stand_in(role, SESSION_COOKIE)}
            if case.method.upper() == "POST":
                case.headers = {**(case.headers or {}), CSRF_HEADER: _stand_in(role, CSRF_HEADER)}

    return Session


def _stand_in(role: str, name: str) -> str:
    return f"stand-in-{role}-{name}"


def _logged_in(case: Case, role: str) -> None:
    login = LOGINS[role]
    if case.cookies and case.cookies.get(SESSION_COOKIE) == _stand_in(role, SESSION_COOKIE):
        case.cookies[SESSION_COOKIE] = login.cookies[SESSION_COOKIE]
    if case.headers and case.headers.get(CSRF_HEADER) == _stand_in(role, CSRF_HEADER):
        case.headers[CSRF_HEADER] = login.csrf_token


def _body_unreadable(response: Response) -> bool:
    """FastAPI reads a JSON body before any dependency runs, the session check included: a body that is not JSON
    text is refused (400 not UTF-8, 422 json_invalid) before the route could know who asks, and the route does not
    run."""
    detail = response.json().get("detail") if response.status_code in (400, 422) else None
    if response.status_code == 400:
        return detail == "There was an error parsing the body"
    return isinstance(detail, list) and any(issue.get("type") == "json_invalid" for issue in detail)


def _role_check(role: str) -> Any:
    def role_is_enforced(ctx: CheckContext, response: Response, case: Case) -> bool | None:
        if case.method.upper() != case.operation.method.upper():
            return None  # an unsupported method (405), which the route never sees: unsupported_method checks it
        if _body_unreadable(response):
            return None
        # Who asked is the session the request carried: a case may leave the cookie out (or forge it) on purpose.
        sent = dict(part.strip().partition("=")[::2] for part in response.request.headers.get("Cookie", "").split(";"))
        session = sent.get(SESSION_COOKIE)
        asked_as = role if role in LOGINS and session == LOGINS[role].cookies.get(SESSION_COOKIE) else "anonymous"
        needed = NEEDS[case.operation.label]
        if asked_as == "anonymous":
            assert response.status_code == 401, f"anonymous got {response.status_code} from {case.operation.label}"
        elif needed is not None and needed != asked_as:
            assert response.status_code == 403, f"{role} got {response.status_code} from {case.operation.label}"
        return None

    return role_is_enforced


def _call_and_validate(case: Case, app: LiveApp, role: str) -> None:
    _logged_in(case, role)
    case.call_and_validate(base_url=app.base_url, additional_checks=[_role_check(role)], timeout=30)


@schema.parametrize()
def test_api_anonymous(case: Case, app: LiveApp) -> None:
    _call_and_validate(case, app, "anonymous")


@schema.parametrize()
@schema.auth.apply(_session_of("radiologist"))
def test_api_radiologist(case: Case, app: LiveApp) -> None:
    _call_and_validate(case, app, "radiologist")


@schema.parametrize()
@schema.auth.apply(_session_of("admin"))
def test_api_admin(case: Case, app: LiveApp) -> None:
    _call_and_validate(case, app, "admin")
