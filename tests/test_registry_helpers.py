"""Helpers for the registry, export and retraining tests: tiny COVID CT models and a reference set where the
"good" one is right on every image, made at test time from ../shared/data (nothing of it is committed).

The models are the study's ``threshold`` baseline (class means of the black-pixel fraction): fitted in
milliseconds, no gradient training, yet real Keras models saved with real cards and loaded by the worker's code.
The "bad" model is fitted with the labels swapped, so on the reference set its recall of both classes is far below
the good model's: the gate must refuse it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_factory import SHARED_DATA
from models.architectures import build_model, default_input_spec, fit_threshold_model
from models.card import ModelCard
from models.imagefiles import read_grey_image
from models.inference import Classifier
from models.preprocessing import prepare_batch
from models.tasks import COVID_CT

COVID_DIR = SHARED_DATA / "covid-ct"
REFERENCE_PER_CLASS = 6


def covid_files(class_name: str, start: int, count: int) -> list[Path]:
    files = sorted((COVID_DIR / class_name).glob("*.png"))[start:start + count]
    if len(files) < count:
        pytest.skip(f"fewer than {start + count} images in {COVID_DIR / class_name}")
    return files


def save_threshold_model(folder: Path, name: str, swap_labels: bool = False) -> str:
    """Fit and save a covid-ct threshold model in ``folder``; return its UID."""
    spec = default_input_spec("threshold", COVID_CT)
    model = build_model("threshold", COVID_CT, spec)
    images, labels = [], []
    for index, class_name in enumerate(COVID_CT.class_names):
        files = covid_files(class_name, 0, 16)
        images += [read_grey_image(f) for f in files]
        labels += [(1 - index) if swap_labels else index] * len(files)
    fit_threshold_model(model, prepare_batch(images, spec), np.array(labels))
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    card = ModelCard(task=COVID_CT.name, class_names=list(COVID_CT.class_names), architecture="threshold",
                     input_spec=spec, name=name)
    card.save(folder)
    return card.uid


def make_reference_set(folder: Path, good_model_dir: Path) -> Path:
    """``folder/<class>/`` links to images the good model classifies right (so its reference accuracy is 1)."""
    classifier = Classifier.load(good_model_dir)
    for index, class_name in enumerate(COVID_CT.class_names):
        candidates = covid_files(class_name, 40, 60)
        predicted = classifier.predict([read_grey_image(f) for f in candidates]).argmax(axis=1)
        right = [f for f, p in zip(candidates, predicted) if p == index][:REFERENCE_PER_CLASS]
        # A threshold model fitted on 32 images gets these right; fewer means fitting or Classifier broke, which
        # must fail the registry and retraining tests that use it, not skip them.
        assert len(right) >= REFERENCE_PER_CLASS, (
            f"the threshold model is right on {len(right)} of 60 {class_name} images; {REFERENCE_PER_CLASS} needed")
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for number, path in enumerate(right):
            (folder / class_name / f"ref{number:02d}.png").symlink_to(path)
    return folder
