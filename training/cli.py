"""The ``train``, ``evaluate`` and ``calibrate`` subcommands of ``dicom-triage``; heavy imports wait until a handler runs."""

from __future__ import annotations

import argparse
from typing import Any

from models.tasks import TASKS

# A copy of models.architectures.ARCHITECTURES (a test keeps them equal): importing that module loads Keras.
ARCHITECTURE_NAMES = ("triage-cnn", "study-brain-cnn", "study-covid-cnn", "resnet50", "threshold")
# Likewise copies of training.fit.LR_SCHEDULES and PRECISIONS (training.fit imports Keras).
LR_SCHEDULE_NAMES = ("plateau", "cosine")
PRECISION_NAMES = ("float32", "mixed_bfloat16")


def _train(args: Any) -> int:
    from training.train import handle_train

    return handle_train(args)


def _evaluate(args: Any) -> int:
    from training.evaluate import handle_evaluate

    return handle_evaluate(args)


def _calibrate(args: Any) -> int:
    from training.calibrate import handle_calibrate

    return handle_calibrate(args)


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``train``, ``evaluate`` and ``calibrate`` to the ``dicom-triage`` command."""
    train = subparsers.add_parser("train", help="train a classifier on an image-folder dataset")
    train.add_argument("task", choices=sorted(TASKS))
    train.add_argument("--data", required=True, action="append",
                       help="folder with <class>/ or Training/<class>/ + Testing/<class>/; repeat to train on "
                            "several sources at once (e.g. an archive export and an external set)")
    train.add_argument("--arch", default="triage-cnn", choices=ARCHITECTURE_NAMES)
    train.add_argument("--out", required=True, help="folder to write model.keras, card.json and figures into")
    # Training choices default to None: a --recipe fills those not given, then training.fit.TrainConfig's defaults.
    train.add_argument("--recipe", metavar="MODEL_DIR",
                       help="train as that model was trained (the shipped one, a registered one): every training "
                            "choice below that is not given, and its input size for the same --arch, come from its "
                            "card")
    train.add_argument("--epochs", type=int, help="default 60")
    train.add_argument("--batch-size", type=int, help="default 32")
    train.add_argument("--learning-rate", type=float, help="default 1e-3")
    train.add_argument("--patience", type=int, help="early-stopping patience (epochs) on val_loss; default 12")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULE_NAMES,
                       help="plateau (default): ReduceLROnPlateau x0.5 on val_loss; cosine: warm-up then cosine decay")
    train.add_argument("--time-budget", type=float, metavar="MINUTES",
                       help="train each model (the --cv folds each their own) for at most this many wall-clock "
                            "minutes, --epochs staying the cap: training ends at the last epoch that fits, and a "
                            "cosine schedule is planned to reach its floor there; 0: no budget (to lift a recipe's)")
    train.add_argument("--warmup-epochs", type=int, help="cosine schedule: epochs of linear warm-up; default 3")
    train.add_argument("--label-smoothing", type=float, help="default 0")
    train.add_argument("--ema", type=float, default=None, metavar="MOMENTUM",
                       help="keep an exponential moving average of the weights (e.g. 0.999) and select, save by it")
    train.add_argument("--precision", choices=PRECISION_NAMES,
                       help="float32 (default) or mixed_bfloat16: compute in bfloat16 while training (for GPUs with "
                            "bfloat16 units; no faster on this project's CPUs); the saved model is float32 either way")
    train.add_argument("--validation-fraction", type=float,
                       help="group-aware share of Training for validation (official splits and CV folds); default "
                            "0.15")
    train.add_argument("--pool-validation-fraction", type=float, metavar="FRACTION",
                       help="a pool without an official split (covid-ct): group-aware share of its non-test images "
                            "for validation; default: the study's 70/20/10 split. The test 10%% stays the same")
    train.add_argument("--seed", type=int, help="default 0")
    train.add_argument("--split-seed", type=int,
                       help="seed of the train/validation/test split (default: --recipe's split, else --seed), to "
                            "score models of other training seeds on one test split")
    train.add_argument("--dropout", type=float, default=None, help="head dropout (default: the architecture's)")
    train.add_argument("--no-batch-norm", action="store_true", help="study CNNs without BatchNormalization")
    train.add_argument("--no-augmentation", action="store_true", help="start from no augmentation at all")
    train.add_argument("--augment", action="append", metavar="NAME=VALUE",
                       help="set one augmentation: flip=true|false, or rotation, zoom, shear, translation, brightness, "
                            "contrast = a factor 0..1 (repeatable; defaults: flip, rotation 0.03, zoom 0.1, shear "
                            "0.05, translation 0.05, brightness 0.1, contrast 0.1)")
    train.add_argument("--no-class-weights", action="store_true")
    train.add_argument("--input-size", help="HxW or HxWxC (default: the architecture's)")
    train.add_argument("--weights", help="resnet50 only: 'imagenet' (from Keras' cache, never downloaded) or a file")
    train.add_argument("--cv", type=int, default=0, metavar="K", help="also run K-fold cross-validation (cards: cvK)")
    train.add_argument("--init-from", metavar="MODEL_DIR",
                       help="start from a trained model's weights (a model folder: the shipped one, a registered "
                            "one); every layer of the same name and shape is copied, the rest start as initialised")
    train.add_argument("--interpolate", type=float, metavar="WEIGHT",
                       help="with --init-from: save WEIGHT x the fine-tuned weights + (1 - WEIGHT) x the --init-from "
                            "model's (0..1), which keeps more of what that model knew")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="evaluate a saved classifier on a dataset's test splits")
    evaluate.add_argument("task", choices=sorted(TASKS))
    evaluate.add_argument("--data", help="image-folder dataset (the curated splits); or --dicom")
    evaluate.add_argument("--model", help="model folder (default: the shipped model of the task)")
    evaluate.add_argument("--json", help="write every figure shown, keyed by split name, to this JSON file")
    evaluate.add_argument("--figures", help="folder for the PNGs (default: beside --json, else the current folder)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--errors", action="store_true",
                          help="also list each split's misclassified files (the JSON always holds them)")
    evaluate.set_defaults(handler=_evaluate)

    calibrate = subparsers.add_parser(
        "calibrate", help="fit a model's temperature, operating threshold and domain on its validation split")
    calibrate.add_argument("task", choices=sorted(TASKS))
    calibrate.add_argument("--data", required=True, action="append",
                           help="the dataset the model was trained on, every --data folder in training's order "
                                "(its split is redrawn)")
    calibrate.add_argument("--model", help="model folder, rewritten in place (default: the shipped model of the task)")
    calibrate.set_defaults(handler=_calibrate)
