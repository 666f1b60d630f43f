"""The shipped classifiers on real scanner DICOM: the worker's path against the path before issue 17, side by side.

For each labelled series (``dicom-triage evaluate --dicom``'s tree and labels format) this runs, in one process:

* ``now``: the worker's own path (:func:`worker.evaluation.evaluate_series`: routing, regions, slice selection,
  calibrated probabilities, the feature-distance check, the task's quantile, ``indeterminate``);
* ``before``: what the worker did before: every frame whole (the full field of view), raw probabilities, the mean of
  the most suspicious quarter of the slices, the argmax (routing as now).

and prints both per series and the series figures of :func:`worker.evaluation.score` for each. It also prints how
the window of the CT display images compares with the training PNGs' grey levels (``--window``).

    .venv/bin/python bench/real_dicom.py --dicom ../shared/data/real-dicom-dev --labels bench/real-dicom-dev.labels.tsv
"""

from __future__ import annotations

import argparse
import glob
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np

from config import DEFAULT_ROUTING_RULES
from models.inference import Classifier, default_model_dir
from models.preprocessing import prepare_batch
from models.tasks import INDETERMINATE, TASKS, Task
from worker.evaluation import (
    NOT_APPLICABLE,
    SeriesOutcome,
    evaluate_series,
    find_series,
    format_outcomes,
    read_labels,
    score,
)
from worker.decoding import decode_series


def before(outcome: SeriesOutcome, paths: tuple[Path, ...], task: Task, classifier: Classifier) -> SeriesOutcome:
    """The pre-issue-17 result of a series the worker routed to ``task``."""
    if outcome.result == NOT_APPLICABLE:
        return outcome
    try:
        images = [frame.image for frame in decode_series(list(paths), task)]
    except ValueError as exc:
        return replace(outcome, result=INDETERMINATE, reason=str(exc))
    raw = np.concatenate([np.asarray(classifier.model.predict_on_batch(prepare_batch(images[i:i + 32],  # type: ignore
                                                                                       classifier.card.input_spec)))
                          for i in range(0, len(images), 32)])
    top = np.argsort(-task.suspicion(raw), kind="stable")[:max(1, math.ceil(0.25 * len(raw)))]
    series = raw[top].mean(axis=0)
    return replace(outcome, result=task.class_names[int(np.argmax(series))],
                   suspicion=round(float(task.suspicion(series)), 4), reason=None, slices_read=len(images))


def window_fit(covid_pngs: Path, real_ct: Path, samples: int = 300) -> str:
    """The lung window that maps real CT's lung and soft-tissue HU modes onto the training PNGs' grey modes."""
    from PIL import Image
    from pydicom import dcmread
    from scipy import ndimage

    random.seed(1)
    files = random.sample(sorted(glob.glob(str(covid_pngs / "non-COVID" / "*.png"))), samples)
    grey = np.zeros(256)
    for file in files:
        grey += np.bincount(np.asarray(Image.open(file).convert("L")).ravel(), minlength=256)
    lung_grey = int(np.argmax(grey[:128]))
    soft_grey = 192 + int(np.argmax(grey[192:248]))  # the soft-tissue peak below the clipped bone at 248-255
    lung_hu, soft_hu = [], []
    for file in sorted(real_ct.glob("*.dcm")):
        ds = dcmread(file)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        labels, _ = ndimage.label(hu > -500)
        body = ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        lung_hu.append(hu[body & (hu < -400)])
        soft_hu.append(hu[body & (hu > -200) & (hu < 200)])
    lung_mode = int(np.argmax(np.bincount((np.concatenate(lung_hu) + 1100).astype(int).clip(0, 2000)))) - 1100
    soft_mode = int(np.argmax(np.bincount((np.concatenate(soft_hu) + 200).astype(int).clip(0, 400)))) - 200
    slope = (soft_grey - lung_grey) / (soft_mode - lung_mode)
    width = 255.0 / slope
    centre = lung_mode - lung_grey / slope + width / 2
    return (f"training PNGs (non-COVID, {samples}): lung grey mode {lung_grey}, soft-tissue grey mode {soft_grey}; "
            f"real chest CT: lung {lung_mode} HU, soft tissue {soft_mode} HU -> window W {width:.0f} / L {centre:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", type=Path, required=True, action="append", help="a labelled tree (repeatable)")
    parser.add_argument("--labels", type=Path, action="append",
                        help="its labels file (one per --dicom, in order; omit all to use the folder names)")
    parser.add_argument("--task", choices=sorted(TASKS), action="append", help="default: both")
    parser.add_argument("--window", type=Path, nargs=2, metavar=("COVID_PNG_DIR", "REAL_CT_SERIES"),
                        help="also fit the CT window: the covid-ct folder and a real chest CT series folder")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.dicom):
        parser.error("give one --labels per --dicom, or none")
    if args.window:
        print(window_fit(*args.window))
    for name in args.task or sorted(TASKS):
        task = TASKS[name]
        classifier = Classifier.load(default_model_dir(name))
        for index, root in enumerate(args.dicom):
            series = find_series(root, read_labels(args.labels[index]) if args.labels else None, task)
            if not series:
                continue
            now = evaluate_series(series, task, classifier, DEFAULT_ROUTING_RULES)
            old = [before(o, s.paths, task, classifier) for o, s in zip(now, series)]
            print(f"\n### {name} on {root}\n\n-- before (whole frames, raw probabilities, top-quarter mean, argmax)")
            print(format_outcomes(old, score(old, task)))
            print("-- now (the worker's path)")
            print(format_outcomes(now, score(now, task)))


if __name__ == "__main__":
    main()
