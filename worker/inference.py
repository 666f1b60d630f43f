"""Classify series: archive files -> model inputs -> model -> slice probabilities -> series result.

The path from archive files to model inputs is :func:`worker.decoding.prepare_series` (run in the worker's decoding
processes, :class:`worker.decoding.DecodePool`); from probabilities to the result (slices left out, aggregation,
``indeterminate``) it is :mod:`models.series`, the one definition ``dicom-triage evaluate --dicom`` runs too. This
module adds the process-wide model lock and cache, and :class:`SeriesBatcher`, which classifies several series at
once with model batches filled across them. Every slice's probabilities are kept with the result (per SOP Instance
UID and frame), and every slice left out says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from models.inference import Classifier, default_model_dir
from models.series import SeriesClassification, decide
from worker.decoding import PreparedSeries, prepare_series
from worker.metrics import INFERENCE_BATCH, INFERENCE_IMAGES

__all__ = [
    "ModelCache",
    "PREDICT_LOCK",
    "SeriesBatcher",
    "SeriesClassification",
    "classify_series_files",
    "predict_in_batches",
    "prepare_for",
]

K = TypeVar("K")


#: One model call at a time per process: TensorFlow spreads each call over every core already, so two worker
#: threads predicting at once only fight over them; the other thread decodes its series meanwhile.
PREDICT_LOCK = threading.Lock()


def predict_in_batches(classifier: Classifier, inputs: np.ndarray, batch_size: int
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(N, C)`` calibrated probabilities and ``(N,)`` feature distances (``None`` without a domain file) of model
    inputs ``(N, H, W, C)``: :meth:`Classifier.classify_prepared` (``batch_size`` rows at a time) under
    :data:`PREDICT_LOCK`.

    No padding to fixed batch shapes on TensorFlow: after :meth:`Classifier.warm_up` Keras runs every batch size on
    one shape-relaxed graph without tracing again (measured: a first call at 24, 17, 9 or 5 images costs what the
    next one does), and padding 24 slices to 32 cost 28% more model time, 17 to 32 twice as much.
    """
    with PREDICT_LOCK:
        return classifier.classify_prepared(inputs, batch_size)


def series_classification(prepared: PreparedSeries, probabilities: np.ndarray, distances: np.ndarray | None,
                          classifier: Classifier) -> SeriesClassification:
    """The series result (:func:`models.series.decide`) from its frames' regions, probabilities and distances."""
    return decide(prepared.keys, prepared.regions, probabilities, distances, classifier.task,
                  classifier.card.calibration, prepared.type_caveats, prepared.finding_caveats)


def prepare_for(classifier: Classifier, paths: Sequence[Path]) -> PreparedSeries:
    """:func:`worker.decoding.prepare_series` for ``classifier``'s task and input, in this thread."""
    return prepare_series(paths, classifier.task.name, classifier.card.input_spec)


def classify_series_files(paths: Sequence[Path], classifier: Classifier, batch_size: int) -> SeriesClassification:
    """Read a series' instances from ``paths``, classify every frame and decide the series.

    Raises ``dicom_io.imaging.ImagingError`` (or pydicom's errors) for instances that cannot be decoded.
    """
    prepared = prepare_for(classifier, paths)
    probabilities, distances = predict_in_batches(classifier, prepared.inputs, batch_size)
    return series_classification(prepared, probabilities, distances, classifier)


@dataclass
class _Pending:
    """A series in a :class:`SeriesBatcher`: its prepared frames, and the probabilities and feature distances (NaN:
    not yet known, or no domain file) predicted so far."""

    prepared: PreparedSeries
    probabilities: np.ndarray
    distances: np.ndarray


class SeriesBatcher(Generic[K]):
    """Classifies several series with model batches filled across them.

    :meth:`add` a prepared series: every full batch of ``batch_size`` frames waiting (from this and earlier
    series) is predicted at once, and the series whose frames are then all predicted are returned with their
    results. So series of 24 slices fill batches of 32 instead of each making a short one, and a series' result
    comes as soon as its last frame is predicted. :meth:`flush` predicts the rest.
    """

    def __init__(self, classifier: Classifier, batch_size: int) -> None:
        self.classifier = classifier
        self.batch_size = batch_size
        self._series: dict[K, _Pending] = {}
        self._left: dict[K, int] = {}
        #: Frames not yet predicted, in arrival order: (series key, index in that series).
        self._waiting: list[tuple[K, int]] = []

    def add(self, key: K, prepared: PreparedSeries) -> list[tuple[K, SeriesClassification]]:
        if key in self._series:
            raise ValueError(f"series {key!r} was added twice")
        if not len(prepared):
            raise ValueError("the series has no frames")
        classes = len(self.classifier.class_names)
        count = len(prepared)
        self._series[key] = _Pending(prepared, np.zeros((count, classes), dtype=np.float32), np.full(count, np.nan))
        self._left[key] = count
        self._waiting += [(key, index) for index in range(count)]
        full = len(self._waiting) // self.batch_size * self.batch_size
        return self._predict(full) if full else []

    def flush(self) -> list[tuple[K, SeriesClassification]]:
        return self._predict(len(self._waiting))

    def _predict(self, count: int) -> list[tuple[K, SeriesClassification]]:
        todo, self._waiting = self._waiting[:count], self._waiting[count:]
        if not todo:
            return []
        inputs = np.stack([self._series[key].prepared.inputs[index] for key, index in todo])
        started = time.perf_counter()
        probabilities, distances = predict_in_batches(self.classifier, inputs, self.batch_size)
        task = self.classifier.task.name
        INFERENCE_BATCH.labels(task).observe(time.perf_counter() - started)
        INFERENCE_IMAGES.labels(task).inc(len(inputs))
        done = []
        for position, ((key, index), row) in enumerate(zip(todo, probabilities)):
            pending = self._series[key]
            pending.probabilities[index] = row
            if distances is not None:
                pending.distances[index] = distances[position]
            self._left[key] -= 1
            if self._left[key] == 0:
                del self._series[key], self._left[key]
                known = None if np.isnan(pending.distances).any() else pending.distances
                done.append((key, series_classification(pending.prepared, pending.probabilities, known,
                                                        self.classifier)))
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

    def loaded_models(self) -> dict[str, str]:
        """Each task's loaded model UID (the worker's readiness check and status)."""
        with self._lock:
            return {task: classifier.card.uid for task, (_, classifier) in self._loaded.items()}

    def warm_up(self, batch_size: int) -> None:
        """Trace every loaded model for ``batch_size`` now, and each model loaded later as it is loaded, so no
        series waits for a compilation (a worker calls this before it takes jobs)."""
        with self._lock:
            self.warm_batch_size = batch_size
            classifiers = [classifier for _, classifier in self._loaded.values()]
        for classifier in classifiers:
            with PREDICT_LOCK:
                classifier.warm_up(batch_size)
