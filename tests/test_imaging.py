"""dicom_io.imaging: decoding, modality LUT, windowing, frame splitting and ordering, bad input.

DICOM is made at test time: from the real training images in ../shared/data (never committed) and from
pydicom's bundled test files.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from dicom_io.imaging import (
    ImagingError,
    Window,
    display_frames,
    series_frame_records,
    series_frames,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _sample(pattern: str, count: int) -> list[Path]:
    files = sorted(SHARED_DATA.glob(pattern))
    if not files:
        pytest.skip(f"no training images matching {pattern} under {SHARED_DATA}")
    return random.Random(1234).sample(files, count)


def _grey8(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8)


def _image_dataset(pixels: np.ndarray, modality: str, *, z: float = 0.0, instance: int = 1) -> Dataset:
    """A minimal single-frame MR or CT image carrying ``pixels`` (uint16 or int16) as stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MR_SOP_CLASS if modality == "MR" else CT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if modality == "MR" else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    return ds


def _mr_from_display(grey: np.ndarray) -> Dataset:
    """MR with 12-bit stored values: the display image scaled to 0..4095."""
    return _image_dataset(np.round(grey.astype(np.float64) * 4095 / 255).astype(np.uint16), "MR")


#: The lung window as radiology publishes it (W 1500 / L -600 HU), written here rather than imported: a change of
#: dicom_io.imaging.LUNG_WINDOW must fail the CT tests, not move their expected values with it.
PUBLISHED_LUNG_WINDOW = Window(center=-600.0, width=1500.0)


def _hu_from_display(grey: np.ndarray, window: Window = PUBLISHED_LUNG_WINDOW) -> np.ndarray:
    """Invert the DICOM linear VOI function: which HU value shows as grey level ``grey``."""
    return (grey.astype(np.float64) / 255.0 - 0.5) * (window.width - 1) + window.center - 0.5


def _ct_from_display(grey: np.ndarray) -> Dataset:
    """CT in HU: stored = HU + 1024 (signed 16 bit), Rescale Slope 1, Intercept -1024, as scanners write it."""
    stored = np.round(_hu_from_display(grey)).astype(np.int16) + 1024
    ds = _image_dataset(stored.astype(np.int16), "CT")
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    return ds


# --- round trip on the real training images -------------------------------------------------------------------


def test_mr_round_trip_stays_close_to_the_training_image() -> None:
    errors = []
    for path in _sample("brain-tumor-mri/*/*/*.jpg", 60):
        grey = _grey8(path)
        (shown,) = display_frames(_mr_from_display(grey))
        assert shown.dtype == np.float32 and shown.shape == grey.shape
        assert 0.0 <= shown.min() and shown.max() <= 255.0
        # The window only stretches (the training JPEGs are not all full range); the picture keeps its shape.
        assert np.corrcoef(shown.ravel(), grey.ravel())[0, 1] > 0.998, path.name
        errors.append(float(np.abs(shown - grey).mean()))
    # Measured on this sample: median 1.7, 95th percentile 7.3 grey levels (mean absolute error).
    assert np.median(errors) < 4.0, errors
    assert np.percentile(errors, 95) < 14.0, errors


def test_ct_round_trip_through_hounsfield_units_is_exact_to_rounding() -> None:
    for path in _sample("covid-ct/*/*.png", 30):
        grey = _grey8(path)
        ds = _ct_from_display(grey)
        (shown,) = display_frames(ds)
        # 1 HU is 255/1499 grey levels; stored values are rounded to whole HU.
        assert np.abs(shown - grey).max() <= 0.5, path.name


def test_ct_shows_the_published_lung_window() -> None:
    # Air (-1000 HU) and below the window's floor (-1350) dark, lung parenchyma mid-grey, soft tissue and bone
    # (above the ceiling, 150) white: the DICOM linear VOI function (PS3.3 C.11.2.1.2.1) worked by hand.
    hu = np.array([[-2000, -1350, -1000, -600], [-100, 40, 150, 1000]], dtype=np.int16)
    ds = _image_dataset(hu + 1024, "CT")
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    (shown,) = display_frames(ds)
    expected = [[0.0, 0.0, 59.54, 127.59], [212.64, 236.46, 255.0, 255.0]]
    np.testing.assert_allclose(shown, expected, atol=0.01)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_give_the_same_image(syntax: pydicom.uid.UID) -> None:
    (path,) = _sample("brain-tumor-mri/Testing/*/*.jpg", 1)
    ds = _mr_from_display(_grey8(path))
    (expected,) = display_frames(ds)
    ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    (shown,) = display_frames(ds)
    np.testing.assert_array_equal(shown, expected)


# --- pydicom's bundled files ----------------------------------------------------------------------------------


MR_SMALL_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.filterwarnings("ignore:The pixel data is 8320 bytes long")  # MR_small_padded: padding on purpose
@pytest.mark.parametrize("name", MR_SMALL_VARIANTS)
def test_lossless_encodings_of_mr_small_decode_identically(name: str) -> None:
    (reference,) = display_frames(pydicom.dcmread(get_testdata_file("MR_small.dcm")))
    (shown,) = display_frames(pydicom.dcmread(get_testdata_file(name)))
    np.testing.assert_allclose(shown, reference, atol=1e-3)
    assert reference.max() == 255.0 and reference.min() == 0.0


def test_ct_small_is_shown_in_the_lung_window() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    (shown,) = display_frames(ds)
    expected = np.clip(((hu + 600.5) / 1499 + 0.5) * 255, 0, 255)
    np.testing.assert_allclose(shown, expected, atol=1e-3)
    # A narrower (mediastinal) window is a parameter and changes the picture.
    (soft,) = display_frames(ds, ct_window=Window(center=40, width=400))
    assert not np.allclose(soft, shown)


@pytest.mark.parametrize(
    "name,frames",
    [
        ("JPGExtended.dcm", 1),
        ("JPEG2000.dcm", 1),
        ("JPEGLSNearLossless_16.dcm", 1),
        ("693_J2KI.dcm", 1),
        ("SC_rgb_jpeg_dcmtk.dcm", 1),
        ("SC_ybr_full_422_uncompressed.dcm", 1),
        ("SC_rgb_rle_2frame.dcm", 2),
        ("examples_ybr_color.dcm", 30),
        ("examples_palette.dcm", 1),
        ("image_dfl.dcm", 1),
        ("rtdose.dcm", 15),
    ],
)
def test_bundled_files_decode_to_grey_frames(name: str, frames: int) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    images = display_frames(ds)
    assert len(images) == frames
    for image in images:
        assert image.shape == (ds.Rows, ds.Columns) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 255.0 and image.max() > image.min()


def test_rgb_becomes_luma() -> None:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))  # 8-bit RGB, no window applies
    rgb = ds.pixel_array.astype(np.float64)
    (shown,) = display_frames(ds)
    np.testing.assert_allclose(shown, rgb @ [0.299, 0.587, 0.114], atol=1e-3)


def test_monochrome1_is_inverted() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (normal,) = display_frames(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    (inverted,) = display_frames(ds)
    np.testing.assert_allclose(inverted, 255.0 - normal, atol=1e-3)


def test_monochrome1_mr_with_inverted_values_shows_the_same_picture() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    (normal,) = display_frames(ds)
    stored = ds.pixel_array
    ds.PixelData = (int(stored.max()) - stored).astype(stored.dtype).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    (shown,) = display_frames(ds)
    # The percentile window is mirrored too, so the same brightest pixels are clipped.
    np.testing.assert_allclose(shown, normal, atol=1e-3)


@pytest.mark.parametrize(
    "dtype,slope,intercept",
    [(np.uint16, 1.0, 0.0), (np.int16, 2.5, -1024.0), (np.int16, -1.5, 100.0), (np.int32, 1.0, 0.0)],
)
def test_mr_window_spans_the_documented_percentiles(dtype: type, slope: float, intercept: float) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    stored = rng.integers(max(info.min, -3000), min(info.max, 4095), (97, 101), endpoint=True).astype(dtype)
    stored.flat[:3] = min(info.max, 2**20)  # a few hot pixels the window must ignore
    ds = _image_dataset(stored.astype(np.int16 if dtype != np.uint16 else np.uint16), "MR")
    if dtype == np.int32:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 1
        ds.PixelData = stored.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    values = ds.pixel_array.astype(np.float64) * slope + intercept
    # The documented window (dicom_io.imaging: the frame's minimum to its 99.99th percentile, chosen because the
    # training JPEGs are min-max exports), written out here rather than read from the constant under test.
    lo, hi = values.min(), np.percentile(values, 99.99)
    (shown,) = display_frames(ds)
    np.testing.assert_allclose(shown, np.clip((values - lo) / (hi - lo) * 255, 0, 255), atol=1e-3)


# --- series ordering -------------------------------------------------------------------------------------------


def test_series_frames_are_ordered_along_the_slice_normal() -> None:
    paths = _sample("brain-tumor-mri/Testing/glioma/*.jpg", 5)
    slices = []
    for z, path in enumerate(paths):
        ds = _mr_from_display(_grey8(path))
        ds.ImagePositionPatient = [0.0, 0.0, -10.0 + 2.5 * z]
        ds.InstanceNumber = 5 - z  # deliberately opposite to the spatial order
        slices.append(ds)
    expected = [display_frames(ds)[0] for ds in slices]
    shuffled = [slices[i] for i in (3, 0, 4, 1, 2)]
    shuffled[2].PixelSpacing = [0.5, 0.75]  # one frame's own spacing travels with it through the sort
    records = series_frame_records(shuffled)
    assert [r.position for r in records] == [-10.0, -7.5, -5.0, -2.5, 0.0]
    assert [r.pixel_spacing for r in records][4] == (0.5, 0.75)
    assert [r.sop_instance_uid for r in records] == [ds.SOPInstanceUID for ds in slices]
    for got, want in zip(series_frames(shuffled), expected):
        np.testing.assert_array_equal(got, want)


def test_series_without_geometry_falls_back_to_instance_number() -> None:
    grey = np.tile(np.arange(64, dtype=np.uint8), (64, 1)) * 4
    slices = []
    for number in (3, 1, 2):
        ds = _mr_from_display(grey)
        del ds.ImagePositionPatient
        ds.InstanceNumber = number
        slices.append(ds)
    records = series_frame_records(slices)
    assert [r.position for r in records] == [None, None, None]
    assert [r.sop_instance_uid for r in records] == [slices[i].SOPInstanceUID for i in (1, 2, 0)]


def _legacy_series(modality: str, count: int) -> list[Dataset]:
    """Single-frame slices with the patient/study/series attributes highdicom's legacy conversion needs."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    pattern = "brain-tumor-mri/Testing/meningioma/*.jpg" if modality == "MR" else "covid-ct/COVID/*.png"
    slices = []
    for index, path in enumerate(_sample(pattern, count)):
        grey = np.asarray(Image.open(path).convert("L").resize((128, 128)), dtype=np.uint8)
        ds = _mr_from_display(grey) if modality == "MR" else _ct_from_display(grey)
        if modality == "CT":
            ds.RescaleSlope = 1 + index % 2  # per-frame Pixel Value Transformation must be honoured
            hu = ds.pixel_array.astype(np.int32) - 1024
            ds.PixelData = (hu // ds.RescaleSlope + 1024).astype(np.int16).tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * index]
        ds.InstanceNumber = index + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.Manufacturer, ds.PixelSpacing, ds.SliceThickness = 1, "Test", [1.0, 1.0], 3.0
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.SeriesDate = ds.ContentDate = "20240101"
        ds.SeriesTime = ds.ContentTime = "120000"
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
            ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = 10, 500, 1.5
        else:
            ds.KVP = 120
        slices.append(ds)
    return slices


@pytest.mark.parametrize(
    "modality,convert",
    [("MR", hd.legacy.LegacyConvertedEnhancedMRImage), ("CT", hd.legacy.LegacyConvertedEnhancedCTImage)],
)
def test_enhanced_objects_split_into_the_frames_of_their_source_slices(modality: str, convert: type) -> None:
    slices = _legacy_series(modality, 4)
    enhanced = convert(
        slices, series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1
    )
    frames = display_frames(enhanced)
    assert len(frames) == 4
    by_position = {float(ds.ImagePositionPatient[2]): display_frames(ds)[0] for ds in slices}
    for index, frame in enumerate(frames):
        z = float(enhanced.PerFrameFunctionalGroupsSequence[index].PlanePositionSequence[0].ImagePositionPatient[2])
        np.testing.assert_allclose(frame, by_position[z], atol=1e-3)
    records = series_frame_records([enhanced])
    assert [r.position for r in records] == [0.0, 3.0, 6.0, 9.0]
    for record in records:
        np.testing.assert_allclose(record.image, by_position[record.position], atol=1e-3)


# --- bad input -------------------------------------------------------------------------------------------------


def _mr_small() -> Dataset:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def test_no_pixel_data() -> None:
    ds = _mr_small()
    del ds.PixelData
    with pytest.raises(ImagingError, match="no Pixel Data"):
        display_frames(ds)


def test_rows_missing() -> None:
    ds = _mr_small()
    del ds.Rows
    with pytest.raises(ImagingError, match="Rows"):
        display_frames(ds)


def test_truncated_pixel_data() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(ImagingError, match="cannot be decoded"):
        display_frames(ds)


def test_huge_declared_size_over_a_few_bytes_is_refused_before_decoding() -> None:
    ds = _mr_small()
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x00" * 16
    with pytest.raises(ImagingError, match="exceeds the limit"):
        display_frames(ds)


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"])
def test_corrupt_compressed_data(name: str) -> None:
    # Both are deliberately broken in pydicom's test set (invalid SOS markers; bytes replaced in the codestream).
    with pytest.raises(ImagingError, match="cannot be decoded"):
        display_frames(pydicom.dcmread(get_testdata_file(name)))


def test_dataset_without_transfer_syntax() -> None:
    ds = _mr_small()
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(ImagingError, match="Transfer Syntax"):
        display_frames(ds)


def test_imaging_error_is_a_value_error() -> None:
    assert issubclass(ImagingError, ValueError)
