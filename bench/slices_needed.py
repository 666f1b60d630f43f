"""How many slices a series answer needs: the task's aggregation on random draws of each series' read slices.

Reads the JSON that ``dicom-triage evaluate TASK --dicom DIR --json FILE`` writes (each series' slices, with their
calibrated probabilities and whether they were read), keeps the series labelled with a class of the task that had
at least ``--min-read`` slices read, and for each ``k`` draws ``k`` of a series' read slices ``--draws`` times,
aggregating them as the worker does (:func:`models.series.aggregate`). It prints, per ``k``, the mean over draws of
the series ROC AUC, the sensitivity and specificity at the card's operating threshold, and the share of negative
series above 0.8: what a series of ``k`` readable slices would get from the same patients. ``k = all`` is the
series as they were read.

    .venv/bin/dicom-triage evaluate covid-ct --dicom /work/extra-dicom --labels /work/extra-dicom/labels.tsv \\
        --json /tmp/extra-covid.json
    .venv/bin/python bench/slices_needed.py covid-ct /tmp/extra-covid.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models.card import ModelCard
from models.series import aggregate
from models.tasks import Task, get_task
from training.metrics import roc_auc

#: A negative series above this suspicion is the issue's worst error (a pre-2020 chest called COVID above 0.8).
CONFIDENT = 0.8


def read_series(paths: list[Path], task: Task, min_read: int) -> tuple[list[tuple[str, bool, np.ndarray]], float]:
    """(name, positive, read slices' probabilities ``(N, C)``) per qualifying series, and the card's threshold."""
    series, thresholds = [], set()
    negative = set(task.negative_classes)
    for path in paths:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload["task"] != task.name:
            raise SystemExit(f"{path} scores {payload['task']}, not {task.name}")
        thresholds.add(float(ModelCard.load(payload["model"]).calibration.get("threshold", 0.5)))
        for outcome in payload["outcomes"]:
            read = [s["probabilities"] for s in outcome.get("slice_results", ()) if "excluded" not in s]
            if outcome["expected"] in task.class_names and len(read) >= min_read:
                series.append((outcome["name"], outcome["expected"] not in negative, np.array(read)))
    if len(thresholds) != 1:
        raise SystemExit(f"the files come from models with different thresholds: {sorted(thresholds)}")
    return series, thresholds.pop()


def figures(positive: np.ndarray, suspicion: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    """ROC AUC, sensitivity, specificity and the share of negatives above :data:`CONFIDENT`."""
    auc = roc_auc(positive, suspicion)
    return (np.nan if auc is None else auc, float(np.mean(suspicion[positive] >= threshold)),
            float(np.mean(suspicion[~positive] < threshold)), float(np.mean(suspicion[~positive] > CONFIDENT)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["brain-tumor", "covid-ct"])
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluate --dicom --json files")
    parser.add_argument("--min-read", type=int, default=10, help="least slices read for a series to take part")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = get_task(args.task)
    series, threshold = read_series(args.evaluations, task, args.min_read)
    positive = np.array([p for _, p, _ in series], dtype=bool)
    if positive.all() or not positive.any():
        raise SystemExit(f"{len(series)} series with {args.min_read}+ slices read: both classes are needed")
    print(f"{task.name}: {len(series)} series with at least {args.min_read} slices read "
          f"({int(positive.sum())} positive), threshold {threshold}, {args.draws} draws per k")
    print(f"{'k':>4}  {'AUC':>6}  {'sens':>6}  {'spec':>6}  {'neg>0.8':>7}")
    rng = np.random.default_rng(args.seed)
    for k in args.k:
        rows = []
        for _ in range(args.draws):
            suspicion = np.array([float(task.suspicion(aggregate(
                read[rng.choice(len(read), size=min(k, len(read)), replace=False)], task))) for _, _, read in series])
            rows.append(figures(positive, suspicion, threshold))
        auc, sensitivity, specificity, confident = np.nanmean(np.array(rows), axis=0)
        print(f"{k:>4}  {auc:6.3f}  {sensitivity:6.3f}  {specificity:6.3f}  {confident:7.3f}")
    whole = np.array([float(task.suspicion(aggregate(read, task))) for _, _, read in series])
    auc, sensitivity, specificity, confident = figures(positive, whole, threshold)
    print(f"{'all':>4}  {auc:6.3f}  {sensitivity:6.3f}  {specificity:6.3f}  {confident:7.3f}")


if __name__ == "__main__":
    main()
