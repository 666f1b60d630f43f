"""The ``evaluate`` command: a saved classifier on a task's evaluation splits, as text, JSON and PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.card import ModelCard
from models.inference import Classifier, default_model_dir
from models.tasks import Task, get_task
from training.data import DataError, Splits, load_and_split
from training.fit import TrainConfig
from training.metrics import classification_metrics, format_metrics, format_misclassified, misclassified
from training.plots import confusion_matrix_png, training_curves_png


def split_indices(splits: Splits) -> dict[str, np.ndarray]:
    """The evaluation splits by their names in cards and JSON: ``testing``/``testing_dedup`` or ``holdout``."""
    if splits.official:
        return {"testing": splits.test, "testing_dedup": splits.test_dedup}
    return {"holdout": splits.test}


def evaluate_splits(classifier: Classifier, splits: Splits, batch_size: int = 32,
                    list_errors: bool = False) -> dict[str, dict[str, Any]]:
    """Metrics per evaluation split (see :func:`split_indices`); with ``list_errors`` each split's also hold
    ``misclassified`` (:func:`training.metrics.misclassified`)."""
    results = {}
    all_indices = np.unique(np.concatenate(list(split_indices(splits).values())))
    probabilities = classifier.predict([splits.images.images[i] for i in all_indices], batch_size=batch_size)
    position = {int(index): row for row, index in enumerate(all_indices)}
    labels = splits.images.label_array
    for name, indices in split_indices(splits).items():
        rows = [position[int(i)] for i in indices]
        results[name] = classification_metrics(labels[indices], probabilities[rows], classifier.class_names)
        if list_errors:
            results[name]["misclassified"] = misclassified(
                labels[indices], probabilities[rows], [splits.images.relative(int(i)) for i in indices],
                classifier.class_names)
    return results


def write_figures(results: dict[str, dict[str, Any]], card: ModelCard, folder: Path) -> list[Path]:
    """Confusion-matrix PNG per split and the training-curve PNG (from the card's history) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, metrics in results.items():
        if "confusion_matrix" in metrics:
            written.append(confusion_matrix_png(
                metrics["confusion_matrix"], card.class_names, f"{card.name}: {split} ({metrics['accuracy']:.2%})",
                folder / f"confusion_{card.task}_{split}.png"))
    history = card.training.get("history")
    if history:
        written.append(training_curves_png(history, card.name, folder / f"training_curves_{card.task}.png"))
    return written


def run_evaluate(task: Task, data_dir: Path, model_dir: Path | None, json_path: Path | None,
                 figures_dir: Path | None, batch_size: int, show_errors: bool = False) -> int:
    """Evaluate; the JSON lists each split's misclassified files, the text too with ``show_errors``."""
    model_dir = model_dir or default_model_dir(task.name)
    classifier = Classifier.load(model_dir)
    if classifier.card.task != task.name:
        print(f"evaluate: {model_dir} is a {classifier.card.task} model, not {task.name}", file=sys.stderr)
        return 2
    training = classifier.card.training
    config = TrainConfig.from_dict(training.get("config", {}))
    splits = load_and_split(data_dir, task, seed=int(classifier.card.split_seed or 0),
                            validation_fraction=config.validation_fraction,
                            pool_validation_fraction=config.pool_validation_fraction)
    print(splits.images.report(), file=sys.stderr)
    expected = training.get("test_manifest_sha256")
    actual = splits.images.subset(splits.test).manifest_sha256()
    if expected and expected != actual:
        print("evaluate: warning: this test split is not the one the model was trained beside "
              "(different data, seed or files); its images may have been seen in training", file=sys.stderr)
    results: dict[str, Any] = evaluate_splits(classifier, splits, batch_size, list_errors=True)
    for name, metrics in results.items():
        print(format_metrics(name, metrics))
        if show_errors:
            print(format_misclassified(metrics["misclassified"]))
    for name in ("cv5",):
        if name in classifier.card.metrics:
            cv = classifier.card.metrics[name]
            results[name] = cv
            print(f"== {name} (from the model card; cross-validation trains, so evaluate cannot rerun it): "
                  f"accuracy {cv['accuracy']:.2%} +/- {cv.get('std', float('nan')):.2%} over {len(cv.get('folds', []))} folds")
    figures_dir = figures_dir or (json_path.parent if json_path else Path("."))
    for path in write_figures(results, classifier.card, figures_dir):
        print(f"wrote {path}", file=sys.stderr)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(model_dir), "model_uid": classifier.card.uid, "task": task.name, **results}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_path}", file=sys.stderr)
    return 0


def handle_evaluate(args: Any) -> int:
    if not args.data:
        print("evaluate: give --data DIR (an image-folder dataset) or --dicom DIR (labelled DICOM series)",
              file=sys.stderr)
        return 2
    try:
        return run_evaluate(get_task(args.task), Path(args.data), Path(args.model) if args.model else None,
                            Path(args.json) if args.json else None,
                            Path(args.figures) if args.figures else None, args.batch_size, args.errors)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
