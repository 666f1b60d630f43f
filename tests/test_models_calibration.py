"""Calibration (temperature scaling) and the feature-distance domain check, and what the shipped cards record."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import apply_temperature, fit_temperature
from models.card import ModelCard
from models.domain import DomainModel
from models.inference import default_model_dir
from models.tasks import TASKS


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_calibrated_probabilities_are_monotone_in_the_raw_ones(temperature: float) -> None:
    rng = np.random.default_rng(3)
    raw = _softmax(rng.normal(0, 3, (500, 2)))
    calibrated = apply_temperature(raw, temperature)
    order = np.argsort(raw[:, 0])
    assert np.all(np.diff(calibrated[order, 0]) >= -1e-6)
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, atol=1e-5)
    # Multi-class: each row keeps its ranking of the classes, so the argmax never changes.
    raw4 = _softmax(rng.normal(0, 2, (200, 4)))
    assert (apply_temperature(raw4, temperature).argmax(axis=1) == raw4.argmax(axis=1)).all()


def test_fit_temperature_recovers_the_temperature_that_made_the_data() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in _softmax(logits)])  # labels drawn at T = 1
    overconfident = _softmax(logits * 2.0)  # a model twice too sure: the fitted T undoes it
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError):
        fit_temperature(overconfident[:0], labels[:0])


def test_domain_distance_separates_shifted_features(tmp_path) -> None:
    rng = np.random.default_rng(1)
    train = np.concatenate([rng.normal(0, 1, (300, 8)), rng.normal(3, 1, (300, 8))])
    labels = np.repeat([0, 1], 300)
    held_out = np.concatenate([rng.normal(0, 1, (100, 8)), rng.normal(3, 1, (100, 8))])
    domain = DomainModel.fit(train, labels, held_out, 99.0)
    assert (domain.distance(held_out) > domain.threshold).mean() <= 0.02
    assert (domain.distance(rng.normal(12, 1, (50, 8))) > domain.threshold).all()
    domain.save(tmp_path)
    loaded = DomainModel.load(tmp_path)
    assert loaded is not None and loaded.threshold == pytest.approx(domain.threshold)
    np.testing.assert_allclose(loaded.distance(held_out), domain.distance(held_out), rtol=1e-4)
    assert DomainModel.load(tmp_path / "nowhere") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "domain.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a domain file"):
        DomainModel.load(tmp_path / "bad")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_cards_record_their_calibration(task: str) -> None:
    folder = default_model_dir(task)
    card = ModelCard.load(folder)
    calibration = card.calibration
    assert 0.05 <= calibration["temperature"] <= 20 and "validation split" in calibration["temperature_basis"]
    assert calibration["threshold"] == 0.5 and calibration["threshold_basis"]
    v = calibration["validation"]
    assert v["nll_calibrated"] <= v["nll_raw"] and v["ece_calibrated"] <= v["ece_raw"]
    domain = DomainModel.load(folder)
    assert domain is not None and domain.threshold == pytest.approx(calibration["domain"]["threshold"], abs=1e-3)
