"""Helpers shared by the web tests (no tests here): a migrated database, users, studies archived as real DICOM
made at test time from the shared brain MRI images, and a small installed model for the heat maps."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi.testclient import TestClient

from config import Settings, load_settings
from dicom_io.archive import Archive
from dicom_io.synthesis import mr_series
from models.tasks import BRAIN_TUMOR
from worker.db import (
    Database, Instance, Job, JobState, Patient, Result, Series, Study, upgrade_database, utcnow,
)
from worker.db.backfill import BackfillPlan, BackfillStudy, PlanState, StudyState
from worker.web.users import add_user

if TYPE_CHECKING:
    from pydicom import Dataset
    from playwright.sync_api import Page

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri" / "Testing"
PASSWORD = "correct horse battery"
XSS_NAME = "<script>alert('pn')</script>^Evil"
XSS_DESCRIPTION = "<img src=x onerror=alert(1)>"


def make_settings(tmp_path: Path, **extra: Any) -> Settings:
    return load_settings(env={}, data_dir=tmp_path / "data", models_dir=tmp_path / "models", **extra)


def make_database(settings: Settings) -> Database:
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    return database


def add_users(database: Database) -> None:
    with database.session() as session:
        add_user(session, "rad", "radiologist", PASSWORD)
        add_user(session, "rad2", "radiologist", PASSWORD)
        add_user(session, "boss", "admin", PASSWORD)


def login(client: TestClient, user: str, password: str = PASSWORD) -> None:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    response = client.post("/login", data={"username": user, "password": password, "csrf_token": token[1]})
    assert response.status_code == 303, response.text


def csrf(client: TestClient) -> str:
    return client.get("/api/me").json()["csrf_token"]


class WebApp:
    """A migrated database with the test users, the web app over it and a small installed brain model; one
    logged-in client per user, kept (a login costs an Argon2 verification)."""

    def __init__(self, tmp_path: Path) -> None:
        from worker.web.app import create_app

        self.settings = make_settings(tmp_path)
        self.database = make_database(self.settings)
        add_users(self.database)
        self.app = create_app(self.settings, self.database)  # corrections publish revised SRs for real
        self.model_uid = install_model(self.settings)
        self._clients: dict[str, TestClient] = {}

    def as_user(self, user: str) -> TestClient:
        if user not in self._clients:
            client = TestClient(self.app, follow_redirects=False)
            login(client, user)
            self._clients[user] = client
        return self._clients[user]


def images(cls: str, count: int) -> list[Path]:
    files = sorted((DATA / cls).glob("*.jpg"))[:count]
    assert len(files) == count, f"need {count} images in {DATA / cls}"
    return files


def seed_study(
    database: Database,
    settings: Settings,
    *,
    cls: str,
    label: str,
    model_uid: str = "2.25.1",
    patient_name: str = "Doe^Jane",
    description: str = "MRI BRAIN",
    slices: int = 2,
    state: JobState = JobState.DONE,
    age_minutes: float = 10.0,
    datasets: list[Dataset] | None = None,
) -> tuple[int, int | None]:
    """Archive a classified MR series (``datasets``, else ``slices`` images of ``cls`` made into DICOM); return
    (study id, result id or None when the job is not done)."""
    if datasets is None:
        datasets = mr_series(images(cls, slices), patient_name=patient_name, study_description=description,
                             patient_id=f"PID-{uuid.uuid4().hex[:10]}", series_description=f"AX {cls}")
    archive = Archive(settings.archive_dir)
    received = utcnow() - timedelta(minutes=age_minutes)
    probabilities = {name: (0.91 if name == label else 0.03) for name in BRAIN_TUMOR.class_names}
    with database.session() as session:
        first = datasets[0]
        patient = Patient(patient_id=str(first.PatientID), patient_name=str(first.PatientName))
        study = Study(study_instance_uid=str(first.StudyInstanceUID), patient=patient,
                      study_description=str(first.StudyDescription), accession_number="ACC1", created_at=received)
        series = Series(series_instance_uid=str(first.SeriesInstanceUID), study=study, modality="MR",
                        series_description=str(first.SeriesDescription), series_number=5, revision=1,
                        pending=False, first_received_at=received, last_received_at=received)
        session.add_all([patient, study, series])
        session.flush()
        for index, ds in enumerate(datasets, start=1):
            stored = archive.store(ds)
            session.add(Instance(sop_instance_uid=stored.sop_instance_uid, series=series,
                                 sop_class_uid=stored.sop_class_uid, instance_number=index,
                                 transfer_syntax_uid=stored.transfer_syntax_uid, archive_path=str(stored.path),
                                 received_at=received))
        job = Job(series_pk=series.id, revision=1, state=state, task=BRAIN_TUMOR.name, instance_count=len(datasets),
                  series_last_received_at=received)
        session.add(job)
        session.flush()
        result_id = None
        if state is JobState.DONE:
            result = Result(
                job_pk=job.id, series_pk=series.id, revision=1, task=BRAIN_TUMOR.name, label=label,
                probabilities=probabilities,
                slice_probabilities=[
                    {"sop_instance_uid": str(ds.SOPInstanceUID), "frame": 1,
                     "probabilities": [probabilities[n] for n in BRAIN_TUMOR.class_names]}
                    for ds in datasets
                ],
                aggregation="mean", model_name="brain-tumor-triage-cnn", model_version="7", model_uid=model_uid,
            )
            session.add(result)
            session.flush()
            result_id = result.id
        return study.id, result_id


def install_model(settings: Settings, uid: str | None = None) -> str:
    """A small untrained brain-tumor triage-cnn saved as the installed model (card uid ``uid``, else a new one);
    returns its card uid."""
    from models.architectures import build_model
    from models.card import MODEL_FILE, ModelCard
    from models.preprocessing import InputSpec

    assert settings.models_dir is not None
    spec = InputSpec(64, 64, 1)
    model = build_model("triage-cnn", BRAIN_TUMOR, spec, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1))
    model(np.zeros((1, *spec.shape), dtype=np.float32))
    directory = settings.models_dir / BRAIN_TUMOR.name
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    card = ModelCard(task=BRAIN_TUMOR.name, class_names=list(BRAIN_TUMOR.class_names), architecture="triage-cnn",
                     input_spec=spec, version="7", **({"uid": uid} if uid else {}))
    card.save(directory)
    return card.uid


#: The running backfill plan's studies (seed_plans): (state, reason) each.
BACKFILL_STUDIES = [("planned", ""), ("planned", ""), ("moving", ""), ("received", ""), ("classified", ""),
           ("classified", ""), ("failed", "C-MOVE of series 1.2.3: status 0xA801 (None completed, None failed)")]


def seed_plans(database: Database) -> tuple[int, int]:
    """A running plan (started ten minutes ago, paused for live ingest) and a done one; their ids."""
    now = utcnow()
    with database.session() as session:
        running = BackfillPlan(source="PACS@10.0.0.1:104", query="modality=MR <b>study_date</b>=2024",
                               state=PlanState.RUNNING.value, started_at=now - timedelta(minutes=10),
                               paused_since=now - timedelta(seconds=30),
                               pause_reason="2 live series waiting for or in classification (bound 0)")
        done = BackfillPlan(source="PACS@10.0.0.1:104", query="modality=CT", state=PlanState.DONE.value)
        session.add_all([running, done])
        session.flush()
        session.add_all(BackfillStudy(plan_pk=running.id, study_instance_uid=f"2.25.{i}", state=state, reason=reason)
                        for i, (state, reason) in enumerate(BACKFILL_STUDIES, start=1))
        session.add(BackfillStudy(plan_pk=done.id, study_instance_uid="2.25.99", state=StudyState.CLASSIFIED.value))
        return running.id, done.id


@contextmanager
def signed_in_browser(settings: Settings, database: Database, user: str = "boss") -> Iterator[tuple["Page", str]]:
    """The web app served in a thread on ``settings.web_port`` and headless Chromium (Playwright) signed in as
    ``user`` (password :data:`PASSWORD`): yields the page and the base URL; stops both afterwards."""
    from playwright.sync_api import sync_playwright

    from test_web_browser import CHROMIUM, CHROMIUM_ARGS
    from worker.web.cli import start_in_thread

    server, thread = start_in_thread(settings, database)
    url = f"http://127.0.0.1:{settings.web_port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.05)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.goto(f"{url}/login?next=%2Fadmin%2Fmodels")
                page.fill("input[name=username]", user)
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                yield page, url
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
