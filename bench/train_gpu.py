"""Train models on the GPU host (Keras 3 on JAX, no TensorFlow) from data made by bench/train_gpu_data.py.

Runs jobs in the order given, each ``NAME=TASK:ARCH:SIDE[:cv5[:foldsA-B][:cvonly]][:ship][:seedN][:eEPOCHS][:cosine|:plateau][:tSECONDS][:fSECONDS]``, until ``--deadline`` seconds have passed
(later jobs are skipped and said to be); ``t``/``f`` flags cap one training's or one CV fold's wall time (training
then stops as early stopping does, keeping the best epoch's weights). Uses the production code: models.architectures, training.fit (callbacks,
Adam, class weights, augmentation) and training.metrics. ``ship`` jobs save ``model.keras`` + ``card.json`` under
``--out/NAME/``; every job's metrics go to ``--out/results.json``. The shipped models are evaluated again on the
original image files, on TensorFlow, by ``dicom-triage evaluate`` (see bench/results.py).

    KERAS_BACKEND=jax python3 bench/train_gpu.py --data .gpu --out $OUT --deadline 420 \\
        --job brain=brain-tumor:triage-cnn:128:ship
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from models.architectures import build_model
from models.card import MODEL_FILE, ModelCard
from models.preprocessing import InputSpec
from models.tasks import get_task
from training.fit import LR_SCHEDULES, PRECISIONS, TrainConfig, build_trainable, fit, one_hot
from training.metrics import classification_metrics

EVALUATION_SPLITS = {"test": "testing", "test_dedup": "testing_dedup"}


def load_data(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """(images (N, S, S, 1) float32 0..255, index arrays by name, meta) from a .npz of PNGs."""
    with np.load(path) as data:
        blob, offsets = data["png"].tobytes(), data["offsets"]
        # convert("L"): WebP decodes grey as RGB
        images = np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b])).convert("L"))
                           for a, b in zip(offsets[:-1], offsets[1:])])
        arrays = {k: data[k] for k in data.files if k not in ("png", "offsets", "meta")}
        meta = json.loads(str(data["meta"]))
    return images[..., None].astype(np.float32), arrays, meta


def load_task_data(data_dir: Path, task_name: str, side: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """The task's inputs at ``side``; when only a larger size was carried (one device call takes 64 MiB), resized
    from the nearest larger one (bilinear, antialiased: what prepare_batch's resize does), and said so in meta."""
    exact = data_dir / f"{task_name}-{side}x{side}.npz"
    if exact.is_file():
        return load_data(exact)
    sizes = sorted(int(p.stem.rsplit("-", 1)[1].split("x")[0]) for p in data_dir.glob(f"{task_name}-*x*.npz"))
    larger = [s for s in sizes if s > side] or sizes[-1:]
    if not larger:
        raise FileNotFoundError(f"no {task_name} data under {data_dir}")
    x, arrays, meta = load_data(data_dir / f"{task_name}-{larger[0]}x{larger[0]}.npz")
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(x, (side, side), interpolation="bilinear",
                                                                 antialias=True))
    meta = {**meta, "derived_from": f"{larger[0]}x{larger[0]} inputs resized to {side}x{side} on the device"}
    return np.clip(resized, 0, 255).astype(np.float32), arrays, meta


def run_job(name: str, spec_text: str, data_dir: Path, out: Path, config: TrainConfig, code_version: str,
            max_epochs: int | None) -> dict[str, Any]:
    task_name, arch, side, *flags = spec_text.split(":")
    task = get_task(task_name)
    x, arrays, meta = load_task_data(data_dir, task.name, int(side))
    spec = InputSpec(int(side), int(side), 3 if arch in ("study-brain-cnn", "resnet50") else 1)
    if spec.channels == 3:
        x = np.repeat(x, 3, axis=-1)  # as prepare_batch repeats grey over 3 channels
    labels = arrays["labels"]
    if max_epochs:
        config = TrainConfig(**{**config.__dict__, "epochs": max_epochs})
    fold_budget = None
    folds = range(5)
    for flag in flags:
        if flag.startswith("seed"):
            config = TrainConfig(**{**config.__dict__, "seed": int(flag[4:])})
        elif flag.startswith("e") and flag[1:].isdigit():
            config = TrainConfig(**{**config.__dict__, "epochs": int(flag[1:])})
        elif flag in LR_SCHEDULES:
            config = TrainConfig(**{**config.__dict__, "lr_schedule": flag})
        elif flag.startswith("folds"):  # foldsA-B: only CV folds A..B (1-based), so folds can run in parallel
            first, last = flag[5:].split("-")
            folds = range(int(first) - 1, int(last))
        elif flag.startswith("t"):
            config = TrainConfig(**{**config.__dict__, "time_budget_minutes": float(flag[1:]) / 60})
        elif flag.startswith("f"):
            fold_budget = float(flag[1:])
    y = one_hot(labels, task.num_classes)
    started = time.time()

    def train(train_idx: np.ndarray, val_idx: np.ndarray, prefix: str, seconds: float | None = None):
        run_config = config if seconds is None else TrainConfig(**{**config.__dict__,
                                                                   "time_budget_minutes": seconds / 60})
        model, trained_model = build_trainable(
            lambda: build_model(arch, task, spec, dropout=config.dropout, batch_norm=config.batch_norm), run_config)
        history = fit(model, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), labels[train_idx], run_config,
                      None, prefix)
        return trained_model(), history

    result: dict[str, Any] = {"task": task.name, "arch": arch, "input": spec.to_dict(), "seed": config.seed,
                              "metrics": {}, "config": config.to_dict(),
                              "data": meta.get("derived_from", "prepared here")}
    card = None
    if "cvonly" not in flags:  # cvonly: the folds alone (another process trains the model itself)
        model, history = train(arrays["train"], arrays["validation"], f"{name}: ")
        result.update(epochs_run=len(history["loss"]), best_val_loss=min(history["val_loss"]))
        for key, split in EVALUATION_SPLITS.items():
            if key in arrays:
                idx = arrays[key]
                split_name = split if meta["official"] else "holdout"
                probabilities = np.asarray(model.predict(x[idx], batch_size=256, verbose=0))
                metrics = classification_metrics(labels[idx], probabilities, task.class_names)
                result["metrics"][split_name] = {k: v for k, v in metrics.items() if k != "class_names"}
                print(f"{name}: {split_name} accuracy {metrics['accuracy']:.4f} (n={metrics['n']})", flush=True)
        result["gpu_seconds"] = round(time.time() - started, 1)
        if "ship" in flags:  # saved before cross-validation, so a run cut short still returns the model
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            model.save(folder / MODEL_FILE)
            card = ModelCard(
                task=task.name, class_names=list(task.class_names), architecture=arch, input_spec=spec,
                training={"config": config.to_dict(), "epochs_run": result["epochs_run"], "history": history,
                          "trained_on": f"GPU, Keras {keras.__version__} on {keras.backend.backend()}",
                          "train_wall_seconds": result["gpu_seconds"], "split": meta["split"], "split_seed": meta["seed"],
                          "skipped_files": meta["skipped_files"], "test_manifest_sha256": meta["test_manifest_sha256"],
                          "input_rounding": "training inputs were prepare_batch output rounded to uint8"
                                            + (f", stored as {meta['codec']}" if meta.get("codec", "png") != "png" else "")},
                dataset_manifest_sha256=meta["dataset_manifest_sha256"], metrics=result["metrics"],
                code_version=code_version,
            )
            card.save(folder)
    if "cv5" in flags:
        accuracies = []
        for fold in folds:
            fold_model, _ = train(arrays[f"cv{fold}_train"], arrays[f"cv{fold}_validation"], f"{name} fold {fold + 1}: ",
                                  fold_budget)
            test = arrays[f"cv{fold}_test"]
            predicted = np.asarray(fold_model.predict(x[test], batch_size=256, verbose=0)).argmax(1)
            accuracies.append(float((predicted == labels[test]).mean()))
            print(f"{name}: fold {fold + 1} accuracy {accuracies[-1]:.4f}", flush=True)
        result["metrics"]["cv5"] = {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                                    "folds": accuracies, "fold_numbers": [fold + 1 for fold in folds]}
        if card is not None:
            card.metrics["cv5"] = result["metrics"]["cv5"]
            card.save(out / name)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".gpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--job", action="append", required=True, help="NAME=TASK:ARCH:SIDE[:cv5[:foldsA-B][:cvonly]][:ship][:seedN][:eN][:cosine|:plateau][:tS][:fS] "
                             "(eN: epochs; tS/fS: training/fold time budget; foldsA-B: only those CV folds; cvonly: "
                             "no training on the main split)")
    parser.add_argument("--deadline", type=float, default=420, help="start no job after this many seconds")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="plateau")
    parser.add_argument("--warmup-epochs", type=int, default=3)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--ema", type=float, default=None, metavar="MOMENTUM", help="weight EMA (training.fit)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help="training.fit precision")
    parser.add_argument("--patience", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=None, help="cap for quick checks")
    parser.add_argument("--code-version", default="unknown")
    args = parser.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for job in args.job:
        name, spec_text = job.split("=", 1)
        if time.time() - started > args.deadline:
            results[name] = {"skipped": f"deadline of {args.deadline:.0f} s passed"}
            print(f"{name}: skipped (deadline)", flush=True)
            continue
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
                             label_smoothing=args.label_smoothing, early_stopping_patience=args.patience,
                             ema_momentum=args.ema, precision=args.precision)
        try:
            results[name] = run_job(name, spec_text, args.data, args.out, config, args.code_version, args.max_epochs)
        except Exception as exc:  # keep going: one failed job must not lose the others' results
            results[name] = {"error": repr(exc)}
            print(f"{name}: FAILED {exc!r}", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
