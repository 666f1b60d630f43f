"""DICOM pixel data to display images: what a radiologist's screen shows, as grey values 0..255.

The classifiers were trained on 8-bit display images (brain MRI JPEG exports, lung-window CT screenshots), so
inference must turn stored DICOM values into the same kind of image. The steps, per frame, follow the DICOM
grayscale pipeline (PS3.4 N.2):

1. Decode the pixel data (any transfer syntax pydicom decodes with pylibjpeg, openjpeg, pyjpegls or RLE).
2. Modality LUT: Rescale Slope/Intercept, the Enhanced objects' per-frame Pixel Value Transformation, or a
   Modality LUT Sequence. For CT this gives Hounsfield units.
3. VOI (windowing):

   * CT: a fixed lung window, W 1500 / L -600 by default (:data:`LUNG_WINDOW`). The COVID classifier looks at
     lung parenchyma (ground-glass opacities, consolidation), its training images are lung-window screenshots, and
     HU are absolute, so one fixed window maps every scanner's CT alike. The window in the header is ignored on
     purpose: it is often a soft-tissue or bone window that would hide the lungs.
   * Everything else (MR above all): MR intensities have no absolute scale, so the window is taken from the frame
     itself: from its minimum (percentile 0; MR magnitude background is black) to its 99.99th percentile
     (:data:`MR_PERCENTILES`). Why not 0.5/99.5: the training JPEGs are min-max exports (their brightest pixel
     is 255 or close), and on 400 of them a 99.5 percentile stretched the image by 30 % in the median
     (mean absolute error 13 grey levels after a 12-bit round trip) against 3 for the 99.99th, which still
     ignores the brightest 0.01 % of pixels (5 pixels of a 224x224 frame, 26 of 512x512): isolated hot pixels
     and spikes no longer darken the whole image. Scanner-set header windows are ignored for the same reason as
     for CT: they differ between vendors, the training exports did not use them.

4. MONOCHROME1 is inverted (its smallest value is white); its percentile window is mirrored, so that the same
   brightest 0.01 % of the picture is clipped as in MONOCHROME2. Colour images (RGB, YBR, palette) are already rendered
   for display: they are scaled to 0..255 and turned grey with the ITU-R BT.601 luma weights, with no window.

Multi-frame and Enhanced MR/CT objects give one image per frame. :func:`series_frames` orders the frames of a whole
series in space.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.pixels.processing import apply_modality_lut

__all__ = [
    "ImagingError",
    "Window",
    "LUNG_WINDOW",
    "MR_PERCENTILES",
    "MAX_FRAME_PIXELS",
    "display_frames",
    "frame_geometry",
    "frame_pixel_spacing",
    "frame_plane",
    "frame_planes",
    "normal_axis",
    "functional_group_item",
    "modality_frames",
    "percentile_grey",
    "SeriesFrame",
    "series_frame_records",
    "series_frames",
    "modality_defect",
]


class ImagingError(ValueError):
    """A dataset's pixel data cannot be turned into display images; the message says why."""


@dataclass(frozen=True)
class Window:
    """A DICOM VOI window (PS3.3 C.11.2.1.2): centre and width in modality units (HU for CT)."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width >= 1:
            raise ValueError(f"window width must be >= 1, got {self.width}")


#: The CT lung window (see the module docstring for why it is fixed).
LUNG_WINDOW = Window(center=-600.0, width=1500.0)

#: Lower and upper percentile of a frame's values that span the MR (and other non-CT grey) window.
MR_PERCENTILES: tuple[float, float] = (0.0, 99.99)

#: A frame with more pixels than this (8192 x 8192) is refused before decoding: no MR or CT frame is that large,
#: and a forged header (65535 x 65535 over a few bytes) must not make the decoder allocate gigabytes.
MAX_FRAME_PIXELS = 8192 * 8192

#: Above this range of stored values percentiles use a partial sort instead of a histogram.
_MAX_HISTOGRAM_BINS = 1 << 20

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def display_frames(
    ds: Dataset,
    *,
    ct_window: Window = LUNG_WINDOW,
    percentiles: tuple[float, float] = MR_PERCENTILES,
    invert_monochrome1_ct: bool = True,
) -> list[np.ndarray]:
    """Return one 2-D float32 display image (grey values 0..255) per frame of ``ds``.

    ``ct_window`` is the VOI window for CT (Hounsfield units); ``percentiles`` the (low, high) percentiles of each
    frame's modality values that span the window of every other greyscale image. ``invert_monochrome1_ct=False``
    windows a MONOCHROME1 CT from its Hounsfield units like any other (air dark), where the display DICOM asks for
    inverts it: what a classifier trained on ordinary lung-window images needs. Raises :class:`ImagingError`
    for a dataset without decodable pixel data.
    """
    lo_pct, hi_pct = percentiles
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    _check_image_attributes(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    is_ct = str(ds.get("Modality", "")).strip().upper() == "CT"
    images = []
    inverted = photometric == "MONOCHROME1" and (invert_monochrome1_ct or not is_ct)
    # The percentiles refer to the displayed picture: in MONOCHROME1 its bright end is the low values.
    window = (100.0 - hi_pct, 100.0 - lo_pct) if inverted else (lo_pct, hi_pct)
    for index, stored in enumerate(_decoded_frames(ds)):
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            affine = _linear_modality(ds, index)
            table = _stored_value_range(stored, affine)
            if table is not None:
                # Each stored value occurring is mapped once and the pixels look their grey up: the same
                # arithmetic per value as per pixel below (identical output), for a few thousand values instead
                # of every pixel.
                low, values = table
                grey = _grey(values, stored, affine, low, is_ct, ct_window, window, inverted, index)
                image = grey.astype(np.float32)[stored.astype(np.intp) - low]
            else:
                values = _modality_values(stored, ds, affine)
                image = _grey(values, stored, affine, None, is_ct, ct_window, window, inverted, index)
        else:
            image = _colour_to_grey(stored, ds, photometric)
        images.append(image.astype(np.float32, copy=False))
    if not images:
        raise ImagingError("the pixel data holds no frames")
    return images


def modality_frames(ds: Dataset) -> list[np.ndarray]:
    """Every frame's modality values (float64; Hounsfield units for CT) of a greyscale image: step 2 of the module
    docstring, before any window. Raises :class:`ImagingError` for a colour image or one that cannot be decoded."""
    _check_image_attributes(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(f"photometric interpretation {photometric!r} has no modality values")
    frames = []
    for index, stored in enumerate(_decoded_frames(ds)):
        values = _modality_values(stored, ds, _linear_modality(ds, index))
        if not np.all(np.isfinite(values)):
            raise ImagingError(f"frame {index + 1} has non-finite pixel values")
        frames.append(values)
    return frames


def percentile_grey(values: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> np.ndarray:
    """Modality ``values`` of one image to grey 0..255 (float32) by its own percentile window: what
    :func:`display_frames` makes of a MONOCHROME2 MR frame with those values."""
    return _percentile_window(values, percentiles, values, None).astype(np.float32)


@dataclass(frozen=True)
class SeriesFrame:
    """One frame of a series: where it comes from, where it lies, and its display image."""

    sop_instance_uid: str
    #: 1-based frame number within its instance (1 for single-frame images).
    frame_number: int
    #: Distance along the slice normal in mm, or ``None`` when the geometry is missing.
    position: float | None
    image: np.ndarray
    #: Why the image cannot be trusted to show what the modality promises (a CT without Rescale Slope/Intercept:
    #: its Hounsfield units are unknown), or ``None``. The image is made all the same, for display.
    defect: str | None = None
    #: An axial slice cut from the series' volume (:func:`dicom_io.reformat.axial_reformat`), not an acquired frame:
    #: ``sop_instance_uid`` is empty and ``frame_number`` numbers the axial slices.
    reformatted: bool = False
    #: (row spacing, column spacing) of ``image`` in mm (:func:`frame_pixel_spacing`), or ``None`` when unknown.
    pixel_spacing: tuple[float, float] | None = None


def series_frame_records(
    datasets: Iterable[Dataset],
    *,
    ct_window: Window = LUNG_WINDOW,
    percentiles: tuple[float, float] = MR_PERCENTILES,
    invert_monochrome1_ct: bool = True,
) -> list[SeriesFrame]:
    """Return every frame of a series as :class:`SeriesFrame`, ordered in space (display options as
    :func:`display_frames`).

    Frames are sorted by Image Position (Patient) projected on the normal of Image Orientation (Patient) when every
    frame has both and all share one orientation; otherwise (or to break ties) by Instance Number, then frame
    number. Arrival order, which the network does not guarantee, never matters.
    """
    records: list[tuple[SeriesFrame, int, np.ndarray | None, np.ndarray | None]] = []
    for ds in datasets:
        images = display_frames(ds, ct_window=ct_window, percentiles=percentiles,
                                invert_monochrome1_ct=invert_monochrome1_ct)
        geometry = frame_geometry(ds, len(images))
        instance_number = _int_or_zero(ds.get("InstanceNumber"))
        defects = [modality_defect(ds, index) for index in range(len(images))]
        for number, (image, (ipp, iop), defect) in enumerate(zip(images, geometry, defects), start=1):
            frame = SeriesFrame(str(ds.get("SOPInstanceUID", "")), number, None, image, defect,
                                pixel_spacing=frame_pixel_spacing(ds, number - 1))
            records.append((frame, instance_number, ipp, iop))
    if not records:
        return []
    orientations = [iop for _, _, _, iop in records]
    spatial = all(ipp is not None for _, _, ipp, _ in records) and all(
        iop is not None and np.allclose(iop, orientations[0], atol=1e-3) for iop in orientations
    )
    if spatial:
        first = orientations[0]
        normal = np.cross(first[:3], first[3:])
        records = [
            (
                replace(f, position=float(np.dot(ipp, normal))),
                n,
                ipp,
                iop,
            )
            for f, n, ipp, iop in records
        ]
        records.sort(key=lambda r: (r[0].position, r[1], r[0].frame_number))
    else:
        records.sort(key=lambda r: (r[1], r[0].frame_number))
    return [frame for frame, _, _, _ in records]


def series_frames(
    datasets: Iterable[Dataset],
    *,
    ct_window: Window = LUNG_WINDOW,
    percentiles: tuple[float, float] = MR_PERCENTILES,
) -> list[np.ndarray]:
    """Return the display images of every frame of a series, ordered in space (see :func:`series_frame_records`)."""
    return [f.image for f in series_frame_records(datasets, ct_window=ct_window, percentiles=percentiles)]


def modality_defect(ds: Dataset, index: int = 0) -> str | None:
    """Why frame ``index`` of ``ds`` does not carry what its modality promises, or ``None``.

    CT: Rescale Slope and Intercept (or the Enhanced CT's Pixel Value Transformation) are Type 1: without them the
    stored values are no Hounsfield units (a scanner storing 0..4095 with intercept -1024 would show air at +24 HU),
    and :func:`display_frames` can only take them as they are.
    """
    if str(ds.get("Modality", "")).strip().upper() != "CT" or "ModalityLUTSequence" in ds:
        return None
    source = functional_group_item(ds, index, "PixelValueTransformationSequence") or ds
    if source.get("RescaleSlope") in (None, "") or source.get("RescaleIntercept") in (None, ""):
        return "CT without Rescale Slope/Intercept: its Hounsfield units are unknown"
    return None


def _check_image_attributes(ds: Dataset) -> None:
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImagingError("the dataset has no Pixel Data")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if ds.get(k) in (None, "")]
    if missing:
        raise ImagingError(f"the dataset lacks {', '.join(missing)}")
    samples = _int_or_zero(ds.get("SamplesPerPixel", 1)) or 1
    pixels = int(ds.Rows) * int(ds.Columns) * samples
    if pixels == 0:
        raise ImagingError(f"the image is empty ({ds.Rows} x {ds.Columns})")
    if pixels > MAX_FRAME_PIXELS:
        raise ImagingError(
            f"a frame of {ds.Rows} x {ds.Columns} x {samples} samples exceeds the limit of {MAX_FRAME_PIXELS} values"
        )


def _decoded_frames(ds: Dataset) -> Iterator[np.ndarray]:
    """Yield the decoded frames one at a time, turning every decoder failure into an :class:`ImagingError`."""
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        raise ImagingError("the dataset has no Transfer Syntax UID (file meta information), so it cannot be decoded")
    syntax = ds.file_meta.TransferSyntaxUID
    frames = iter_pixels(ds)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as exc:  # pydicom and the codec plugins raise many types for corrupt data
            raise ImagingError(f"pixel data in {syntax.name} cannot be decoded: {exc}") from exc
        yield frame


def functional_group_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for frame ``index`` (per-frame group first, then shared), if any."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and position < len(items):
            inner = items[position].get(sequence)
            if inner:
                return inner[0]
    return None


def _linear_modality(ds: Dataset, index: int) -> tuple[float, float] | None:
    """Frame ``index``'s modality LUT (PS3.3 C.11.1 / C.7.6.16.2.9) as (slope, intercept), or ``None`` when it is a
    Modality LUT Sequence. No rescale attributes: the identity."""
    transform = functional_group_item(ds, index, "PixelValueTransformationSequence")
    if transform is None and "ModalityLUTSequence" in ds:
        return None
    source = transform if transform is not None else ds
    slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        return (1.0, 0.0)
    return float(slope), float(intercept)


def _modality_values(stored: np.ndarray, ds: Dataset, affine: tuple[float, float] | None) -> np.ndarray:
    """The modality values of ``stored`` (HU for CT): by ``affine`` (slope, intercept), else the LUT sequence."""
    if affine is None:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    slope, intercept = affine
    if (slope, intercept) == (1.0, 0.0):
        return stored.astype(np.float64)
    return stored.astype(np.float64) * slope + intercept


def _small_integer_range(stored: np.ndarray, affine: tuple[float, float] | None) -> tuple[int, int] | None:
    """``(smallest, largest)`` stored value when a frame can be handled per stored value rather than per pixel:
    integers of a range of at most ``_MAX_HISTOGRAM_BINS`` under a linear modality LUT; ``None`` otherwise."""
    if affine is None or affine[0] == 0.0 or stored.dtype.kind not in "iu" or stored.size == 0:
        return None
    low, high = int(stored.min()), int(stored.max())
    return (low, high) if high - low <= _MAX_HISTOGRAM_BINS else None


def _stored_value_range(stored: np.ndarray, affine: tuple[float, float] | None) -> tuple[int, np.ndarray] | None:
    """For a :func:`_small_integer_range` frame: the smallest stored value and the modality value of every stored
    value from it to the largest; ``None`` otherwise."""
    bounds = _small_integer_range(stored, affine)
    if bounds is None or affine is None:
        return None
    low, high = bounds
    slope, intercept = affine
    return low, np.arange(low, high + 1, dtype=np.float64) * slope + intercept


def _grey(
    values: np.ndarray,
    stored: np.ndarray,
    affine: tuple[float, float] | None,
    low: int | None,
    is_ct: bool,
    ct_window: Window,
    percentiles: tuple[float, float],
    inverted: bool,
    index: int,
) -> np.ndarray:
    """Modality ``values`` to grey 0..255: the CT window, or the percentile window of the frame ``stored``.

    ``values`` are either every pixel's (``low`` is ``None``) or those of the stored values ``low``, ``low + 1``
    ... (a lookup table; the percentiles then come from the frame's histogram all the same)."""
    if not np.all(np.isfinite(values)):
        raise ImagingError(f"frame {index + 1} has non-finite pixel values")
    if is_ct:
        grey = _linear_window(values, ct_window)
    else:
        grey = _percentile_window(values, percentiles, stored, affine, low)
    return 255.0 - grey if inverted else grey


def _linear_window(values: np.ndarray, window: Window) -> np.ndarray:
    """The DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1) onto 0..255."""
    c, w = window.center, window.width
    return np.clip(((values - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0, 0.0, 255.0)


def _percentile_window(
    values: np.ndarray,
    percentiles: tuple[float, float],
    stored: np.ndarray,
    affine: tuple[float, float] | None,
    low: int | None = None,
) -> np.ndarray:
    """Window ``values`` from the frame's ``percentiles`` onto 0..255. ``low`` given: ``values`` is the table of the
    stored values from ``low`` up (see :func:`_grey`); its ends are the frame's smallest and largest values."""
    lo, hi = _percentiles(values if low is None else None, percentiles, stored, affine)
    if hi <= lo:  # (nearly) constant between the percentiles: fall back to the frame's full range
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # a uniform frame has no contrast to show
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def _percentiles(
    values: np.ndarray | None, percentiles: Sequence[float], stored: np.ndarray, affine: tuple[float, float] | None
) -> list[float]:
    """``np.percentile(values, percentiles)`` (linear interpolation) of the frame's modality values, computed cheaply.

    Stored values are integers of a small range and the modality LUT is usually linear, so the order statistics
    come from one histogram of the stored values (a 512 x 512 frame: about 1.5 ms against 20 for
    ``np.percentile``); otherwise from a partial sort of ``values`` (every pixel's; only ``None`` when the
    histogram applies).
    """
    size = stored.size
    positions = [pct / 100.0 * (size - 1) for pct in percentiles]
    bounds = _small_integer_range(stored, affine) if values is None or values.size == size else None
    if bounds is not None and affine is not None:
        slope, intercept = affine
        low = bounds[0]
        cumulative = np.cumsum(np.bincount((stored.astype(np.int64) - low).ravel()))
        result = []
        for position in positions:
            if slope < 0:  # a negative slope reverses the order of the values
                position = size - 1 - position
            below = math.floor(position)
            a, b = np.searchsorted(cumulative, [below, min(below + 1, size - 1)], side="right") + low
            result.append(float((a + (b - a) * (position - below)) * slope + intercept))
        return result
    if values is None:
        raise ValueError("the frame's values are needed when its histogram cannot give the percentiles")
    flat = values.ravel()
    size = flat.size
    positions = [pct / 100.0 * (size - 1) for pct in percentiles]
    kth = sorted({min(k, size - 1) for position in positions for k in (math.floor(position), math.floor(position) + 1)})
    part = np.partition(flat, kth)
    result = []
    for position in positions:
        below = math.floor(position)
        above = min(below + 1, size - 1)
        result.append(float(part[below] + (part[above] - part[below]) * (position - below)))
    return result


def _colour_to_grey(stored: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except Exception as exc:
            raise ImagingError(f"the palette colour lookup table cannot be applied: {exc}") from exc
        full_scale = float(np.iinfo(rgb.dtype).max)
    elif stored.ndim == 3 and stored.shape[-1] == 3:
        rgb = stored  # pydicom has already converted YBR to RGB
        full_scale = float(2 ** int(ds.get("BitsStored", ds.BitsAllocated)) - 1)
    else:
        raise ImagingError(f"photometric interpretation {photometric!r} is not supported")
    return np.clip(rgb.astype(np.float32) @ _LUMA * (255.0 / full_scale), 0.0, 255.0)


def frame_geometry(ds: Dataset, frames: int) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """Image Position and Orientation (Patient) per frame (``None`` where missing or malformed), from the functional
    groups or the image plane module."""
    result = []
    for index in range(frames):
        position = functional_group_item(ds, index, "PlanePositionSequence")
        orientation = functional_group_item(ds, index, "PlaneOrientationSequence")
        ipp = _vector((position or ds).get("ImagePositionPatient"), 3)
        iop = _vector((orientation or ds).get("ImageOrientationPatient"), 6)
        result.append((ipp, iop))
    return result


#: The anatomical planes by the patient axis (DICOM LPS: x right to left, y front to back, z foot to head) their
#: normal runs along.
PLANES = ("sagittal", "coronal", "axial")


def normal_axis(orientation: np.ndarray) -> int:
    """The patient axis (0 x, 1 y, 2 z) that the normal of slices of this Image Orientation (Patient) runs nearest."""
    return int(np.argmax(np.abs(np.cross(orientation[:3], orientation[3:]))))


def frame_plane(ds: Dataset, index: int = 0) -> str | None:
    """The plane of frame ``index`` (:data:`PLANES`, by :func:`normal_axis`), or ``None`` without Image Orientation
    (Patient)."""
    orientation = frame_geometry(ds, index + 1)[index][1]
    return None if orientation is None else PLANES[normal_axis(orientation)]


def frame_planes(ds: Dataset, frames: int) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float]]] | None:
    """``(position, orientation, pixel spacing)`` of each of the ``frames`` frames (:func:`frame_geometry`,
    :func:`frame_pixel_spacing`), or ``None`` when a frame lacks one of them."""
    planes = []
    for index, (position, orientation) in enumerate(frame_geometry(ds, frames)):
        spacing = frame_pixel_spacing(ds, index)
        if position is None or orientation is None or spacing is None:
            return None
        planes.append((position, orientation, spacing))
    return planes


def frame_pixel_spacing(ds: Dataset, index: int = 0) -> tuple[float, float] | None:
    """Frame ``index``'s Pixel Spacing (row spacing, column spacing) in mm, or ``None`` when missing or not
    positive."""
    measures = functional_group_item(ds, index, "PixelMeasuresSequence")
    spacing = _vector((measures or ds).get("PixelSpacing"), 2)
    if spacing is None or not np.all(spacing > 0):
        return None
    return float(spacing[0]), float(spacing[1])


def _vector(value: Sequence[float] | None, length: int) -> np.ndarray | None:
    try:
        vector = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return vector if vector is not None and vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def _int_or_zero(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0
