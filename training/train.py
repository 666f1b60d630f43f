"""The ``train`` command: decode, split duplicate-aware, fit, save model + card, evaluate, optionally cross-validate."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.architectures import build_model, default_input_spec, fit_threshold_model, is_gradient_trained
from models.card import CARD_FILE, MODEL_FILE, ModelCard
from models.inference import Classifier
from models.preprocessing import InputSpec
from models.tasks import Task, get_task
from models.transfer import WeightTransfer, copy_matching_weights, interpolate_weights
from training.data import DataError, Splits, cross_validation_parts, load_and_split_sources
from training.device import training_device
from training.evaluate import evaluate_splits, write_figures
from training.fit import TrainConfig, build_trainable, fit
from training.metrics import format_metrics
from training.pipeline import image_dataset, prepared_array


def train_one(arch: str, task: Task, spec: InputSpec, splits: Splits, train: np.ndarray, validation: np.ndarray,
              config: TrainConfig, weights: str | None, checkpoint_dir: Path | None, prefix: str = "",
              init_from: Classifier | None = None) -> tuple[Any, dict[str, list[float]], WeightTransfer | None]:
    """Build and train one model on index sets of ``splits.images``, first taking ``init_from``'s matching layers
    when given; return (model, history, what was taken)."""
    images, labels = splits.images.images, splits.images.label_array
    def build() -> Any:
        return build_model(arch, task, spec, dropout=config.dropout, batch_norm=config.batch_norm, weights=weights)

    if not is_gradient_trained(arch):  # counted, not trained: the precision does not apply
        model = build()
        means = fit_threshold_model(model, prepared_array([images[i] for i in train], spec), labels[train])
        print(f"{prefix}class means of the black-pixel fraction: {np.round(means, 4).tolist()}", flush=True)
        return model, {}, None
    model, trained_model = build_trainable(build, config)
    transfer = copy_matching_weights(model, init_from) if init_from is not None else None
    if transfer is not None:
        print(f"{prefix}{transfer.describe()}", flush=True)
    def dataset(indices: np.ndarray, seed: int | None):
        return image_dataset([images[i] for i in indices], labels[indices], task.num_classes, spec,
                             config.batch_size, shuffle_seed=seed)
    history = fit(model, dataset(train, config.seed), dataset(validation, None), labels[train], config,
                  checkpoint_dir, prefix)
    return trained_model(), history, transfer


def run_train(task: Task, data_dirs: list[Path], arch: str, out_dir: Path, config: TrainConfig,
              spec: InputSpec | None, weights: str | None, cv_folds: int, init_from: Path | None = None,
              recipe_uid: str | None = None, split_seed: int | None = None, interpolate: float | None = None) -> int:
    """Train, save model and card, evaluate; ``split_seed`` (default: the training seed) draws the train/validation/
    test split, so models trained with other seeds can still be scored on one test split. ``interpolate`` (with
    ``init_from``): the saved weights are that share of the fine-tuned ones and the rest of ``init_from``'s
    (:func:`models.transfer.interpolate_weights`)."""
    if interpolate is not None and init_from is None:
        raise ValueError("--interpolate needs --init-from: the model the fine-tune is interpolated with")
    spec = spec or default_input_spec(arch, task)
    split_seed = config.seed if split_seed is None else split_seed
    source = None
    if init_from is not None:
        if not is_gradient_trained(arch):
            raise ValueError(f"--init-from: {arch} is not trained by gradient descent; it has no weights to start "
                             "from")
        source = Classifier.load(init_from)  # once, and before the data are read: a bad folder fails now
    splits = load_and_split_sources(data_dirs, task, split_seed, config.validation_fraction,
                                    pool_validation_fraction=config.pool_validation_fraction)
    print(splits.images.report(), file=sys.stderr)
    print(splits.describe(), file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.process_time(), time.time()
    model, history, transfer = train_one(arch, task, spec, splits, splits.train, splits.validation, config, weights,
                                         out_dir / "checkpoints", init_from=source)
    cpu_seconds, wall_seconds = time.process_time() - started[0], time.time() - started[1]
    interpolated = None
    if interpolate is not None and source is not None and transfer is not None:
        if transfer.fresh:
            raise ValueError(f"--interpolate: layers {', '.join(transfer.fresh)} did not come from --init-from, so "
                             "the two models cannot be interpolated")
        interpolate_weights(model, source, interpolate)
        interpolated = {"weight": interpolate, "with_uid": source.card.uid, "with": str(init_from)}
        print(f"weights: {interpolate} x fine-tuned + {1 - interpolate:.2f} x {init_from}", file=sys.stderr)
    model.save(out_dir / MODEL_FILE)
    card = ModelCard(
        task=task.name, class_names=list(task.class_names), architecture=arch, input_spec=spec,
        training={
            "config": config.to_dict(), "recipe_from": recipe_uid, "weights": weights,
            "init_from": transfer.to_dict() if transfer is not None else None, "interpolated": interpolated,
            "epochs_run": len(history.get("loss", [])),
            "history": history, "trained_on": training_device(), "train_cpu_seconds": round(cpu_seconds, 1),
            "train_wall_seconds": round(wall_seconds, 1),
            "sources": [str(d) for d in data_dirs], "split": splits.describe(), "split_seed": split_seed, "skipped_files": [str(p) for p, _ in splits.images.skipped],
            "test_manifest_sha256": splits.images.subset(splits.test).manifest_sha256(),
        },
        dataset_manifest_sha256=splits.images.manifest_sha256(),
    )
    card.save(out_dir / CARD_FILE)
    # Evaluate through the saved files and the inference path, exactly as the worker will run the model.
    classifier = Classifier.load(out_dir)
    results = evaluate_splits(classifier, splits, config.batch_size)
    for name, metrics in results.items():
        print(format_metrics(name, metrics))
    card.metrics.update({name: {k: v for k, v in m.items() if k != "class_names"} for name, m in results.items()})
    if cv_folds:
        card.metrics[f"cv{cv_folds}"] = cross_validate(arch, task, spec, splits, config, weights, cv_folds, source)
    card.save(out_dir / CARD_FILE)
    write_figures(results, card, out_dir)
    print(f"saved {out_dir / MODEL_FILE} and {out_dir / CARD_FILE} (uid {card.uid})", file=sys.stderr)
    return 0


def cross_validate(arch: str, task: Task, spec: InputSpec, splits: Splits, config: TrainConfig, weights: str | None,
                   folds: int, init_from: Classifier | None = None) -> dict[str, Any]:
    """Group-aware k-fold cross-validation over every image (each fold starting from ``init_from`` when given);
    mean and standard deviation of fold accuracy."""
    labels = splits.images.label_array
    accuracies = []
    for fold, (train, validation, test) in enumerate(
            cross_validation_parts(labels, splits.groups, folds, config.seed, config.validation_fraction)):
        model, _, _ = train_one(arch, task, spec, splits, train, validation, config, weights, None,
                                prefix=f"fold {fold + 1}: ", init_from=init_from)
        probabilities = model.predict(prepared_array([splits.images.images[i] for i in test], spec), verbose=0)
        accuracies.append(float((probabilities.argmax(1) == labels[test]).mean()))
        print(f"fold {fold + 1}/{folds}: accuracy {accuracies[-1]:.2%} on {len(test)} images", flush=True)
    return {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "folds": accuracies}


def parse_input_size(text: str) -> InputSpec:
    """``HxW`` or ``HxWxC`` (e.g. ``128x128x1``) -> :class:`InputSpec`."""
    try:
        numbers = [int(part) for part in text.lower().split("x")]
        if len(numbers) not in (2, 3):
            raise ValueError
        return InputSpec(*numbers)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--input-size {text!r}: expected HxW or HxWxC with C 1 or 3 ({exc})") from None


def parse_augmentation(base: "Augmentation", settings: list[str]) -> "Augmentation":
    """Apply ``--augment NAME=VALUE`` settings (e.g. ``zoom=0.2``, ``flip=false``) to ``base``."""
    from dataclasses import fields, replace

    kinds = {f.name: f.type for f in fields(base)}
    changes: dict[str, Any] = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in kinds or not value:
            raise ValueError(f"--augment {setting!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        if name == "flip":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--augment {setting!r}: flip is true or false")
            changes[name] = value.lower() in ("true", "1", "yes")
        else:
            try:
                changes[name] = float(value)
            except ValueError:
                raise ValueError(f"--augment {setting!r}: {name} takes a number") from None
            if not 0.0 <= changes[name] <= 1.0:
                raise ValueError(f"--augment {setting!r}: {name} must be between 0 and 1")
    return replace(base, **changes)


#: ``train`` options a ``--recipe`` supplies when they are not given: argparse name -> :class:`TrainConfig` field.
_RECIPE_OPTIONS = {
    "epochs": "epochs", "batch_size": "batch_size", "learning_rate": "learning_rate",
    "patience": "early_stopping_patience", "lr_schedule": "lr_schedule", "warmup_epochs": "warmup_epochs",
    "label_smoothing": "label_smoothing", "ema": "ema_momentum", "precision": "precision",
    "validation_fraction": "validation_fraction", "pool_validation_fraction": "pool_validation_fraction",
    "seed": "seed", "dropout": "dropout",
    "time_budget": "time_budget_minutes",
}


def train_config(args: Any, recipe: ModelCard | None) -> TrainConfig:
    """The command line's choices over ``recipe``'s (its card's training configuration), over the defaults."""
    from models.architectures import Augmentation

    base = TrainConfig.from_dict(recipe.training.get("config", {})) if recipe is not None else TrainConfig()
    chosen = {field: getattr(args, name) if getattr(args, name) is not None else getattr(base, field)
              for name, field in _RECIPE_OPTIONS.items()}
    if args.time_budget == 0:
        chosen["time_budget_minutes"] = None
    return TrainConfig(
        **chosen, class_weights=base.class_weights and not args.no_class_weights,
        batch_norm=base.batch_norm and not args.no_batch_norm,
        augmentation=parse_augmentation(Augmentation.none() if args.no_augmentation else base.augmentation,
                                        args.augment or []),
    )


def _load_recipe(folder: str) -> ModelCard:
    try:
        return ModelCard.load(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--recipe {folder}: {exc}") from None


def handle_train(args: Any) -> int:
    try:
        recipe = _load_recipe(args.recipe) if args.recipe else None
        config = train_config(args, recipe)
        if args.input_size:
            spec = parse_input_size(args.input_size)
        else:
            spec = recipe.input_spec if recipe is not None and recipe.architecture == args.arch else None
        split_seed = args.split_seed
        if split_seed is None and recipe is not None:
            split_seed = recipe.split_seed
        return run_train(get_task(args.task), [Path(d) for d in args.data], args.arch, Path(args.out), config, spec,
                         args.weights, args.cv, Path(args.init_from) if args.init_from else None,
                         recipe_uid=recipe.uid if recipe is not None else None, split_seed=split_seed,
                         interpolate=args.interpolate)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
