"""Hypothesis over the routes the OpenAPI schema leaves out: the HTML pages and the form posts, against the real
app (uvicorn on a loopback port, a migrated SQLite database with a real DICOM study and a registered model), as
each role: anonymous, radiologist, admin.

Each route's path segments, query values and form fields are drawn as Schemathesis draws the API's: either all of
the right kind (a known row's id, a boundary of 32 or 64 bits, any integer up to 70 bits; a listed choice; any
text where any text goes), or all so but one, which is any text. Forms carry the role's CSRF token, so that they
reach their validation and their work. Every answer must be no server error and come from a route the role may
reach: anonymous is sent to the login page, a radiologist gets 403 from admin pages, an admin 403 from decisions.
Fixed seed (``derandomize``), bounded examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlencode

import httpx
import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from models.tasks import TASKS
from web_fuzz_helpers import MODEL_UID, ROLES, LiveApp, live_app, log_in
from worker.web.auth import CSRF_FIELD
from worker.web.worklist import FILTER_CHOICES

#: Random examples a route and role, after the sweep of integer edges (10 for the login and logout forms).
EXAMPLES = 25
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# --- values ----------------------------------------------------------------------------------------------------

ANY_TEXT = st.text(max_size=40)
#: Where integers stop: PostgreSQL's integer (ids), 64 bits (SQLite, offsets), and beyond.
INTEGER_EDGES = tuple(str(n) for n in (0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**20))
NOT_QUITE_INTEGERS = ("1e3", " 1", "0x10", "1.0", "", "１")
AN_INTEGER = TypeAdapter(int)


@dataclass(frozen=True)
class Param:
    """How one parameter is drawn: ``values`` of the right kind; ``default``, what it is while another parameter
    is at an edge; ``integer``, whether the edge sweep sends it every integer edge."""

    values: st.SearchStrategy[str]
    default: str = ""
    integer: bool = False


def integer(*known: int) -> Param:
    """An integer parameter: a known row's, an edge, or any up to 70 bits either way."""
    known = known or (1,)
    return Param(st.one_of(st.sampled_from([str(k) for k in known]), st.sampled_from(INTEGER_EDGES),
                           st.integers(-(2**70), 2**70).map(str)), str(known[0]), integer=True)


def choice(*values: str) -> Param:
    return Param(st.sampled_from(values), values[0])


def text(default: str = "") -> Param:
    return Param(st.one_of(st.just(default), ANY_TEXT) if default else ANY_TEXT, default)


#: Worklist cursors: forward and back, at the edges of each part (the last two are beyond: a 422), and any text.
CURSOR_EDGES = ("a2.1.0.1", "b999999999.2.99999999999999999.2147483647", "a1.0.1.9999999999",
                "a1.3.1.1", "b1.0.123456789012345678.1")


def cursor() -> Param:
    return Param(st.one_of(st.sampled_from(CURSOR_EDGES), ANY_TEXT), "")


CLASS_NAMES = tuple(sorted({c for task in TASKS.values() for c in task.class_names}))


@dataclass(frozen=True)
class Route:
    """A page or form route and how its parameters are drawn."""

    method: str
    path: str
    #: The role the route needs: None any logged-in user, "nobody" (the login page).
    needs: str | None
    segments: dict[str, Param]
    query: dict[str, Param]
    form: dict[str, Param] | None = None
    #: Which drawn requests may be sent (all, unless the route could break the fuzzers' own logins).
    allowed: Callable[[Request], bool] = lambda _request: True

    def _params(self) -> dict[str, Param]:
        return {**{f"path:{k}": v for k, v in self.segments.items()},
                **{f"query:{k}": v for k, v in self.query.items()},
                **{f"form:{k}": v for k, v in (self.form or {}).items()}}

    def edges(self) -> list[Request]:
        """Every integer parameter at every edge (and at text almost an integer), the others at their defaults:
        the sweep Schemathesis' coverage phase makes of the API."""
        params = self._params()
        base = {k: p.default for k, p in params.items()}
        drawn = [{**base, k: edge} for k, p in params.items() if p.integer
                 for edge in (*INTEGER_EDGES, *NOT_QUITE_INTEGERS)]
        requests = [self._request(d) for d in drawn if self._one_segment_each(d)]
        return [r for r in requests if self.allowed(r)]

    def requests(self) -> st.SearchStrategy[Request]:
        """Random requests: every parameter of the right kind, or all but one, which is any text."""
        params = self._params()
        chosen = st.fixed_dictionaries({k: p.values for k, p in params.items() if k.startswith("path:")},
                                       optional={k: p.values for k, p in params.items() if not k.startswith("path:")})
        wrong = st.one_of(ANY_TEXT, st.sampled_from(NOT_QUITE_INTEGERS))
        negative = chosen.flatmap(lambda d: st.sampled_from(sorted(d)).flatmap(
            lambda k: wrong.map(lambda v: {**d, k: v})) if d else st.just(d))
        return st.one_of(chosen, negative).filter(self._one_segment_each).map(self._request).filter(self.allowed)

    @staticmethod
    def _one_segment_each(drawn: dict[str, str]) -> bool:
        # A value that would make another path (empty, dots, a slash, which the server decodes from %2F before
        # routing) is another route's test.
        return all(v not in ("", ".", "..") and "/" not in v for k, v in drawn.items() if k.startswith("path:"))

    def _request(self, drawn: dict[str, str]) -> Request:
        part = {kind: {k.split(":", 1)[1]: v for k, v in drawn.items() if k.startswith(kind + ":")}
                for kind in ("path", "query", "form")}
        path = self.path.format(**{k: quote(v, safe="") for k, v in part["path"].items()})
        return Request(self.method, path, self.needs, part["query"], part["form"] if self.form is not None else None)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    needs: str | None
    query: dict[str, str]
    form: dict[str, str] | None

    def url(self) -> str:
        return self.path + ("?" + urlencode(self.query) if self.query else "")


def routes(app: LiveApp) -> dict[str, Route]:
    """Every route of the page routers but login and logout (their own test: logout ends the session the others
    use), by name."""
    uid = text(MODEL_UID)

    def spares_the_fuzzers(request: Request) -> bool:
        # A fuzzed form may disable any user but the fuzzers' own logins, which the other tests go on using; the
        # id is read as the app reads it (" 1", "+1" and "1.0" are 1 there).
        try:
            return AN_INTEGER.validate_python(unquote(request.path.split("/")[3])) not in app.protected_user_ids
        except ValidationError:
            return True

    filters = {name: choice("", *values) for name, values in FILTER_CHOICES.items()}
    return {
        "login": Route("GET", "/login", "nobody", {}, {"next": text()}),
        "worklist": Route("GET", "/", None, {}, {**filters, "cursor": cursor()}),
        "study": Route("GET", "/studies/{study_id}", None, {"study_id": integer(app.study_id)},
                       {"report_failed": choice("0", "1", "true")}),
        "thumbnail": Route("GET", "/thumbnails/{instance_id}/{frame}.png", None,
                           {"instance_id": integer(app.instance_id), "frame": integer(1)}, {}),
        "axial": Route("GET", "/reformats/{result_id}/{number}.png", None,
                       {"result_id": integer(app.result_id), "number": integer(1)}, {}),
        "heatmap": Route("GET", "/heatmaps/{result_id}/{instance_id}/{frame}.png", None,
                         {"result_id": integer(app.result_id), "instance_id": integer(app.instance_id),
                          "frame": integer(1)}, {}),
        "users": Route("GET", "/admin/users", "admin", {}, {"error": text()}),
        "models": Route("GET", "/admin/models", "admin", {}, {}),
        "drift": Route("GET", "/admin/drift", "admin", {}, {}),
        "backfill": Route("GET", "/admin/backfill", "admin", {}, {}),
        "audit": Route("GET", "/admin/audit", "admin", {}, {"before": integer(1, 50)}),
        "registry": Route("GET", "/admin/registry", "admin", {}, {}),
        "run": Route("GET", "/admin/registry/runs/{run_id}", "admin", {"run_id": integer(1)}, {}),
        "model": Route("GET", "/admin/registry/models/{uid}", "admin", {"uid": uid}, {"error": text()}),
        "figure": Route("GET", "/admin/registry/models/{uid}/figures/{name}", "admin",
                        {"uid": uid, "name": text("curves.png")}, {}),
        "decision": Route("POST", "/results/{result_id}/decision", "radiologist",
                          {"result_id": integer(app.result_id)}, {},
                          {"decision": choice("confirm", "correct"), "label": choice("", *CLASS_NAMES),
                           "comment": text()}),
        "user-active": Route("POST", "/admin/users/{user_id}/active", "admin", {"user_id": integer(99, 2)}, {},
                             {"active": choice("0", "1")}, spares_the_fuzzers),
        "user-add": Route("POST", "/admin/users", "admin", {}, {},
                          {"username": text(), "role": choice("radiologist", "admin"), "password": text()}),
        "retrain": Route("POST", "/admin/registry/retrain", "admin", {}, {}, {
            "task": choice(*TASKS), "architecture": choice("triage-cnn", "threshold"), "epochs": integer(1, 1000),
            "batch_size": integer(8), "input_size": choice("", "32x32", "64x64x1"),
            "confirmed_only": choice("0", "1"), "since": choice("", "2024-01-01", "2024-02-31"),
            "start_from_active": choice("0", "1"),
            "time_budget_minutes": choice("", "1", "0.5", "-1", "nan", "inf", "1e308")}),
        "promote": Route("POST", "/admin/registry/models/{uid}/promote", "admin", {"uid": uid}, {},
                         {"force": choice("", "1"), "reason": text()}),
        "backfill-cancel": Route("POST", "/admin/backfill/{plan_id}/cancel", "admin", {"plan_id": integer(1, 2)},
                                 {}, {}),
        "backfill-retry": Route("POST", "/admin/backfill/{plan_id}/retry", "admin", {"plan_id": integer(1, 2)},
                                {}, {}),
        "rollback": Route("POST", "/admin/registry/tasks/{task}/rollback", "admin", {"task": choice(*TASKS)}, {},
                          {"reason": text()}),
    }


PAGES = ("login", "worklist", "study", "thumbnail", "axial", "heatmap", "users", "models", "drift", "backfill",
         "audit", "registry", "run", "model", "figure")
FORMS = ("decision", "user-active", "user-add", "retrain", "promote", "rollback", "backfill-cancel",
         "backfill-retry")


# --- the app and the checks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    with live_app(tmp_path_factory.mktemp("fuzz-pages")) as served:
        yield served


@pytest.fixture(scope="module")
def clients(app: LiveApp) -> Iterator[dict[str, httpx.Client]]:
    made = {role: httpx.Client(base_url=app.base_url, cookies=app.logins[role].cookies, follow_redirects=False,
                               timeout=30, headers={"Accept": "text/html"})
            for role in ROLES}
    yield made
    for client in made.values():
        client.close()


def send(client: httpx.Client, request: Request, csrf_token: str) -> httpx.Response:
    if request.form is None:
        return client.request(request.method, request.url())
    return client.request(request.method, request.url(), data={**request.form, CSRF_FIELD: csrf_token})


def check(role: str, request: Request, response: httpx.Response) -> None:
    where = f"{request.method} {request.url()} as {role}: {response.status_code}"
    if response.status_code >= 500:
        refuse(f"{where} {response.text[:300]}")
    if request.needs == "nobody":
        return
    if role == "anonymous":
        if response.status_code != 303 or not response.headers["location"].startswith("/login"):
            refuse(f"{where}, not sent to the login page")
    elif request.needs is not None and request.needs != role and response.status_code != 403:
        refuse(f"{where}, not 403: the route needs the {request.needs} role")


def refuse(message: str) -> None:
    # The message says it all; no traceback (rendering one after a Hypothesis run can trip CPython 3.11.7's
    # "AST constructor recursion depth mismatch" inside pytest, which ends the whole session).
    pytest.fail(message, pytrace=False)


def fuzz(app: LiveApp, clients: dict[str, httpx.Client], role: str, name: str) -> None:
    def one(request: Request) -> None:
        check(role, request, send(clients[role], request, app.logins[role].csrf_token))

    route = routes(app)[name]
    for request in route.edges():
        one(request)
    FUZZ(given(route.requests())(one))()


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("page", PAGES)
def test_page(app: LiveApp, clients: dict[str, httpx.Client], role: str, page: str) -> None:
    fuzz(app, clients, role, page)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("form", FORMS)
def test_form_post(app: LiveApp, clients: dict[str, httpx.Client], role: str, form: str) -> None:
    fuzz(app, clients, role, form)


@settings(max_examples=10, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(form=st.fixed_dictionaries({}, optional={"next": ANY_TEXT, "username": ANY_TEXT, "password": ANY_TEXT}))
def test_login_and_logout_forms(app: LiveApp, form: dict[str, str]) -> None:
    """Login with any fields (a wrong login is a 401 or a 429, never a 500), then logout with any fields, on a session of
    its own each time (logout ends it)."""
    with httpx.Client(base_url=app.base_url, follow_redirects=False, timeout=30) as client:
        page = client.get("/login")
        token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        answer = client.post("/login", data={**form, CSRF_FIELD: token})
        # 429: a name the examples repeat is throttled after a few failures (worker.web.throttle).
        assert answer.status_code in (303, 401, 429), answer.text[:300]
        login = log_in(client, "rad")
        ended = client.post("/logout", data={**form, CSRF_FIELD: login.csrf_token})
        assert ended.status_code == 303 and ended.headers["location"] == "/login"
        assert client.get("/api/me").status_code == 401


#: Enough of an app to list the routes (their strategies are not drawn from).
_NO_APP = LiveApp("", None, {}, 1, 1, 1, MODEL_UID, frozenset())  # type: ignore[arg-type]


def test_every_page_and_form_is_fuzzed() -> None:
    """Every route of the page routers (which the OpenAPI schema leaves out) is fuzzed here: a new page or form
    must join :func:`routes`."""
    from worker.web import admin_models, pages

    served = {(method, route.path) for router in (pages.router, admin_models.router) for route in router.routes
              if isinstance(route, APIRoute) for method in route.methods}
    fuzzed = {(r.method, r.path) for r in routes(_NO_APP).values()} | {("POST", "/login"), ("POST", "/logout")}
    assert served == fuzzed
    assert set(routes(_NO_APP)) == {*PAGES, *FORMS}

