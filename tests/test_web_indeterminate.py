"""Indeterminate results (``models.tasks.INDETERMINATE``: the model could not judge the series) through the web app
and the SR path, over HTTP on a real migrated database with real archived DICOM; volumes read as axial slices cut
from them; and the admin models pages showing every evaluation split of a model card (the shipped COVID card has
``holdout``, not ``testing``).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update

from test_dicom_io_reformat import _block, sagittal_series
from test_web_helpers import WebApp, add_users, csrf, install_model, login, make_database, make_settings, seed_study
from dicom_io.sr import read_classification_sr
from models.card import CARD_FILE
from models.tasks import BRAIN_TUMOR, INDETERMINATE
from worker.db import Database, Instance, Result, SrDocument
from worker.db.review import TrainingExample
from worker.decoding import decode_series
from worker.registry import register_installed_models
from worker.reporting import publish_result
from worker.web.admin_models import evaluation_splits
from worker.web.app import create_app
from worker.web.rendering import THUMBNAIL_SIZE
from worker.web.worklist import WorklistFilter, is_suspected, load_worklist

ROOT = Path(__file__).resolve().parents[1]
REASON = "not a brain: no head in the field of view"
SHIPPED_COVID = ROOT / "models" / "weights" / "covid-ct"
#: Metrics given to the test's brain model card: three named splits, one that is no evaluation.
BRAIN_METRICS = {
    "testing": {"accuracy": 0.9878, "n": 1311, "macro_f1": 0.987},
    "testing_dedup": {"accuracy": 0.9855, "n": 1242},
    "external": {"accuracy": 0.8125, "n": 64},
    "notes": {"text": "not an evaluation"},
}


def make_indeterminate(database: Database, result_id: int, reason: str = REASON) -> None:
    """Turn a seeded result into what the worker stores for a series it cannot judge: the label, the reason, every
    class' probability, and the slices it left out marked ``excluded``."""
    probabilities = dict(zip(BRAIN_TUMOR.class_names, (0.30, 0.20, 0.40, 0.10)))
    with database.session() as session:
        result = session.get_one(Result, result_id)
        slices = [dict(item) for item in result.slice_probabilities]
        slices[0]["excluded"] = "scout-like frame"
        session.execute(
            update(Result).where(Result.id == result_id).values(
                label=INDETERMINATE, reason=reason, probabilities=probabilities, slice_probabilities=slices)
        )


class Env(WebApp):
    """A suspected study, a negative one and an indeterminate one; the installed brain model and the shipped COVID
    model registered."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        assert self.settings.models_dir is not None
        card_path = self.settings.models_dir / BRAIN_TUMOR.name / CARD_FILE
        card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "metrics": BRAIN_METRICS}))
        (self.settings.models_dir / "covid-ct").symlink_to(SHIPPED_COVID, target_is_directory=True)
        register_installed_models(self.database, self.settings)
        self.negative, _ = seed_study(self.database, self.settings, cls="notumor", label="notumor",
                                      model_uid=self.model_uid, age_minutes=60)
        self.suspected, _ = seed_study(self.database, self.settings, cls="glioma", label="glioma",
                                       model_uid=self.model_uid, age_minutes=5)
        # Received before the suspected one: if indeterminate counted as a finding it would come first.
        self.indeterminate, result = seed_study(self.database, self.settings, cls="pituitary", label="pituitary",
                                                model_uid=self.model_uid, age_minutes=30)
        assert result is not None
        self.result = result
        make_indeterminate(self.database, result)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("web-indeterminate"))
    yield environment
    environment.database.dispose()


def test_indeterminate_is_no_finding() -> None:
    assert not is_suspected("brain-tumor", INDETERMINATE) and not is_suspected("covid-ct", INDETERMINATE)
    assert is_suspected("brain-tumor", "glioma") and not is_suspected("brain-tumor", "notumor")


def test_worklist_api_shows_and_filters_indeterminate(env: Env) -> None:
    client = env.as_user("rad")
    items = client.get("/api/worklist").json()["items"]
    # The suspected finding leads; the indeterminate study waits with the negative one, oldest first.
    assert [i["study_id"] for i in items] == [env.suspected, env.negative, env.indeterminate]
    row = next(i for i in items if i["study_id"] == env.indeterminate)
    assert (row["finding"], row["reason"], row["probability"]) == (INDETERMINATE, REASON, None)
    [result] = row["results"]
    assert (result["label"], result["reason"], result["suspected"]) == (INDETERMINATE, REASON, False)
    suspected_row = next(i for i in items if i["study_id"] == env.suspected)
    assert suspected_row["reason"] is None and suspected_row["results"][0]["reason"] is None
    filtered = client.get("/api/worklist?finding=indeterminate").json()
    assert filtered["total"] == 1 and [i["study_id"] for i in filtered["items"]] == [env.indeterminate]
    assert client.get("/api/worklist?finding=indeterminated").status_code == 422


def test_worklist_page_shows_the_reason_and_offers_the_filter(env: Env) -> None:
    client = env.as_user("rad")
    page = client.get("/")
    assert page.status_code == 200
    assert '<option value="indeterminate">indeterminate</option>' in page.text
    row = re.search(rf'<tr class="[^"]*" data-study-id="{env.indeterminate}">(.*?)</tr>', page.text, re.S)
    assert row is not None
    assert 'class="finding indeterminate"' in row[1] and REASON in row[1]
    filtered = client.get("/?finding=indeterminate")
    assert filtered.status_code == 200 and "1 studies" in filtered.text
    assert f'data-study-id="{env.indeterminate}"' in filtered.text
    assert f'data-study-id="{env.suspected}"' not in filtered.text
    assert '<option value="indeterminate" selected>' in filtered.text


def test_worklist_filter_and_order_on_postgresql(tmp_path: Path, postgres_database: Database) -> None:
    settings = make_settings(tmp_path)
    negative, _ = seed_study(postgres_database, settings, cls="notumor", label="notumor", age_minutes=60, slices=1)
    suspected, _ = seed_study(postgres_database, settings, cls="glioma", label="glioma", age_minutes=5, slices=1)
    unjudged, result = seed_study(postgres_database, settings, cls="pituitary", label="pituitary", age_minutes=90,
                                  slices=1)
    assert result is not None
    make_indeterminate(postgres_database, result)
    with postgres_database.session() as session:
        page = load_worklist(session, WorklistFilter())
        assert [r.study_id for r in page.rows] == [suspected, unjudged, negative]
        only = load_worklist(session, WorklistFilter(finding=INDETERMINATE))
        assert [(r.study_id, r.finding, r.reason) for r in only.rows] == [(unjudged, INDETERMINATE, REASON)]


def test_study_page_and_api_show_the_reason_and_excluded_slices(env: Env) -> None:
    client = env.as_user("rad")
    page = client.get(f"/studies/{env.indeterminate}")
    assert page.status_code == 200, page.text
    assert f'<span data-testid="result-reason">{REASON}</span>' in page.text
    assert "left out: scout-like frame" in page.text
    assert "data-heatmap=" not in page.text  # no class to explain: the toggle requests nothing here
    assert 'data-heatmap="/heatmaps/' in client.get(f"/studies/{env.suspected}").text
    data = client.get(f"/api/studies/{env.indeterminate}").json()
    [series] = data["series"]
    [result] = series["results"]
    assert (result["label"], result["reason"], result["probability"]) == (INDETERMINATE, REASON, None)
    assert result["probabilities"]["notumor"] == pytest.approx(0.40)
    assert [s["excluded"] for s in series["slices"]] == ["scout-like frame", None]


def test_heatmap_of_an_indeterminate_result_is_a_clear_422(env: Env) -> None:
    client = env.as_user("rad")
    series = client.get(f"/api/studies/{env.indeterminate}").json()["series"][0]
    url = f"/heatmaps/{series['results'][0]['result_id']}/{series['slices'][1]['instance_id']}/1.png"
    response = client.get(url)
    assert response.status_code == 422
    assert "indeterminate" in response.json()["detail"] and "no class" in response.json()["detail"]
    assert not list((env.settings.data_dir / "web-cache" / "heatmaps").rglob("*.png"))  # nothing was drawn


def test_sr_of_an_indeterminate_result_then_confirm_and_correct(env: Env) -> None:
    first = publish_result(env.database, env.settings, env.result)
    assert first is not None and first.created
    report = read_classification_sr(pydicom.dcmread(first.archive_path))
    assert (report.finding, report.reason) == (INDETERMINATE, REASON)
    assert report.probabilities["notumor"] == pytest.approx(0.40)
    assert publish_result(env.database, env.settings, env.result).created is False  # already reported
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "sr", "show", str(first.archive_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "DICOM_TRIAGE_CONFIG": ""})
    assert shown.returncode == 0, shown.stderr
    assert "Finding: indeterminate" in shown.stdout and f"Reason: {REASON}" in shown.stdout

    rad = env.as_user("rad")
    headers = {"X-CSRF-Token": csrf(rad)}
    url = f"/api/results/{env.result}/decision"
    confirmed = rad.post(url, json={"decision": "confirm"}, headers=headers)
    assert confirmed.status_code == 200 and confirmed.json()["label"] == INDETERMINATE

    def training_labels() -> list[str]:
        with env.database.session() as session:
            series_pk = session.get_one(Result, env.result).series_pk
            return list(session.scalars(select(TrainingExample.label).where(TrainingExample.series_pk == series_pk)))

    assert training_labels() == []  # agreeing that the model cannot judge it names no class to train on
    refused = rad.post(url, json={"decision": "correct", "label": INDETERMINATE}, headers=headers)
    assert refused.status_code == 422  # a correction names a class
    corrected = rad.post(url, json={"decision": "correct", "label": "pituitary"}, headers=headers)
    assert corrected.status_code == 200 and corrected.json()["report_error"] is None
    assert training_labels() == ["pituitary"]
    with env.database.session() as session:
        documents = session.scalars(select(SrDocument).where(SrDocument.result_pk == env.result)
                                    .order_by(SrDocument.id)).all()
    assert [d.id for d in documents][0] == first.document_pk and len(documents) == 2
    revised = read_classification_sr(pydicom.dcmread(documents[1].archive_path))
    assert (revised.finding, revised.reason) == ("pituitary", None)
    assert revised.predecessors == (first.sop_instance_uid,)
    page = rad.get(f"/studies/{env.indeterminate}")
    assert "corrected as pituitary" in page.text and REASON in page.text  # the model's reason stays on record


def test_evaluation_splits_of_the_shipped_cards() -> None:
    for folder in sorted((ROOT / "models" / "weights").iterdir()):
        metrics = json.loads((folder / CARD_FILE).read_text())["metrics"]
        splits = evaluation_splits(metrics)
        assert [s.split for s in splits] == [name for name, m in metrics.items() if "accuracy" in m], folder.name
        for split in splits:
            assert split.accuracy == metrics[split.split]["accuracy"]
    covid = json.loads((SHIPPED_COVID / CARD_FILE).read_text())["metrics"]
    assert "holdout" in [s.split for s in evaluation_splits(covid)] and "testing" not in covid
    cv = [s for s in evaluation_splits(covid) if s.std is not None]
    assert cv and all(s.n is None for s in cv)  # cross-validation: a spread over folds, no single n
    assert evaluation_splits({"x": {"accuracy": True}, "y": {"accuracy": "0.9"}, "z": [1], "w": {}}) == []


def test_admin_models_page_shows_every_evaluation_split(env: Env) -> None:
    admin = env.as_user("boss")
    page = admin.get("/admin/models")
    assert page.status_code == 200
    cells = dict(re.findall(r'<td><small>([\d.]+)</small></td>.*?<td data-testid="evaluations">(.*?)</td>',
                            page.text, re.S))
    covid_uid = json.loads((SHIPPED_COVID / CARD_FILE).read_text())["uid"]
    assert set(cells) == {env.model_uid, covid_uid}
    brain = cells[env.model_uid]
    assert re.findall(r'data-split="([^"]+)"', brain) == ["testing", "testing_dedup", "external"]
    assert "98.8 %" in brain and "n=1311" in brain and "81.2 %" in brain and "notes" not in brain
    covid_metrics = json.loads((SHIPPED_COVID / CARD_FILE).read_text())["metrics"]
    holdout = covid_metrics["holdout"]
    assert f'holdout {100 * holdout["accuracy"]:.1f} %' in cells[covid_uid] and f'n={holdout["n"]}' in cells[covid_uid]
    assert "±" in cells[covid_uid]  # the card's cross-validation, with its spread

    detail = admin.get(f"/admin/registry/models/{covid_uid}")
    assert detail.status_code == 200
    assert re.findall(r'<tr data-split="([^"]+)">', detail.text) == [s.split for s in evaluation_splits(covid_metrics)]
    api = admin.get(f"/api/admin/models/{env.model_uid}").json()
    assert [e["split"] for e in api["model"]["evaluations"]] == ["testing", "testing_dedup", "external"]
    assert api["model"]["evaluations"][0] == {"split": "testing", "accuracy": 0.9878, "n": 1311, "macro_f1": 0.987,
                                             "std": None}


def test_a_volume_read_axially_is_shown_as_such_and_its_sr_cites_every_instance(tmp_path: Path) -> None:
    """A result whose slices are axial slices cut from the volume (``worker.decoding.slice_key``): the page says so
    and explains no acquired frame (the model did not see them); the SR cites every instance of the series. (Its own
    database: the module's studies are counted by the worklist tests.)"""
    settings = make_settings(tmp_path)
    database = make_database(settings)
    try:
        add_users(database)
        app = create_app(settings, database)
        model_uid = install_model(settings)
        register_installed_models(database, settings)
        _check_reformatted_study(database, settings, app, model_uid)
    finally:
        database.dispose()


def _check_reformatted_study(database: Database, settings, app, model_uid: str) -> None:
    study_id, result_id = seed_study(database, settings, cls="notumor", label="notumor", model_uid=model_uid,
                                     slices=3)
    assert result_id is not None
    slices = [{"reformat": "axial", "slice": n, "position": -50.0 + n, "probabilities": [0.02, 0.03, 0.9, 0.05]}
              for n in range(1, 6)]
    with database.session() as session:
        session.execute(update(Result).where(Result.id == result_id).values(slice_probabilities=slices))
        series_pk = session.get_one(Result, result_id).series_pk
        instance_uids = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.series_pk == series_pk)))
    client = TestClient(app, follow_redirects=False)
    login(client, "rad")
    page = client.get(f"/studies/{study_id}")
    assert page.status_code == 200, page.text
    assert re.search(r'data-testid="reformat-note">Read as 5 axial slices cut from this\s+volume', page.text)
    assert "data-heatmap=" not in page.text and page.text.count('class="slice"') == 3
    [series] = client.get(f"/api/studies/{study_id}").json()["series"]
    assert series["reformatted_slices"] == 5
    assert [s["probabilities"] for s in series["slices"]] == [None, None, None]
    refused = client.get(f"/heatmaps/{result_id}/{series['slices'][0]['instance_id']}/1.png")
    assert refused.status_code == 422 and "axial slices cut from it" in refused.json()["detail"]
    published = publish_result(database, settings, result_id)
    assert published is not None
    report = read_classification_sr(pydicom.dcmread(published.archive_path))
    assert {uid for _, uid in report.referenced_instances} == instance_uids and len(instance_uids) == 3


def test_the_axial_slices_the_model_read_are_shown_as_it_saw_them(tmp_path: Path) -> None:
    """A sagittal volume archived, and a result that read it as axial slices: the study page and the API show those
    slices, each picture the slice the worker's own path cuts (the first request cuts them all), with its figures."""
    volume = sagittal_series(_block((130, 128, 124)))
    for ds in volume:
        ds.StudyDescription = "MRI BRAIN"
    app = WebApp(tmp_path)
    try:
        study_id, result_id = seed_study(app.database, app.settings, cls="notumor", label="notumor",
                                         model_uid=app.model_uid, datasets=volume)
        other_study, other_result = seed_study(app.database, app.settings, cls="glioma", label="glioma",
                                               model_uid=app.model_uid)
        assert result_id is not None and other_result is not None
        with app.database.session() as session:
            series_pk = session.get_one(Result, result_id).series_pk
            paths = [Path(p) for p in session.scalars(select(Instance.archive_path).where(
                Instance.series_pk == series_pk).order_by(Instance.instance_number))]
        frames = decode_series(paths, BRAIN_TUMOR)
        assert frames[0].reformatted and len(frames) == 124
        slices = [{"reformat": "axial", "slice": f.frame_number, "position": f.position,
                   "probabilities": [0.02, 0.03, 0.9, 0.05]} for f in frames]
        slices[0]["excluded"] = "no head in the field"
        with app.database.session() as session:
            session.execute(update(Result).where(Result.id == result_id).values(slice_probabilities=slices))

        client = app.as_user("rad")
        page = client.get(f"/studies/{study_id}").text
        assert page.count('class="slice-axial"') == 124 and page.count('class="slice"') == 130
        assert f'src="/reformats/{result_id}/1.png"' in page and "left out: no head in the field" in page
        [series] = client.get(f"/api/studies/{study_id}").json()["series"]
        assert [s["number"] for s in series["axial_slices"]] == list(range(1, 125))
        assert series["axial_slices"][5]["image_url"] == f"/reformats/{result_id}/6.png"
        assert series["axial_slices"][5]["position"] == pytest.approx(frames[5].position)
        for number in (1, 60, 124):
            response = client.get(f"/reformats/{result_id}/{number}.png")
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            shown = np.asarray(Image.open(io.BytesIO(response.content)))
            expected = Image.fromarray(np.clip(np.rint(frames[number - 1].image), 0, 255).astype(np.uint8))
            expected.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
            np.testing.assert_array_equal(shown, np.asarray(expected))
        beyond = client.get(f"/reformats/{result_id}/125.png")
        assert beyond.status_code == 422 and "124 axial slices, not slice 125" in beyond.json()["detail"]
        # A result that read its acquired frames has no axial slices to show.
        assert client.get(f"/reformats/{other_result}/1.png").status_code == 404
        assert client.get(f"/api/studies/{other_study}").json()["series"][0]["axial_slices"] == []
    finally:
        app.database.dispose()
