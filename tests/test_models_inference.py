"""models.inference.Classifier: loads the shipped models once, predicts probabilities in class order."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.card import ModelCard
from models.inference import Classifier, default_model_dir

@pytest.fixture(scope="module")
def brain() -> Classifier:
    return Classifier.load(default_model_dir("brain-tumor"))


def test_default_model_dir_names_the_task():
    assert default_model_dir("covid-ct").name == "covid-ct"
    with pytest.raises(KeyError, match="unknown task"):
        default_model_dir("knee")


def test_predict_gives_probabilities_in_class_order(brain):
    assert brain.task.name == "brain-tumor" and brain.class_names == ("glioma", "meningioma", "notumor", "pituitary")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224), np.uint8) for _ in range(5)] + [rng.integers(0, 256, (90, 60), np.uint8)]
    probabilities = brain.predict(images, batch_size=4)
    assert probabilities.shape == (6, 4) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(brain.predict(images, batch_size=32), probabilities, atol=1e-5)
    assert brain.predict([]).shape == (0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        brain.predict(images, batch_size=0)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Classifier.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="has no model.keras"):
        Classifier.load(tmp_path)
    shutil.copy(default_model_dir("covid-ct") / "card.json", tmp_path / "card.json")
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot be loaded as a Keras model"):
        Classifier.load(tmp_path)


def test_card_that_does_not_fit_the_model_is_refused(tmp_path):
    shutil.copy(default_model_dir("covid-ct") / "model.keras", tmp_path / "model.keras")
    card = ModelCard.load(default_model_dir("covid-ct"))
    card.input_spec = type(card.input_spec)(64, 64, 1)
    card.save(tmp_path)
    with pytest.raises(ValueError, match="do not match its card"):
        Classifier.load(tmp_path)
