"""Multi-planar reformatting: a volume acquired sagittally or coronally, cut into axial slices.

A 3D MR volume (an MPRAGE, a 3D GRE) is often acquired sagittally, and any of its planes can be cut from it. The
brain classifier's no-tumour training images are almost all axial, its tumour images mostly coronal or sagittal, so
it reads the plane as well as the brain: the same healthy volume cut three ways (``bench/plane_reformat.py``) was
called a tumour in 2 of 7 volumes when cut coronally or sagittally, in none when cut axially. :func:`axial_reformat`
gives such a series as axial display images, one per row of voxels from foot to head.

A series qualifies when its frames are greyscale MR frames of one size and orientation whose normal lies nearest the
patient's left-right or front-back axis, evenly spaced, with voxels at most :data:`MAX_ANISOTROPY` times longer one
way than another (a 2D series of thick slices has no usable reformat) and spanning at least
:data:`MIN_EXTENT_MM` across its slices (a head, not a slab). The cut follows the volume's own axes nearest the
patient's (no oblique resampling: a volume tilted by 10 degrees gives axial slices tilted as much, as a tilted axial
acquisition would), and each slice is resampled to square pixels (linear interpolation) before its own percentile
window (:func:`dicom_io.imaging.percentile_grey`), as an acquired MR frame gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from scipy import ndimage

from dicom_io.imaging import (
    MR_PERCENTILES,
    SeriesFrame,
    frame_plane,
    frame_planes,
    modality_frames,
    normal_axis,
    percentile_grey,
)

__all__ = ["MAX_ANISOTROPY", "MIN_EXTENT_MM", "MIN_SLICE_STEP_MM", "axial_reformat"]

#: Largest ratio of a voxel's longest to its shortest side that is reformatted. 3D volumes are often twice as fine
#: in plane as across (0.45 x 0.45 x 0.9 mm); 2D series of thick slices are 3-5 times coarser across.
MAX_ANISOTROPY = 2.5

#: Least extent across the slices, in mm: the width of a head (about 140 mm), less a margin, so that an axial slice
#: cut from the volume shows the whole head and not a slab of it.
MIN_EXTENT_MM = 120.0

#: Axial slices are cut about this far apart (the nearest whole number of voxel rows, at least one): a 3D volume
#: is often 0.5 mm fine along the head, and slices half a millimetre apart are near copies that only multiply the
#: work (every row of a 512-row volume took 11 s to prepare, against 3 s for its 160 slices as acquired).
MIN_SLICE_STEP_MM = 1.0

#: Relative spread of the slice steps tolerated as "evenly spaced" (scanners round positions to 0.01-0.1 mm).
_STEP_TOLERANCE = 0.01

_FOOT_HEAD = 2  # the patient z axis (DICOM LPS: x right to left, y front to back, z foot to head)


def axial_reformat(datasets: Sequence[Dataset], percentiles: tuple[float, float] = MR_PERCENTILES
                   ) -> list[SeriesFrame] | None:
    """The series' volume cut into axial slices from foot to head, as display images (:class:`SeriesFrame` with
    ``reformatted`` set, ``frame_number`` the axial slice number from 1 and ``position`` its z in mm), or ``None``
    when the series does not qualify (see the module docstring; an axial series never does). One slice is cut every
    :data:`MIN_SLICE_STEP_MM` (the nearest whole number of voxel rows, at least one).

    Raises what :func:`dicom_io.imaging.modality_frames` raises for frames that cannot be decoded."""
    if not datasets or any(str(ds.get("Modality", "")).strip().upper() != "MR" for ds in datasets):
        return None
    if any(str(ds.get("PhotometricInterpretation", "")).strip().upper() != "MONOCHROME2" for ds in datasets):
        return None
    if frame_plane(datasets[0]) == "axial":  # refused either way: axial, or frames of several orientations
        return None  # the usual brain series: no need to read every frame's geometry to refuse it
    frames = _frames(datasets)
    if frames is None:
        return None
    positions, orientation, pixel_spacing, sources = frames
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    if normal_axis(orientation) == _FOOT_HEAD or len(sources) < 2:
        return None
    along = np.array([float(np.dot(normal, position)) for position in positions])
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    step = float(np.median(steps))
    if step <= 0 or float(np.ptp(steps)) > _STEP_TOLERANCE * step + 1e-3:
        return None
    spacing = (step, pixel_spacing[0], pixel_spacing[1])  # across slices, down the columns, along the rows
    if max(spacing) > MAX_ANISOTROPY * min(spacing) or step * len(sources) < MIN_EXTENT_MM:
        return None
    directions = np.stack([normal, column, row])
    # Which volume axis runs along patient z, y and x (an axial image's slices, rows and columns).
    axes = [int(np.argmax(np.abs(directions[:, patient]))) for patient in (2, 1, 0)]
    if len(set(axes)) != 3:
        return None  # oblique near 45 degrees: no volume axis is nearest a patient axis of its own
    volume = _stack(datasets, sources, order)
    volume = np.transpose(volume, axes)
    for index, (source, patient) in enumerate(zip(axes, (2, 1, 0))):
        if directions[source, patient] < 0:
            volume = np.flip(volume, axis=index)
    # z of each axial slice: where the volume's first voxel lies, plus the steps along the axis that runs along z.
    first = positions[int(order[0])]
    z_axis = axes[0]
    count = volume.shape[0]
    along_z = np.arange(count) * spacing[z_axis] * abs(directions[z_axis, _FOOT_HEAD])
    z_values = (first[_FOOT_HEAD] + along_z if directions[z_axis, _FOOT_HEAD] >= 0
                else first[_FOOT_HEAD] - along_z[::-1])
    every = max(1, round(MIN_SLICE_STEP_MM / spacing[z_axis]))
    rows_mm, columns_mm = spacing[axes[1]], spacing[axes[2]]
    pixel = min(rows_mm, columns_mm)
    zoom = (rows_mm / pixel, columns_mm / pixel)
    result = []
    for number, index in enumerate(range(0, count, every), start=1):
        image = volume[index]
        if zoom != (1.0, 1.0):
            image = ndimage.zoom(image, zoom, order=1)
        result.append(SeriesFrame("", number, round(float(z_values[index]), 3),
                                  percentile_grey(image, percentiles), reformatted=True,
                                  pixel_spacing=(pixel, pixel)))
    return result


def _frames(datasets: Sequence[Dataset]
            ) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float], list[tuple[int, int]]] | None:
    """Every frame's position, the one orientation and pixel spacing, and ``(dataset, frame)`` per frame; ``None``
    when a frame lacks its geometry or frames differ in orientation, spacing or size."""
    positions: list[np.ndarray] = []
    sources: list[tuple[int, int]] = []
    orientation: np.ndarray | None = None
    pixel_spacing: tuple[float, float] | None = None
    shape = None
    for number, ds in enumerate(datasets):
        count = int(ds.get("NumberOfFrames", 1) or 1)
        if shape is None:
            shape = (ds.get("Rows"), ds.get("Columns"))
        elif (ds.get("Rows"), ds.get("Columns")) != shape:
            return None
        planes = frame_planes(ds, count)
        if planes is None:
            return None
        for index, (ipp, iop, spacing) in enumerate(planes):
            if orientation is None:
                orientation, pixel_spacing = iop, spacing
            elif not np.allclose(iop, orientation, atol=1e-3) or not np.allclose(spacing, pixel_spacing, rtol=1e-3):
                return None
            positions.append(ipp)
            sources.append((number, index))
    if orientation is None or pixel_spacing is None:
        return None
    return positions, orientation, pixel_spacing, sources


def _stack(datasets: Sequence[Dataset], sources: list[tuple[int, int]], order: np.ndarray) -> np.ndarray:
    """The frames' modality values as a float32 volume ``(slices, rows, columns)``, slices in ``order``."""
    values: dict[int, list[np.ndarray]] = {}
    for number in sorted({number for number, _ in sources}):
        values[number] = [frame.astype(np.float32) for frame in modality_frames(datasets[number])]
    return np.stack([values[sources[i][0]][sources[i][1]] for i in order])
