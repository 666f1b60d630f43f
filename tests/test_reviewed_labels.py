"""Reviewed labels by default (issue 23), on a real migrated database and archive seeded as ``test_export`` seeds it
(six reviewed series, one nobody reviewed):

* ``models retrain`` queues a run on radiologists' labels only and says how many unreviewed results it leaves out;
  ``--include-unreviewed`` (and the old ``--all-results``) opt in and say how many labels are the model's own;
* a run that included them records that count in the candidate's card and in its registry row;
* the admin registry page shows both counts before a run starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from config import load_settings
from dicom_io.archive import Archive
from models.card import ModelCard
from models.tasks import COVID_CT
from test_export import KEY, SLICES, seed
from worker.db import Database, upgrade_database
from worker.db.registry import RegisteredModel, TrainingRun
from worker.export import label_counts
from worker.retraining import run_retraining
from worker.web.app import create_app
from worker.web.users import add_user

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reviewed")
    settings = load_settings(env={}, data_dir=root / "data", pseudonym_key=KEY)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    seed(database, settings, Archive(settings.archive_dir))
    yield settings, database
    database.dispose()


def _retrain(settings, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(DICOM_TRIAGE_PSEUDONYM_KEY=KEY, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "worker.cli", "models", "retrain", "covid-ct", "--arch", "threshold",
                           "--epochs", "1", "--data-dir", str(settings.data_dir), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def _run_options(database: Database, run_id: int) -> dict:
    with database.session() as session:
        return session.get(TrainingRun, run_id).options


def test_label_counts_reviewed_and_unreviewed(seeded) -> None:
    _, database = seeded
    assert label_counts(database, COVID_CT) == {"reviewed": 6, "unreviewed": 1}
    assert label_counts(database, COVID_CT, since=date.today() - timedelta(days=1)) == {"reviewed": 6, "unreviewed": 1}
    assert label_counts(database, COVID_CT, since=date.today() + timedelta(days=1)) == {"reviewed": 0, "unreviewed": 0}


def test_retrain_cli_defaults_to_reviewed_labels_and_says_what_it_left_out(seeded) -> None:
    settings, database = seeded
    default = _retrain(settings)
    assert default.returncode == 0, default.stderr[-2000:]
    assert "left out 1 unreviewed results (--include-unreviewed adds them)" in default.stdout
    later = _retrain(settings, "--since", (date.today() + timedelta(days=1)).isoformat())
    assert later.returncode == 0, later.stderr[-2000:]
    assert "labels: 0 radiologist-reviewed series; left out 0 unreviewed results" in later.stdout
    run_id = int(re.search(r"queued training run (\d+)", default.stdout)[1])
    assert _run_options(database, run_id)["confirmed_only"] is True
    for flag in ("--include-unreviewed", "--all-results"):
        opted = _retrain(settings, flag)
        assert opted.returncode == 0, opted.stderr[-2000:]
        assert "1 series labelled with the model's own unreviewed result" in opted.stdout
        assert _run_options(database, int(re.search(r"queued training run (\d+)", opted.stdout)[1]))[
            "confirmed_only"] is False


def test_a_run_with_unreviewed_labels_records_how_many_in_card_and_registry(seeded) -> None:
    settings, database = seeded
    queued = _retrain(settings, "--include-unreviewed")
    assert queued.returncode == 0, queued.stderr[-2000:]
    run_id = int(re.search(r"queued training run (\d+)", queued.stdout)[1])
    run_retraining(settings, database, run_id)  # the training worker's own code, in this process
    with database.session() as session:
        run = session.get(TrainingRun, run_id)
        assert run.state == "done", run.error
        model = session.scalar(select(RegisteredModel).where(RegisteredModel.model_uid == run.model_uid))
        export = model.data_manifest["export"]
        model_dir = Path(model.model_dir)
    # One unreviewed series of SLICES slices carries the model's label; the six reviewed ones the radiologists'.
    assert export["model_labels"] == SLICES and export["label_sources"] == {"radiologist": 6 * SLICES,
                                                                            "model": SLICES}
    assert ModelCard.load(model_dir).training["archive_labels"]["model_labels"] == SLICES


def test_admin_page_shows_the_label_counts_before_a_run(seeded) -> None:
    settings, database = seeded
    with database.session() as session:
        add_user(session, "boss", "admin", PASSWORD)
    client = TestClient(create_app(settings, database), follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    assert client.post("/login", data={"username": "boss", "password": PASSWORD,
                                       "csrf_token": token}).status_code == 303
    registry = client.get("/admin/registry")
    assert registry.status_code == 200
    row = re.search(r'<tr data-task="covid-ct">(.*?)</tr>', registry.text, re.S)[1]
    assert re.findall(r"<td>(.*?)</td>", row) == ["covid-ct", "6", "1"]
