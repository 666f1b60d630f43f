"""The series decision (models.series) and the regions it reads (models.regions), on real scanner frames."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_factory import SHARED_DATA
from models.regions import CT_WINDOW_HU, MR_MARGINS, Region, chest_region, crop, head_region
from models.series import aggregate, decide
from models.tasks import BRAIN_TUMOR, COVID_CT, INDETERMINATE

REAL = SHARED_DATA / "real-dicom-dev"


def _grey(hu: np.ndarray) -> np.ndarray:
    centre, width = CT_WINDOW_HU
    return np.clip(((hu - (centre - 0.5)) / (width - 1.0) + 0.5) * 255.0, 0, 255).astype(np.float32)


def _real_ct_hu(index: int = 32) -> np.ndarray:
    from pydicom import dcmread

    files = sorted((REAL / "a" / "lung-pet-ct-dx" / "Lung_Dx-A0001-5mm").glob("*.dcm"))
    if not files:
        pytest.skip(f"no real chest CT under {REAL}")
    ds = dcmread(files[index])
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_aggregate_takes_the_median_slice_for_covid() -> None:
    # Eleven slices: seven clear, four suspicious (a mass, an apex). The median slice is clear; the mean of the top
    # quarter, the old rule, would have been 0.8 COVID.
    clear, suspicious = [0.05, 0.95], [0.8, 0.2]
    slices = np.array([clear] * 7 + [suspicious] * 4)
    np.testing.assert_allclose(aggregate(slices, COVID_CT), clear)
    # Two slices: halfway between them; one slice: itself.
    np.testing.assert_allclose(aggregate(np.array([clear, suspicious]), COVID_CT), [0.425, 0.575])
    np.testing.assert_allclose(aggregate(slices[:1], COVID_CT), clear)
    with pytest.raises(ValueError):
        aggregate(np.zeros((0, 2)), COVID_CT)


def test_aggregate_brain_needs_a_quarter_of_the_slices() -> None:
    normal, glioma = [0.05, 0.05, 0.85, 0.05], [0.80, 0.05, 0.10, 0.05]
    # A tumour on 3 of 8 slices (over a quarter) is found; on 1 of 8 it is not.
    assert BRAIN_TUMOR.class_names[int(np.argmax(aggregate(np.array([normal] * 5 + [glioma] * 3), BRAIN_TUMOR)))] \
        == "glioma"
    assert BRAIN_TUMOR.class_names[int(np.argmax(aggregate(np.array([normal] * 7 + [glioma]), BRAIN_TUMOR)))] \
        == "notumor"


def _frames(count: int) -> list[dict[str, object]]:
    return [{"sop_instance_uid": f"1.2.{i}", "frame": 1} for i in range(count)]


def test_decide_is_indeterminate_when_too_few_slices_count() -> None:
    suitable = Region((0, 0, 10, 10), 0.4)
    unsuitable = Region((0, 0, 10, 10), 0.0, "too little lung in the slice (0% of the body; at least 10%)")
    probabilities = np.array([[0.9, 0.1]] * 8)
    result = decide(_frames(8), [suitable] + [unsuitable] * 7, probabilities, None, COVID_CT, {})
    assert result.label == INDETERMINATE
    assert "only 1 of 8 slices" in (result.reason or "") and "7 too little lung in the slice" in (result.reason or "")
    assert sum("excluded" in s for s in result.slice_probabilities) == 7
    # Every class keeps a probability, for the SR.
    assert set(result.probabilities) == set(COVID_CT.class_names)


def test_decide_excludes_slices_far_from_the_training_images() -> None:
    region = Region((0, 0, 10, 10), 0.4)
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    calibration = {"threshold": 0.5, "domain": {"threshold": 10.0}}
    result = decide(_frames(3), [region] * 3, probabilities, np.array([5.0, 50.0, 60.0]), COVID_CT, calibration)
    # Two of three slices are out of the domain: fewer than a quarter... no, 1 of 3 is a third, so it counts: COVID.
    assert result.label == "COVID" and result.reason is None
    assert [s.get("excluded", "").startswith("unlike the training images") for s in result.slice_probabilities] \
        == [False, True, True]
    result = decide(_frames(3), [region] * 3, probabilities, np.array([50.0, 50.0, 60.0]), COVID_CT, calibration)
    assert result.label == INDETERMINATE and "3 unlike the training images" in (result.reason or "")


def test_decide_uses_the_cards_operating_threshold() -> None:
    region = Region((0, 0, 10, 10), 0.4)
    probabilities = np.array([[0.30, 0.70]])
    assert decide(_frames(1), [region], probabilities, None, COVID_CT, {"threshold": 0.5}).label == "non-COVID"
    assert decide(_frames(1), [region], probabilities, None, COVID_CT, {"threshold": 0.25}).label == "COVID"
    # Brain: above the threshold the most probable tumour class, even when 'notumor' alone is the largest.
    brain = np.array([[0.25, 0.05, 0.45, 0.25]])
    assert float(BRAIN_TUMOR.suspicion(brain)[0]) == pytest.approx(0.55)
    assert decide(_frames(1), [region], brain, None, BRAIN_TUMOR, {"threshold": 0.5}).label == "glioma"


def test_chest_region_crops_a_real_slice_to_its_lungs() -> None:
    hu = _real_ct_hu()
    region = chest_region(_grey(hu))
    assert region.suitable and 0.2 < region.fraction < 0.7
    top, left, bottom, right = region.box
    # The whole 512x512 field of view holds air, the table and the body; the lung box is well inside it.
    assert (bottom - top) * (right - left) < 0.5 * hu.size
    cropped = crop(_grey(hu), region)
    assert cropped.dtype == np.uint8 and cropped.shape == (bottom - top, right - left)


def test_a_chest_box_narrower_than_a_chest_is_unsuitable() -> None:
    # The same real slice at its own spacing (about 0.84 mm: a box near 290 mm) and said to be five times finer,
    # which makes its lung box a reduced field of view under MIN_CHEST_WIDTH_MM.
    grey = _grey(_real_ct_hu())
    assert chest_region(grey).suitable and chest_region(grey, (0.84, 0.84)).suitable
    part = chest_region(grey, (0.168, 0.168))
    assert not part.suitable and "part of a chest" in (part.reason or "")
    assert part.box == chest_region(grey).box


def test_chest_crop_keeps_a_densely_consolidated_lung() -> None:
    from scipy import ndimage

    hu = _real_ct_hu()
    clear = chest_region(_grey(hu))
    # Consolidate the lung on the image's right (the patient's left) at +30 HU: the HU threshold no longer sees it
    # as lung, but the lung box, widened to the same chest-wall distance on both sides, still holds it.
    labels, _ = ndimage.label(hu > -500)
    body = ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    columns = np.flatnonzero(body.any(axis=0))
    right_side = body & (hu < -400) & (np.arange(hu.shape[1])[None, :] > (columns[0] + columns[-1]) // 2)
    labels, _ = ndimage.label(right_side)
    right_lung = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    assert right_lung.sum() > 0.05 * body.sum()
    consolidated = np.where(right_lung, 30.0, hu)
    dense = chest_region(_grey(consolidated))
    assert dense.suitable
    width = clear.box[3] - clear.box[1]
    # The box still reaches the consolidated lung's outer edge (within 5% of the width)...
    assert dense.box[3] >= np.flatnonzero(right_lung.any(axis=0))[-1] - 0.05 * width, (clear.box, dense.box)
    # ... and keeps most of the width of the aerated chest's box (a box of the aerated lung alone: about half).
    assert dense.box[3] - dense.box[1] >= 0.85 * width, (clear.box, dense.box)


@pytest.mark.parametrize(
    ("name", "frame", "reason"),
    [
        ("all air", np.full((256, 256), -1000.0), "no body in the field"),
        ("all metal", np.full((256, 256), 3000.0), "no air in the frame"),
        ("head CT", None, "too little lung"),
        ("water phantom", None, "too little lung"),
    ],
)
def test_chest_region_refuses_frames_without_lungs(name: str, frame: np.ndarray | None, reason: str) -> None:
    if frame is None:
        frame = np.full((256, 256), -1000.0)
        yy, xx = np.mgrid[:256, :256]
        inside = (yy - 128) ** 2 + (xx - 128) ** 2 < 80 ** 2
        frame[inside] = 35.0 if name == "head CT" else 0.0  # brain / water
        if name == "head CT":
            frame[inside & ((yy - 128) ** 2 + (xx - 128) ** 2 > 72 ** 2)] = 1200.0  # skull
    region = chest_region(_grey(frame))
    assert not region.suitable and reason in (region.reason or ""), (name, region)


def test_head_region_refuses_noise_and_crops_a_head() -> None:
    rng = np.random.default_rng(0)
    noise = rng.rayleigh(2.0, (256, 256)).astype(np.float32)
    assert not head_region(noise).suitable
    head = noise.copy()
    yy, xx = np.mgrid[:256, :256]
    inside = ((yy - 120) / 90.0) ** 2 + ((xx - 128) / 75.0) ** 2 < 1
    # Anatomy inside: folds a few pixels across, as sulci and grey and white matter make them.
    head[inside] = (120.0 + 40.0 * np.sin(xx / 2.5) * np.sin(yy / 3.0))[inside]
    region = head_region(head)
    assert region.suitable
    # The head (rows 30-210, columns 53-203) takes the share of the box the training images' heads take.
    top, left, bottom, right = region.box
    m_left, m_right, m_top, m_bottom = MR_MARGINS
    assert (203 - 53) / (right - left) == pytest.approx(1 - m_left - m_right, abs=0.02), region.box
    assert (210 - 30) / (bottom - top) == pytest.approx(1 - m_top - m_bottom, abs=0.02), region.box
    assert (53 - left) / (right - left) == pytest.approx(m_left, abs=0.02), region.box
    assert not head_region(np.zeros((64, 64), np.float32)).suitable


def test_head_region_refuses_a_phantom() -> None:
    """A sphere of fluid (a QA phantom): the outline of a head, smooth shading and noise inside, no anatomy. The
    Siemens EPI phantom of the extra collection (median structure 0.021) was read as a head on 50 of 63 slices."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:256, :256]
    radius = np.hypot(yy - 128, xx - 128)
    frame = rng.rayleigh(2.0, (256, 256)).astype(np.float32)
    inside = radius < 95
    # Brighter towards the coil at the rim, as in the real phantom series; noise as in a 64 x 64 EPI, upsampled.
    shading = 90.0 + 50.0 * (radius / 95.0) ** 4
    frame[inside] = (shading + rng.normal(0.0, 1.5, (256, 256)))[inside]
    region = head_region(frame)
    assert not region.suitable and "as in a phantom" in (region.reason or ""), region
    # The same outline with anatomy inside is a head.
    frame[inside] += (30.0 * np.sin(xx / 2.5) * np.sin(yy / 3.0))[inside]
    assert head_region(frame).suitable


def test_decide_needs_slices_enough_to_rule_a_tumour_out() -> None:
    region = Region((0, 0, 10, 10), 0.4)
    normal, glioma = [0.02, 0.02, 0.94, 0.02], [0.90, 0.04, 0.04, 0.02]
    # Two brain slices without a lesion cannot say "no tumour" (a tumour may lie on the slices not taken) ...
    few = decide(_frames(2), [region] * 2, np.array([normal] * 2), None, BRAIN_TUMOR, {"threshold": 0.5})
    assert few.label == INDETERMINATE
    assert few.reason == "only 2 slice(s) read, too few to rule out a finding (a negative result needs 10)"
    # ... but the same two slices showing one are a finding, and ten clear slices are a negative answer.
    assert decide(_frames(2), [region] * 2, np.array([glioma] * 2), None, BRAIN_TUMOR, {}).label == "glioma"
    assert decide(_frames(10), [region] * 10, np.array([normal] * 10), None, BRAIN_TUMOR, {}).label == "notumor"
    # Excluded slices do not count: ten slices of which two show the head.
    unsuitable = Region((0, 0, 10, 10), 0.0, "no head in the slice")
    mostly_out = decide(_frames(10), [region] * 3 + [unsuitable] * 7, np.array([normal] * 10), None, BRAIN_TUMOR, {})
    assert mostly_out.label == INDETERMINATE and "only 3 slice(s) read" in (mostly_out.reason or "")
    # A single chest slice can be negative: COVID-19 pneumonia is diffuse.
    assert decide(_frames(1), [region], np.array([[0.1, 0.9]]), None, COVID_CT, {}).label == "non-COVID"


def test_decide_keeps_a_finding_but_not_its_type_on_a_sequence_the_types_were_not_learned_from() -> None:
    region = Region((0, 0, 10, 10), 0.4)
    normal, meningioma = [0.02, 0.02, 0.94, 0.02], [0.10, 0.85, 0.03, 0.02]
    caveat = "a FLAIR (inversion time 2200 ms) series, and the model learned the types from T1 post-contrast only"
    caveats = dict.fromkeys(BRAIN_TUMOR.finding_classes, caveat)
    found = decide(_frames(12), [region] * 12, np.array([meningioma] * 12), None, BRAIN_TUMOR, {}, caveats)
    assert (found.label, found.reason) == (BRAIN_TUMOR.untyped_finding, f"type not assessed: {caveat}")
    assert found.probabilities["meningioma"] == pytest.approx(0.85)  # the model's figures stay on record
    assert BRAIN_TUMOR.is_finding(found.label) and found.label not in BRAIN_TUMOR.class_names
    # A negative answer needs no type: it stands on such a series (the notumor class holds FLAIR and T2 slices).
    clear = decide(_frames(12), [region] * 12, np.array([normal] * 12), None, BRAIN_TUMOR, {}, caveats)
    assert (clear.label, clear.reason) == ("notumor", None)
    # Indeterminate stays indeterminate, with its own reason; without a caveat the type is given as before.
    few = decide(_frames(2), [region] * 2, np.array([normal] * 2), None, BRAIN_TUMOR, {}, caveats)
    assert few.label == INDETERMINATE and "too few to rule out" in (few.reason or "")
    typed = decide(_frames(12), [region] * 12, np.array([meningioma] * 12), None, BRAIN_TUMOR, {}, None)
    assert (typed.label, typed.reason) == ("meningioma", None)
    # A task whose findings have no types to withhold ignores it.
    assert COVID_CT.untyped_finding is None
    covid = decide(_frames(1), [region], np.array([[0.9, 0.1]]), None, COVID_CT, {}, {"COVID": caveat})
    assert (covid.label, covid.reason) == ("COVID", None)
    # A caveat for one class withholds that type only: a meningioma stays typed where pituitary would not.
    only_pituitary = {"pituitary": "an axial post-contrast series"}
    assert decide(_frames(12), [region] * 12, np.array([meningioma] * 12), None, BRAIN_TUMOR, {},
                  only_pituitary).label == "meningioma"
    pituitary = decide(_frames(12), [region] * 12, np.array([[0.02, 0.03, 0.05, 0.90]] * 12), None, BRAIN_TUMOR, {},
                       only_pituitary)
    assert (pituitary.label, pituitary.reason) == ("tumor", "type not assessed: an axial post-contrast series")


def test_decide_leaves_a_finding_it_cannot_tell_from_normal_anatomy_indeterminate() -> None:
    region = Region((0, 0, 10, 10), 0.4)
    pituitary, meningioma, normal = [0.02, 0.03, 0.05, 0.90], [0.10, 0.85, 0.03, 0.02], [0.02, 0.02, 0.94, 0.02]
    caveat = {"pituitary": "an axial post-contrast series: normal enhancement"}
    found = decide(_frames(12), [region] * 12, np.array([pituitary] * 12), None, BRAIN_TUMOR, {}, None, caveat)
    assert (found.label, found.reason) == (INDETERMINATE, "finding not assessed: an axial post-contrast series: "
                                                          "normal enhancement")
    assert found.probabilities["pituitary"] == pytest.approx(0.90)  # the model's figures stay on record
    # Another finding class, and a negative answer, stand on the same series; it outranks a type caveat.
    assert decide(_frames(12), [region] * 12, np.array([meningioma] * 12), None, BRAIN_TUMOR, {}, None,
                  caveat).label == "meningioma"
    assert decide(_frames(12), [region] * 12, np.array([normal] * 12), None, BRAIN_TUMOR, {}, None,
                  caveat).label == "notumor"
    every_type = dict.fromkeys(BRAIN_TUMOR.finding_classes, "a FLAIR series")
    assert decide(_frames(12), [region] * 12, np.array([pituitary] * 12), None, BRAIN_TUMOR, {}, every_type,
                  caveat).label == INDETERMINATE
