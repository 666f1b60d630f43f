"""Classify series: archive files -> display frames -> model -> slice probabilities -> series result.

:class:`SeriesBatcher` classifies several series at once with model batches filled across them.

Aggregation (:data:`AGGREGATION`): each slice gets a *suspicion* score, one minus the probability of the task's
negative classes (``notumor``, ``non-COVID``). The series probabilities are the mean class probabilities of the
most suspicious quarter of its slices (at least one slice); the label is their argmax. Why not the mean of all
slices: a tumour or COVID lesions show on a minority of slices, and averaging over every slice of a long series
would dilute a clear finding into "normal"; for a triage tool, missing a finding costs more than a second look.
A series of normal slices still comes out normal, since its most suspicious slices are normal too. Every slice's
probabilities are kept with the result (per SOP Instance UID and frame).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from pydicom import dcmread

from dicom_io.imaging import SeriesFrame, series_frame_records
from models.inference import Classifier, default_model_dir
from models.tasks import Task

K = TypeVar("K")

#: Fraction of slices (the most suspicious) whose mean gives the series probabilities.
TOP_FRACTION = 0.25
AGGREGATION = f"mean of the top {TOP_FRACTION:.0%} most suspicious slices (at least 1)"


@dataclass(frozen=True)
class SeriesClassification:
    """A series result: the label, probabilities per class, and every slice's probabilities."""

    label: str
    probabilities: dict[str, float]
    #: ``[{"sop_instance_uid", "frame", "probabilities": [...]}]`` in spatial order, probabilities in class order.
    slice_probabilities: list[dict[str, Any]]
    aggregation: str = AGGREGATION


def aggregate(slice_probabilities: np.ndarray, task: Task) -> np.ndarray:
    """Series probabilities ``(C,)`` from slice probabilities ``(N, C)`` by the rule in :data:`AGGREGATION`."""
    if slice_probabilities.ndim != 2 or slice_probabilities.shape[0] == 0:
        raise ValueError("a series needs at least one slice to aggregate")
    negatives = [task.class_names.index(name) for name in task.negative_classes]
    suspicion = 1.0 - slice_probabilities[:, negatives].sum(axis=1)
    count = max(1, math.ceil(TOP_FRACTION * len(suspicion)))
    top = np.argsort(-suspicion, kind="stable")[:count]
    return slice_probabilities[top].mean(axis=0)


#: One model call at a time per process: TensorFlow spreads each call over every core already, so two worker
#: threads predicting at once only fight over them; the other thread decodes its series meanwhile.
PREDICT_LOCK = threading.Lock()


def predict_in_batches(classifier: Classifier, images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """``(N, C)`` probabilities: :meth:`Classifier.predict` (``batch_size`` images at a time, the last batch as it
    comes) under :data:`PREDICT_LOCK`.

    No padding to fixed batch shapes: after :meth:`Classifier.warm_up` Keras runs every batch size on one
    shape-relaxed graph without tracing again (measured: a first call at 24, 17, 9 or 5 images costs what the next
    one does), and padding 24 slices to 32 cost 28% more model time, 17 to 32 twice as much.
    """
    with PREDICT_LOCK:
        return classifier.predict(images, batch_size)


def decode_series(paths: Sequence[Path]) -> list[SeriesFrame]:
    """A series' frames from its archive files, as display images in spatial order.

    Raises ``dicom_io.imaging.ImagingError`` (or pydicom's errors) for instances that cannot be decoded, and
    ``ValueError`` for a series without frames.
    """
    frames = series_frame_records(dcmread(path) for path in paths)
    if not frames:
        raise ValueError("the series has no frames")
    return frames


def series_classification(frames: Sequence[SeriesFrame], probabilities: np.ndarray, classifier: Classifier
                          ) -> SeriesClassification:
    """The series result from its frames' probabilities ``(N, C)`` (:func:`aggregate`), keeping every slice's."""
    series = aggregate(probabilities, classifier.task)
    class_names = classifier.class_names
    return SeriesClassification(
        label=class_names[int(np.argmax(series))],
        probabilities={name: round(float(p), 6) for name, p in zip(class_names, series)},
        slice_probabilities=[
            {
                "sop_instance_uid": frame.sop_instance_uid,
                "frame": frame.frame_number,
                "probabilities": [round(float(p), 6) for p in row],
            }
            for frame, row in zip(frames, probabilities)
        ],
    )


def classify_series_files(paths: Sequence[Path], classifier: Classifier, batch_size: int) -> SeriesClassification:
    """Read a series' instances from ``paths``, classify every frame and aggregate.

    Raises ``dicom_io.imaging.ImagingError`` (or pydicom's errors) for instances that cannot be decoded.
    """
    frames = decode_series(paths)
    probabilities = predict_in_batches(classifier, [frame.image for frame in frames], batch_size)
    return series_classification(frames, probabilities, classifier)


class SeriesBatcher(Generic[K]):
    """Classifies several series with model batches filled across them.

    :meth:`add` a series' frames: every full batch of ``batch_size`` frames waiting (from this and earlier series)
    is predicted at once, and the series whose frames are then all predicted are returned with their results. So
    series of 24 slices fill batches of 32 instead of each making a short one, and a series' result comes as soon as
    its last frame is predicted. :meth:`flush` predicts the rest.
    """

    def __init__(self, classifier: Classifier, batch_size: int) -> None:
        self.classifier = classifier
        self.batch_size = batch_size
        self._series: dict[K, tuple[list[SeriesFrame], np.ndarray]] = {}
        self._left: dict[K, int] = {}
        #: Frames not yet predicted, in arrival order: (series key, index in that series).
        self._waiting: list[tuple[K, int]] = []

    def add(self, key: K, frames: Sequence[SeriesFrame]) -> list[tuple[K, SeriesClassification]]:
        if key in self._series:
            raise ValueError(f"series {key!r} was added twice")
        if not frames:
            raise ValueError("the series has no frames")
        classes = len(self.classifier.class_names)
        self._series[key] = (list(frames), np.zeros((len(frames), classes), dtype=np.float32))
        self._left[key] = len(frames)
        self._waiting += [(key, index) for index in range(len(frames))]
        full = len(self._waiting) // self.batch_size * self.batch_size
        return self._predict(full) if full else []

    def flush(self) -> list[tuple[K, SeriesClassification]]:
        return self._predict(len(self._waiting))

    def _predict(self, count: int) -> list[tuple[K, SeriesClassification]]:
        todo, self._waiting = self._waiting[:count], self._waiting[count:]
        images = [self._series[key][0][index].image for key, index in todo]
        probabilities = predict_in_batches(self.classifier, images, self.batch_size)
        done = []
        for (key, index), row in zip(todo, probabilities):
            self._series[key][1][index] = row
            self._left[key] -= 1
            if self._left[key] == 0:
                frames, rows = self._series.pop(key)
                del self._left[key]
                done.append((key, series_classification(frames, rows, self.classifier)))
        return done


class ModelCache:
    """Each task's classifier, loaded once per process on first use (thread-safe).

    With ``active_dir`` (``task -> folder or None``; the model registry's active model) the folder is looked up
    each time a job asks, and a different folder is loaded in place of the old one: a promotion or rollback takes
    effect at the next job, without restarting the worker. ``None`` falls back to :meth:`model_dir`.
    """

    def __init__(self, models_dir: Path | None, active_dir: Callable[[str], Path | None] | None = None) -> None:
        self.models_dir = models_dir
        self.active_dir = active_dir
        #: When set, each model is traced for this batch size as it is loaded (:meth:`warm_up`).
        self.warm_batch_size: int | None = None
        self._loaded: dict[str, tuple[Path, Classifier]] = {}
        self._lock = threading.Lock()

    def model_dir(self, task_name: str) -> Path:
        """``models_dir/<task>`` when a models directory is configured, else the shipped model."""
        return self.models_dir / task_name if self.models_dir is not None else default_model_dir(task_name)

    def get(self, task_name: str) -> Classifier:
        folder = (self.active_dir(task_name) if self.active_dir is not None else None) or self.model_dir(task_name)
        with self._lock:
            loaded = self._loaded.get(task_name)
            if loaded is None or loaded[0] != folder:
                classifier = Classifier.load(folder)
                if self.warm_batch_size is not None:
                    with PREDICT_LOCK:
                        classifier.warm_up(self.warm_batch_size)
                self._loaded[task_name] = (folder, classifier)
            return self._loaded[task_name][1]

    def warm_up(self, batch_size: int) -> None:
        """Trace every loaded model for ``batch_size`` now, and each model loaded later as it is loaded, so no
        series waits for a compilation (a worker calls this before it takes jobs)."""
        with self._lock:
            self.warm_batch_size = batch_size
            classifiers = [classifier for _, classifier in self._loaded.values()]
        for classifier in classifiers:
            with PREDICT_LOCK:
                classifier.warm_up(batch_size)
