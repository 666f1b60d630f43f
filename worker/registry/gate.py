"""The promotion gate: a candidate against the active model on the task's fixed reference set.

The reference set is an image folder (``DIR/<class>/*``) configured per task (``reference_sets``). Both models
are evaluated on every image of it through the inference path the worker uses (:class:`models.inference.Classifier`),
and the candidate passes only if neither its accuracy nor any class's recall is lower than the active model's by
more than the tolerance. Recall per class, not only accuracy: a model that gains accuracy by missing the rare
finding (a pituitary tumour, COVID) must not slip through.

The curated images are not what the hospital sends, so the gate also compares the two models' ``external`` split:
series-level figures on real scanner DICOM that ``dicom-triage evaluate TASK --dicom DIR --labels FILE
--record-split external`` records on each card (:data:`EXTERNAL_CHECKS`: ROC AUC, sensitivity and specificity at
the card's operating threshold, which must not fall, and the indeterminate rate, which must not rise). Where the
active model's card has that split, a candidate without it is refused: it has not been measured where it counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.imagefiles import IMAGE_SUFFIXES, read_grey_image
from models.tasks import Task

#: Differences this small are rounding, not a worse model.
_EPSILON = 1e-9
#: The card split of real scanner series (``evaluate --dicom ... --record-split external``).
EXTERNAL_SPLIT = "external"
#: The external split's figures the gate compares, each with whether a higher value is the better one.
EXTERNAL_CHECKS: tuple[tuple[str, bool], ...] = (
    ("roc_auc", True), ("sensitivity", True), ("specificity", True), ("indeterminate_rate", False),
)


class ReferenceSetError(ValueError):
    """The reference folder cannot be used; the message names it and why."""


@dataclass(frozen=True)
class ReferenceSet:
    """The files and labels of a task's reference folder, and a hash naming exactly this content."""

    task: Task
    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    manifest_sha256: str


def load_reference_set(root: Path | str, task: Task) -> ReferenceSet:
    """List ``root/<class>/*`` images (every class of ``task`` needs at least one) and hash their content."""
    root = Path(root)
    if not root.is_dir():
        raise ReferenceSetError(f"reference set {root} for {task.name} is not a folder")
    paths: list[Path] = []
    labels: list[int] = []
    lines: list[str] = []
    for label, class_name in enumerate(task.class_names):
        files = sorted(
            p for p in (root / class_name).glob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ) if (root / class_name).is_dir() else []
        if not files:
            raise ReferenceSetError(f"reference set {root} has no images of class {class_name!r} (in {class_name}/)")
        for path in files:
            paths.append(path)
            labels.append(label)
            lines.append(f"{class_name}/{path.name}\t{hashlib.sha256(path.read_bytes()).hexdigest()}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return ReferenceSet(task, root, tuple(paths), tuple(labels), digest)


def evaluate_on_reference(model_dir: Path | str, reference: ReferenceSet, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, per-class precision/recall, confusion matrix of the model in ``model_dir`` on ``reference``."""
    import numpy as np

    from models.inference import Classifier
    from training.metrics import classification_metrics

    classifier = Classifier.load(model_dir)
    if classifier.card.task != reference.task.name:
        raise ReferenceSetError(f"{model_dir} is a {classifier.card.task} model, not {reference.task.name}")
    try:
        images = [read_grey_image(path) for path in reference.paths]
    except ValueError as exc:
        raise ReferenceSetError(f"reference set {reference.root}: {exc}") from None
    probabilities = classifier.predict(images, batch_size=batch_size)
    metrics = classification_metrics(np.asarray(reference.labels), probabilities, classifier.class_names)
    metrics["reference_manifest_sha256"] = reference.manifest_sha256
    return metrics


@dataclass(frozen=True)
class GateCheck:
    """One compared figure: the candidate's, the active model's, and whether the candidate is within tolerance."""

    metric: str
    candidate: float
    active: float
    passed: bool
    #: ``False`` for a figure where lower is better (the indeterminate rate).
    higher_is_better: bool = True


def _check(metric: str, candidate: float, active: float, tolerance: float, higher_is_better: bool = True) -> GateCheck:
    if higher_is_better:
        return GateCheck(metric, candidate, active, candidate >= active - tolerance - _EPSILON)
    return GateCheck(metric, candidate, active, candidate <= active + tolerance + _EPSILON, False)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    tolerance: float
    checks: tuple[GateCheck, ...] = field(default_factory=tuple)
    #: Refusals that are no comparison of two figures (the candidate lacks a split the active model has).
    missing: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failures(self) -> list[str]:
        """Why the candidate was refused, one line per failed check, both figures shown."""
        return [
            f"{c.metric} {c.candidate:.4f} is worse than the active model's {c.active:.4f} "
            f"by more than {self.tolerance:.4f}"
            for c in self.checks if not c.passed
        ] + list(self.missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "checks": [vars(c) for c in self.checks],
            "missing": list(self.missing),
            "failures": self.failures,
        }

    def with_external(self, candidate_card: dict[str, Any], active_card: dict[str, Any]) -> "GateDecision":
        """This decision plus the external split's checks (:func:`external_checks`)."""
        checks, missing = external_checks(candidate_card, active_card, self.tolerance)
        all_checks = self.checks + checks
        all_missing = self.missing + missing
        return GateDecision(all(c.passed for c in all_checks) and not all_missing, self.tolerance, all_checks,
                            all_missing)


def external_checks(candidate_card: dict[str, Any], active_card: dict[str, Any],
                    tolerance: float) -> tuple[tuple[GateCheck, ...], tuple[str, ...]]:
    """Compare the ``external`` split of two cards' ``metrics`` (dicts as ``card.json`` holds them).

    Nothing to compare where the active model has no external split (the gate cannot ask more of a candidate than
    of the model in use). A figure the active model's split lacks (``None``: no positives, say) is not compared;
    one the candidate's lacks where the active model has it is a refusal.
    """
    active = (active_card.get("metrics") or {}).get(EXTERNAL_SPLIT)
    if not isinstance(active, dict):
        return (), ()
    candidate = (candidate_card.get("metrics") or {}).get(EXTERNAL_SPLIT)
    if not isinstance(candidate, dict):
        return (), (f"the candidate has no {EXTERNAL_SPLIT!r} split while the active model has one; record it with "
                    f"dicom-triage evaluate TASK --dicom DIR --labels FILE --model MODEL_DIR "
                    f"--record-split {EXTERNAL_SPLIT}",)
    if candidate.get("source") != active.get("source"):
        return (), (f"the {EXTERNAL_SPLIT} splits were measured on different series ({candidate.get('source')!r} "
                    f"and {active.get('source')!r}); evaluate both models on the same tree",)
    checks, missing = [], []
    for name, higher_is_better in EXTERNAL_CHECKS:
        if active.get(name) is None:
            continue
        if candidate.get(name) is None:
            missing.append(f"{EXTERNAL_SPLIT} {name}: the candidate has no figure, the active model {active[name]}")
            continue
        checks.append(_check(f"{EXTERNAL_SPLIT} {name}", float(candidate[name]), float(active[name]), tolerance,
                             higher_is_better))
    return tuple(checks), tuple(missing)


def gate_decision(candidate: dict[str, Any], active: dict[str, Any], tolerance: float) -> GateDecision:
    """Compare two reference evaluations (from :func:`evaluate_on_reference`): accuracy and each class's recall."""
    if candidate.get("reference_manifest_sha256") != active.get("reference_manifest_sha256"):
        raise ValueError("the two evaluations are not on the same reference set")
    pairs = [("accuracy", float(candidate["accuracy"]), float(active["accuracy"]))]
    for name, active_class in active["per_class"].items():
        pairs.append((f"recall[{name}]", float(candidate["per_class"][name]["recall"]), float(active_class["recall"])))
    checks = tuple(_check(metric, cand, act, tolerance) for metric, cand, act in pairs)
    return GateDecision(all(c.passed for c in checks), tolerance, checks)


__all__ = [
    "GateCheck",
    "GateDecision",
    "ReferenceSet",
    "ReferenceSetError",
    "EXTERNAL_CHECKS",
    "EXTERNAL_SPLIT",
    "evaluate_on_reference",
    "external_checks",
    "gate_decision",
    "load_reference_set",
]
