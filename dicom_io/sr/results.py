"""Plain data going into and coming out of a classification SR (no models import: the worker fills these in)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dicom_io.codes import INDETERMINATE, UNTYPED_FINDING_CONCEPTS, has_reason


@dataclass(frozen=True)
class ClassificationResult:
    """One series' classification: the predicted class (or :data:`~dicom_io.codes.INDETERMINATE`, or an untyped
    finding of :data:`~dicom_io.codes.UNTYPED_FINDING_CONCEPTS`, either with the ``reason`` why) and a probability
    per class, in model output order."""

    task: str
    label: str
    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    #: Why the label is indeterminate, or why an untyped finding has no type (plain text, no patient data); only
    #: those labels have one.
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "probabilities", tuple(float(p) for p in self.probabilities))
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be at least two distinct names, got {self.class_names}")
        if len(self.probabilities) != len(self.class_names):
            raise ValueError(f"{len(self.probabilities)} probabilities for {len(self.class_names)} classes")
        if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in self.probabilities):
            raise ValueError(f"probabilities must lie in [0, 1], got {self.probabilities}")
        if self.label not in self.class_names and not has_reason(self.label):
            raise ValueError(f"label {self.label!r} is not one of {self.class_names} (or {INDETERMINATE!r}, or an "
                             f"untyped finding: {', '.join(UNTYPED_FINDING_CONCEPTS)})")
        if self.reason is not None and not has_reason(self.label):
            raise ValueError(f"a reason is for an {INDETERMINATE!r} result or an untyped finding, not for the class "
                             f"{self.label!r}")

    @property
    def probability_by_class(self) -> dict[str, float]:
        return dict(zip(self.class_names, self.probabilities))


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced a result: it is the SR's observer device (Device UID = the model card's UID)."""

    name: str
    version: str
    uid: str
    manufacturer: str
    #: Algorithm parameters as (name, value) pairs, e.g. the slice aggregation rule.
    parameters: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", tuple((str(k), str(v)) for k, v in self.parameters))
        for field in ("name", "version", "uid", "manufacturer"):
            if not str(getattr(self, field)).strip():
                raise ValueError(f"AlgorithmInfo.{field} must not be empty")


@dataclass(frozen=True)
class ClassificationReport:
    """What :func:`dicom_io.sr.read_classification_sr` finds in one of our SRs."""

    sop_instance_uid: str
    task: str | None
    #: The predicted class name, ``"indeterminate"``, an untyped finding's label, or the code meaning when the SR
    #: does not name its classes.
    finding: str
    probabilities: dict[str, float]
    algorithm: AlgorithmInfo
    #: (SOP Class UID, SOP Instance UID) of every source image the measurement group references.
    referenced_instances: tuple[tuple[str, str], ...]
    #: SOP Instance UIDs of the SRs this one replaces.
    predecessors: tuple[str, ...]
    #: Why the finding is indeterminate or untyped, when the SR says (``None`` otherwise).
    reason: str | None = None
