"""The worklist at scale (issue 22), on SQLite and on the real PostgreSQL, with a few thousand studies written
through the triggers that keep the worklist's summary (:mod:`worker.db.triage`):

* every query a page runs walks an index in triage order or probes by key (EXPLAIN on both backends): no sort,
  no scan of a base table, whatever the archive holds;
* keyset pages return every study exactly once while new studies arrive between them, and back again;
* each filter (and some together) and the order match a reference computed in Python from the base tables, after
  updates of every kind (jobs moving on, reviews, a late revision superseding a result), and the summary the
  triggers kept equals a rebuild from scratch;
* ``results --json`` streamed is ``json.dumps`` of the report; the models' result counts are kept.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, func, insert, select, text, update

from conftest import PG_ADMIN
from models.tasks import INDETERMINATE, TASKS
from worker.db import Database, Job, JobState, Patient, Result, Review, Series, Study, User, upgrade_database
from worker.db import triage
from worker.report import results_report, write_json
from worker.web import worklist
from worker.web.worklist import Cursor, WorklistFilter, is_suspected, load_worklist

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
STATES = [(JobState.DONE, 0.6), (JobState.QUEUED, 0.1), (JobState.RUNNING, 0.05), (JobState.FAILED, 0.05),
          (JobState.RECEIVED, 0.05), (JobState.NOT_APPLICABLE, 0.15)]
STUDIES = 1500


# --- a realistic archive, written through the triggers -----------------------------------------------------------


@dataclass
class Ids:
    """The next free id of each table (rows are inserted with explicit ids, in bulk)."""

    patient: int = 0
    study: int = 0
    series: int = 0
    job: int = 0
    result: int = 0
    review: int = 0


def _result(rng: random.Random, ids: Ids, job: int, series: int, revision: int, task: str,
            received: datetime) -> dict[str, Any]:
    known = TASKS[task]
    label = rng.choice((*known.class_names, INDETERMINATE))
    ids.result += 1
    return {"id": ids.result, "job_pk": job, "series_pk": series, "revision": revision, "task": task,
            "label": label, "probabilities": {c: 1.0 / known.num_classes for c in known.class_names},
            "slice_probabilities": [], "aggregation": "median", "model_name": f"{task}-cnn", "model_version": "1",
            "model_uid": f"2.25.{known.num_classes}", "reason": "no lung" if label == INDETERMINATE else None,
            "created_at": received}


def add_studies(database: Database, count: int, ids: Ids, rng: random.Random, user: int,
                newest: datetime = NOW) -> list[int]:
    """``count`` studies of one or two series in every state, bulk-inserted; returns their ids."""
    rows: dict[Any, list[dict[str, Any]]] = {t: [] for t in (Patient, Study, Series, Job, Result, Review)}
    made = []
    for _ in range(count):
        ids.patient += 1
        ids.study += 1
        made.append(ids.study)
        # Whole seconds now and then: ties on the received time are broken by the id.
        received = newest - timedelta(seconds=rng.choice((rng.randrange(0, 30 * 86400), rng.uniform(0, 86400))))
        rows[Patient].append({"id": ids.patient, "patient_id": f"P{ids.patient}", "issuer_of_patient_id": "",
                              "patient_name": "", "birth_date": "", "sex": "", "created_at": received})
        rows[Study].append({"id": ids.study, "study_instance_uid": f"2.25.1.{ids.study}", "patient_pk": ids.patient,
                            "accession_number": "", "study_date": "", "study_description": "",
                            "created_at": received})
        task = rng.choice(tuple(TASKS))
        for _series in range(rng.choice((1, 1, 2))):
            ids.series += 1
            pending = rng.random() < 0.03  # not yet routed: no job
            rows[Series].append({"id": ids.series, "series_instance_uid": f"2.25.2.{ids.series}",
                                 "study_pk": ids.study, "modality": "MR", "body_part_examined": "",
                                 "series_description": "", "series_number": ids.series, "image_types": "",
                                 "first_received_at": received, "last_received_at": received,
                                 "pending": pending, "revision": 0 if pending else 1})
            if pending:
                continue
            ids.job += 1
            state = rng.choices([s for s, _ in STATES], [w for _, w in STATES])[0]
            rows[Job].append({"id": ids.job, "series_pk": ids.series, "revision": 1, "state": state,
                              "task": None if state is JobState.NOT_APPLICABLE else task, "reason": "",
                              "instance_count": 1, "attempts": 1, "series_last_received_at": received,
                              "created_at": received, "queued_at": None, "started_at": None, "finished_at": None})
            if state is JobState.DONE:
                result = _result(rng, ids, ids.job, ids.series, 1, task, received)
                rows[Result].append(result)
                for _review in range(rng.choice((0, 0, 1, 2))):
                    ids.review += 1
                    corrected = rng.random() < 0.3
                    rows[Review].append({"id": ids.review, "result_pk": result["id"], "user_pk": user,
                                         "decision": "correct" if corrected else "confirm",
                                         "label": result["label"], "comment": "", "created_at": received})
    with database.session() as session:
        for model, values in rows.items():
            if values:
                session.execute(insert(model.__table__), values)  # type: ignore[arg-type]
    return made


def move_on(database: Database, ids: Ids, rng: random.Random, user: int) -> None:
    """Updates of every kind, each in its own transaction as the workers and the web make them."""
    with database.session() as session:
        queued = session.scalars(select(Job.id).where(Job.state == JobState.QUEUED)).all()
        session.execute(update(Job).where(Job.id.in_(queued[: len(queued) // 2])).values(state=JobState.RUNNING))
    with database.session() as session:
        running = session.execute(
            select(Job.id, Job.series_pk, Job.task, Job.created_at).where(Job.state == JobState.RUNNING)
        ).all()
        for job, series, task, received in running[: len(running) // 2]:
            session.execute(update(Job).where(Job.id == job).values(state=JobState.DONE))
            session.execute(insert(Result.__table__), [_result(rng, ids, job, series, 1, task, received)])
    with database.session() as session:  # second opinions: the latest review wins
        results = session.scalars(select(Result.id).order_by(Result.id)).all()
        for result in rng.sample(list(results), len(results) // 5):
            ids.review += 1
            label = session.scalar(select(Result.label).where(Result.id == result))
            session.execute(insert(Review.__table__), [{
                "id": ids.review, "result_pk": result, "user_pk": user, "decision": rng.choice(("confirm", "correct")),
                "label": label, "comment": "", "created_at": NOW}])
    with database.session() as session:  # late instances: a new revision, classified again
        done = session.execute(
            select(Job.series_pk, Job.task, Result.id).join(Result, Result.job_pk == Job.id)
        ).all()
        for series, task, old in rng.sample(list(done), len(done) // 10):
            session.execute(update(Series).where(Series.id == series).values(revision=2))
            ids.job += 1
            session.execute(insert(Job.__table__), [{
                "id": ids.job, "series_pk": series, "revision": 2, "state": JobState.RECEIVED, "task": task,
                "reason": "", "instance_count": 1, "attempts": 0, "series_last_received_at": NOW}])
            if rng.random() < 0.5:
                session.execute(update(Job).where(Job.id == ids.job).values(state=JobState.DONE))
                new = _result(rng, ids, ids.job, series, 2, task, NOW)
                session.execute(insert(Result.__table__), [new])
                session.execute(update(Result).where(Result.id == old).values(superseded_by_pk=new["id"]))


def build(database: Database, studies: int, seed: int = 22) -> Ids:
    rng = random.Random(seed)
    ids = Ids()
    with database.session() as session:
        session.add(User(id=1, name="reader", role="radiologist", password_hash="-"))
    add_studies(database, studies, ids, rng, user=1)
    move_on(database, ids, rng, user=1)
    _analyze(database)
    return ids


def _analyze(database: Database) -> None:
    with database.engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
        connection.commit()


# --- the reference: the worklist's rules in Python over the base tables ------------------------------------------


@dataclass(frozen=True)
class Expected:
    study_id: int
    group: int
    received_at: datetime
    status: str
    review_state: str
    tags: frozenset[str]


def reference(database: Database) -> list[Expected]:
    """Every study in triage order with its status, review state and filter values, by the documented rules."""
    with database.session() as session:
        studies: dict[int, datetime] = {i: t for i, t in session.execute(select(Study.id, Study.created_at))}
        series = session.execute(select(Series.id, Series.study_pk, Series.revision)).all()
        jobs = {(s, r): (state, task) for s, r, state, task in
                session.execute(select(Job.series_pk, Job.revision, Job.state, Job.task))}
        current: dict[int, list[tuple[int, str, str]]] = {}
        for rid, s, task, label in session.execute(
            select(Result.id, Result.series_pk, Result.task, Result.label).where(Result.superseded_by_pk.is_(None))
        ):
            current.setdefault(s, []).append((rid, task, label))
        latest: dict[int, str] = {}
        for result, decision in session.execute(select(Review.result_pk, Review.decision).order_by(Review.id)):
            latest[result] = decision
    by_study: dict[int, list[tuple[int, int]]] = {}
    for sid, study, revision in series:
        by_study.setdefault(study, []).append((sid, revision))
    order = [s.value for s in triage.STATUS_ORDER]
    out = []
    for study, received in studies.items():
        ranks, tags, n, reviewed, corrected, suspect = [], set(), 0, 0, 0, False
        for sid, revision in by_study.get(study, []):
            state, task = jobs.get((sid, revision), (None, None))
            ranks.append(order.index(state.value if state is not None else "received"))
            if task is not None:
                tags.add(f"task:{task}")
            for rid, rtask, label in current.get(sid, []):
                tags.add(f"finding:{label}")
                n += 1
                reviewed += rid in latest
                corrected += latest.get(rid) == "correct"
                suspect |= is_suspected(rtask, label) and rid not in latest
        status = order[min(ranks or [order.index("received")])]
        review = ("no_result" if n == 0 else "pending" if reviewed == 0 else "partial" if reviewed < n
                  else "corrected" if corrected else "confirmed")
        group = 0 if suspect else 1 if reviewed < n or n == 0 else 2
        tags |= {f"status:{status}", f"review:{review}"}
        out.append(Expected(study, group, received, status, review, frozenset(tags)))
    return sorted(out, key=lambda e: (e.group, e.received_at, e.study_id))


def walk(database: Database, filters: WorklistFilter, page_size: int) -> list[Any]:
    """Every row of the worklist, following the next cursors from the first page."""
    rows, cursor = [], None
    with database.read_session() as session:
        while True:
            page = load_worklist(session, filters, page_size=page_size, cursor=cursor)
            rows.extend(page.rows)
            if page.next is None:
                return rows
            cursor = page.next


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """A migrated database holding :data:`STUDIES` studies moved on by every kind of update; read-only to tests."""
    with _scratch(request.param, tmp_path_factory.mktemp("archive")) as database:
        build(database, STUDIES)
        yield database


class _scratch:
    """A migrated scratch database: a SQLite file, or a PostgreSQL database created and then dropped."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.name = f"triage_scale_{uuid.uuid4().hex[:12]}" if backend == "postgresql" else None
        self.url = (f"postgresql://postgres@127.0.0.1:5432/{self.name}" if self.name
                    else f"sqlite:///{tmp / 'triage.sqlite3'}")

    def __enter__(self) -> Database:
        if self.name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.name}"')
        upgrade_database(self.url)
        self.database = Database(self.url)
        return self.database

    def __exit__(self, *_exc: object) -> None:
        self.database.dispose()
        if self.name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


FILTERS = [
    WorklistFilter(),
    *(WorklistFilter(**{name: value}) for name, values in worklist.FILTER_CHOICES.items() for value in values),
    WorklistFilter(review="pending", task="brain-tumor"),
    WorklistFilter(status="done", finding=INDETERMINATE),
    WorklistFilter(status="done", review="partial", task="covid-ct", finding="COVID"),
    WorklistFilter(task="covid-ct", finding="glioma"),  # matches nothing
]


# --- tests -----------------------------------------------------------------------------------------------------------


def test_filters_and_order_match_the_reference(archive: Database) -> None:
    expected = reference(archive)
    assert len(expected) == STUDIES
    for filters in FILTERS:
        wanted = {f"{k}:{v}" for k, v in vars(filters).items() if v is not None}
        matching = [e for e in expected if wanted <= e.tags]
        rows = walk(archive, filters, page_size=97)
        assert [(r.study_id, r.status, r.review_state) for r in rows] == [
            (e.study_id, e.status, e.review_state) for e in matching], filters
        with archive.read_session() as session:
            first = load_worklist(session, filters, page_size=97)
        if first.total_exact:
            assert first.total == len(matching), filters
        else:  # counted up to the cap, or (several filters) the rows up to this page: a lower bound
            assert first.total <= min(len(matching), worklist.TOTAL_CAP), filters
        if len(wanted) < 2:
            assert first.total_exact == (len(matching) <= worklist.TOTAL_CAP), filters
        # Each row's details: its tasks and current results are the study's.
        for row in rows[:20]:
            assert {f"task:{t}" for t in row.tasks} | {f"finding:{r.label}" for r in row.results} == {
                t for t in next(e for e in matching if e.study_id == row.study_id).tags
                if t.startswith(("task:", "finding:"))}


def test_totals_are_counted_only_up_to_the_cap(archive: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = reference(archive)
    monkeypatch.setattr(worklist, "TOTAL_CAP", 100)
    with archive.read_session() as session:
        everything = load_worklist(session, WorklistFilter())
        assert (everything.total, everything.total_exact, everything.pages) == (100, False, None)
        rare = WorklistFilter(status="failed")
        failed = sum("status:failed" in e.tags for e in expected)
        assert failed < 100 and load_worklist(session, rare).total == failed
        # Several filters: not counted together; the rows seen so far, and "more".
        together = WorklistFilter(status="done", task="brain-tumor")
        assert sum({"status:done", "task:brain-tumor"} <= e.tags for e in expected) > 100
        both = load_worklist(session, together)
        assert (both.total, both.total_exact) == (50, False) and both.next is not None
        assert load_worklist(session, together, cursor=both.next).total == 100


def test_the_summary_kept_by_the_triggers_equals_a_rebuild(archive: Database) -> None:
    def snapshot() -> tuple[list[Any], list[Any], list[Any]]:
        with archive.engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                sorted(tuple(row) for row in connection.execute(text(f"SELECT * FROM {table}")))
                for table in ("study_triage", "study_tags", "model_result_counts")
            )

    kept = snapshot()
    with archive.engine.begin() as connection:
        triage.rebuild(connection)
    assert snapshot() == kept
    with archive.session() as session:
        counts = {uid: n for uid, n in session.execute(select(Result.model_uid, func.count()).group_by(Result.model_uid))}
    assert dict(kept[2]) == counts and sum(counts.values()) > 0


def _plan(database: Database, statement: str, parameters: Any) -> str:
    with database.engine.connect() as connection:
        if database.is_sqlite:
            rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return "\n".join(str(row[-1]) for row in rows)
        # With a few thousand rows PostgreSQL rightly prefers reading a small table whole (it would not at a
        # million: see bench/worklist.py). Sequential scans and sorts priced out, the plan shows whether indexes
        # can serve the statement: if none could, the scan or sort would still be there.
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        connection.exec_driver_sql("SET LOCAL enable_sort = off")
        rows = connection.exec_driver_sql("EXPLAIN " + statement, parameters).all()
        connection.rollback()
    return "\n".join(str(row[0]) for row in rows)


def test_every_page_query_walks_an_index(archive: Database) -> None:
    """The plans of every statement a page runs: keys walked in index order, totals bounded by a LIMIT, details by
    primary key; no sort and no scan of a base table on either backend."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    read_engine = archive.engine
    event.listen(read_engine, "before_cursor_execute", record)
    try:
        with archive.session() as session:
            for filters in (WorklistFilter(), WorklistFilter(review="pending"), WorklistFilter(finding="glioma"),
                            WorklistFilter(review="pending", task="brain-tumor")):
                first = load_worklist(session, filters)
                assert first.next is not None
                second = load_worklist(session, filters, cursor=first.next)
                assert second.previous is not None
                load_worklist(session, filters, cursor=second.previous)
    finally:
        event.remove(read_engine, "before_cursor_execute", record)
    assert len(seen) >= 20
    for statement, parameters in seen:
        plan = _plan(archive, statement, parameters)
        where = f"{statement}\n--- plan:\n{plan}"
        if archive.is_sqlite:
            assert "TEMP B-TREE" not in plan, where
            for line in plan.splitlines():
                if line.startswith("SCAN "):
                    # A scan is an index walked in order (cut short by the LIMIT), or a LIMITed subquery's rows.
                    assert "ix_study_triage_order" in line or "ix_study_tags_order" in line or " USING " not in line \
                        and line.split()[1] in ("anon_1", "anon_2", "driver"), where
        else:
            assert "Seq Scan" not in plan and "Sort" not in plan, where
        if "ORDER BY" in statement and "LIMIT" in statement and "study_pk IN" not in statement:
            assert "ix_study_triage_order" in plan or "ix_study_tags_order" in plan, where


def test_keyset_pages_return_every_study_once_while_studies_arrive(tmp_path: Path) -> None:
    for backend in ("sqlite", "postgresql"):
        with _scratch(backend, tmp_path / backend) as database:
            rng = random.Random(5)
            ids = build(database, 400)
            before = {e.study_id for e in reference(database)}
            for filters in (WorklistFilter(), WorklistFilter(task="brain-tumor")):
                seen: list[int] = []
                pages = []
                cursor: Cursor | None = None
                while True:
                    with database.read_session() as session:
                        page = load_worklist(session, filters, page_size=25, cursor=cursor)
                    pages.append(page)
                    seen.extend(r.study_id for r in page.rows)
                    # Studies arrive between two page views, older and newer than those shown, in every group.
                    add_studies(database, 7, ids, rng, user=1, newest=NOW + timedelta(days=1))
                    if page.next is None:
                        break
                    cursor = page.next
                assert len(seen) == len(set(seen)), "a study was shown twice"
                wanted = {e.study_id for e in reference(database)
                          if e.study_id in before and (filters.task is None or f"task:{filters.task}" in e.tags)}
                assert wanted <= set(seen), "a study that was there all along was never shown"
                assert [p.page for p in pages] == list(range(1, len(pages) + 1))
            # Back again, page by page from the last: each previous page is the one shown before it.
            with database.read_session() as session:
                forward = [load_worklist(session, WorklistFilter(), page_size=25)]
                while forward[-1].next is not None:
                    forward.append(load_worklist(session, WorklistFilter(), page_size=25, cursor=forward[-1].next))
                for shown, earlier in zip(forward[:0:-1], forward[-2::-1], strict=True):
                    back = load_worklist(session, WorklistFilter(), page_size=25, cursor=shown.previous)
                    assert (back.page, [r.study_id for r in back.rows]) == (
                        earlier.page, [r.study_id for r in earlier.rows])


def test_results_json_is_streamed_as_the_report(archive: Database) -> None:
    out = io.StringIO()
    write_json(archive, out)
    assert out.getvalue() == json.dumps(results_report(archive), indent=2) + "\n"
    assert len(json.loads(out.getvalue())["series"]) > STUDIES
