"""Series -> model inputs, in a pool of decoding processes that runs ahead of the model.

:func:`prepare_series` is the one path from a series' archive files to what the model reads: decode the frames
(:func:`decode_series`, :mod:`dicom_io.imaging`, compressed transfer syntaxes included; a sagittal or coronal
volume cut into axial slices for a task that reads them so, :mod:`dicom_io.reformat`), find each frame's region
and cut it out (:func:`models.series.model_inputs`), resize to the model's input (:func:`models.preprocessing.
prepare_batch`). :class:`DecodePool` only runs it, in ``processes`` separate processes: one Python process
decodes and windows a 512 x 512 CT slice in 2-3 ms and finds its lungs in about 4 ms, while a GPU classifies 32
slices in a few milliseconds, so one decoding thread would leave the device idle most of the time.

:meth:`DecodePool.prepare_all` submits series ahead of the one being consumed, up to a cap of frames in flight
(memory stays bounded), and yields them in submission order: while the caller's model runs one batch, the pool
decodes the next series.

This module imports nothing of Celery, the database or the metrics, because each decoding process imports it
(spawned, not forked: the parent holds TensorFlow's or JAX's threads, which a fork would copy half-initialised).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from pydicom import Dataset, dcmread

from dicom_io.imaging import SeriesFrame, Window, frame_plane, series_frame_records
from dicom_io.mr import contrast_given, mr_weighting
from dicom_io.reformat import axial_reformat
from models.preprocessing import InputSpec, prepare_batch
from models.regions import CT_WINDOW_HU, Region
from models.series import model_inputs
from models.tasks import Task, get_task

__all__ = [
    "DecodePool",
    "MODEL_CT_WINDOW",
    "PreparedSeries",
    "decode_series",
    "default_decode_processes",
    "finding_caveats",
    "prepare_series",
    "series_inputs",
    "slice_key",
    "type_caveats",
]

K = TypeVar("K")

#: CT frames are displayed in the window the training images were made with (:data:`models.regions.CT_WINDOW_HU`).
MODEL_CT_WINDOW = Window(*CT_WINDOW_HU)


def decode_series(paths: Sequence[Path], task: Task) -> list[SeriesFrame]:
    """A series' frames from its archive files, as display images in spatial order (CT in the models' window, never
    inverted), as ``task``'s model reads them: a qualifying sagittal or coronal volume as axial slices cut from it
    when the task says so (:attr:`models.tasks.Task.axial_reformat`).

    Raises ``dicom_io.imaging.ImagingError`` (or pydicom's errors) for instances that cannot be decoded, and
    ``ValueError`` for a series without frames.
    """
    return _frames([dcmread(path) for path in paths], task)


def _frames(datasets: Sequence[Dataset], task: Task) -> list[SeriesFrame]:
    frames = axial_reformat(datasets) if task.axial_reformat else None
    if frames is None:
        # The models read CT as Hounsfield units in their window, air dark, whatever display MONOCHROME1 asks for.
        frames = series_frame_records(datasets, ct_window=MODEL_CT_WINDOW, invert_monochrome1_ct=False)
    if not frames:
        raise ValueError("the series has no frames")
    return frames


def type_caveats(datasets: Sequence[Dataset], task: Task) -> dict[str, str]:
    """Finding class -> why ``task``'s model cannot give that type on this series (empty: it can give every type):
    every finding class, when the header (of the first instance) shows a weighting other than the one the finding
    classes were learned from (:func:`dicom_io.mr.mr_weighting`, :attr:`models.tasks.Task.typed_on`)."""
    if task.untyped_finding is None or not datasets:
        return {}
    weighting = mr_weighting(datasets[0])
    if weighting is None:
        return {}
    reason = f"a {weighting.describe()} series, and the model learned the types from {task.typed_on} only"
    return dict.fromkeys(task.finding_classes, reason)


def finding_caveats(datasets: Sequence[Dataset], frames: Sequence[SeriesFrame], task: Task) -> dict[str, str]:
    """Finding class -> why ``task``'s model cannot tell a finding of that class from normal anatomy on this series
    (empty: it can tell every class): the task's :attr:`~models.tasks.Task.contrast_confounded` classes, when the
    series is of the weighting the types were learned from (no other weighting in its header), read as axial
    slices (acquired so, or cut so: ``frames``), and a contrast agent was given (:func:`dicom_io.mr.contrast_given`).
    """
    if not (task.contrast_confounded and datasets and frames) or mr_weighting(datasets[0]) is not None:
        return {}
    axial = frames[0].reformatted or frame_plane(datasets[0]) == "axial"
    if not (axial and contrast_given(datasets[0])):
        return {}
    return {name: (f"an axial post-contrast series: the model's axial {name} images are post-contrast slices, and "
                   f"it calls normally enhancing anatomy {name} (on two real glioblastoma series, slices without a "
                   f"{name} tumour), so it cannot tell a {name} finding here")
            for name in task.contrast_confounded}


def series_inputs(frames: Sequence[SeriesFrame], task: Task) -> tuple[list[Region], list[np.ndarray]]:
    """Each frame's region and model input (:func:`models.series.model_inputs`; a frame's defect makes it
    unsuitable): what the worker classifies and what ``dataset export`` writes for training."""
    return model_inputs([frame.image for frame in frames], task, [frame.defect for frame in frames],
                        [frame.pixel_spacing for frame in frames])


@dataclass(frozen=True)
class PreparedSeries:
    """A series ready for the model: each frame's identity and region, and the model inputs ``(N, H, W, C)``."""

    #: Per frame, in spatial order (the result's slice keys): ``{"sop_instance_uid", "frame"}`` for an acquired frame,
    #: ``{"reformat": "axial", "slice", "position"}`` for an axial slice cut from the volume (:func:`slice_key`).
    keys: list[dict[str, Any]]
    regions: list[Region]
    inputs: np.ndarray
    #: Finding class -> why the model cannot give that type on this series (:func:`type_caveats`).
    type_caveats: dict[str, str] = field(default_factory=dict)
    #: Finding class -> why the model cannot tell that finding on this series (:func:`finding_caveats`).
    finding_caveats: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def prepare_series(paths: Sequence[Path], task_name: str, spec: InputSpec) -> PreparedSeries:
    """Decode a series and make its model inputs (see the module docstring); raises what :func:`decode_series`
    raises."""
    task = get_task(task_name)
    datasets = [dcmread(path) for path in paths]
    frames = _frames(datasets, task)
    regions, crops = series_inputs(frames, task)
    return PreparedSeries([slice_key(frame) for frame in frames], regions, prepare_batch(crops, spec),
                          type_caveats(datasets, task), finding_caveats(datasets, frames, task))


def slice_key(frame: SeriesFrame) -> dict[str, Any]:
    """What identifies ``frame`` in a result: its instance and frame number, or, cut from the volume, the axial
    slice's number and z position (mm)."""
    if frame.reformatted:
        return {"reformat": "axial", "slice": frame.frame_number, "position": frame.position}
    return {"sop_instance_uid": frame.sop_instance_uid, "frame": frame.frame_number}


#: Below this many cores the worker decodes in its own threads (0 processes): with two cores its two threads
#: already decode one series while the other's batch is predicted, and a pool would only add the copying of every
#: model input between processes (bench/pipeline.py, same session: see docs/results.md).
MIN_CORES_FOR_POOL = 4


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_decode_processes(cores: int | None = None) -> int:
    """Decoding processes when the settings name none: every core but one (the model call and the worker's own
    threads need it), or 0 below :data:`MIN_CORES_FOR_POOL` cores."""
    cores = available_cores() if cores is None else cores
    return cores - 1 if cores >= MIN_CORES_FOR_POOL else 0


class DecodePool(Generic[K]):
    """Runs :func:`prepare_series` on ``processes`` processes (0: in the calling thread), ahead of the consumer.

    The processes start on first use and stay for the pool's life (a spawn costs about a second: imports);
    :meth:`close` ends them. Safe to use from several threads at once (each call keeps its own cap).
    """

    def __init__(self, processes: int, max_frames_in_flight: int) -> None:
        if processes < 0:
            raise ValueError(f"decode processes must be 0 or more, not {processes}")
        if max_frames_in_flight < 1:
            raise ValueError(f"frames in flight must be at least 1, not {max_frames_in_flight}")
        self.processes = processes
        self.max_frames_in_flight = max_frames_in_flight
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        return self._executor

    def start(self) -> None:
        """Start the processes now (and let them import), rather than with the first series."""
        if self.processes:
            for future in [self._pool().submit(_ready) for _ in range(self.processes)]:
                future.result()

    def prepare_all(self, series: Iterable[tuple[K, Sequence[Path], int]], task_name: str, spec: InputSpec
                    ) -> Iterator[tuple[K, PreparedSeries | BaseException]]:
        """``(key, paths, frames)`` per series -> ``(key, prepared series or the error that stopped it)``, in the
        order given. Series are decoded ahead while fewer than ``max_frames_in_flight`` frames (``frames``: the
        series' frame count as the database knows it, at least 1) are submitted and not yet yielded; one series
        is always let through, however large. A series' error never stops the others."""
        if not self.processes:
            for key, paths, _ in series:
                try:
                    yield key, prepare_series(paths, task_name, spec)
                except Exception as exc:
                    yield key, exc
            return
        pool = self._pool()
        pending: deque[tuple[K, int, Future[PreparedSeries]]] = deque()
        in_flight = 0
        for key, paths, frames in series:
            frames = max(1, frames)
            while pending and in_flight + frames > self.max_frames_in_flight:
                done_key, done_frames, future = pending.popleft()
                in_flight -= done_frames
                yield done_key, self._check(_outcome(future))
            pending.append((key, frames, pool.submit(prepare_series, list(paths), task_name, spec)))
            in_flight += frames
        while pending:
            done_key, _, future = pending.popleft()
            yield done_key, self._check(_outcome(future))

    def _check(self, outcome: PreparedSeries | BaseException) -> PreparedSeries | BaseException:
        if isinstance(outcome, BrokenProcessPool) and self._executor is not None:
            # A decoding process died (killed, out of memory): this pool takes no more work; the next call starts
            # a fresh one instead of failing every later series.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        return outcome

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _ready() -> bool:
    return True


def _outcome(future: Future[PreparedSeries]) -> PreparedSeries | BaseException:
    try:
        return future.result()
    except Exception as exc:  # the series' own error, or the pool broken (a decoding process killed)
        return exc
