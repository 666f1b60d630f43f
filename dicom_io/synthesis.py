"""Realistic MR and CT series made from 8-bit grey images, for tests and benchmarks.

The images are *display* images (what a radiologist saw), so each series stores values that map back to them
exactly through the usual display pipeline:

* MR: 12 bits stored in 16, ``stored = grey * 16`` (MONOCHROME1: ``4080 - grey * 16``).
* CT: Hounsfield units that a lung window (W1500/L-600) displays as the image, ``HU = round(grey * 1500 / 255)
  - 1350``, stored with Rescale Slope 1 and Intercept -1024 (signed) or -2048 (unsigned: no HU is clipped).

:func:`encode` re-encodes an instance into any transfer syntax the listener accepts. Nothing made here is ever
committed: tests make their DICOM at run time.
"""

from __future__ import annotations

import copy
import datetime
import io
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)

from dicom_io.imaging import LUNG_WINDOW

#: Every transfer syntax :func:`encode` produces (and the listener accepts).
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: Lossless transfer syntaxes: decoding gives back the stored values exactly.
LOSSLESS_TRANSFER_SYNTAXES: frozenset[UID] = frozenset(
    set(TRANSFER_SYNTAXES) - {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
)

_DCMCJPEG = "/usr/bin/dcmcjpeg"
_DCMCJPEG_MODES = {JPEGExtended12Bit: "+ee", JPEGLossless: "+el", JPEGLosslessSV1: "+e1"}
_AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

ImageInput = np.ndarray | Path | str


def load_grey(image: ImageInput) -> np.ndarray:
    """An 8-bit 2-D grey array from an array or an image file (colour is converted to luminance)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("L"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.asarray(Image.fromarray(array[..., :3].astype(np.uint8)).convert("L"), dtype=np.uint8)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise ValueError("grey values must lie in 0..255")
        array = array.astype(np.uint8)
    return array


def grey_to_hounsfield(grey: np.ndarray) -> np.ndarray:
    """Invert the lung window: the HU values (int16) that the window displays as ``grey``."""
    low = LUNG_WINDOW.center - LUNG_WINDOW.width / 2
    return np.rint(grey.astype(np.float64) * LUNG_WINDOW.width / 255.0 + low).astype(np.int16)


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _base(
    sop_class: str,
    modality: str,
    *,
    patient_id: str,
    patient_name: str,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    study_description: str,
    series_description: str,
    series_number: int,
    accession_number: str,
    body_part: str,
    manufacturer: str,
    model_name: str,
    when: datetime.datetime,
) -> Dataset:
    ds = Dataset()
    sop_instance = generate_uid()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "Synthetic Test Hospital"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.StationName = "SYNTH01"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = model_name
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = f"{max(0, when.year - 1970):03d}Y"
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = _AXIAL
    return ds


def _place(ds: Dataset, index: int, shape: tuple[int, int], pixel_spacing: float, slice_spacing: float) -> None:
    rows, columns = shape
    z = round(index * slice_spacing, 3)
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [
        round(-columns * pixel_spacing / 2, 3),
        round(-rows * pixel_spacing / 2, 3),
        z,
    ]
    ds.SliceLocation = z
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1


def _set_pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, signed: bool, photometric: str) -> None:
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    ds["PixelData"].VR = "OW"


def _study_defaults(
    study_instance_uid: str | None, series_instance_uid: str | None, frame_of_reference_uid: str | None
) -> tuple[str, str, str]:
    return (
        study_instance_uid or generate_uid(),
        series_instance_uid or generate_uid(),
        frame_of_reference_uid or generate_uid(),
    )


def mr_series(
    images: Iterable[ImageInput],
    *,
    patient_id: str = "SYN-MR-0001",
    patient_name: str = "Synthetic^Brain",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_description: str = "MRI BRAIN WITH AND WITHOUT CONTRAST",
    series_description: str = "AX T1 POST",
    series_number: int = 5,
    accession_number: str = "ACC0001",
    body_part: str = "BRAIN",
    manufacturer: str = "SIEMENS",
    model_name: str = "Aera",
    magnetic_field_strength: float = 1.5,
    pixel_spacing: float = 0.9375,
    slice_thickness: float = 5.0,
    monochrome1: bool = False,
    when: datetime.datetime | None = None,
) -> list[Dataset]:
    """An axial MR Image series, one instance per image, 12-bit values in 16-bit words, Explicit VR LE."""
    study, series, frame_of_reference = _study_defaults(
        study_instance_uid, series_instance_uid, frame_of_reference_uid
    )
    when = when or datetime.datetime(2024, 3, 14, 9, 30, 0)
    result = []
    for index, image in enumerate(images):
        grey = load_grey(image)
        ds = _base(
            MRImageStorage,
            "MR",
            patient_id=patient_id,
            patient_name=patient_name,
            study_instance_uid=study,
            series_instance_uid=series,
            frame_of_reference_uid=frame_of_reference,
            study_description=study_description,
            series_description=series_description,
            series_number=series_number,
            accession_number=accession_number,
            body_part=body_part,
            manufacturer=manufacturer,
            model_name=model_name,
            when=when,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*se2d1"
        ds.SliceThickness = slice_thickness
        ds.SpacingBetweenSlices = slice_thickness + 1.0
        ds.RepetitionTime = 550.0
        ds.EchoTime = 12.0
        ds.NumberOfAverages = 1.0
        ds.ImagingFrequency = round(42.577478 * magnetic_field_strength, 6)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = magnetic_field_strength
        ds.EchoTrainLength = 1
        ds.FlipAngle = 90.0
        ds.ContrastBolusAgent = "GADOLINIUM" if "POST" in series_description.upper() else ""
        _place(ds, index, grey.shape, pixel_spacing, slice_thickness + 1.0)
        stored = grey.astype(np.uint16) * 16
        if monochrome1:
            stored = 4080 - stored
        _set_pixels(ds, stored, 12, False, "MONOCHROME1" if monochrome1 else "MONOCHROME2")
        ds.WindowCenter = 2040
        ds.WindowWidth = 4080
        result.append(ds)
    return result


def ct_series(
    images: Iterable[ImageInput],
    *,
    patient_id: str = "SYN-CT-0001",
    patient_name: str = "Synthetic^Chest",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_description: str = "CT CHEST WITHOUT CONTRAST",
    series_description: str = "AXIAL LUNG 1.25MM",
    series_number: int = 3,
    accession_number: str = "ACC0002",
    body_part: str = "CHEST",
    manufacturer: str = "GE MEDICAL SYSTEMS",
    model_name: str = "Revolution CT",
    pixel_spacing: float = 0.703125,
    slice_thickness: float = 1.25,
    signed: bool = True,
    when: datetime.datetime | None = None,
) -> list[Dataset]:
    """An axial CT Image series in Hounsfield units (see the module docstring), Explicit VR LE."""
    study, series, frame_of_reference = _study_defaults(
        study_instance_uid, series_instance_uid, frame_of_reference_uid
    )
    when = when or datetime.datetime(2024, 3, 14, 10, 15, 0)
    intercept = -1024 if signed else -2048
    result = []
    for index, image in enumerate(images):
        grey = load_grey(image)
        ds = _base(
            CTImageStorage,
            "CT",
            patient_id=patient_id,
            patient_name=patient_name,
            study_instance_uid=study,
            series_instance_uid=series,
            frame_of_reference_uid=frame_of_reference,
            study_description=study_description,
            series_description=series_description,
            series_number=series_number,
            accession_number=accession_number,
            body_part=body_part,
            manufacturer=manufacturer,
            model_name=model_name,
            when=when,
        )
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = slice_thickness
        ds.KVP = 120.0
        ds.DataCollectionDiameter = 500.0
        ds.ReconstructionDiameter = round(pixel_spacing * max(grey.shape), 3)
        ds.GantryDetectorTilt = 0.0
        ds.TableHeight = 150.0
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "LUNG"
        ds.PatientPosition = "FFS"
        _place(ds, index, grey.shape, pixel_spacing, slice_thickness)
        stored = grey_to_hounsfield(grey).astype(np.int32) - intercept
        _set_pixels(ds, stored, 12, signed, "MONOCHROME2")
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = LUNG_WINDOW.center
        ds.WindowWidth = LUNG_WINDOW.width
        result.append(ds)
    return result


def multiframe_mr(series: Sequence[Dataset], *, sop_instance_uid: str | None = None) -> Dataset:
    """One Legacy Converted Enhanced MR Image (multi-frame, functional groups) from an :func:`mr_series`."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    first = series[0]
    converted = LegacyConvertedEnhancedMRImage(
        legacy_datasets=list(series),
        series_instance_uid=generate_uid(),
        series_number=int(first.SeriesNumber) + 100,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
    )
    converted.SeriesDescription = f"{first.SeriesDescription} MF"
    return converted


def _copy_with_syntax(ds: Dataset, syntax: UID) -> Dataset:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = syntax
    return out


def _native(ds: Dataset) -> Dataset:
    """An Explicit VR LE copy, decompressing if needed."""
    out = copy.deepcopy(ds)
    syntax = UID(out.file_meta.TransferSyntaxUID)
    if syntax.is_compressed:
        out.decompress()
    elif syntax == ExplicitVRBigEndian:
        array = out.pixel_array
        out.PixelData = array.astype(array.dtype.newbyteorder("<")).tobytes()
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return out


def _jpeg_baseline(ds: Dataset) -> Dataset:
    if int(ds.BitsAllocated) != 8 or int(ds.SamplesPerPixel) != 1:
        raise ValueError("JPEG Baseline needs 8-bit single-sample data; use JPEG Extended for 12-bit MR/CT")
    out = copy.deepcopy(ds)
    frames = out.pixel_array.reshape(-1, int(out.Rows), int(out.Columns))
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    out.PixelData = encapsulate(encoded)
    out["PixelData"].VR = "OB"
    out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out.LossyImageCompression = "01"
    return out


def _dcmcjpeg(ds: Dataset, syntax: UID) -> Dataset:
    # No Python encoder writes JPEG Extended or JPEG Lossless; dcmtk's dcmcjpeg does (installed with dcmtk).
    if not Path(_DCMCJPEG).exists():
        raise RuntimeError(f"encoding {syntax.name} needs dcmtk's {_DCMCJPEG}")
    with tempfile.TemporaryDirectory(prefix="synthesis-") as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(source, enforce_file_format=True)
        subprocess.run(
            [_DCMCJPEG, _DCMCJPEG_MODES[syntax], "+un", str(source), str(target)],
            check=True,
            capture_output=True,
        )
        return dcmread(target)


def encode(ds: Dataset, transfer_syntax_uid: str) -> Dataset:
    """A copy of ``ds`` encoded in ``transfer_syntax_uid`` (one of :data:`TRANSFER_SYNTAXES`).

    UIDs are kept, also for lossy syntaxes, so a test can follow an instance through. JPEG Baseline needs 8-bit
    data; JPEG Extended and Lossless use dcmtk's ``dcmcjpeg``; the rest use pydicom's encoders.
    """
    syntax = UID(transfer_syntax_uid)
    if syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"cannot encode in {syntax} ({syntax.name}); supported: {', '.join(TRANSFER_SYNTAXES)}")
    native = _native(ds)
    if syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        return _copy_with_syntax(native, syntax)
    if syntax == ExplicitVRBigEndian:
        out = _copy_with_syntax(native, syntax)
        if int(out.BitsAllocated) > 8:
            # pydicom writes OW values as given: make the words big endian.
            array = native.pixel_array
            out.PixelData = array.astype(array.dtype.newbyteorder(">")).tobytes()
        return out
    if syntax == JPEGBaseline8Bit:
        return _jpeg_baseline(native)
    if syntax in _DCMCJPEG_MODES:
        return _dcmcjpeg(native, syntax)
    options: dict[str, object] = {}
    if syntax == JPEGLSNearLossless:
        options["jls_error"] = 2
    elif syntax == JPEG2000:
        options["j2k_cr"] = [10]
    native.compress(syntax, generate_instance_uid=False, **options)
    return native
