"""The model registry on a real database: installed models become active, the gate refuses a worse candidate and
logs it, a forced promotion needs and logs a reason, workers' model cache follows promotions and rollbacks without
a restart, and the CLI lists the registry as JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from config import load_settings
from test_registry_helpers import make_reference_set, save_threshold_model
from worker.db import Database, upgrade_database
from worker.db.registry import ModelEvent, RegisteredModel
from worker.inference import ModelCache
from worker.registry import (
    PromotionRefused,
    RegistryError,
    active_model_dirs,
    gate_decision,
    get_model,
    list_models,
    promote,
    register_installed_models,
    register_model,
    rollback,
)

ROOT = Path(__file__).resolve().parents[1]


def evaluation(accuracy: float, recalls: dict[str, float], sha: str = "ref") -> dict:
    return {"accuracy": accuracy, "reference_manifest_sha256": sha,
            "per_class": {name: {"recall": value} for name, value in recalls.items()}}


def test_gate_checks_accuracy_and_every_class_recall() -> None:
    active = evaluation(0.90, {"COVID": 0.90, "non-COVID": 0.90})
    assert gate_decision(evaluation(0.89, {"COVID": 0.89, "non-COVID": 0.95}), active, 0.02).passed
    # Better accuracy bought by missing COVID: refused, and the reason names the class.
    worse = gate_decision(evaluation(0.93, {"COVID": 0.80, "non-COVID": 0.99}), active, 0.02)
    assert not worse.passed
    assert worse.failures == ["recall[COVID] 0.8000 is worse than the active model's 0.9000 by more than 0.0200"]
    assert not gate_decision(evaluation(0.87, {"COVID": 0.9, "non-COVID": 0.9}), active, 0.02).passed
    assert gate_decision(evaluation(0.90, {"COVID": 0.9, "non-COVID": 0.9}), active, 0.0).passed
    with pytest.raises(ValueError, match="same reference set"):
        gate_decision(evaluation(0.9, {"COVID": 0.9, "non-COVID": 0.9}, sha="other"), active, 0.02)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """An installed good model, a bad candidate and a reference set the good model gets all right."""
    root = tmp_path_factory.mktemp("registry")
    good = root / "installed" / "covid-ct"
    good_uid = save_threshold_model(good, "good")
    bad_uid = save_threshold_model(root / "bad", "bad", swap_labels=True)
    reference = make_reference_set(root / "reference", good)
    return {"root": root, "installed": root / "installed", "good_uid": good_uid, "bad": root / "bad",
            "bad_uid": bad_uid, "reference": reference}


def test_promotion_gate_force_and_rollback_follow_through_to_the_worker_cache(
    trio: dict, tmp_path: Path, database_url: str
) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", models_dir=trio["installed"],
                             reference_sets={"covid-ct": trio["reference"]}, promotion_tolerance=0.0,
                             database_url=database_url)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    try:
        assert register_installed_models(database, settings) == [trio["good_uid"]]
        assert register_installed_models(database, settings) == []  # idempotent
        with database.session() as session:
            register_model(session, trio["bad"], actor="trainer")
            assert {m.model_uid: m.state for m in list_models(session, "covid-ct")} == {
                trio["good_uid"]: "active", trio["bad_uid"]: "candidate"}
            assert register_model(session, trio["bad"], actor="again").model_uid == trio["bad_uid"]  # idempotent
            copy = tmp_path / "copy"
            shutil.copytree(trio["bad"], copy)
            with pytest.raises(RegistryError, match="already registered from"):
                register_model(session, copy, actor="x")

        cache = ModelCache(settings.models_dir, active_dir=active_model_dirs(database))
        assert cache.get("covid-ct").card.uid == trio["good_uid"]

        with pytest.raises(PromotionRefused) as refused:
            promote(database, settings, trio["bad_uid"], "boss")
        assert not refused.value.decision.passed
        assert any("recall[COVID]" in line for line in refused.value.decision.failures)
        with pytest.raises(PromotionRefused):
            promote(database, settings, trio["bad_uid"], "boss", force_reason="   ")  # a blank reason is none
        with database.session() as session:
            assert get_model(session, trio["bad_uid"]).state == "candidate"
            good = get_model(session, trio["good_uid"])
            # Both evaluations are kept with the models, keyed by the reference set's content.
            assert list(good.reference_metrics.values())[0]["accuracy"] == 1.0

        outcome = promote(database, settings, trio["bad_uid"], "boss", force_reason="vendor asked for a trial")
        assert outcome.forced and outcome.replaced_uid == trio["good_uid"]
        assert cache.get("covid-ct").card.uid == trio["bad_uid"]  # next job, no restart
        with database.session() as session:
            bad = get_model(session, trio["bad_uid"])
            assert (bad.state, bad.promoted_by) == ("active", "boss") and bad.promoted_at is not None
            assert get_model(session, trio["good_uid"]).state == "retired"
            events = [(e.action, e.actor, e.reason) for e in session.scalars(
                select(ModelEvent).where(ModelEvent.model_pk == bad.id).order_by(ModelEvent.id))]
        assert events == [("register", "trainer", ""), ("promotion_refused", "boss", ""),
                          ("promotion_refused", "boss", ""), ("promote_forced", "boss", "vendor asked for a trial")]

        back = rollback(database, "covid-ct", "boss", "worse in practice")
        assert (back.model_uid, back.replaced_uid) == (trio["good_uid"], trio["bad_uid"])
        assert cache.get("covid-ct").card.uid == trio["good_uid"]
        with pytest.raises(RegistryError, match="nothing to roll back to"):
            rollback(database, "covid-ct", "boss")  # the installed model replaced nothing
        with pytest.raises(RegistryError, match="already the active"):
            promote(database, settings, trio["good_uid"], "boss")
    finally:
        database.dispose()


def test_gate_without_a_reference_set_needs_force(trio: dict, tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", models_dir=trio["installed"])
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    try:
        register_installed_models(database, settings)
        with database.session() as session:
            register_model(session, trio["bad"], actor="trainer")
        with pytest.raises(RegistryError, match="no reference set is configured"):
            promote(database, settings, trio["bad_uid"], "boss")
        assert promote(database, settings, trio["bad_uid"], "boss", force_reason="no reference yet").forced
    finally:
        database.dispose()


def test_concurrent_promotions_leave_one_active_model(trio: dict, tmp_path: Path, database_url: str) -> None:
    settings = load_settings(env={}, data_dir=tmp_path / "data", models_dir=trio["installed"],
                             database_url=database_url)
    database = Database(settings.effective_database_url)
    upgrade_database(database)
    try:
        register_installed_models(database, settings)
        uids = []
        with database.session() as session:
            for number in range(2):
                copy = tmp_path / f"candidate{number}"
                uids.append(save_threshold_model(copy, f"candidate{number}"))
                register_model(session, copy, actor="trainer")
        barrier, outcomes = threading.Barrier(2), []

        def run(uid: str) -> None:
            barrier.wait()
            try:
                promote(database, settings, uid, "boss", force_reason="race")
                outcomes.append("promoted")
            except RegistryError as exc:
                outcomes.append(f"refused: {exc}")
            except Exception as exc:  # anything else must fail the test, not die unseen in the thread
                outcomes.append(f"error: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(uid,)) for uid in uids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with database.session() as session:
            active = session.scalar(select(func.count()).select_from(RegisteredModel).where(
                RegisteredModel.task == "covid-ct", RegisteredModel.state == "active"))
        assert active == 1
        assert len(outcomes) == 2, f"a promotion thread did not return: {outcomes}"
        assert "promoted" in outcomes, outcomes
        assert all(o == "promoted" or ("refused" in o and "changed meanwhile" in o) for o in outcomes), outcomes
    finally:
        database.dispose()


def test_cli_lists_and_shows_json_and_refuses_bad_input(trio: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_TRIAGE_")}
    env.update(DICOM_TRIAGE_MODELS_DIR=str(trio["installed"]), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker.cli", *args, "--data-dir", str(tmp_path / "data")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    listed = run("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [model] = json.loads(listed.stdout)
    assert (model["task"], model["state"], model["model_uid"]) == ("covid-ct", "active", trio["good_uid"])
    assert "metrics" in model
    shown = run("models", "show", trio["good_uid"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["events"][0]["action"] == "register"
    missing = run("models", "show", "2.25.1")
    assert missing.returncode == 2 and "no registered model with UID 2.25.1" in missing.stderr
    forced = run("models", "promote", trio["good_uid"], "--force")
    assert forced.returncode == 2 and "--force needs --reason" in forced.stderr
