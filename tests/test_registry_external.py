"""The promotion gate and the external real-DICOM split (issue 23), through the real CLI, database and web page.

Two small covid-ct models fitted now (``test_registry_helpers``): the active one, and a candidate fitted with the
labels swapped. The curated reference set is the images the candidate gets right, so on it the candidate is the
better model; then ``dicom-triage evaluate covid-ct --dicom real-dicom-dev --record-split external`` measures both
on real scanner series, where the candidate is the worse one (figures measured, not written into the cards). The
gate must refuse it showing both figures, keep the refusal in the registry and on the admin page, and let a forced
promotion through only with a reason, audited with the external figures.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from config import load_settings
from processes import triage_environment
from test_models_series import REAL
from test_registry_helpers import make_reference_set, save_threshold_model
from worker.db import Database, upgrade_database
from worker.registry import get_model, model_events, register_installed_models, register_model
from worker.web.app import create_app
from worker.web.users import add_user

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "bench" / "real-dicom-dev.labels.tsv"
PASSWORD = "correct horse battery"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is missing")
    root = tmp_path_factory.mktemp("gate-external")
    active_dir, candidate_dir = root / "installed" / "covid-ct", root / "candidate"
    active_uid = save_threshold_model(active_dir, "active")
    candidate_uid = save_threshold_model(candidate_dir, "candidate", swap_labels=True)
    reference = make_reference_set(root / "reference", candidate_dir)  # the candidate is right on all of it
    env = triage_environment(root / "installed", reference_sets=f"covid-ct={reference}", promotion_tolerance="0")
    for model_dir in (active_dir, candidate_dir):
        recorded = _cli(env, "evaluate", "covid-ct", "--dicom", str(REAL), "--labels", str(LABELS), "--model",
                        str(model_dir), "--record-split", "external")
        assert recorded.returncode == 0, recorded.stderr[-2000:]
    return {"root": root, "active_uid": active_uid, "candidate_dir": candidate_dir, "candidate_uid": candidate_uid,
            "env": env}


def _database(env: dict[str, str], data_dir: Path) -> tuple[Database, object]:
    settings = load_settings(env={**env, "DICOM_TRIAGE_DATA_DIR": str(data_dir)})
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    register_installed_models(database, settings)
    return database, settings


def test_better_on_curated_but_worse_on_external_is_refused_then_forced_with_a_reason(models, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**models["env"], "DICOM_TRIAGE_DATA_DIR": str(data_dir)}
    database, settings = _database(env, data_dir)
    uid = models["candidate_uid"]
    with database.session() as session:
        register_model(session, models["candidate_dir"], actor="test")

    refused = _cli(env, "models", "promote", uid, "--actor", "boss")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    # The gate's findings are the JSON object on stderr (TensorFlow may log before it).
    start = refused.stderr.index('{\n  "passed"')
    gate = json.loads(refused.stderr[start:refused.stderr.rindex("}") + 1])
    checks = {c["metric"]: c for c in gate["checks"]}
    # Better on the curated reference set...
    assert checks["accuracy"]["passed"] and checks["accuracy"]["candidate"] > checks["accuracy"]["active"]
    # ...worse on real scanner series, with both figures in the refusal.
    external = checks["external roc_auc"]
    assert not external["passed"] and external["candidate"] < external["active"]
    assert (f"external roc_auc {external['candidate']:.4f} is worse than the active model's "
            f"{external['active']:.4f}") in refused.stderr
    assert not checks["external sensitivity"]["passed"] and not checks["external specificity"]["passed"]

    # The refusal is in the registry, and the candidate's row holds the card the gate read.
    with database.session() as session:
        model = get_model(session, uid)
        assert model.state == "candidate" and "external" in model.card["metrics"]
        (event,) = [e for e in model_events(session, model) if e.action == "promotion_refused"]
        assert any(line.startswith("external roc_auc") for line in event.details["gate"]["failures"])

    # The admin's model page shows the external comparison with both figures.
    with database.session() as session:
        add_user(session, "boss", "admin", PASSWORD)
    client = TestClient(create_app(settings, database), follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)[1]
    assert client.post("/login", data={"username": "boss", "password": PASSWORD,
                                       "csrf_token": token}).status_code == 303
    page = client.get(f"/admin/registry/models/{uid}").text
    row = re.search(r"<tr><td>external roc_auc</td>(.*?)</tr>", page, re.S)
    assert row and re.findall(r"<td>(.*?)</td>", row[1])[-1] == "worse", page[-3000:]
    assert "refuses" in page
    # And the models page keeps the refusal's figures beside the model.
    models_page = client.get("/admin/models").text
    row = re.search(rf'<tr data-model="{uid}" data-metric="external roc_auc">(.*?)</tr>', models_page, re.S)
    assert row, models_page[-3000:]
    cells = re.findall(r"<td>(.*?)</td>", row[1], re.S)
    assert cells[1:] == ["promotion_refused", "external roc_auc", f"{external['candidate']:.4f}",
                         f"{external['active']:.4f}", "worse"]

    no_reason = _cli(env, "models", "promote", uid, "--force")
    assert no_reason.returncode == 2 and "--force needs --reason" in no_reason.stderr
    forced = _cli(env, "models", "promote", uid, "--force", "--reason", "external set too small", "--actor", "boss")
    assert forced.returncode == 0 and "(forced)" in forced.stdout, forced.stderr[-2000:]
    with database.session() as session:
        model = get_model(session, uid)
        (event,) = [e for e in model_events(session, model) if e.action == "promote_forced"]
    assert (event.actor, event.reason) == ("boss", "external set too small")
    assert any(c["metric"] == "external roc_auc" and not c["passed"] for c in event.details["gate"]["checks"])
    database.dispose()


def test_a_candidate_without_the_external_split_is_refused_when_the_active_model_has_one(
        models, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**models["env"], "DICOM_TRIAGE_DATA_DIR": str(data_dir)}
    database, _ = _database(env, data_dir)
    unmeasured = tmp_path / "unmeasured"
    shutil.copytree(models["candidate_dir"], unmeasured)
    card = json.loads((unmeasured / "card.json").read_text())
    del card["metrics"]["external"]
    card["uid"] = "2.25.2300000000000000000001"  # another model, never evaluated on real series
    (unmeasured / "card.json").write_text(json.dumps(card))
    with database.session() as session:
        register_model(session, unmeasured, actor="test")
    refused = _cli(env, "models", "promote", card["uid"])
    assert refused.returncode == 2
    assert "the candidate has no 'external' split while the active model has one" in refused.stderr
    database.dispose()
