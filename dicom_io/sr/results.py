"""Plain data going into and coming out of a classification SR (no models import: the worker fills these in)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassificationResult:
    """One series' classification: the predicted class and a probability per class, in model output order."""

    task: str
    label: str
    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "probabilities", tuple(float(p) for p in self.probabilities))
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be at least two distinct names, got {self.class_names}")
        if len(self.probabilities) != len(self.class_names):
            raise ValueError(f"{len(self.probabilities)} probabilities for {len(self.class_names)} classes")
        if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in self.probabilities):
            raise ValueError(f"probabilities must lie in [0, 1], got {self.probabilities}")
        if self.label not in self.class_names:
            raise ValueError(f"label {self.label!r} is not one of {self.class_names}")

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
    #: The predicted class name (or the code meaning when the SR does not name its classes).
    finding: str
    probabilities: dict[str, float]
    algorithm: AlgorithmInfo
    #: (SOP Class UID, SOP Instance UID) of every source image the measurement group references.
    referenced_instances: tuple[tuple[str, str], ...]
    #: SOP Instance UIDs of the SRs this one replaces.
    predecessors: tuple[str, ...]
