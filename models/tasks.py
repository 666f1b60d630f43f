"""The classification tasks: their names and class names in model output order.

This is the one definition of these facts; training, the worker and the SR writer all import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    """A classification task."""

    name: str
    class_names: tuple[str, ...]
    #: Class names that are *not* a finding (a negative result); everything else is a suspected finding.
    negative_classes: tuple[str, ...]
    description: str
    #: Read a volume acquired sagittally or coronally as axial slices cut from it (:mod:`dicom_io.reformat`): the
    #: task's training images of its negative class are axial, so the plane would count as evidence.
    axial_reformat: bool = False
    #: The label of a finding whose type the model cannot assess on a series (``None``: every finding is typed). The
    #: finding classes were learned from images of one kind (:attr:`typed_on`); on a series whose header shows
    #: another weighting the series keeps its finding, under this label, and the reason says why the type is not
    #: given (:func:`models.series.decide`).
    untyped_finding: str | None = None
    #: What the finding classes' training images are, for the reason of an untyped finding.
    typed_on: str = ""
    #: Finding classes the model cannot tell from normal anatomy on an axial post-contrast series: the class's axial
    #: training images are post-contrast slices, so the model gives the class to normally enhancing anatomy. A series
    #: whose finding is such a class is indeterminate, with the reason (:func:`models.series.decide`).
    contrast_confounded: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def finding_classes(self) -> tuple[str, ...]:
        """The classes that are a suspected finding: every class but the negative ones, in model output order."""
        return tuple(name for name in self.class_names if name not in self.negative_classes)

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label a classified series may have: the classes, then the untyped finding if the task has one
        (:data:`INDETERMINATE` is none: it says the series was not classified)."""
        return self.class_names + ((self.untyped_finding,) if self.untyped_finding else ())

    @property
    def finding_labels(self) -> tuple[str, ...]:
        """The labels that are a suspected finding: the finding classes, then the untyped finding if any."""
        return self.finding_classes + ((self.untyped_finding,) if self.untyped_finding else ())

    def suspicion(self, probabilities: np.ndarray) -> np.ndarray:
        """One minus the probability of the negative classes, per row of ``probabilities`` ``(..., C)`` in
        :attr:`class_names` order: the probability of some finding, whatever its type."""
        negatives = [self.class_names.index(name) for name in self.negative_classes]
        return 1.0 - np.asarray(probabilities)[..., negatives].sum(axis=-1)

    def is_finding(self, label: str) -> bool:
        """Whether ``label`` is a suspected finding (:attr:`finding_labels`)."""
        return label in self.finding_labels


BRAIN_TUMOR = Task(
    name="brain-tumor",
    class_names=("glioma", "meningioma", "notumor", "pituitary"),
    negative_classes=("notumor",),
    description="Brain MRI: glioma, meningioma, pituitary tumour or no tumour",
    axial_reformat=True,
    # The dataset's glioma, meningioma and pituitary images are T1 post-contrast slices throughout (docs/results.md):
    # a FLAIR or T2 tumour series lies outside every tumour class's examples.
    untyped_finding="tumor",
    typed_on="T1-weighted post-contrast images",
    # The pituitary class's axial images are post-contrast slices at the level of the sella, where the normal gland,
    # cavernous sinuses and skull base enhance in everyone: on two real axial post-contrast glioblastoma series the
    # model called slices without a pituitary tumour pituitary at 0.93-0.99, on the MPRAGE most of the brain's axial
    # slices from skull base to vertex, normal brain and tumour alike (docs/results.md).
    contrast_confounded=("pituitary",),
)

COVID_CT = Task(
    name="covid-ct",
    class_names=("COVID", "non-COVID"),
    negative_classes=("non-COVID",),
    description="Lung CT: COVID-19 or not",
)

#: The label of a series a model cannot judge: it is not what the model was trained on (no lung in the field, not a
#: brain, a scout, frames far from the training images ...). It is no class of any task; the result's reason says why.
INDETERMINATE = "indeterminate"

TASKS: dict[str, Task] = {task.name: task for task in (BRAIN_TUMOR, COVID_CT)}


def get_task(name: str) -> Task:
    """Return the task called ``name`` or raise ``KeyError`` with the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
