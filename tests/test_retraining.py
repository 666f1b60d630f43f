"""Retraining end to end with real components: a running ``dicom-triage serve`` (listener, scheduler, inference
worker, and a ``training-worker`` child on the Celery ``training`` queue), dcmtk's storescu pushing CT studies
made now from ../shared/data images, the web app's JSON API for decisions and for the admin's actions.

The story of issue 6: radiologists confirm and correct results; the admin starts a retraining (export + an
external folder, one epoch of a tiny CNN), follows its progress, finds the candidate registered; the gate refuses
it against the installed model on the reference set; a forced promotion needs a reason; the next study is
classified by the new model (its UID in the result and in its SR) without restarting the worker; a fine-tune
from that active model names it in its card; a rollback brings the old model back. The export holds no patient
name, ID or birth date.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from config import load_settings
from dicom_factory import storescu, write_files
from dicom_io.synthesis import ct_series
from models.card import ModelCard
from models.tasks import COVID_CT
from processes import Child, celery_ready, free_port, serve_ready, triage_command, triage_environment, wait_for
from test_registry_helpers import covid_files, make_reference_set, save_threshold_model
from worker.db import Database, Result, Series, SrDocument, upgrade_database
from worker.db.registry import TrainingRun
from worker.retraining import (
    RetrainOptions,
    fail_orphaned_runs,
    parse_epoch_line,
    parse_plan_line,
    request_retraining,
    run_dir,
    run_retraining,
    train_command,
)
from worker.web.app import create_app
from worker.web.users import add_user

OUR_AE = "DICOM_TRIAGE"
PASSWORD = "correct horse battery"
KEY = "retraining-test-key-0123456789"
STARTUP_SECONDS = 240  # TensorFlow's import is slow on a loaded 2-core CI machine
#: (patient ID, name, birth date, true class) of the studies the radiologists review.
REVIEWED = [
    ("RT-PID-2001", "Retrain^Agatha", "19390101", "COVID"),
    ("RT-PID-2002", "Retrain^Basil", "19480202", "COVID"),
    ("RT-PID-2003", "Retrain^Clovis", "19570303", "non-COVID"),
    ("RT-PID-2004", "Retrain^Delphine", "19660404", "non-COVID"),
]
SLICES = 3


def login(client: TestClient, user: str) -> str:
    """Log ``client`` in as ``user``; return its CSRF token for API writes."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    response = client.post("/login", data={"username": user, "password": PASSWORD, "csrf_token": token[1]})
    assert response.status_code == 303, response.text
    return client.get("/api/me").json()["csrf_token"]


def test_epoch_lines_and_options_are_checked() -> None:
    assert parse_epoch_line("epoch 3: accuracy=0.5000 loss=0.8728 val_loss=0.6932 lr=1.00e-03\n") == (
        3, {"accuracy": 0.5, "loss": 0.8728, "val_loss": 0.6932})
    assert parse_epoch_line("fold 1/5: accuracy 80%") is None
    assert parse_plan_line("time budget of 0.5 min: training now ends at epoch 97\n") == 97
    assert parse_plan_line("time budget of 55 min: stopping after epoch 40") == 40
    assert parse_plan_line("epoch 3: accuracy=0.5000") is None
    for bad, message in (({"epochs": 0}, "epochs"), ({"architecture": "gpt"}, "architecture"),
                         ({"input_size": "32"}, "input size"), ({"since": "yesterday"}, "yesterday"),
                         ({"time_budget_minutes": 0}, "time budget must be more than 0")):
        with pytest.raises(ValueError, match=message):
            RetrainOptions(**bad)
    options = RetrainOptions(epochs=3, external=("/x",), time_budget_minutes=45)
    assert RetrainOptions.from_dict(options.to_dict()) == options
    assert train_command("covid-ct", [Path("/d")], Path("/m"), options)[-2:] == ["--time-budget", "45"]


def test_runs_fail_visibly(tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", pseudonym_key=KEY)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    try:
        def broker_down(run_id: int) -> None:
            raise ConnectionError("broker unreachable")

        with pytest.raises(ConnectionError):
            request_retraining(database, broker_down, "covid-ct", RetrainOptions(), "boss")
        queued = request_retraining(database, lambda run_id: None, "covid-ct", RetrainOptions(), "boss")
        run_retraining(settings, database, queued)  # nothing confirmed, no external folder
        run_retraining(settings, database, queued)  # a duplicate message: the run is not queued any more
        no_model = request_retraining(database, lambda run_id: None, "covid-ct",
                                      RetrainOptions(start_from_active=True, external=(str(tmp_path),)), "boss")
        run_retraining(settings, database, no_model)  # nothing registered to start from
        orphan = request_retraining(database, lambda run_id: None, "covid-ct", RetrainOptions(), "boss")
        with database.session() as session:
            run = session.get(TrainingRun, orphan)
            run.state, run.claimed_by = "running", f"{socket.gethostname()}:{2**22 + 1}"  # no such pid
        assert fail_orphaned_runs(database) == 1
        with database.session() as session:
            runs = {r.id: (r.state, r.error) for r in session.scalars(select(TrainingRun))}
    finally:
        database.dispose()
    assert [state for state, _ in runs.values()] == ["failed"] * 4
    errors = [error for _, error in runs.values()]
    assert "broker unreachable" in errors[0]
    assert "no labelled covid-ct series to train on" in errors[1]
    assert "no active covid-ct model to start from" in errors[2]
    assert "training worker running it stopped" in errors[3]


def test_confirm_export_retrain_gate_promote_and_roll_back(tmp_path: Path, processes: list[Child]) -> None:
    # The installed model, the reference set it gets all right, and an external labelled folder.
    installed = tmp_path / "installed"
    installed_uid = save_threshold_model(installed / "covid-ct", "installed")
    reference = make_reference_set(tmp_path / "reference", installed / "covid-ct")
    external = tmp_path / "external"
    for class_name in COVID_CT.class_names:
        (external / class_name).mkdir(parents=True)
        for number, path in enumerate(covid_files(class_name, 200, 8)):
            (external / class_name / f"ext{number}.png").symlink_to(path)

    data_dir, port = tmp_path / "data", free_port()
    env = triage_environment(
        installed, data_dir=data_dir, pseudonym_key=KEY, reference_sets=f"covid-ct={reference}",
        promotion_tolerance="0", external_training_data=f"covid-ct={external}",
    )
    # serve runs the training worker (the training queue) as a child, beside the inference and delivery workers.
    serve = Child(triage_command("serve", "--dicom-port", str(port), "--web-port", str(free_port())), env,
                  name="serve")
    processes.append(serve)
    serve.wait_for_line(serve_ready, STARTUP_SECONDS)
    serve.wait_for_line(lambda line: "training-" in line and celery_ready(line), STARTUP_SECONDS)

    settings = load_settings(env=env)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    with database.session() as session:
        add_user(session, "rad", "radiologist", PASSWORD)
        add_user(session, "boss", "admin", PASSWORD)
    app = create_app(settings, database)
    radiologist = TestClient(app, follow_redirects=False)
    admin = TestClient(app, follow_redirects=False)
    rad_csrf, boss_csrf = login(radiologist, "rad"), login(admin, "boss")

    image_offset = [300]

    def push_study(patient_id: str, name: str, birth: str, truth: str) -> str:
        datasets = ct_series(covid_files(truth, image_offset[0], SLICES), patient_id=patient_id, patient_name=name,
                             study_instance_uid=generate_uid(), series_instance_uid=generate_uid())
        image_offset[0] += SLICES
        for ds in datasets:
            ds.PatientBirthDate = birth
        files = write_files(datasets, tmp_path / "push" / patient_id)
        sent = storescu(port, files, called_ae=OUR_AE)
        assert sent.returncode == 0 and sent.statuses == [0] * len(files), sent.output[-3000:]
        return str(datasets[0].SeriesInstanceUID)

    def result_of(series_uid: str) -> Result | None:
        with database.session() as session:
            return session.scalar(
                select(Result).join(Series, Series.id == Result.series_pk)
                .where(Series.series_instance_uid == series_uid, Result.superseded_by_pk.is_(None)))

    # 1. Studies arrive and are classified by the installed model.
    truths = {push_study(*patient): patient[3] for patient in REVIEWED}
    results = {uid: wait_for(lambda u=uid: result_of(u), 180, f"the result of {uid}", serve) for uid in truths}
    assert {r.model_uid for r in results.values()} == {installed_uid}

    # 2. The radiologist confirms right results and corrects wrong ones through the API.
    for uid, result in results.items():
        body = ({"decision": "confirm"} if result.label == truths[uid]
                else {"decision": "correct", "label": truths[uid]})
        answer = radiologist.post(f"/api/results/{result.id}/decision", json=body,
                                  headers={"X-CSRF-Token": rad_csrf})
        assert answer.status_code == 200, answer.text

    # 3. The admin retrains; the run reports progress and ends with a registered candidate.
    assert admin.post("/api/admin/retrain", json={"task": "covid-ct"}).status_code == 403  # no CSRF token
    assert radiologist.post("/api/admin/retrain", json={"task": "covid-ct"},
                            headers={"X-CSRF-Token": rad_csrf}).status_code == 403  # not an admin
    started = admin.post("/api/admin/retrain", headers={"X-CSRF-Token": boss_csrf}, json={
        "task": "covid-ct", "epochs": 1, "architecture": "triage-cnn", "input_size": "32x32", "batch_size": 8})
    assert started.status_code == 200, started.text
    run_id = started.json()["run_id"]
    seen_phases: set[str] = set()

    def finished(run_id: int) -> dict[str, Any] | None:
        run = admin.get(f"/api/admin/runs/{run_id}").json()
        seen_phases.add(run["phase"])
        return run if run["state"] in ("done", "failed") else None

    run = wait_for(lambda: finished(run_id), 420, "the training run", serve)
    assert run["state"] == "done", run
    assert run["progress"] == 1.0 and len(run["history"]["loss"]) == 1 and "val_loss" in run["history"]
    assert seen_phases - {"queued", "done"}, seen_phases  # progress was visible while it ran
    candidate = run["model_uid"]
    listed = admin.get("/api/admin/models", params={"task": "covid-ct"}).json()
    assert {m["model_uid"]: m["state"] for m in listed} == {installed_uid: "active", candidate: "candidate"}
    detail = admin.get(f"/api/admin/models/{candidate}").json()
    manifest = detail["model"]["data_manifest"]
    assert {s["series_instance_uid"] for s in manifest["series"]} == set(truths)
    assert {s["label"] for s in manifest["series"]} == set(truths.values())
    assert manifest["external"] == [str(external)]
    assert detail["model"]["parent_uid"] == installed_uid
    # Trained to the active model's recipe (its card), with the admin's epochs and input size over it.
    candidate_card = ModelCard.load(Path(detail["model"]["model_dir"]))
    assert candidate_card.training["recipe_from"] == installed_uid
    assert candidate_card.training["config"]["epochs"] == 1 and candidate_card.input_spec.height == 32
    assert detail["reference"]["n"] == detail["active_reference"]["n"] == 12
    assert detail["active_reference"]["accuracy"] == 1.0

    # The export the run trained on holds no patient data anywhere.
    export = run_dir(settings, run_id) / "data"
    files = [p for p in export.rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".png"]) == len(REVIEWED) * SLICES
    forbidden = [text.encode() for pid, name, birth, _ in REVIEWED for text in (pid, name, birth, name.split("^")[1])]
    for path in files:
        content = path.read_bytes() + path.as_posix().encode()
        assert not [t for t in forbidden if t in content], path

    # 4. The gate refuses the one-epoch candidate; forcing needs a reason; then it is promoted.
    assert "done" in admin.get(f"/admin/registry/runs/{run_id}").text
    page = admin.get(f"/admin/registry/models/{candidate}")
    assert page.status_code == 200 and candidate in page.text and "confusion" in page.text
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    refused_page = admin.post(f"/admin/registry/models/{candidate}/promote", data={"csrf_token": form_token},
                              headers={"Accept": "text/html"})
    assert refused_page.status_code == 409 and "refuses" in refused_page.text
    refused = admin.post(f"/api/admin/models/{candidate}/promote", json={}, headers={"X-CSRF-Token": boss_csrf})
    assert refused.status_code == 409, refused.text
    assert not refused.json()["gate"]["passed"] and refused.json()["gate"]["failures"]
    no_reason = admin.post(f"/api/admin/models/{candidate}/promote", json={"force": True},
                           headers={"X-CSRF-Token": boss_csrf})
    assert no_reason.status_code == 422
    forced = admin.post(f"/api/admin/models/{candidate}/promote", headers={"X-CSRF-Token": boss_csrf},
                        json={"force": True, "reason": "pilot of the retrained model"})
    assert forced.status_code == 200 and forced.json()["forced"], forced.text
    events = admin.get(f"/api/admin/models/{candidate}").json()["model"]["events"]
    assert ("promote_forced", "boss", "pilot of the retrained model") in [
        (e["action"], e["actor"], e["reason"]) for e in events]

    # 5. The next study is classified by the new model, without restarting the worker.
    new_series = push_study("RT-PID-2005", "Retrain^Eugene", "19750505", "COVID")
    assert wait_for(lambda: result_of(new_series), 180, "the new study's result", serve).model_uid == candidate

    def sr_paths_of(series_uid: str) -> list[str]:
        with database.session() as session:
            return session.scalars(select(SrDocument.archive_path).join(Result, Result.id == SrDocument.result_pk)
                                   .join(Series, Series.id == Result.series_pk)
                                   .where(Series.series_instance_uid == series_uid)).all()

    # The worker makes SRs once no series waits (at most 30 s after the result): wait for it, not for the result.
    sr_paths = wait_for(lambda: sr_paths_of(new_series), 90, "the SR of the new study's result", serve)
    for path in sr_paths:
        assert candidate in str(dcmread(path))  # the SR's algorithm identification names the new model

    # 6. A fine-tune from the active model, asked for on the registry page's form: the candidate's card names it.
    page = admin.get("/admin/registry")
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    assert 'name="start_from_active"' in page.text and 'name="time_budget_minutes"' in page.text
    posted = admin.post("/admin/registry/retrain", data={
        "csrf_token": form_token, "task": "covid-ct", "architecture": "triage-cnn", "epochs": "1",
        "input_size": "32x32", "confirmed_only": "1", "start_from_active": "1", "time_budget_minutes": "30"})
    assert posted.status_code == 303, posted.text
    tuned_run = int(posted.headers["location"].rsplit("/", 1)[1])
    tuned = wait_for(lambda: finished(tuned_run), 420, "the fine-tuning run", serve)
    assert tuned["state"] == "done", tuned
    tuned_model = admin.get(f"/api/admin/models/{tuned['model_uid']}").json()["model"]
    assert tuned_model["parent_uid"] == candidate
    tuned_training = ModelCard.load(Path(tuned_model["model_dir"])).training
    assert tuned_training["init_from"]["source_uid"] == candidate and tuned_training["init_from"]["fresh_layers"] == []
    assert tuned_training["config"]["time_budget_minutes"] == 30

    # 7. Roll back: the installed model is active again and classifies the next study.
    back = admin.post("/api/admin/tasks/covid-ct/rollback", json={"reason": "pilot over"},
                      headers={"X-CSRF-Token": boss_csrf})
    assert back.status_code == 200 and back.json()["model_uid"] == installed_uid, back.text
    last_series = push_study("RT-PID-2006", "Retrain^Fanny", "19840606", "non-COVID")
    assert wait_for(lambda: result_of(last_series), 180, "the last study's result", serve).model_uid == installed_uid
    assert admin.get("/admin/registry").status_code == 200
    database.dispose()
