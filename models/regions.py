"""Where the anatomy is in a display image, and whether a slice shows what a model was trained on.

The training images are tight crops: the COVID CT PNGs are cropped to the lungs (median margins 3-5% of the width
left and right, 6% top and bottom, measured on 300 of them), the brain MR JPEGs to the head. A scanner frame is the
whole field of view: the body small in the middle, air, the table. Each function here finds the region a model
reads in one display image (grey 0..255, as :func:`dicom_io.imaging.display_frames` makes it) and says whether the
slice is suitable at all; :func:`crop` cuts it out with the training images' margins. On a training image, already
a crop, the CT region is the whole image (3 of 400 COVID PNGs are found unsuitable, with 4-10% lung) and the MR
region the training margins' own box; on a scanner frame the region brings it to the training images' framing.

CT works on the lung window's grey levels (:data:`CT_WINDOW_HU`, the window the display images are made with):
a grey level is a Hounsfield value there, so thresholds are stated in HU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from scipy import ndimage

__all__ = [
    "CT_WINDOW_HU",
    "MIN_CHEST_WIDTH_MM",
    "Region",
    "RegionFinder",
    "chest_region",
    "head_region",
    "crop",
    "region_finder",
]

#: (centre, width) in HU of the window that makes CT display images look like the training PNGs: the linear map that
#: takes the modes of lung parenchyma (-865 HU) and soft tissue (42 HU) in real chest CT onto the modes of the same
#: tissues in 300 non-COVID training PNGs (grey 83 and 231); ``bench/real_dicom.py --window`` measures it
#: (W 1563 / L -592), rounded. Close to the textbook lung window (W 1500 / L -600), which the PNGs' exporters
#: likely used.
CT_WINDOW_HU: tuple[float, float] = (-590.0, 1560.0)

#: Body: above this HU (air is -1000, fat -100). The lungs: below this HU inside the body. -400 keeps most
#: ground-glass (-700 to -300 HU); consolidated lung, denser, is recovered by mirroring the lung box (below).
BODY_HU, LUNG_HU = -500.0, -400.0
#: A CT slice is read when its lungs cover at least this share of the body's cross-section (mid-chest slices of real
#: CT: 30-50%, apex and base 10-25%; abdomen slices, bowel gas counted: 0-6% in 40 of them).
MIN_LUNG_FRACTION = 0.10
#: The least width, in mm, of the box a CT slice is read in (the lungs with the training crops' margins): the crops
#: span both lungs of an adult's chest. Real axial chest CT (the development set and the extra collection, about
#: 1,270 slices read): 148 mm at least (an apex slice), 250-320 mm as a rule; only a sagittal reformat's lateral
#: slice measured less (56 mm; its series is indeterminate either way). pydicom's CT_small.dcm, 85 mm around the
#: spine with a lung edge on either side, was read as a whole chest and called COVID at 1.0. Without Pixel Spacing
#: the width is unknown and not checked.
MIN_CHEST_WIDTH_MM = 120.0
#: Masks are found on the image shrunk (block means) to at most this many pixels a side: a box and an area share
#: need no more, and on a 512 x 512 CT frame it cuts the time from 12.5 to about 4 ms.
MASK_SIDE = 256
#: The body must cover at least this share of the frame: less is air, a wrist, a stray object.
MIN_BODY_FRACTION = 0.02
#: Margins (left, right, top, bottom) around the region, as shares of the crop: the training images' medians (the
#: lung box in 300 COVID PNGs; the head box, found as :func:`head_region` finds it, in 400 brain JPEGs, whose heads
#: touch the bottom edge in half of them).
CT_MARGINS = (0.033, 0.047, 0.06, 0.059)
MR_MARGINS = (0.116, 0.116, 0.076, 0.009)
#: An MR slice is read when the head covers at least this share of the frame's area (a slice through the vertex or
#: the neck, below it, shows little brain; the training images' head covers 27% and more at their 1st percentile).
MIN_HEAD_FRACTION = 0.08
#: The least tissue level (grey, of 255) of an MR frame that shows a head: the lateral sagittal slices through the ear
#: of a 3D volume measured 1.5-2.3, real head slices 4.5 and up, the training images 7 and up (1st percentile).
MIN_TISSUE_LEVEL = 3.5
#: A head's cross-section is rounded: it fills at most this share of its bounding box (an ellipse: 79%; training
#: images up to 90%). A knee or a field of view inside the body, filled with tissue edge to edge: 98-99%.
MAX_HEAD_FILL = 0.94
#: A head has anatomy inside it; a phantom (a sphere or bottle of fluid) is smooth shading and noise. The measure,
#: :func:`_fine_structure`: the spread of a band-pass of the frame (Gaussian blur at 1% minus at 4% of the head's
#: size: sulci, ventricles, grey and white matter) over the inside of the head (its outer tenth eroded away),
#: relative to the mean grey there. Measured (2026-12-06): the curated brain JPEGs (7,019) have a 0.1st percentile
#: of 0.060, one image below 0.04; the 2,582 slices read of real brain series (development set, extra collection,
#: dcm2niix validation volunteers: T1, EPI, DTI; glioma T1 and FLAIR) a minimum of 0.050; the four MR phantom series
#: of the extra collection 98 of 151 slices below 0.04, all 63 of the Siemens EPI sphere that the feature distance let
#: through (median 0.021). A phantom with rods and wedges inside (0.10 and up) passes: routing refuses it by its
#: description (``config.settings.DEFAULT_QA_DESCRIPTIONS``).
MIN_HEAD_STRUCTURE = 0.04


@dataclass(frozen=True)
class Region:
    """The box a model reads in one image, and why the slice is unsuitable (``None``: suitable)."""

    #: (top, left, bottom, right), bottom and right exclusive, in pixels of the image.
    box: tuple[int, int, int, int]
    #: The share of the reference area the anatomy covers (CT: lung of body; MR: head of frame).
    fraction: float
    reason: str | None = None

    @property
    def suitable(self) -> bool:
        return self.reason is None


def _grey_of_hu(hu: float) -> float:
    centre, width = CT_WINDOW_HU
    return float(np.clip(((hu - (centre - 0.5)) / (width - 1.0) + 0.5) * 255.0, 0.0, 255.0))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _with_margins(box: tuple[int, int, int, int], margins: tuple[float, float, float, float],
                  shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``box`` grown so that it takes ``1 - left - right`` of the new width (likewise the height), within the image."""
    top, left, bottom, right = box
    m_left, m_right, m_top, m_bottom = margins
    width = (right - left) / (1.0 - m_left - m_right)
    height = (bottom - top) / (1.0 - m_top - m_bottom)
    return (
        max(0, int(round(top - m_top * height))),
        max(0, int(round(left - m_left * width))),
        min(shape[0], int(round(bottom + m_bottom * height))),
        min(shape[1], int(round(right + m_right * width))),
    )


def _sides_touched(mask: np.ndarray) -> int:
    """How many of the image's four edges ``mask`` covers for at least a fifth of their length."""
    edges = (mask[0, :], mask[-1, :], mask[:, 0], mask[:, -1])
    return sum(int(edge.mean() >= 0.2) for edge in edges)


def _reduced(grey: np.ndarray) -> tuple[np.ndarray, int]:
    """``grey`` shrunk by block means to at most :data:`MASK_SIDE` pixels a side, and the factor it was shrunk by."""
    factor = max(1, int(np.ceil(max(grey.shape) / MASK_SIDE)))
    if factor == 1:
        return grey, 1
    rows, cols = grey.shape[0] // factor, grey.shape[1] // factor
    if rows == 0 or cols == 0:
        return grey, 1
    return grey[:rows * factor, :cols * factor].reshape(rows, factor, cols, factor).mean(axis=(1, 3)), factor


def _opening(factor: int) -> int:
    """Iterations of the 3x3 opening that removes specks, thin lines and the table's edge: two full-size pixels."""
    return 2 if factor == 1 else 1


def _scaled(box: tuple[int, int, int, int], factor: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    top, left, bottom, right = box
    return top * factor, left * factor, min(shape[0], bottom * factor), min(shape[1], right * factor)


def _whole(image: np.ndarray, fraction: float, reason: str | None) -> Region:
    return Region((0, 0, image.shape[0], image.shape[1]), round(float(fraction), 4), reason)


def chest_region(image: np.ndarray, pixel_spacing: tuple[float, float] | None = None) -> Region:
    """The lungs of a CT lung-window display image, with the training crops' margins.

    Body: the largest connected region above :data:`BODY_HU` (the table, separated by air, and the air around are
    left out), holes filled. Lungs: inside it, below :data:`LUNG_HU`, pieces of at least 0.5% of the body. The
    lung box is widened to the same chest-wall distance on both sides, so a lung made dense by consolidation, which
    the HU threshold misses, stays inside the box as long as the other lung is aerated. With ``pixel_spacing``
    (row, column, mm), a box narrower than :data:`MIN_CHEST_WIDTH_MM` is unsuitable: a field of view that shows part
    of a chest.
    """
    return _wide_enough(_chest_region(image), pixel_spacing)


def _wide_enough(region: Region, pixel_spacing: tuple[float, float] | None) -> Region:
    if not region.suitable or pixel_spacing is None:
        return region
    width = (region.box[3] - region.box[1]) * pixel_spacing[1]
    if width >= MIN_CHEST_WIDTH_MM:
        return region
    return Region(region.box, region.fraction, f"part of a chest: the lungs' box is {width:.0f} mm wide, under "
                                               f"{MIN_CHEST_WIDTH_MM:.0f} mm: a reduced or targeted field of view")


def _chest_region(image: np.ndarray) -> Region:
    full = np.asarray(image, dtype=np.float32)
    if not (full <= _grey_of_hu(BODY_HU)).any():
        return _whole(full, 0.0, "no air in the frame (nothing at or below -500 HU): a field of view inside the "
                                 "body, or a wrong Rescale Intercept")
    grey, factor = _reduced(full)
    dense = grey > _grey_of_hu(BODY_HU)
    body = ndimage.binary_opening(dense, iterations=_opening(factor))
    body = ndimage.binary_fill_holes(_largest_component(body))
    body_fraction = float(body.mean())
    if body_fraction < MIN_BODY_FRACTION:
        return _whole(full, 0.0, f"no body in the field (body {body_fraction:.1%} of the frame)")
    if _sides_touched(dense) >= 3:
        # Already a chest crop (a training image, an export, a field of view fitted to the chest): the lungs run
        # into the frame's edges, so they are no holes in the body; every dark pixel counts, the frame is the box.
        lung_fraction = float((grey < _grey_of_hu(LUNG_HU)).mean())
        if lung_fraction < MIN_LUNG_FRACTION:
            return _whole(full, lung_fraction, f"too little lung in the slice ({lung_fraction:.0%} of the frame; "
                                               f"at least {MIN_LUNG_FRACTION:.0%})")
        return _whole(full, lung_fraction, None)
    lung = body & (grey < _grey_of_hu(LUNG_HU))
    labels, count = ndimage.label(lung)
    if count:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        lung = (sizes >= 0.005 * body.sum())[labels]
    lung_fraction = float(lung.sum() / body.sum())
    if lung_fraction < MIN_LUNG_FRACTION:
        return _whole(full, lung_fraction, f"too little lung in the slice ({lung_fraction:.0%} of the body; at least "
                                           f"{MIN_LUNG_FRACTION:.0%})")
    top, left, bottom, right = _bounds(lung)
    _, body_left, _, body_right = _bounds(body)
    # Each side's chest wall is as thick as the other's: a lung the threshold lost reaches as close to its side of
    # the body as the aerated lung does to its own.
    left, right = min(left, body_left + (body_right - right)), max(right, body_right - (left - body_left))
    box = _scaled((top, left, bottom, right), factor, full.shape)
    return Region(_with_margins(box, CT_MARGINS, full.shape), round(lung_fraction, 4))


def head_region(image: np.ndarray) -> Region:
    """The head of an MR display image (the largest region above the tissue level, holes filled), with the
    training images' margins.

    The tissue level is Otsu's threshold of the log grey levels: MR tissue spans a wide range (fat and vessels far
    brighter than brain), and on a linear scale Otsu splits bright fat from brain instead of tissue from background.
    A frame whose level is under :data:`MIN_TISSUE_LEVEL` is background noise with at most a sliver of tissue.
    """
    full = np.asarray(image, dtype=np.float32)
    if float(full.max()) <= float(full.min()):
        return _whole(full, 0.0, "the frame is blank")
    scale = np.log1p(255.0) / 255.0
    level = float(np.expm1(_otsu_level(np.log1p(np.clip(full, 0.0, 255.0)) / scale) * scale))
    if level < MIN_TISSUE_LEVEL:
        return _whole(full, 0.0, f"no head in the field (tissue barely above the background: level {level:.1f} of "
                                 f"255, at least {MIN_TISSUE_LEVEL})")
    grey, factor = _reduced(full)
    head = ndimage.binary_opening(grey > level, iterations=_opening(factor))
    if not head.any():
        return _whole(full, 0.0, "no head in the field")
    head = ndimage.binary_fill_holes(_largest_component(head))
    fraction = float(head.mean())
    if fraction < MIN_HEAD_FRACTION:
        return _whole(full, fraction, f"no head in the field (head {fraction:.1%} of the frame; at least "
                                      f"{MIN_HEAD_FRACTION:.0%})")
    top, left, bottom, right = _bounds(head)
    fill = float(head.sum()) / ((bottom - top) * (right - left))
    if fill > MAX_HEAD_FILL:
        return _whole(full, fraction, f"no head outline: tissue fills its box ({fill:.0%}; a head at most "
                                      f"{MAX_HEAD_FILL:.0%}), as in a limb or a field of view inside the body")
    structure = _fine_structure(grey, head, (top, left, bottom, right))
    if structure < MIN_HEAD_STRUCTURE:
        return _whole(full, fraction, f"no anatomy inside the outline: uniform, as in a phantom (structure "
                                      f"{structure:.3f}; a head at least {MIN_HEAD_STRUCTURE})")
    box = _scaled((top, left, bottom, right), factor, full.shape)
    return Region(_with_margins(box, MR_MARGINS, full.shape), round(fraction, 4))


def _fine_structure(grey: np.ndarray, head: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """:data:`MIN_HEAD_STRUCTURE`'s measure: the band-pass's standard deviation inside ``head`` (eroded by a tenth
    of the smaller side of ``box``, the head's bounds) over the mean grey there; ``inf`` when too little is left to
    judge. Computed on the head's box only (with room for the wider blur): the filters are most of the cost."""
    top, left, bottom, right = box
    size = min(bottom - top, right - left)
    pad = int(np.ceil(3 * 0.04 * size)) + 1
    rows = slice(max(0, top - pad), bottom + pad)
    cols = slice(max(0, left - pad), right + pad)
    grey, head = grey[rows, cols], head[rows, cols]
    # Taxicab distance above k is the 3x3-cross erosion iterated k times, in one pass.
    inner = ndimage.distance_transform_cdt(head, metric="taxicab") > max(1, size // 10)
    if inner.sum() < 50:
        return float("inf")
    band = (ndimage.gaussian_filter(grey, 0.01 * size, truncate=3.0)
            - ndimage.gaussian_filter(grey, 0.04 * size, truncate=3.0))
    return float(band[inner].std() / max(float(grey[inner].mean()), 1e-3))


def _otsu_level(grey: np.ndarray) -> float:
    """Otsu's threshold of a grey image (0..255): the level that best splits it into dark and bright pixels. On MR it
    falls between the background (noise, near black) and tissue, whatever the frame's scaling or noise floor."""
    counts = np.bincount(np.clip(grey, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight = np.cumsum(counts)
    mass = np.cumsum(counts * levels)
    total, total_mass = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight))
    between[~np.isfinite(between)] = 0.0
    return float(np.argmax(between)) + 0.5


def crop(image: np.ndarray, region: Region) -> np.ndarray:
    """The region's box of ``image`` as 8-bit grey, the training images' type (so export and inference agree)."""
    top, left, bottom, right = region.box
    return np.rint(np.clip(np.asarray(image, dtype=np.float32)[top:bottom, left:right], 0, 255)).astype(np.uint8)


#: A region function: the display image and its pixel spacing (row, column, mm; ``None`` when unknown).
RegionFinder = Callable[[np.ndarray, tuple[float, float] | None], Region]


def _head_region_any_spacing(image: np.ndarray, pixel_spacing: tuple[float, float] | None) -> Region:
    # No floor in mm for a head: real heads' boxes measured 73 mm at the vertex of a glioma volume and 200 mm and
    # more mid-brain, so a width says nothing that the head's share of the frame does not.
    return head_region(image)


_FINDERS: Mapping[str, RegionFinder] = MappingProxyType(
    {"covid-ct": chest_region, "brain-tumor": _head_region_any_spacing}
)


def region_finder(task_name: str) -> RegionFinder:
    """The region function of a task (``KeyError`` for a task without one)."""
    try:
        return _FINDERS[task_name]
    except KeyError:
        raise KeyError(f"no region finder for task {task_name!r}") from None
