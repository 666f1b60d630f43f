"""Benchmark: the worklist's first page with 10,000 studies in the database, on SQLite and PostgreSQL.

Fills a scratch database (a temporary SQLite file; a scratch PostgreSQL database created and dropped on
127.0.0.1:5432) with a realistic mix: studies of one or two series, latest jobs in every state, results for the
finished ones, reviews for a part of them. Then times, per backend:

* ``query``: :func:`worker.web.worklist.load_worklist` for page 1 (the SQL and the page's details);
* ``api``: ``GET /api/worklist`` through the whole app (session check, query, JSON);
* ``page``: ``GET /`` (session check, query, HTML template).

Target (issue 5): the first page in under 300 ms. Run: ``.venv/bin/python bench/worklist.py [--studies N]``.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_settings  # noqa: E402
from models.tasks import TASKS  # noqa: E402
from worker.db import (  # noqa: E402
    Database, Job, JobState, Patient, Result, Review, Series, Study, upgrade_database, utcnow,
)
from worker.web.users import add_user  # noqa: E402
from worker.web.worklist import WorklistFilter, load_worklist  # noqa: E402

TARGET_MS = 300.0
PASSWORD = "benchmark-password"
STATES = [(JobState.DONE, 0.70), (JobState.QUEUED, 0.10), (JobState.RUNNING, 0.05), (JobState.FAILED, 0.05),
          (JobState.NOT_APPLICABLE, 0.10)]


def fill(database: Database, studies: int, seed: int = 5) -> None:
    """Insert ``studies`` studies (with patients, series, jobs, results, reviews) in bulk."""
    rng = random.Random(seed)
    now = utcnow()
    with database.session() as session:
        user_id = add_user(session, "bench", "radiologist", PASSWORD).id
    patients, study_rows, series_rows, jobs, results, reviews = [], [], [], [], [], []
    series_id = job_id = 0
    for index in range(1, studies + 1):
        received = now - timedelta(minutes=rng.uniform(0, 60 * 24 * 30))
        patients.append({"id": index, "patient_id": f"P{index:07d}", "issuer_of_patient_id": "",
                         "patient_name": f"Patient^{index}", "birth_date": "19700101", "sex": "O",
                         "created_at": received})
        study_rows.append({"id": index, "study_instance_uid": f"2.25.{index}", "patient_pk": index,
                           "accession_number": f"A{index}", "study_date": "20260101",
                           "study_description": "MRI BRAIN" if index % 2 else "CT CHEST", "created_at": received})
        task = TASKS["brain-tumor" if index % 2 else "covid-ct"]
        for _ in range(rng.choice((1, 1, 2))):
            series_id += 1
            job_id += 1
            state = rng.choices([s for s, _ in STATES], [w for _, w in STATES])[0]
            series_rows.append({"id": series_id, "series_instance_uid": f"2.25.{index}.{series_id}",
                                "study_pk": index, "modality": "MR" if index % 2 else "CT",
                                "body_part_examined": "", "series_description": "AX", "series_number": series_id,
                                "image_types": "ORIGINAL\\PRIMARY", "first_received_at": received,
                                "last_received_at": received, "pending": False, "revision": 1})
            jobs.append({"id": job_id, "series_pk": series_id, "revision": 1, "state": state.value,
                         "task": None if state is JobState.NOT_APPLICABLE else task.name, "reason": "",
                         "instance_count": 20, "attempts": 1, "series_last_received_at": received,
                         "created_at": received, "queued_at": received, "started_at": None, "finished_at": None})
            if state is JobState.DONE:
                label = rng.choice(task.class_names)
                probabilities = {name: (0.7 if name == label else 0.3 / (task.num_classes - 1))
                                 for name in task.class_names}
                results.append({"id": job_id, "job_pk": job_id, "series_pk": series_id, "revision": 1,
                                "task": task.name, "label": label, "probabilities": probabilities,
                                "slice_probabilities": [], "aggregation": "mean", "model_name": f"{task.name}-cnn",
                                "model_version": "3", "model_uid": f"2.25.9{task.num_classes}",
                                "inference_seconds": 0.5, "created_at": received, "superseded_by_pk": None})
                if rng.random() < 0.4:
                    corrected = rng.random() < 0.2
                    reviews.append({"result_pk": job_id, "user_pk": user_id,
                                    "decision": "correct" if corrected else "confirm",
                                    "label": next(c for c in task.class_names if c != label) if corrected else label,
                                    "comment": "", "created_at": received})
    with database.session() as session:
        for model, rows in ((Patient, patients), (Study, study_rows), (Series, series_rows), (Job, jobs),
                            (Result, results), (Review, reviews)):
            for start in range(0, len(rows), 5000):
                session.execute(insert(model.__table__), rows[start:start + 5000])
    if database.engine.dialect.name == "postgresql":
        with database.engine.connect() as connection:
            connection.execute(text("COMMIT"))
            for table in ("patients", "studies", "series", "jobs", "results", "reviews"):
                # Explicit ids were inserted: move the sequences past them, then refresh the planner's statistics.
                connection.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
            connection.execute(text("ANALYZE"))
            connection.commit()
    else:
        with database.engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")


def timed(function: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, max) milliseconds over ``repeat`` runs after one warm-up run."""
    function()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def measure(name: str, database: Database, data_dir: Path, studies: int, repeat: int) -> dict[str, tuple[float, float]]:
    from fastapi.testclient import TestClient

    from worker.web.app import create_app

    start = time.perf_counter()
    fill(database, studies)
    print(f"{name}: filled {studies} studies in {time.perf_counter() - start:.1f} s", flush=True)
    settings = load_settings(env={}, data_dir=data_dir, database_url=database.url)
    client = TestClient(create_app(settings, database))
    login = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', login.text)[1]  # type: ignore[index]
    assert client.post("/login", data={"username": "bench", "password": PASSWORD, "csrf_token": token},
                       follow_redirects=False).status_code == 303

    def query() -> None:
        with database.session() as session:
            page = load_worklist(session, WorklistFilter())
        assert page.total == studies and len(page.rows) == 50

    def api() -> None:
        response = client.get("/api/worklist")
        assert response.status_code == 200 and response.json()["total"] == studies

    def page() -> None:
        response = client.get("/")
        assert response.status_code == 200 and "data-study-id" in response.text

    def filtered() -> None:
        response = client.get("/api/worklist?review=pending&task=brain-tumor")
        assert response.status_code == 200

    return {"query": timed(query, repeat), "api": timed(api, repeat), "page": timed(page, repeat),
            "api_filtered": timed(filtered, repeat)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                        help="a database on the server to create the scratch database from")
    args = parser.parse_args()
    report: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-worklist-") as tmp:
        sqlite = Database(f"sqlite:///{tmp}/bench.sqlite3")
        upgrade_database(sqlite)
        report["sqlite"] = measure("sqlite", sqlite, Path(tmp) / "sqlite-data", args.studies, args.repeat)
        sqlite.dispose()
        name = f"bench_worklist_{uuid.uuid4().hex[:10]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = admin.url.set(database=name).render_as_string(hide_password=False)
            postgres = Database(url)
            upgrade_database(postgres)
            report["postgresql"] = measure("postgresql", postgres, Path(tmp) / "pg-data", args.studies, args.repeat)
            postgres.dispose()
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(f"\nworklist first page, {args.studies} studies, median / max of {args.repeat} runs (ms):")
    worst = 0.0
    for backend, timings in report.items():
        cells = "  ".join(f"{what} {median:6.1f} / {peak:6.1f}" for what, (median, peak) in timings.items())
        print(f"  {backend:<10} {cells}")
        worst = max(worst, timings["page"][0], timings["api"][0])
    verdict = "meets" if worst < TARGET_MS else "MISSES"
    print(f"slowest median {worst:.1f} ms: {verdict} the {TARGET_MS:.0f} ms target")
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
