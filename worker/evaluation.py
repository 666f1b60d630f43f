"""``dicom-triage evaluate TASK --dicom DIR``: the worker's own path on a labelled tree of real DICOM series.

Each series goes where a pushed series goes: routing (the settings' ``routing_rules``, on the same header facts the
scheduler reads), decoding (:func:`worker.decoding.decode_series`), regions, slice selection, calibrated
probabilities, aggregation and the indeterminate rule (:func:`worker.inference.classify_series_files`). The score is
per series:

* ``accuracy``: the exact class right, over the series labelled with a class of the task (indeterminate or not
  applicable counts as wrong);
* ``coverage``: the share of those series given a class or the untyped finding (a tumour whose type the model does
  not assess on the sequence, :attr:`models.tasks.Task.untyped_finding`); ``indeterminate_rate`` is the rest;
* ``type_not_assessed``: how many of those series are the untyped finding (a finding, but no exact class);
* ``sensitivity`` / ``specificity`` of finding against no finding and ``roc_auc`` of the series suspicion, over the
  series given a class (``sensitivity_all`` counts an indeterminate positive as missed);
* ``max_negative_suspicion``: the most suspicious series among the negatives (a pre-2020 chest called COVID at 0.9
  is a worse error than one at 0.55);
* ``out_of_domain_handled``: the share of the series labelled ``out-of-domain`` that came back indeterminate or not
  applicable, never a class.

Labels: a TSV file (``--labels``) of ``PATH-PREFIX<TAB>LABEL`` lines (``#`` comments; the longest prefix of a
series' folder, relative to ``DIR``, wins), else the first folder under ``DIR`` when it is a class name or
``out-of-domain``. Series labelled for another task are skipped. A folder may hold several series: files are grouped by
Series Instance UID.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from config import RoutingRule
from dicom_io.validation import integer_value
from models.card import CARD_FILE
from models.inference import Classifier, default_model_dir
from models.tasks import INDETERMINATE, Task
from training.metrics import roc_auc
from worker.inference import classify_series_files
from worker.routing import SeriesFacts, route

#: The label of a series that no classifier should read (an abdomen CT, a knee MR, a scout, a phantom).
OUT_OF_DOMAIN = "out-of-domain"
#: A series routing sends nowhere (or to another task).
NOT_APPLICABLE = "not applicable"


class EvaluationError(ValueError):
    """The tree or the labels cannot be read; the message says why."""


@dataclass(frozen=True)
class LabelledSeries:
    """One series of the tree: where it is, its expected label, and its files."""

    name: str
    label: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class SeriesOutcome:
    """What the worker's path made of one series."""

    name: str
    expected: str
    result: str
    #: One minus the probability of the task's negative classes, aggregated (``None``: not applicable).
    suspicion: float | None
    probabilities: dict[str, float] | None
    reason: str | None
    slices: int
    slices_read: int
    #: Every slice's calibrated probabilities (in the task's class order), feature distance and, when it was not
    #: read, why (:attr:`models.series.SeriesClassification.slice_probabilities` less the instance keys): what
    #: ``bench/slices_needed.py`` draws from. Empty when the series was not classified.
    slice_results: tuple[dict[str, Any], ...] = ()


def read_labels(path: Path) -> list[tuple[str, str]]:
    """``(prefix, label)`` pairs of a labels file, longest prefix first."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvaluationError(f"labels file {path} cannot be read: {exc}") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise EvaluationError(f"{path}:{number}: expected PATH-PREFIX<TAB>LABEL, got {line!r}")
        pairs.append((fields[0].strip().strip("/"), fields[1].strip()))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _label_of(relative: str, labels: list[tuple[str, str]] | None) -> str | None:
    if labels is not None:
        for prefix, label in labels:
            if relative == prefix or relative.startswith(prefix + "/") or not prefix:
                return label
        return None
    return relative.split("/", 1)[0]


def find_series(root: Path, labels: list[tuple[str, str]] | None, task: Task) -> list[LabelledSeries]:
    """Every series under ``root`` labelled with a class of ``task`` or :data:`OUT_OF_DOMAIN`, in name order."""
    if not root.is_dir():
        raise EvaluationError(f"{root} is not a folder")
    grouped: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, TypeError):
            continue  # manifests, checksums, anything else that is not DICOM
        relative = path.parent.relative_to(root).as_posix()
        grouped[(relative, str(header.get("SeriesInstanceUID", "")))].append(path)
    wanted = set(task.class_names) | {OUT_OF_DOMAIN}
    folders = defaultdict(int)
    for relative, _ in grouped:
        folders[relative] += 1
    found = []
    for (relative, uid), paths in sorted(grouped.items()):
        label = _label_of(relative, labels)
        if label not in wanted:
            continue
        name = relative if folders[relative] == 1 else f"{relative} [{uid[-12:]}]"
        found.append(LabelledSeries(name, label, tuple(paths)))
    return found


def series_facts(paths: Sequence[Path]) -> SeriesFacts:
    """The facts routing reads, from the series' headers (the scheduler reads the same from the database, which
    the listener filled from the same attributes)."""
    headers = [dcmread(path, stop_before_pixels=True) for path in paths]
    first = headers[0]
    return SeriesFacts(
        modality=str(first.get("Modality", "")),
        body_part_examined=str(first.get("BodyPartExamined", "")),
        study_description=str(first.get("StudyDescription", "")),
        series_description=str(first.get("SeriesDescription", "")),
        image_types=frozenset(str(value).upper() for value in (first.get("ImageType") or []) if str(value)),
        slice_count=sum(max(1, integer_value(h, "NumberOfFrames") or 1) for h in headers),
        sop_classes=frozenset(str(h.get("SOPClassUID", "")) for h in headers),
    )


def evaluate_series(series: Sequence[LabelledSeries], task: Task, classifier: Classifier,
                    rules: tuple[RoutingRule, ...], batch_size: int = 32) -> list[SeriesOutcome]:
    """Route and classify each series as the worker would; a series that cannot be decoded is indeterminate with
    the error as its reason (the worker fails such a job with the same message)."""
    outcomes = []
    for item in series:
        decision = route(series_facts(item.paths), rules)
        if decision.task != task.name:
            reason = decision.reason if decision.task is None else f"routed to {decision.task}"
            outcomes.append(SeriesOutcome(item.name, item.label, NOT_APPLICABLE, None, None, reason,
                                          len(item.paths), 0))
            continue
        try:
            result = classify_series_files(list(item.paths), classifier, batch_size)
        except ValueError as exc:  # ImagingError and pydicom's decoding errors are ValueErrors
            outcomes.append(SeriesOutcome(item.name, item.label, INDETERMINATE, None, None, f"cannot be read: {exc}",
                                          len(item.paths), 0))
            continue
        probabilities = np.array([result.probabilities[name] for name in task.class_names])
        read = sum("excluded" not in s for s in result.slice_probabilities)
        slices = tuple({key: s[key] for key in ("probabilities", "distance", "excluded") if key in s}
                       for s in result.slice_probabilities)
        outcomes.append(SeriesOutcome(item.name, item.label, result.label,
                                      round(float(task.suspicion(probabilities)), 4), result.probabilities,
                                      result.reason, len(result.slice_probabilities), read, slices))
    return outcomes


def _share(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def score(outcomes: Sequence[SeriesOutcome], task: Task) -> dict[str, Any]:
    """The series-level figures of the module docstring, JSON-ready."""
    in_domain = [o for o in outcomes if o.expected in task.class_names]
    out_of_domain = [o for o in outcomes if o.expected == OUT_OF_DOMAIN]
    classified = [o for o in in_domain if o.result in task.labels]
    negative = set(task.negative_classes)
    positives = [o for o in classified if o.expected not in negative]
    negatives = [o for o in classified if o.expected in negative]
    all_positives = [o for o in in_domain if o.expected not in negative]
    auc = roc_auc(np.array([o.expected not in negative for o in classified], dtype=bool),
                  np.array([o.suspicion for o in classified], dtype=float)) if classified else None
    return {
        "n": len(in_domain),
        "accuracy": _share(sum(o.result == o.expected for o in in_domain), len(in_domain)),
        "coverage": _share(len(classified), len(in_domain)),
        "indeterminate_rate": _share(len(in_domain) - len(classified), len(in_domain)),
        "type_not_assessed": sum(o.result == task.untyped_finding for o in classified),
        "finding_accuracy": _share(sum((o.result in negative) == (o.expected in negative) for o in classified),
                                   len(classified)),
        "sensitivity": _share(sum(o.result not in negative for o in positives), len(positives)),
        "sensitivity_all": _share(sum(task.is_finding(o.result) for o in all_positives), len(all_positives)),
        "specificity": _share(sum(o.result in negative for o in negatives), len(negatives)),
        "roc_auc": None if auc is None else round(auc, 4),
        "max_negative_suspicion": max((o.suspicion or 0.0 for o in negatives), default=None),
        "out_of_domain_n": len(out_of_domain),
        "out_of_domain_handled": _share(sum(o.result in (INDETERMINATE, NOT_APPLICABLE) for o in out_of_domain),
                                        len(out_of_domain)),
    }


def format_outcomes(outcomes: Sequence[SeriesOutcome], figures: dict[str, Any]) -> str:
    width = max([len(o.name) for o in outcomes] + [6])
    lines = [f"{'series':<{width}}  {'expected':<13} {'result':<15} {'suspicion':>9}  slices  reason"]
    for o in outcomes:
        shown = "-" if o.suspicion is None else f"{o.suspicion:.3f}"
        lines.append(f"{o.name:<{width}}  {o.expected:<13} {o.result:<15} {shown:>9}  {o.slices_read:>3}/{o.slices:<3} "
                     f"{o.reason or ''}")
    lines.append("== series: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    return "\n".join(lines)


def run_dicom_evaluate(task: Task, root: Path, labels_file: Path | None, model_dir: Path | None,
                       json_path: Path | None, record_split: str | None, rules: tuple[RoutingRule, ...],
                       batch_size: int = 32) -> int:
    model_dir = model_dir or default_model_dir(task.name)
    classifier = Classifier.load(model_dir)
    if classifier.card.task != task.name:
        raise EvaluationError(f"{model_dir} is a {classifier.card.task} model, not {task.name}")
    series = find_series(root, read_labels(labels_file) if labels_file else None, task)
    if not series:
        raise EvaluationError(f"no series under {root} is labelled with a class of {task.name} or {OUT_OF_DOMAIN}")
    outcomes = evaluate_series(series, task, classifier, rules, batch_size)
    figures = score(outcomes, task)
    print(format_outcomes(outcomes, figures))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(model_dir), "model_uid": classifier.card.uid, "task": task.name, "dicom": str(root),
                   "series": figures, "outcomes": [asdict(o) for o in outcomes]}
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {json_path}", file=sys.stderr)
    if record_split:
        classifier.card.metrics[record_split] = {**figures, "level": "series", "source": root.name,
                                                 "evaluated": date.today().isoformat()}
        classifier.card.save(model_dir / CARD_FILE)
        print(f"recorded as split {record_split!r} in {model_dir / CARD_FILE}", file=sys.stderr)
    return 0
