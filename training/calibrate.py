"""The ``calibrate`` command: fit a trained model's temperature, operating threshold and domain on its own splits.

Everything is fitted on images the model was not trained on, except the domain's class means and covariance, which
describe the training images themselves:

* temperature (:mod:`models.calibration`): minimum negative log-likelihood on the validation split;
* operating threshold on the suspicion (one minus the negative classes' probability): :data:`OPERATING_THRESHOLD`,
  the Bayes decision for equal costs once probabilities are calibrated. Youden's J on the validation split was
  tried and rejected: the curated validation images are separated so well that J is flat over a wide range, and
  its maximum fell at a suspicion of 0.066 for the brain model, which turned half the slices of healthy scanner
  volumes into tumours. The validation sensitivity and specificity at the threshold are recorded;
* domain (:mod:`models.domain`): class means and covariance of the training split's features, threshold the
  :data:`DOMAIN_PERCENTILE` of the validation split's distances.

The results go into the card's ``calibration`` and ``domain.npz`` beside the model; the probabilities the model
reports change, its argmax (and so every accuracy) does not.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.calibration import apply_temperature, fit_temperature
from models.card import CARD_FILE
from models.domain import DomainModel
from models.inference import Classifier, default_model_dir
from models.preprocessing import prepare_batch
from models.tasks import Task, get_task
from training.data import DataError, load_and_split_sources
from training.fit import TrainConfig

#: Share of validation images whose feature distance the domain threshold lets through.
DOMAIN_PERCENTILE = 99.5
#: The operating threshold on the calibrated series suspicion (see the module docstring).
OPERATING_THRESHOLD = 0.5


def features_and_probabilities(classifier: Classifier, images: list[np.ndarray], batch_size: int = 64
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and raw (uncalibrated) probabilities of ``images``."""
    parts = [classifier.features(prepare_batch(images[start:start + batch_size], classifier.card.input_spec))
             for start in range(0, len(images), batch_size)]
    return np.concatenate([f for f, _ in parts]), np.concatenate([p for _, p in parts])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE: the gap between confidence and accuracy, averaged over ``bins`` equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total)


def calibrate(classifier: Classifier, task: Task, train: tuple[list[np.ndarray], np.ndarray],
              validation: tuple[list[np.ndarray], np.ndarray]) -> tuple[dict[str, Any], DomainModel]:
    """The card's ``calibration`` and the domain model from ``(images, labels)`` of the train and validation
    splits."""
    train_features, _ = features_and_probabilities(classifier, train[0])
    val_features, val_raw = features_and_probabilities(classifier, validation[0])
    labels = validation[1]
    temperature = fit_temperature(val_raw, labels)
    calibrated = apply_temperature(val_raw, temperature)
    negatives = [task.class_names.index(name) for name in task.negative_classes]
    positive = ~np.isin(labels, negatives)
    called = task.suspicion(calibrated) >= OPERATING_THRESHOLD
    domain = DomainModel.fit(train_features, train[1], val_features, DOMAIN_PERCENTILE)
    rows = np.arange(len(labels))
    record = {
        "temperature": temperature,
        "temperature_basis": f"minimum negative log-likelihood on the validation split ({len(labels)} images)",
        "threshold": OPERATING_THRESHOLD,
        "threshold_basis": ("the Bayes decision for equal costs on calibrated probabilities; Youden's J on the "
                            "curated validation split is flat and fell far lower (see training/calibrate.py)"),
        "validation": {
            "nll_raw": round(float(-np.log(np.clip(val_raw[rows, labels], 1e-7, 1)).mean()), 4),
            "nll_calibrated": round(float(-np.log(np.clip(calibrated[rows, labels], 1e-7, 1)).mean()), 4),
            "ece_raw": round(expected_calibration_error(val_raw, labels), 4),
            "ece_calibrated": round(expected_calibration_error(calibrated, labels), 4),
            "sensitivity_at_threshold": round(float(called[positive].mean()), 4),
            "specificity_at_threshold": round(float((~called[~positive]).mean()), 4),
        },
        "domain": {
            "method": "Mahalanobis distance of the penultimate features to the nearest class mean, shared covariance",
            "threshold": round(domain.threshold, 3),
            "basis": (f"{DOMAIN_PERCENTILE}th percentile of the validation split's distances ({len(labels)} images); "
                      f"means and covariance from the training split ({len(train[1])} images)"),
        },
    }
    return record, domain


def run_calibrate(task: Task, data_dirs: list[Path], model_dir: Path | None) -> int:
    model_dir = model_dir or default_model_dir(task.name)
    classifier = Classifier.load(model_dir)
    if classifier.card.task != task.name:
        print(f"calibrate: {model_dir} is a {classifier.card.task} model, not {task.name}", file=sys.stderr)
        return 2
    config = TrainConfig.from_dict(classifier.card.training.get("config", {}))
    # The split is redrawn exactly as training drew it, from the same --data folders in the same order.
    splits = load_and_split_sources(data_dirs, task, seed=int(classifier.card.split_seed or 0),
                                    validation_fraction=config.validation_fraction,
                                    pool_validation_fraction=config.pool_validation_fraction)
    print(splits.describe(), file=sys.stderr)
    labels = splits.images.label_array

    def part(indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        return [splits.images.images[i] for i in indices], labels[indices]

    record, domain = calibrate(classifier, task, part(splits.train), part(splits.validation))
    domain.save(model_dir)
    classifier.card.calibration = record
    classifier.card.save(model_dir / CARD_FILE)
    v = record["validation"]
    print(f"temperature {record['temperature']} (validation NLL {v['nll_raw']} -> {v['nll_calibrated']}, "
          f"ECE {v['ece_raw']} -> {v['ece_calibrated']}); threshold {record['threshold']}; "
          f"domain threshold {record['domain']['threshold']}")
    return 0


def handle_calibrate(args: Any) -> int:
    try:
        return run_calibrate(get_task(args.task), [Path(d) for d in args.data],
                             Path(args.model) if args.model else None)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
