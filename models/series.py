"""A series' result from its slices: which slices count, how they are combined, and when the answer is indeterminate.

The one definition of the path from a series' display images to its result, run by the worker and by
``dicom-triage evaluate --dicom`` alike:

1. :func:`model_inputs`: each image's region (:mod:`models.regions`: the lungs on CT, the head on MR) cut out with
   the training images' margins. A slice without the anatomy (too little lung, no head) is *excluded*, with its
   reason.
2. The classifier gives each slice calibrated probabilities and its feature distance to the training images
   (:meth:`models.inference.Classifier.classify`); a slice farther than the model's domain threshold is excluded too.
3. :func:`decide`: the series is ``indeterminate`` (:data:`models.tasks.INDETERMINATE`) when too few of its slices
   are left (:data:`MIN_SUITABLE_SHARE`, at least one slice); otherwise the slices left are combined by the task's
   rule (:func:`aggregate`, :data:`QUANTILES`) and the series suspicion, one minus the probability of the negative
   classes, is compared with the card's operating threshold: at or above it the series is the most probable
   finding class, below it the negative class, unless too few slices were read to rule a finding out
   (:data:`MIN_SLICES_FOR_NEGATIVE`): then it is indeterminate too, as is a finding of a class the model cannot
   tell from normal anatomy on the series (the caller's ``finding_caveats``: pituitary on an axial post-contrast
   series, where the model calls normally enhancing anatomy pituitary). A finding whose type the model cannot
   assess on the series (the caller's ``type_caveats``: every type on a FLAIR series for a model whose tumour types
   were learned from T1 post-contrast images) keeps its finding under the task's untyped label
   (:attr:`models.tasks.Task.untyped_finding`) with the caveat as its reason, never a type the model was not taught
   to tell on such images.

Every slice keeps its probabilities and, when excluded, its reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from models.regions import Region, crop, region_finder
from models.tasks import INDETERMINATE, Task

__all__ = [
    "QUANTILES",
    "MIN_SLICES_FOR_NEGATIVE",
    "MIN_SUITABLE_SHARE",
    "SeriesClassification",
    "aggregate",
    "decide",
    "describe_aggregation",
    "model_inputs",
]

#: Where a task's series result lies among its slices (those that count), ordered by suspicion: the series takes
#: the probabilities at this quantile of the slices' suspicion (interpolated between the two slices around it), so
#: it is a finding when at least ``1 - q`` of its slices are suspicious.
#: - covid-ct, 0.5 (the median slice): COVID-19 pneumonia is bilateral and diffuse, so it shows on most lung
#:   slices; neither a few apex or base slices nor a tumour mass on a few slices decide. The mean of the top
#:   quarter, used before, called a 2007 lung-cancer series COVID at 0.55 from 11 such slices; its median is 0.01.
#: - brain-tumor, 0.75 (a finding on a quarter of the slices): a tumour shows on a minority of slices, but the
#:   healthy scanner volumes of the development set have 3-16% of their slices above 0.5 (at the skull base, the
#:   vertex), which the mean of the top quarter turned into a tumour (a healthy DTI b0 volume: meningioma).
QUANTILES: Mapping[str, float] = MappingProxyType({"covid-ct": 0.5, "brain-tumor": 0.75})
#: A series whose slices are mostly not the anatomy is not what the model reads (an abdomen CT with a few lung-base
#: slices, a head CT, a neck MR): below this share of suitable slices it is indeterminate.
MIN_SUITABLE_SHARE = 0.25
#: A negative answer ("no finding") claims something of the whole organ, so it needs the slices to cover it; a
#: finding needs only the slices that show it. Below this many slices read, a series without a finding is
#: indeterminate. brain-tumor, 10: a tumour shows on a minority of a brain's 20-30 axial 5 mm slices, so two slices
#: near the vertex (RIDER Neuro MRI glioblastoma patients in the development set, no lesion on them) cannot say
#: "no tumour"; every healthy volume read has 40 slices or more. covid-ct, 1: COVID-19 pneumonia is bilateral and
#: diffuse, a single lung slice shows it or its absence, and the single pre-2020 slices read are answered on their
#: own (docs/results.md).
MIN_SLICES_FOR_NEGATIVE: Mapping[str, int] = MappingProxyType({"covid-ct": 1, "brain-tumor": 10})


@dataclass(frozen=True)
class SeriesClassification:
    """A series result: the label, probabilities per class, and every slice's probabilities."""

    label: str
    probabilities: dict[str, float]
    #: ``[{"sop_instance_uid", "frame", "probabilities": [...], "excluded"?: reason}]`` in spatial order.
    slice_probabilities: list[dict[str, Any]]
    aggregation: str = ""
    #: Why the label is :data:`models.tasks.INDETERMINATE`, or why an untyped finding has no type (``None`` for a
    #: class label).
    reason: str | None = None


def model_inputs(images: Sequence[np.ndarray], task: Task, defects: Sequence[str | None] | None = None,
                 pixel_spacings: Sequence[tuple[float, float] | None] | None = None
                 ) -> tuple[list[Region], list[np.ndarray]]:
    """Each display image's region and the model input cut from it (the whole frame for an unsuitable slice).

    ``defects``: per image, why its values cannot be trusted (e.g. a CT without its Hounsfield rescale); such an
    image is unsuitable with that reason, whatever it shows. ``pixel_spacings``: per image, (row, column) in mm or
    ``None`` (a training image has none), for the region's checks in mm."""
    find = region_finder(task.name)
    regions = []
    for index, image in enumerate(images):
        defect = defects[index] if defects is not None else None
        spacing = pixel_spacings[index] if pixel_spacings is not None else None
        regions.append(Region((0, 0, *np.shape(image)[:2]), 0.0, defect) if defect else find(image, spacing))
    return regions, [crop(image, region) for image, region in zip(images, regions)]


def aggregate(probabilities: np.ndarray, task: Task, quantile: float | None = None) -> np.ndarray:
    """Series probabilities ``(C,)`` from slice probabilities ``(N, C)`` (N >= 1): the slices ordered by suspicion,
    the probabilities at ``quantile`` of that order (the task's :data:`QUANTILES` by default), linearly
    interpolated between the two slices around it."""
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise ValueError("a series needs at least one slice to aggregate")
    quantile = QUANTILES[task.name] if quantile is None else quantile
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], not {quantile}")
    ordered = probabilities[np.argsort(task.suspicion(probabilities), kind="stable")]
    position = quantile * (len(ordered) - 1)
    below = int(np.floor(position))
    above = min(below + 1, len(ordered) - 1)
    weight = position - below
    return (1.0 - weight) * ordered[below] + weight * ordered[above]


def describe_aggregation(task: Task) -> str:
    """The aggregation rule of ``task`` in words (a result's ``aggregation``, followed by the slice count)."""
    quantile = QUANTILES[task.name]
    if quantile == 0.5:
        return "median slice by suspicion of the slices that show the anatomy"
    return f"{quantile:.0%} quantile by suspicion of the slices that show the anatomy"


def _exclusions(regions: Sequence[Region], distances: np.ndarray | None, domain_threshold: float | None
                ) -> list[str | None]:
    reasons: list[str | None] = [region.reason for region in regions]
    if distances is not None and domain_threshold is not None:
        for index, distance in enumerate(distances):
            if reasons[index] is None and distance > domain_threshold:
                reasons[index] = (f"unlike the training images (feature distance {distance:.1f}, above "
                                  f"{domain_threshold:.1f})")
    return reasons


def _summary(reasons: Sequence[str | None]) -> str:
    """'7 too little lung in the slice; 1 unlike the training images': the commonest reasons with their counts, each
    without its parenthesised figures."""
    counts = Counter(reason.split(" (")[0] for reason in reasons if reason)
    return "; ".join(f"{count} {text}" for text, count in counts.most_common(3))


def decide(
    frames: Sequence[Mapping[str, Any]],
    regions: Sequence[Region],
    probabilities: np.ndarray,
    distances: np.ndarray | None,
    task: Task,
    calibration: Mapping[str, Any],
    type_caveats: Mapping[str, str] | None = None,
    finding_caveats: Mapping[str, str] | None = None,
) -> SeriesClassification:
    """The series result (see the module docstring) from its slices' regions, calibrated ``probabilities``
    ``(N, C)`` and feature ``distances`` (``None``: no domain check). ``frames`` identify the slices in the result
    (``{"sop_instance_uid": ..., "frame": ...}``); ``calibration`` is the model card's; ``type_caveats``, finding
    class -> why that type cannot be assessed on this series (a class not in it can); ``finding_caveats``, finding
    class -> why a finding of that class cannot be told from normal anatomy on this series (it is indeterminate)."""
    if len(frames) == 0 or len(frames) != len(regions) or len(frames) != len(probabilities):
        raise ValueError("a series needs as many frames, regions and probability rows, and at least one")
    domain = calibration.get("domain", {})
    reasons = _exclusions(regions, distances, domain.get("threshold"))
    kept = np.array([reason is None for reason in reasons])
    slices = []
    for index, (frame, row, reason) in enumerate(zip(frames, probabilities, reasons)):
        entry: dict[str, Any] = {**frame, "probabilities": [round(float(p), 6) for p in row]}
        if distances is not None:
            entry["distance"] = round(float(distances[index]), 2)
        if reason is not None:
            entry["excluded"] = reason
        slices.append(entry)
    share = float(kept.mean())
    reason = None
    if not kept.any():
        reason = f"no slice shows what the model reads ({_summary(reasons)})"
    elif share < MIN_SUITABLE_SHARE:
        reason = (f"only {int(kept.sum())} of {len(kept)} slices show what the model reads, fewer than "
                  f"{MIN_SUITABLE_SHARE:.0%} ({_summary(reasons)})")
    series = aggregate(probabilities[kept] if kept.any() else probabilities, task)
    names = task.class_names
    if reason is not None:
        label = INDETERMINATE
    else:
        threshold = float(calibration.get("threshold", 0.5))
        side = task.finding_classes if float(task.suspicion(series)) >= threshold else task.negative_classes
        pool = [names.index(name) for name in side]
        label = names[max(pool, key=lambda i: series[i])]
        needed = MIN_SLICES_FOR_NEGATIVE[task.name]
        if label in task.negative_classes and kept.sum() < needed:
            reason = (f"only {int(kept.sum())} slice(s) read, too few to rule out a finding (a negative result "
                      f"needs {needed})")
            label = INDETERMINATE
        elif finding_caveats and label in finding_caveats:
            reason = f"finding not assessed: {finding_caveats[label]}"
            label = INDETERMINATE
        elif task.untyped_finding and type_caveats and label in type_caveats:
            reason = f"type not assessed: {type_caveats[label]}"
            label = task.untyped_finding
    return SeriesClassification(
        label=label,
        probabilities={name: round(float(p), 6) for name, p in zip(names, series)},
        slice_probabilities=slices,
        aggregation=f"{describe_aggregation(task)} ({int(kept.sum())} of {len(kept)} slices)",
        reason=reason,
    )
