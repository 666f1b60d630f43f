"""The series answers under another slice rule, replayed on the slices an evaluation recorded.

Reads the JSON that ``dicom-triage evaluate TASK --dicom DIR --json FILE`` writes (every series' slices with their
calibrated probabilities, feature distance and, when not read, why) and decides each series again with the worker's
own :func:`models.series.decide`, changing one thing:

- ``--domain-threshold T ...``: the feature distance above which a slice is left out as unlike the training images
  (the card's threshold is the 99.5th percentile of the curated validation split's distances). A lower one leaves
  more unusual slices out, so it trades coverage for the answers kept.
- ``--blend FILE ... --weights W ...``: another model's evaluation of the same trees; each slice's probabilities
  become ``(1 - W) * first + W * other``, on the slices the first model read. ``W = 0`` is the first model alone.

It prints, per rule, the finding-level figures of :func:`worker.evaluation.score` over the series labelled with a
class of the task, and how the out-of-domain series were handled. Tumour types are not replayed (the evaluation
does not record which type the series' sequence allows), so the brain model's class accuracy is not shown.

    .venv/bin/dicom-triage evaluate covid-ct --dicom ../shared/data/real-dicom-dev \\
        --labels bench/real-dicom-dev.labels.tsv --json /tmp/dev.json
    .venv/bin/dicom-triage evaluate covid-ct --dicom /work/extra-dicom --labels /work/extra-dicom/labels.tsv \\
        --json /tmp/extra.json
    .venv/bin/python bench/slice_rules.py covid-ct /tmp/dev.json /tmp/extra.json \\
        --domain-threshold 13.924 13 12 11 10.5
    # the same trees scored by an earlier model (--model DIR) into /tmp/dev-old.json and /tmp/extra-old.json:
    .venv/bin/python bench/slice_rules.py covid-ct /tmp/dev.json /tmp/extra.json \\
        --blend /tmp/dev-old.json /tmp/extra-old.json --weights 0 0.25 0.5 0.75 1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.card import ModelCard
from models.regions import Region
from models.series import decide
from models.tasks import Task, get_task
from worker.evaluation import SeriesOutcome, score

#: The start of :func:`models.series.decide`'s reason for a slice left out by its feature distance: replayed slices
#: with only this reason are judged by the rule's threshold again.
DOMAIN_REASON = "unlike the training images"


def read_outcomes(paths: list[Path], task: Task) -> tuple[list[SeriesOutcome], dict[str, Any]]:
    """The series outcomes of evaluation files of ``task`` by one model, and that model's card calibration."""
    outcomes, models = [], set()
    for path in paths:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload["task"] != task.name:
            raise SystemExit(f"{path} scores {payload['task']}, not {task.name}")
        models.add(payload["model"])
        for entry in payload["outcomes"]:
            outcomes.append(SeriesOutcome(
                entry["name"], entry["expected"], entry["result"], entry["suspicion"], entry["probabilities"],
                entry["reason"], entry["slices"], entry["slices_read"], tuple(entry.get("slice_results", ()))))
    if len(models) != 1:
        raise SystemExit(f"the files come from {len(models)} models; give one model's evaluations at a time")
    return outcomes, ModelCard.load(models.pop()).calibration


def replay(outcome: SeriesOutcome, task: Task, calibration: dict[str, Any],
           probabilities: np.ndarray | None = None) -> SeriesOutcome:
    """``outcome`` decided again from its recorded slices under ``calibration`` (its domain threshold), with
    ``probabilities`` ``(N, C)`` in place of the recorded ones when given. A series without recorded slices (not
    applicable, unreadable) keeps its result."""
    slices = outcome.slice_results
    if not slices:
        return outcome
    regions = []
    for entry in slices:
        reason = entry.get("excluded")
        if reason is not None and reason.startswith(DOMAIN_REASON):
            reason = None  # the rule's own threshold judges it again
        regions.append(Region((0, 0, 1, 1), 0.0, reason))
    if probabilities is None:
        probabilities = np.array([entry["probabilities"] for entry in slices], dtype=float)
    distances = np.array([entry.get("distance", 0.0) for entry in slices], dtype=float)
    frames = [{"frame": index} for index in range(len(slices))]
    result = decide(frames, regions, probabilities, distances, task, calibration)
    series = np.array([result.probabilities[name] for name in task.class_names])
    return replace(outcome, result=result.label, suspicion=round(float(task.suspicion(series)), 4),
                   probabilities=result.probabilities, reason=result.reason,
                   slices_read=sum("excluded" not in s for s in result.slice_probabilities))


def blended(first: SeriesOutcome, other: SeriesOutcome, weight: float) -> np.ndarray:
    """The two evaluations' slice probabilities of one series, mixed; the slices must be the same ones."""
    if len(first.slice_results) != len(other.slice_results):
        raise SystemExit(f"{first.name}: {len(first.slice_results)} slices against {len(other.slice_results)}")
    mine = np.array([entry["probabilities"] for entry in first.slice_results], dtype=float)
    theirs = np.array([entry["probabilities"] for entry in other.slice_results], dtype=float)
    return (1.0 - weight) * mine + weight * theirs


def row(label: str, outcomes: list[SeriesOutcome], task: Task) -> str:
    figures = score(outcomes, task)
    classified = [o for o in outcomes if o.expected in task.class_names and o.result in task.labels]
    confident = sum((o.suspicion or 0.0) > 0.8 for o in classified if o.expected in task.negative_classes)

    def shown(key: str) -> str:
        value = figures[key]
        return "-" if value is None else f"{value:.3f}"

    return (f"{label:<22} {len(classified):>4}/{figures['n']:<4} {shown('finding_accuracy'):>7} "
            f"{shown('sensitivity'):>6} {shown('specificity'):>6} {shown('roc_auc'):>6} {confident:>7} {shown('out_of_domain_handled'):>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["brain-tumor", "covid-ct"])
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluate --dicom --json files of one model")
    parser.add_argument("--domain-threshold", type=float, nargs="+", default=[],
                        help="feature distances to replay with (default: the card's)")
    parser.add_argument("--blend", type=Path, nargs="+", default=[],
                        help="another model's evaluate --dicom --json files of the same trees")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="with --blend: the other model's share of each slice's probabilities")
    args = parser.parse_args()
    task = get_task(args.task)
    outcomes, calibration = read_outcomes(args.evaluations, task)
    card_threshold = float(calibration.get("domain", {}).get("threshold", np.inf))
    print(f"{task.name}: {len(outcomes)} series; operating threshold {calibration.get('threshold', 0.5)}, "
          f"card's domain threshold {card_threshold}")
    print(f"{'rule':<22} {'classified':>9} {'finding':>7} {'sens':>6} {'spec':>6} {'AUC':>6} {'neg>0.8':>7} "
          f"{'OOD ok':>6}")
    print(row("as evaluated", outcomes, task))
    for threshold in args.domain_threshold:
        rule = {**calibration, "domain": {**calibration.get("domain", {}), "threshold": threshold}}
        print(row(f"domain <= {threshold:g}", [replay(o, task, rule) for o in outcomes], task))
    if args.blend:
        others, _ = read_outcomes(args.blend, task)
        by_name = {o.name: o for o in others}
        missing = [o.name for o in outcomes if o.name not in by_name]
        if missing:
            raise SystemExit(f"{len(missing)} series are not in the blended evaluations, e.g. {missing[0]}")
        for weight in args.weights:
            print(row(f"blend {weight:g}", [replay(o, task, calibration, blended(o, by_name[o.name], weight))
                                            if o.slice_results else o for o in outcomes], task))


if __name__ == "__main__":
    main()
