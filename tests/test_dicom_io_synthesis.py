"""dicom_io.synthesis: valid IODs (dciodvfy), exact value mapping, every transfer syntax decodes back."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut

from dicom_factory import brain_images, ct_images
from dicom_io import synthesis

DCIODVFY = "/usr/bin/dciodvfy"


@pytest.fixture(scope="module")
def mr_paths() -> list[Path]:
    return brain_images(3, seed=11)


@pytest.fixture(scope="module")
def ct_paths() -> list[Path]:
    return ct_images(3, seed=11)


def _dciodvfy_errors(ds: Dataset, tmp_path: Path) -> list[str]:
    path = tmp_path / "check.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    "make",
    [
        lambda mr, ct: synthesis.mr_series(mr),
        lambda mr, ct: synthesis.mr_series(mr, monochrome1=True),
        lambda mr, ct: synthesis.ct_series(ct),
        lambda mr, ct: synthesis.ct_series(ct, signed=False),
    ],
    ids=["mr", "mr-monochrome1", "ct-signed", "ct-unsigned"],
)
def test_series_are_valid_iods_with_one_study_and_series(make, mr_paths, ct_paths, tmp_path: Path) -> None:
    series = make(mr_paths, ct_paths)
    assert len(series) == 3
    assert len({ds.SOPInstanceUID for ds in series}) == 3
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in series}) == 1
    assert [int(ds.InstanceNumber) for ds in series] == [1, 2, 3]
    assert [float(ds.ImagePositionPatient[2]) for ds in series] == sorted({float(ds.SliceLocation) for ds in series})
    for ds in series:
        assert _dciodvfy_errors(ds, tmp_path) == []


def test_mr_is_12_bit_with_real_headers(mr_paths) -> None:
    series = synthesis.mr_series(mr_paths, patient_id="P1", series_description="AX FLAIR")
    for ds, path in zip(series, mr_paths):
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.Modality == "MR" and ds.BodyPartExamined == "BRAIN"
        assert ds.SeriesDescription == "AX FLAIR" and ds.PatientID == "P1"
        assert float(ds.MagneticFieldStrength) == 1.5 and ds.Manufacturer
        stored = ds.pixel_array
        assert stored.max() <= 4095
        assert (stored == synthesis.load_grey(path).astype(np.uint16) * 16).all()
    inverted = synthesis.mr_series(mr_paths[:1], monochrome1=True)[0]
    assert inverted.PhotometricInterpretation == "MONOCHROME1"
    assert (inverted.pixel_array == 4080 - series[0].pixel_array).all()


@pytest.mark.parametrize("signed", [True, False])
def test_ct_is_hounsfield_units_that_the_lung_window_displays_as_the_image(ct_paths, signed: bool) -> None:
    series = synthesis.ct_series(ct_paths, signed=signed)
    centre, width = synthesis.LUNG_WINDOW.center, synthesis.LUNG_WINDOW.width
    for ds, path in zip(series, ct_paths):
        assert ds.BodyPartExamined == "CHEST" and ds.RescaleType == "HU"
        assert int(ds.RescaleIntercept) == (-1024 if signed else -2048)
        assert ds.PixelRepresentation == int(signed)
        hu = apply_modality_lut(ds.pixel_array, ds)
        grey = synthesis.load_grey(path)
        assert hu.min() >= -1350 and hu.max() <= 150
        display = np.clip((hu - (centre - width / 2)) / width * 255.0, 0, 255)
        assert np.abs(display - grey).max() <= 0.5


@pytest.mark.parametrize("syntax", synthesis.TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_encode_round_trips_in_every_transfer_syntax(syntax, mr_paths, ct_paths) -> None:
    sources = [synthesis.mr_series(mr_paths[:1])[0], synthesis.ct_series(ct_paths[:1])[0]]
    if syntax == synthesis.JPEGBaseline8Bit:
        with pytest.raises(ValueError, match="8-bit"):
            synthesis.encode(sources[0], syntax)
        return
    for source in sources:
        encoded = synthesis.encode(source, syntax)
        assert encoded.SOPInstanceUID == source.SOPInstanceUID
        buffer = BytesIO()
        encoded.save_as(buffer, enforce_file_format=True)
        back = dcmread(BytesIO(buffer.getvalue()))
        assert back.file_meta.TransferSyntaxUID == syntax
        expected = apply_modality_lut(source.pixel_array, source)
        got = apply_modality_lut(back.pixel_array, back)
        error = np.abs(got.astype(np.float64) - expected).max()
        if syntax in synthesis.LOSSLESS_TRANSFER_SYNTAXES:
            assert error == 0
        else:
            assert 0 < error < 0.1 * float(np.ptp(expected))


def test_jpeg_baseline_for_8_bit_data(mr_paths) -> None:
    source = synthesis.mr_series(mr_paths[:1])[0]
    eight_bit = synthesis.encode(source, synthesis.ExplicitVRLittleEndian)
    eight_bit.PixelData = (source.pixel_array // 16).astype(np.uint8).tobytes()
    eight_bit.BitsAllocated, eight_bit.BitsStored, eight_bit.HighBit = 8, 8, 7
    eight_bit["PixelData"].VR = "OB"
    encoded = synthesis.encode(eight_bit, synthesis.JPEGBaseline8Bit)
    buffer = BytesIO()
    encoded.save_as(buffer, enforce_file_format=True)
    back = dcmread(BytesIO(buffer.getvalue())).pixel_array.astype(int)
    assert np.abs(back - eight_bit.pixel_array.astype(int)).mean() < 2


def test_multiframe_mr_holds_every_slice(mr_paths) -> None:
    series = synthesis.mr_series(mr_paths)
    multiframe = synthesis.multiframe_mr(series)
    assert int(multiframe.NumberOfFrames) == len(series)
    assert multiframe.StudyInstanceUID == series[0].StudyInstanceUID
    by_position = {tuple(map(float, ds.ImagePositionPatient)): ds for ds in series}
    frames = multiframe.pixel_array
    for frame, groups in zip(frames, multiframe.PerFrameFunctionalGroupsSequence):
        position = tuple(map(float, groups.PlanePositionSequence[0].ImagePositionPatient))
        assert (frame == by_position.pop(position).pixel_array).all()
    assert by_position == {}


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        synthesis.load_grey(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="0..255"):
        synthesis.load_grey(np.full((4, 4), 300))
    with pytest.raises(ValueError, match="cannot encode"):
        synthesis.encode(synthesis.mr_series([np.zeros((4, 4), np.uint8)])[0], "1.2.840.10008.1.2.4.100")
