"""The shipped models held to their cards: each scored on its own evaluation split, redrawn as training drew it.

A model file, a preprocessing change or a loader change that costs accuracy fails here, not only in a benchmark.
The floor is the card's own figure less one image (float reductions may differ by a hair between CPUs), and the
figure itself must stay at or above the product's target for that split."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.inference import Classifier, default_model_dir
from models.tasks import get_task
from training.data import load_and_split
from training.evaluate import evaluate_splits
from training.fit import TrainConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: (task, dataset folder, {split: the product's floor}): issue 17's curated-set floors for brain; COVID's 95.6% holdout
#: target is still open (issues 2 and 17), so its floor here is the shipped model's recorded level.
CASES = [
    ("brain-tumor", "brain-tumor-mri", {"testing": 0.985, "testing_dedup": 0.980}),
    ("covid-ct", "covid-ct", {"holdout": 0.955}),
]


@pytest.mark.parametrize(("task_name", "folder", "floors"), CASES, ids=[c[0] for c in CASES])
def test_shipped_model_reaches_its_card_on_its_evaluation_split(task_name: str, folder: str,
                                                                 floors: dict[str, float]) -> None:
    data_dir = DATA / folder
    if not data_dir.is_dir():
        pytest.skip(f"{data_dir} is not present")
    task = get_task(task_name)
    classifier = Classifier.load(default_model_dir(task_name))
    config = TrainConfig.from_dict(classifier.card.training.get("config", {}))
    splits = load_and_split(data_dir, task, seed=int(classifier.card.split_seed or 0),
                            validation_fraction=config.validation_fraction,
                            pool_validation_fraction=config.pool_validation_fraction, progress=False)
    results = evaluate_splits(classifier, splits, batch_size=64)
    assert set(floors) <= set(results), results.keys()
    for split, floor in floors.items():
        measured, n = results[split]["accuracy"], results[split]["n"]
        recorded = classifier.card.metrics[split]["accuracy"]
        assert recorded >= floor, f"{task_name} {split}: the card records {recorded:.4f}, below the floor {floor}"
        assert measured >= recorded - 1.0 / n - 1e-9, (
            f"{task_name} {split}: {measured:.4f} on {n} images, the card records {recorded:.4f}")
