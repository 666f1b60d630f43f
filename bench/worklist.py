"""Benchmark: the worklist at 10,000 and at 1,000,000 studies, SQLite and PostgreSQL side by side (issues 5, 22).

For each size and backend it fills a scratch database (a temporary SQLite file; a scratch PostgreSQL database
created and dropped on 127.0.0.1:5432) with a realistic mix: studies of one or two series, latest jobs in every
state, results for the finished ones (some indeterminate), reviews for a part of them. The base rows go in by bulk
inserts (SQLite ``executemany``, PostgreSQL ``COPY``) with the worklist's triggers set aside, then the summary is
built set-based by :func:`worker.db.triage.rebuild`, the statements migration ``wl0001`` runs on an existing
database ("rebuild": its downtime at that size); then ``ANALYZE`` (PostgreSQL: ``VACUUM ANALYZE``, as autovacuum
would have). Then, through the whole app (session check, queries, JSON or HTML), median and max of ``--repeat``:

* ``first``: ``GET /api/worklist``; ``first_html``: ``GET /``;
* ``page50`` / ``page50_html``: the 50th page, by the cursor the 49th page links to;
* one filter of each kind and two together (``review=pending&task=brain-tumor``);
* ``models``: ``GET /admin/models`` (result counts per model);
* ``drift``: ``GET /admin/drift`` (8 weeks of results per task; no target, shown for scale).

``results --json`` is run over the largest database as ``dicom-triage results --json > /dev/null``, with its time
and peak RSS, beside the RSS of the same command over an empty result (the process's own baseline).

Targets (issue 22): at the largest size every first page, filter and page 50 within a median of 100 ms and a max
of 200 ms, and each median within 1.5x of the smallest size's. Run:
``.venv/bin/python bench/worklist.py --studies 10000 1000000``.

Measured (2026-12-04, ``--studies 10000 1000000``, 2 cores shared with a training run; median / max ms of 15):

====================  =============  =============  =============  =============
request               SQLite 10k     PostgreSQL 10k SQLite 1M      PostgreSQL 1M
====================  =============  =============  =============  =============
first (API)           11.9 / 16.8    19.4 / 31.6    15.8 / 22.6    17.4 / 26.3
first_html            12.7 / 16.4    18.9 / 39.7    16.8 / 21.5    17.9 / 23.1
page50 (API)          17.7 / 25.7    18.2 / 39.0    14.0 / 17.8    16.4 / 18.9
page50_html           12.8 / 16.6    18.7 / 25.7    16.3 / 19.1    17.5 / 23.3
status=failed         15.4 / 138.1   24.0 / 27.3    16.9 / 22.5    16.1 / 22.6
task=covid-ct         12.1 / 17.1    22.3 / 27.5    15.1 / 19.1    17.5 / 19.6
finding=glioma        12.9 / 21.8    21.6 / 25.8    19.0 / 20.7    21.3 / 31.8
finding=indeterminate 14.5 / 18.8    22.3 / 40.9    17.0 / 20.4    16.2 / 25.1
review=pending        11.7 / 17.6    17.8 / 33.3    13.6 / 16.7    15.4 / 17.9
review+task           16.2 / 29.1    21.2 / 163.4   21.6 / 24.7    17.1 / 18.6
models (admin page)   6.9 / 12.0     10.5 / 13.7    8.4 / 10.8     6.0 / 8.9
====================  =============  =============  =============  =============

``/admin/drift`` at 1,000,000 studies (141,627 results in its 8 weeks), median / max of 5 ms, same command, two
runs 20 minutes apart on the same machine (2026-12-06): Python decoding every result row 2975 / 3031 (SQLite) and
4557 / 4744 (PostgreSQL); the database's grouped sums 896 / 928 and 1321 / 1327 (at 10,000 studies 36 and 43).
What is left is the scan of the results table by task and time.

Before issue 22 the first page took 30 ms at 10,000 studies and 393-435 ms at 200,000. Filling 1,000,000 studies:
base rows 77.8 s (SQLite) and 94.8 s (PostgreSQL), summary rebuild 57.7 s and 64.4 s. ``results --json`` over
the million (about 1.33 million series): 58.6 s and 58.9 s, peak RSS 338 and 340 MiB, the same as the command over
no series (338 and 340 MiB: the process itself).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_settings  # noqa: E402
from models.tasks import INDETERMINATE, TASKS  # noqa: E402
from worker.db import Database, JobState, triage, upgrade_database, utcnow  # noqa: E402
from worker.web.users import add_user  # noqa: E402
from worker.web.worklist import WorklistFilter, load_worklist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEDIAN_TARGET_MS, MAX_TARGET_MS, GROWTH_TARGET = 100.0, 200.0, 1.5
PASSWORD = "benchmark-password"
STATES = [(JobState.DONE, 0.70), (JobState.QUEUED, 0.10), (JobState.RUNNING, 0.05), (JobState.FAILED, 0.05),
          (JobState.NOT_APPLICABLE, 0.10)]
#: The requests timed, by name (``first`` and ``page50`` are filled in with their cursors).
FILTERS = {
    "status=failed": "status=failed",
    "task=covid-ct": "task=covid-ct",
    "finding=glioma": "finding=glioma",
    "finding=indeterminate": "finding=indeterminate",
    "review=pending": "review=pending",
    "review+task": "review=pending&task=brain-tumor",
}
CHUNK = 50_000
COLUMNS = {
    "patients": ("id", "patient_id", "issuer_of_patient_id", "patient_name", "birth_date", "sex", "created_at"),
    "studies": ("id", "study_instance_uid", "patient_pk", "accession_number", "study_date", "study_description",
                "created_at"),
    "series": ("id", "series_instance_uid", "study_pk", "modality", "body_part_examined", "series_description",
               "series_number", "image_types", "first_received_at", "last_received_at", "pending", "revision"),
    "jobs": ("id", "series_pk", "revision", "state", "task", "reason", "instance_count", "attempts",
             "series_last_received_at", "created_at"),
    "results": ("id", "job_pk", "series_pk", "revision", "task", "label", "probabilities", "slice_probabilities",
                "aggregation", "model_name", "model_version", "model_uid", "inference_seconds", "reason",
                "created_at"),
    "reviews": ("id", "result_pk", "user_pk", "decision", "label", "comment", "created_at"),
}


def generate(studies: int, user: int, seed: int = 5) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """The rows of ``studies`` studies, :data:`CHUNK` studies at a time (memory stays bounded at a million)."""
    rng = random.Random(seed)
    now = utcnow()
    series_id = job_id = review_id = 0
    for first in range(1, studies + 1, CHUNK):
        rows: dict[str, list[tuple[Any, ...]]] = {table: [] for table in COLUMNS}
        for index in range(first, min(first + CHUNK, studies + 1)):
            received = now - timedelta(minutes=rng.uniform(0, 60 * 24 * 365))
            rows["patients"].append((index, f"P{index:07d}", "", f"Patient^{index}", "19700101", "O", received))
            rows["studies"].append((index, f"2.25.{index}", index, f"A{index}", "20260101",
                                    "MRI BRAIN" if index % 2 else "CT CHEST", received))
            task = TASKS["brain-tumor" if index % 2 else "covid-ct"]
            for _ in range(rng.choice((1, 1, 2))):
                series_id += 1
                job_id += 1
                state = rng.choices([s for s, _ in STATES], [w for _, w in STATES])[0]
                rows["series"].append((series_id, f"2.25.{index}.{series_id}", index, "MR" if index % 2 else "CT",
                                       "", "AX", series_id, "ORIGINAL\\PRIMARY", received, received, False, 1))
                rows["jobs"].append((job_id, series_id, 1, state.value,
                                     None if state is JobState.NOT_APPLICABLE else task.name, "", 20, 1, received,
                                     received))
                if state is not JobState.DONE:
                    continue
                label = INDETERMINATE if rng.random() < 0.05 else rng.choice(task.class_names)
                probabilities = {name: (0.7 if name == label else 0.3 / (task.num_classes - 1))
                                 for name in task.class_names}
                rows["results"].append((job_id, job_id, series_id, 1, task.name, label, json.dumps(probabilities),
                                        "[]", "mean", f"{task.name}-cnn", "3", f"2.25.9{task.num_classes}", 0.5,
                                        "no lung in the field" if label == INDETERMINATE else None, received))
                if label != INDETERMINATE and rng.random() < 0.4:
                    corrected = rng.random() < 0.2
                    review_id += 1
                    rows["reviews"].append((
                        review_id, job_id, user, "correct" if corrected else "confirm",
                        next(c for c in task.class_names if c != label) if corrected else label, "", received))
        yield rows


def _sqlite_value(value: Any) -> Any:
    # As SQLAlchemy stores them on SQLite: UTC times as text, booleans as 0/1.
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")  # the times generated are UTC already
    if isinstance(value, bool):
        return int(value)
    return value


def fill(database: Database, studies: int) -> tuple[float, float]:
    """Insert ``studies`` studies in bulk; returns (seconds for the base rows, seconds for the summary)."""
    with database.session() as session:
        user_id = add_user(session, "bench", "radiologist", PASSWORD).id
        add_user(session, "bench-admin", "admin", PASSWORD)
    start = time.perf_counter()
    with database.engine.begin() as connection:
        triage.uninstall(connection)  # the base rows first, then the summary set-based: see rebuild()
    raw = database.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for rows in generate(studies, user_id):
            for table, values in rows.items():
                columns = COLUMNS[table]
                if database.is_sqlite:
                    cursor.execute("BEGIN IMMEDIATE")
                    cursor.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [tuple(_sqlite_value(v) for v in row) for row in values])
                    cursor.execute("COMMIT")
                else:
                    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        for row in values:
                            copy.write_row(row)
                    raw.commit()
        cursor.close()
    finally:
        raw.close()
    base = time.perf_counter() - start
    start = time.perf_counter()
    with database.engine.begin() as connection:
        triage.install(connection)
        triage.rebuild(connection)
    summary = time.perf_counter() - start
    if database.is_sqlite:
        with database.engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
    else:
        with database.engine.connect() as connection:
            connection.execute(text("COMMIT"))
            for table in COLUMNS:  # explicit ids were inserted: move the sequences past them
                connection.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
            connection.commit()
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
    return base, summary


def timed(function: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, max) milliseconds over ``repeat`` runs after one warm-up run."""
    function()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def _client(app: Any, user: str) -> Any:
    from fastapi.testclient import TestClient

    client = TestClient(app)
    login = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', login.text)[1]  # type: ignore[index]
    assert client.post("/login", data={"username": user, "password": PASSWORD, "csrf_token": token},
                       follow_redirects=False).status_code == 303
    return client


def measure(name: str, database: Database, data_dir: Path, studies: int, repeat: int) -> dict[str, Any]:
    from worker.web.app import create_app

    base, summary = fill(database, studies)
    print(f"{name}: {studies} studies filled in {base:.1f} s (bulk), summary rebuilt in {summary:.1f} s",
          flush=True)
    settings = load_settings(env={}, data_dir=data_dir, database_url=database.url)
    app = create_app(settings, database)
    client, admin = _client(app, "bench"), _client(app, "bench-admin")
    with database.read_session() as session:
        page = load_worklist(session, WorklistFilter())
        for _ in range(48):
            assert page.next is not None
            page = load_worklist(session, WorklistFilter(), cursor=page.next)
    assert page.next is not None and page.page == 49
    page50 = page.next.encode()

    def get(url: str, what: str = "json") -> Callable[[], None]:
        def call() -> None:
            response = (admin if url.startswith("/admin") else client).get(url)
            assert response.status_code == 200, (url, response.text[:200])
            if what == "json":
                assert response.json()["items"] or "indeterminate" in url or "failed" in url
            else:
                assert "data-study-id" in response.text or url.startswith("/admin")
        return call

    timings: dict[str, tuple[float, float]] = {
        "first": timed(get("/api/worklist"), repeat),
        "first_html": timed(get("/", "html"), repeat),
        "page50": timed(get(f"/api/worklist?cursor={page50}"), repeat),
        "page50_html": timed(get(f"/?cursor={page50}", "html"), repeat),
    }
    for label, query in FILTERS.items():
        timings[label] = timed(get(f"/api/worklist?{query}"), repeat)
    timings["models"] = timed(get("/admin/models", "html"), repeat)
    timings["drift"] = timed(get("/admin/drift", "html"), repeat)
    return {"fill_s": base, "rebuild_s": summary, "timings": timings}


def results_json(url: str, data_dir: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS in MiB, baseline peak RSS in MiB) of ``dicom-triage results --json`` over ``url``."""
    environment = {**os.environ, "DICOM_TRIAGE_DATABASE_URL": url, "DICOM_TRIAGE_CONFIG": ""}

    def run(*extra: str) -> tuple[float, int]:
        start = time.perf_counter()
        with open(os.devnull, "w") as sink:
            child = subprocess.Popen([str(ROOT / ".venv/bin/dicom-triage"), "results", "--json", "--data-dir",
                                      str(data_dir), *extra], stdout=sink, env=environment)
            _pid, status, usage = os.wait4(child.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return time.perf_counter() - start, usage.ru_maxrss // 1024

    seconds, peak = run()
    _seconds, baseline = run("--study", "2.25.0")  # no such study: the process and one empty query
    return seconds, peak, baseline


def _postgres(admin_url: str) -> Iterator[str]:
    name = f"bench_worklist_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_size(studies: int, args: argparse.Namespace, tmp: Path, with_results: bool) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for backend in ("sqlite", "postgresql"):
        scratch = _postgres(args.postgres) if backend == "postgresql" else iter(
            [f"sqlite:///{tmp}/bench-{studies}.sqlite3"])
        url = next(scratch)
        try:
            database = Database(url)
            upgrade_database(database)
            report[backend] = measure(backend, database, tmp / f"{backend}-{studies}", studies, args.repeat)
            database.dispose()
            if with_results:
                report[backend]["results_json"] = results_json(url, tmp / f"{backend}-{studies}")
        finally:
            next(scratch, None)  # drops the PostgreSQL database
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[10_000],
                        help="archive sizes (the first is the reference of the growth target)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-results-json", action="store_true", help="skip results --json over the largest")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                        help="a database on the server to create the scratch database from")
    args = parser.parse_args()
    sizes = args.studies
    reports: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-worklist-") as tmp:
        for n in sizes:
            reports[n] = run_size(n, args, Path(tmp), with_results=n == max(sizes) and not args.no_results_json)
    return summarise(sizes, reports, args.repeat)


def summarise(sizes: list[int], reports: dict[int, dict[str, Any]], repeat: int) -> int:
    backends = ("sqlite", "postgresql")
    names = list(reports[sizes[0]]["sqlite"]["timings"])
    print(f"\nworklist, median / max of {repeat} runs (ms), through the app:")
    header = "  ".join(f"{f'{b} {n:,}':>22}" for n in sizes for b in backends)
    print(f"  {'':<22}{header}")
    for name in names:
        cells = "  ".join(
            f"{reports[n][b]['timings'][name][0]:10.1f} / {reports[n][b]['timings'][name][1]:7.1f}"
            for n in sizes for b in backends)
        print(f"  {name:<22}{cells}")
    for n in sizes:
        for b in backends:
            print(f"  fill {b} {n:,}: base rows {reports[n][b]['fill_s']:.1f} s, summary rebuild "
                  f"{reports[n][b]['rebuild_s']:.1f} s")
    largest, smallest = max(sizes), min(sizes)
    for b in backends:
        if "results_json" in reports[largest][b]:
            seconds, peak, baseline = reports[largest][b]["results_json"]
            print(f"  results --json {b} {largest:,} studies: {seconds:.1f} s, peak RSS {peak} MiB "
                  f"(the command over no series: {baseline} MiB)")
    failures = []
    checked = [n for n in names if n not in ("models", "drift")]
    for b in backends:
        for name in checked:
            median, peak = reports[largest][b]["timings"][name]
            if median > MEDIAN_TARGET_MS or peak > MAX_TARGET_MS:
                failures.append(f"{b} {name}: {median:.1f} / {peak:.1f} ms at {largest:,}")
            if largest != smallest:
                growth = median / reports[smallest][b]["timings"][name][0]
                if growth > GROWTH_TARGET:
                    failures.append(f"{b} {name}: {growth:.2f}x the {smallest:,}-study median")
    if failures:
        print("MISSES the targets (median <= 100 ms, max <= 200 ms, <= 1.5x growth):\n  " + "\n  ".join(failures))
        return 1
    print(f"meets the targets at {largest:,} studies: median <= {MEDIAN_TARGET_MS:.0f} ms, "
          f"max <= {MAX_TARGET_MS:.0f} ms" + (f", <= {GROWTH_TARGET}x the {smallest:,}-study medians"
                                               if largest != smallest else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
