"""models.card: fields, JSON round trip, DICOM UID, licence notes; the shipped cards are complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydicom.uid import UID

from models.card import ModelCard, new_model_uid
from models.inference import default_model_dir
from models.preprocessing import InputSpec
from models.tasks import BRAIN_TUMOR, COVID_CT, TASKS

REQUIRED_FIELDS = {"uid", "name", "version", "task", "class_names", "architecture", "input_spec", "training",
                   "dataset_manifest_sha256", "metrics", "created", "code_version", "licence"}


def make_card(**overrides) -> ModelCard:
    values = dict(task="covid-ct", class_names=list(COVID_CT.class_names), architecture="triage-cnn",
                  input_spec=InputSpec(160, 160, 1))
    values.update(overrides)
    return ModelCard(**values)


def test_uid_is_a_valid_dicom_uid_and_unique():
    uids = {new_model_uid() for _ in range(50)}
    assert len(uids) == 50
    for uid in uids:
        assert UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25.")


def test_round_trip_keeps_every_field(tmp_path):
    card = make_card(metrics={"holdout": {"accuracy": 0.9}, "cv5": {"accuracy": 0.91, "std": 0.01}},
                     training={"config": {"seed": 3}})
    path = card.save(tmp_path)
    assert path.name == "card.json"
    data = json.loads(path.read_text())
    assert REQUIRED_FIELDS <= set(data)
    loaded = ModelCard.load(tmp_path)
    assert loaded == card
    assert loaded.input_spec == InputSpec(160, 160, 1)


def test_licence_notes_follow_the_task():
    assert "CC BY-NC-SA 4.0" in make_card().licence
    brain = make_card(task="brain-tumor", class_names=list(BRAIN_TUMOR.class_names))
    assert "CC BY 4.0" in brain.licence and brain.name == "brain-tumor-triage-cnn"


def test_class_names_must_match_the_task():
    with pytest.raises(ValueError, match="differ from task covid-ct"):
        make_card(class_names=["non-COVID", "COVID"])
    with pytest.raises(KeyError, match="unknown task"):
        make_card(task="knee")


def test_bad_card_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelCard.load(tmp_path / "nope.json")
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelCard.load(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({**make_card().to_dict(), "surprise": 1}))
    with pytest.raises(ValueError, match="unknown model card fields: surprise"):
        ModelCard.load(tmp_path)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_model_and_card(task):
    folder = default_model_dir(task)
    card = ModelCard.load(folder)
    assert card.task == task and tuple(card.class_names) == TASKS[task].class_names
    assert UID(card.uid).is_valid
    assert (folder / "model.keras").stat().st_size <= 25 * 2**20
    assert len(card.dataset_manifest_sha256) == 64
    expected = {"testing", "testing_dedup"} if task == "brain-tumor" else {"holdout", "cv5"}
    assert expected <= set(card.metrics)
    for split in expected:
        figures = card.metrics[split]
        if "confusion_matrix" in figures:  # the accuracy is the confusion matrix's diagonal, recounted here
            matrix = np.asarray(figures["confusion_matrix"])
            assert matrix.sum() == figures["n"]
            assert figures["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-9)
        else:  # cross-validation: the mean and spread of its folds
            assert figures["accuracy"] == pytest.approx(np.mean(figures["folds"]), abs=1e-9)
            assert figures["std"] == pytest.approx(np.std(figures["folds"]), abs=1e-9)
    assert isinstance(card.training["config"]["seed"], int) and card.training["history"]["val_loss"]
