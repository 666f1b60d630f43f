"""Bad input on the worker's classification path: real chest CT slices with broken headers or pixels, and series of
frames with no anatomy. Each gives a result or ``indeterminate`` with a reason: never a crash, never a silent
default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_factory import write_files
from dicom_io.synthesis import mr_series
from models.inference import Classifier, default_model_dir
from models.tasks import BRAIN_TUMOR, COVID_CT, INDETERMINATE
from test_models_series import REAL
from worker.inference import classify_series_files


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.load(default_model_dir(COVID_CT.name))


def _chest(count: int = 3):
    files = sorted((REAL / "a" / "lung-pet-ct-dx" / "Lung_Dx-A0001-5mm").glob("*.dcm"))
    if not files:
        pytest.skip(f"no real chest CT under {REAL}")
    return [dcmread(path) for path in files[28:28 + count]]


def _classify(datasets, tmp_path: Path, classifier: Classifier):
    return classify_series_files(write_files(datasets, tmp_path), classifier, batch_size=8)


def test_intact_slices_are_read(classifier: Classifier, tmp_path: Path) -> None:
    result = _classify(_chest(), tmp_path, classifier)
    assert result.label == "non-COVID" and result.reason is None
    assert not any("excluded" in s for s in result.slice_probabilities)


def test_missing_rescale_is_indeterminate_and_says_why(classifier: Classifier, tmp_path: Path) -> None:
    datasets = _chest()
    for ds in datasets:
        del ds.RescaleSlope, ds.RescaleIntercept
    result = _classify(datasets, tmp_path, classifier)
    assert result.label == INDETERMINATE
    assert "CT without Rescale Slope/Intercept" in (result.reason or "")


def test_wrong_rescale_intercept_is_indeterminate_and_says_why(classifier: Classifier, tmp_path: Path) -> None:
    datasets = _chest()
    for ds in datasets:
        ds.RescaleIntercept = float(ds.RescaleIntercept) + 1200  # air would read about +200 HU
    result = _classify(datasets, tmp_path, classifier)
    assert result.label == INDETERMINATE and "no air in the frame" in (result.reason or "")


def test_missing_pixel_spacing_tilted_gantry_and_one_slice_still_give_a_result(classifier: Classifier,
                                                                                tmp_path: Path) -> None:
    datasets = _chest()
    for ds in datasets:
        del ds.PixelSpacing
        ds.GantryDetectorTilt = 15.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(np.radians(15))), float(np.sin(np.radians(15)))]
    result = _classify(datasets, tmp_path / "tilted", classifier)
    assert result.label == "non-COVID" and len(result.slice_probabilities) == 3
    single = _classify(_chest(1), tmp_path / "single", classifier)
    assert single.label == "non-COVID" and "(1 of 1 slices)" in single.aggregation


@pytest.mark.parametrize(("name", "hu", "reason"), [
    ("all air", -1000, "no body in the field"),
    ("all metal", 3071, "no air in the frame"),
    ("padding value", -1024, "no body in the field"),
])
def test_frames_without_anatomy_are_indeterminate(classifier: Classifier, tmp_path: Path, name: str, hu: int,
                                                   reason: str) -> None:
    datasets = _chest()
    for ds in datasets:
        stored = np.full(ds.pixel_array.shape, int(round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))),
                         dtype=ds.pixel_array.dtype)
        ds.PixelData = stored.tobytes()
    result = _classify(datasets, tmp_path, classifier)
    assert result.label == INDETERMINATE and reason in (result.reason or ""), (name, result.reason)
    assert all(s["excluded"] for s in result.slice_probabilities)


def test_monochrome1_ct_is_read_from_its_hounsfield_units(classifier: Classifier, tmp_path: Path) -> None:
    # MONOCHROME1 asks a viewer to show air white; the model reads the Hounsfield units in its window, air dark, as
    # in every training image, and gives the series the same result as the MONOCHROME2 original.
    original = _classify(_chest(), tmp_path / "m2", classifier)
    datasets = _chest()
    for ds in datasets:
        ds.PhotometricInterpretation = "MONOCHROME1"
    result = _classify(datasets, tmp_path / "m1", classifier)
    assert result.label == original.label == "non-COVID" and result.reason is None
    assert result.probabilities == original.probabilities


def _sphere_phantom(slices: int = 14, size: int = 128) -> list[np.ndarray]:
    """Axial slices through a fluid sphere as an MR QA phantom shows it: a disc brighter towards the coil at its rim,
    noise, and nothing inside (sizes and shading as in dcm_qa_sag's Siemens EPI phantom)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for z in np.linspace(-0.85, 0.85, slices):
        radius = 0.42 * size * np.sqrt(1.0 - z * z)
        distance = np.hypot(yy - size / 2, xx - size / 2)
        image = rng.rayleigh(3.0, (size, size))
        inside = distance < radius
        image[inside] = (110.0 + 60.0 * (distance / radius) ** 4 + rng.normal(0.0, 2.0, (size, size)))[inside]
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def test_a_phantom_series_is_indeterminate_as_a_phantom(tmp_path: Path) -> None:
    # Named like a patient's series (no 'phantom' in its descriptions), so only the images can tell.
    brain = Classifier.load(default_model_dir(BRAIN_TUMOR.name))
    result = classify_series_files(write_files(mr_series(_sphere_phantom()), tmp_path), brain, batch_size=8)
    assert result.label == INDETERMINATE, result
    assert "as in a phantom" in (result.reason or ""), result.reason
    phantom_slices = [s for s in result.slice_probabilities if "as in a phantom" in s.get("excluded", "")]
    assert len(phantom_slices) >= 12, result.slice_probabilities


def test_a_field_of_view_on_part_of_a_chest_is_indeterminate(classifier: Classifier, tmp_path: Path) -> None:
    # pydicom's CT_small.dcm: a real GE chest slice cut to 85 mm around the spine, a lung edge on either side. Its
    # body touches the frame's edges as a chest crop's does, and it was read as a whole chest: COVID at 1.0.
    from pydicom.data import get_testdata_file

    part = dcmread(get_testdata_file("CT_small.dcm"))
    result = _classify([part], tmp_path / "part", classifier)
    assert result.label == INDETERMINATE
    assert "part of a chest: the lungs' box is 85 mm wide" in (result.reason or "")
    # The same pixels said to span 340 mm: the width is what refuses the slice (it is read, whatever it is called).
    widened = dcmread(get_testdata_file("CT_small.dcm"))
    widened.PixelSpacing = [4 * float(value) for value in part.PixelSpacing]
    assert _classify([widened], tmp_path / "widened", classifier).label in COVID_CT.class_names
