"""Untyped findings (``models.tasks.BRAIN_TUMOR.untyped_finding``, ``tumor``: a tumour suspected on a sequence whose
tumour types the model was not taught) through the worklist, the study page, the heat-map route, the SR and a
radiologist's review, over HTTP on a real migrated database with real archived DICOM.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from test_web_helpers import WebApp, csrf, make_settings, seed_study
from dicom_io.codes import UNTYPED_FINDING_CONCEPTS
from dicom_io.sr import read_classification_sr
from models.tasks import BRAIN_TUMOR, TASKS
from worker.db import Database, Result, SrDocument
from worker.db.review import TrainingExample
from worker.drift import DriftBounds, weekly_figures
from worker.reporting import publish_result
from worker.web.worklist import FILTER_CHOICES, WorklistFilter, is_suspected, load_worklist

ROOT = Path(__file__).resolve().parents[1]
UNTYPED = BRAIN_TUMOR.untyped_finding
REASON = ("type not assessed: a FLAIR (inversion time 2200 ms) series, and the model learned the types from "
          "T1-weighted post-contrast images only")
#: glioma, meningioma, notumor, pituitary: a finding (suspicion 0.90) whose likeliest type is meningioma.
PROBABILITIES = dict(zip(BRAIN_TUMOR.class_names, (0.25, 0.55, 0.10, 0.10)))


def make_untyped(database: Database, result_id: int) -> None:
    """Turn a seeded result into what the worker stores for a tumour found on a FLAIR series."""
    with database.session() as session:
        session.execute(update(Result).where(Result.id == result_id).values(
            label=UNTYPED, reason=REASON, probabilities=PROBABILITIES))


class Env(WebApp):
    """An untyped finding, a negative study and a typed finding, received in that order."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.untyped, result = seed_study(self.database, self.settings, cls="glioma", label="glioma",
                                          model_uid=self.model_uid, age_minutes=90)
        self.negative, _ = seed_study(self.database, self.settings, cls="notumor", label="notumor",
                                      model_uid=self.model_uid, age_minutes=60)
        self.typed, _ = seed_study(self.database, self.settings, cls="glioma", label="glioma",
                                   model_uid=self.model_uid, age_minutes=5)
        assert result is not None
        self.result = result
        make_untyped(self.database, result)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("web-untyped"))
    yield environment
    environment.database.dispose()


def test_every_untyped_finding_is_a_coded_finding_of_its_task() -> None:
    for task in TASKS.values():
        if task.untyped_finding is not None:
            assert task.untyped_finding in UNTYPED_FINDING_CONCEPTS and task.untyped_finding not in task.class_names
            assert task.is_finding(task.untyped_finding) and task.untyped_finding in task.labels
            assert is_suspected(task.name, task.untyped_finding)
    assert not is_suspected("covid-ct", UNTYPED)  # no such label there
    assert UNTYPED in FILTER_CHOICES["finding"]


def test_worklist_puts_the_untyped_finding_with_the_findings_and_filters_it(env: Env) -> None:
    client = env.as_user("rad")
    items = client.get("/api/worklist").json()["items"]
    # Findings first, the longest waiting first: the untyped one (90 minutes) before the typed one (5).
    assert [i["study_id"] for i in items] == [env.untyped, env.typed, env.negative]
    row = items[0]
    assert (row["finding"], row["reason"]) == (UNTYPED, REASON)
    assert row["probability"] == pytest.approx(0.90)  # the finding classes together, not one type
    assert row["results"][0]["suspected"] is True
    filtered = client.get(f"/api/worklist?finding={UNTYPED}").json()
    assert [i["study_id"] for i in filtered["items"]] == [env.untyped]
    page = client.get("/")
    assert f'<option value="{UNTYPED}">{UNTYPED}</option>' in page.text
    html_row = re.search(rf'<tr class="[^"]*" data-study-id="{env.untyped}">(.*?)</tr>', page.text, re.S)
    assert html_row is not None and REASON in html_row[1]


def test_worklist_order_on_postgresql(tmp_path: Path, postgres_database: Database) -> None:
    # The triage summary is kept by the database's own triggers: their SQL must count the label as a finding too.
    settings = make_settings(tmp_path)
    negative, _ = seed_study(postgres_database, settings, cls="notumor", label="notumor", age_minutes=60, slices=1)
    untyped, result = seed_study(postgres_database, settings, cls="glioma", label="glioma", age_minutes=5, slices=1)
    assert result is not None
    make_untyped(postgres_database, result)
    with postgres_database.session() as session:
        assert [r.study_id for r in load_worklist(session, WorklistFilter()).rows] == [untyped, negative]
        only = load_worklist(session, WorklistFilter(finding=UNTYPED))
        assert [(r.study_id, r.finding, r.reason) for r in only.rows] == [(untyped, UNTYPED, REASON)]


def test_study_page_says_why_no_type_and_draws_no_heat_map(env: Env) -> None:
    client = env.as_user("rad")
    page = client.get(f"/studies/{env.untyped}")
    assert page.status_code == 200, page.text
    assert f'A finding, its type not given: <span data-testid="result-reason">{REASON}</span>' in page.text
    assert "could not judge" not in page.text
    assert "data-heatmap=" not in page.text  # no class to explain
    series = client.get(f"/api/studies/{env.untyped}").json()["series"][0]
    [result] = series["results"]
    assert (result["label"], result["reason"]) == (UNTYPED, REASON)
    response = client.get(f"/heatmaps/{result['result_id']}/{series['slices'][0]['instance_id']}/1.png")
    assert response.status_code == 422 and "no tumour type" in response.json()["detail"]


def test_drift_counts_the_untyped_share(env: Env) -> None:
    weeks = weekly_figures(env.database, BRAIN_TUMOR, DriftBounds.from_settings(env.settings))
    # The seeded results may straddle a Monday midnight: count over the weeks.
    assert sum(w.series for w in weeks) == 3
    assert sum(w.class_shares[UNTYPED] * w.series for w in weeks) == pytest.approx(1)


def test_sr_reports_the_untyped_finding_then_a_correction_gives_the_type(tmp_path: Path) -> None:
    env = Env(tmp_path)  # its own: the review moves the study to the reviewed end of the worklist
    first = publish_result(env.database, env.settings, env.result)
    assert first is not None and first.created
    ds = pydicom.dcmread(first.archive_path)
    report = read_classification_sr(ds)
    assert (report.finding, report.reason) == (UNTYPED, REASON)
    assert report.probabilities == pytest.approx(PROBABILITIES)
    assert UNTYPED_FINDING_CONCEPTS[UNTYPED].value in json.dumps(ds.to_json_dict())
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "sr", "show", str(first.archive_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"Finding: {UNTYPED}" in shown.stdout and f"Reason: {REASON}" in shown.stdout

    rad = env.as_user("rad")
    headers = {"X-CSRF-Token": csrf(rad)}
    url = f"/api/results/{env.result}/decision"

    def training_labels() -> list[str]:
        with env.database.session() as session:
            series_pk = session.get_one(Result, env.result).series_pk
            return list(session.scalars(select(TrainingExample.label).where(TrainingExample.series_pk == series_pk)))

    confirmed = rad.post(url, json={"decision": "confirm"}, headers=headers)
    assert confirmed.status_code == 200 and confirmed.json()["label"] == UNTYPED
    assert training_labels() == []  # a tumour of no stated type is no class to train on
    assert rad.post(url, json={"decision": "correct", "label": UNTYPED}, headers=headers).status_code == 422
    corrected = rad.post(url, json={"decision": "correct", "label": "glioma"}, headers=headers)
    assert corrected.status_code == 200 and corrected.json()["report_error"] is None
    assert training_labels() == ["glioma"]
    with env.database.session() as session:
        documents = session.scalars(select(SrDocument).where(SrDocument.result_pk == env.result)
                                    .order_by(SrDocument.id)).all()
    revised = read_classification_sr(pydicom.dcmread(documents[-1].archive_path))
    assert (revised.finding, revised.reason) == ("glioma", None)
    assert revised.predecessors == (first.sop_instance_uid,)
    env.database.dispose()
