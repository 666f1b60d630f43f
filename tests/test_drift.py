"""The drift watch (issue 23) on a real migrated database, SQLite then PostgreSQL: four ordinary weeks of covid-ct
results (a quarter COVID, a few corrections) and then a synthetic week where every series is called COVID. The
weekly figures flag that week's COVID share and nothing in the ordinary ones; the admin drift page shows the
warning; ``/metrics`` exports the warning gauge that the ``DicomTriageModelDrift`` alert watches."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from config import load_settings
from models.tasks import COVID_CT
from test_web_helpers import PASSWORD, signed_in_browser
from worker.db import Database, Job, JobState, Patient, Result, Series, Study, User
from worker.db.review import Decision, record_decision
from worker.drift import DriftBounds, iso_week, weekly_figures
from worker.web.app import create_app
from worker.web.users import add_user

SERIES_PER_WEEK = 12


def _add_result(session: Any, patient: Patient, label: str, probabilities: dict[str, float],
                created: datetime) -> Result:
    """A covid-ct result ``label`` created at ``created``, on a series and study of its own."""
    study = Study(study_instance_uid=generate_uid(), patient=patient)
    series = Series(series_instance_uid=generate_uid(), study=study, modality="CT", revision=1, pending=False)
    session.add_all([study, series])
    session.flush()
    job = Job(series_pk=series.id, revision=1, state=JobState.DONE, task=COVID_CT.name,
              series_last_received_at=created)
    session.add(job)
    session.flush()
    result = Result(job_pk=job.id, series_pk=series.id, revision=1, task=COVID_CT.name, label=label,
                    probabilities=probabilities, slice_probabilities=[], aggregation="test", model_name="m",
                    model_version="1", model_uid="2.25.23", created_at=created)
    session.add(result)
    session.flush()
    return result


def _seed_week(database: Database, moment: datetime, labels: list[str], corrections: int) -> None:
    """One result per label at ``moment``; the first six reviewed, ``corrections`` of them corrected."""
    with database.session() as session:
        reviewer = session.query(User).filter_by(name="drift-rad").one_or_none()
        if reviewer is None:
            reviewer = User(name="drift-rad", role="radiologist", password_hash="x")
            session.add(reviewer)
        patient = Patient(patient_id=f"DRIFT-{generate_uid()[-12:]}", patient_name="Drift^Week")
        session.add(patient)
        for number, label in enumerate(labels):
            result = _add_result(session, patient, label,
                                 {label: 0.9, ("non-COVID" if label == "COVID" else "COVID"): 0.1}, moment)
            if number < corrections:
                other = "non-COVID" if label == "COVID" else "COVID"
                record_decision(session, result, reviewer, Decision.CORRECT, other)
            elif number < 6:
                record_decision(session, result, reviewer, Decision.CONFIRM, label)


def _seed(database: Database, now: datetime) -> tuple[list[str], str]:
    """Four ordinary weeks before this one, then this week all COVID; return the ordinary weeks and this one."""
    ordinary = ["COVID"] * 3 + ["non-COVID"] * (SERIES_PER_WEEK - 3)
    weeks = []
    for back in (4, 3, 2, 1):
        moment = now - timedelta(weeks=back)
        _seed_week(database, moment, ordinary, corrections=1)
        weeks.append(iso_week(moment)[0])
    _seed_week(database, now, ["COVID"] * SERIES_PER_WEEK, corrections=1)
    return weeks, iso_week(now)[0]


def test_a_week_where_every_series_is_covid_is_flagged(database: Database, tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    ordinary, this_week = _seed(database, now)
    bounds = DriftBounds.from_settings(load_settings(env={}, data_dir=tmp_path / "data"))
    weeks = weekly_figures(database, COVID_CT, bounds, now)
    assert [w.week for w in weeks] == [*ordinary, this_week]
    assert all(w.warnings == [] for w in weeks[:-1])  # ordinary weeks: nothing flagged
    latest = weeks[-1]
    assert latest.series == SERIES_PER_WEEK and latest.class_shares["COVID"] == 1.0
    assert [(w.figure, w.class_name) for w in latest.warnings] == [("class_share", "COVID")]
    assert latest.warnings[0].baseline == 0.25
    assert weeks[0].correction_rate == 1 / 6 and abs(weeks[0].mean_confidence - 0.9) < 1e-9


def test_the_drift_warning_on_the_admin_page_and_in_metrics(tmp_path: Path, database_url: str) -> None:
    from worker.db import upgrade_database

    settings = load_settings(env={}, data_dir=tmp_path / "data", database_url=database_url)
    upgrade_database(database_url)
    database = Database(database_url)
    try:
        _, this_week = _seed(database, datetime.now(timezone.utc))
        with database.session() as session:
            add_user(session, "boss", "admin", PASSWORD)
        client = TestClient(create_app(settings, database), follow_redirects=False)
        metrics = client.get("/metrics").text
        assert 'dicom_triage_drift_warning{figure="class_share",task="covid-ct"} 1.0' in metrics
        assert 'dicom_triage_drift_warning{figure="correction_rate",task="covid-ct"} 0.0' in metrics
        assert 'dicom_triage_drift_class_share{class="COVID",task="covid-ct"} 1.0' in metrics
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)[1]
        assert client.post("/login", data={"username": "boss", "password": PASSWORD,
                                           "csrf_token": token}).status_code == 303
        assert 'href="/admin/drift"' in client.get("/admin/models").text
        page = client.get("/admin/drift")
        assert page.status_code == 200
        warning = re.search(r'data-testid="drift-warning-covid-ct">(.*?)</p>', page.text, re.S)
        assert warning, page.text[-3000:]
        assert f"week {this_week}" in warning[1] and "COVID share 100% is 4.0x the baseline 25%" in warning[1]
        assert 'data-testid="drift-warning-brain-tumor"' not in page.text
    finally:
        database.dispose()


def test_the_drift_warning_is_visible_in_a_browser(tmp_path: Path) -> None:
    """Headless Chromium (Playwright) logs in as an admin and sees the all-COVID week's warning on /admin/drift."""
    from playwright.sync_api import expect

    from processes import free_port
    from worker.db import upgrade_database

    settings = load_settings(env={}, data_dir=tmp_path / "data", web_port=free_port())
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    _, this_week = _seed(database, datetime.now(timezone.utc))
    with database.session() as session:
        add_user(session, "boss", "admin", PASSWORD)
    try:
        with signed_in_browser(settings, database, "boss") as (page, _):
            page.click("a[href='/admin/drift']")
            warning = page.get_by_test_id("drift-warning-covid-ct")
            expect(warning).to_be_visible()
            expect(warning).to_contain_text(f"week {this_week}")
            expect(warning).to_contain_text("COVID share 100%")
            expect(page.locator(f"tr[data-week='{this_week}'].drift-warning")).to_be_visible()
            expect(page.get_by_test_id("drift-warning-brain-tumor")).to_have_count(0)
    finally:
        database.dispose()


def test_week_figures_take_the_latest_review_the_week_bounds_and_only_present_probabilities(
        database: Database, tmp_path: Path) -> None:
    """Computed by the database (grouped queries): the figures of one hand-counted week."""
    now = datetime.now(timezone.utc)
    _, monday = iso_week(now)
    start = datetime(monday.year, monday.month, monday.day, tzinfo=timezone.utc)
    rows = [  # label, probabilities, created: the first two at the week's very start
        ("COVID", {"COVID": 0.8, "non-COVID": 0.2}, start),
        ("non-COVID", {"COVID": 0.4, "non-COVID": 0.6}, start),
        ("indeterminate", {"COVID": 0.5, "non-COVID": 0.5}, start + timedelta(hours=1)),
        ("COVID", {"non-COVID": 0.3}, start + timedelta(hours=2)),  # no probability of its own label: no confidence
        ("COVID", {"COVID": 0.1}, start - timedelta(microseconds=1)),  # the week before
        ("non-COVID", {"non-COVID": 0.05}, start + timedelta(hours=3)),  # superseded below: not current
    ]
    with database.session() as session:
        reviewer = User(name="drift-latest", role="radiologist", password_hash="x")
        patient = Patient(patient_id="DRIFT-LATEST", patient_name="Drift^Latest")
        session.add_all([reviewer, patient])
        session.flush()
        results = [_add_result(session, patient, *row) for row in rows]
        results[-1].superseded_by_pk = results[0].id
        # The latest decision counts: the first result confirmed, then corrected; the second only confirmed.
        record_decision(session, results[0], reviewer, Decision.CONFIRM, "COVID")
        record_decision(session, results[0], reviewer, Decision.CORRECT, "non-COVID")
        record_decision(session, results[1], reviewer, Decision.CONFIRM, "non-COVID")
    bounds = DriftBounds.from_settings(load_settings(env={}, data_dir=tmp_path / "data"))
    weeks = weekly_figures(database, COVID_CT, bounds, now)
    assert [(w.week, w.series) for w in weeks] == [(iso_week(start - timedelta(days=1))[0], 1), (iso_week(now)[0], 4)]
    week = weeks[-1]
    assert week.class_shares == {"COVID": 0.5, "non-COVID": 0.25} and week.indeterminate_rate == 0.25
    assert week.reviewed == 2 and week.correction_rate == 0.5
    assert abs(week.mean_confidence - (0.8 + 0.6) / 2) < 1e-9
    assert abs(weeks[0].mean_confidence - 0.1) < 1e-9 and weeks[0].reviewed == 0 and weeks[0].correction_rate is None
