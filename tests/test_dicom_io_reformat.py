"""``dicom_io.reformat``: a sagittal or coronal MR volume cut into axial slices, and the worker reading it so.

The volumes are made here: a block of voxel values in patient space (LPS: x right to left, y front to back, z foot
to head) with values in no pattern, stored as the slices a scanner would send in each plane, so that every axial
slice the reformat returns can be compared with the block's own axial slice, position and orientation included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_io.imaging import percentile_grey
from dicom_io.reformat import axial_reformat
from dicom_io.synthesis import multiframe_mr
from models.card import CARD_FILE, ModelCard
from models.inference import default_model_dir
from models.preprocessing import InputSpec
from models.tasks import BRAIN_TUMOR, COVID_CT
from worker.decoding import decode_series, prepare_series

#: Voxels along x, y, z: a head-sized block of 1 mm voxels (wider than the reformat's least extent every way).
SHAPE = (130, 150, 140)
ORIGIN = np.array([-60.0, -80.0, -50.0])  # patient position of voxel (0, 0, 0)


def _block(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """``block[x, y, z]``: stored values with no pattern a mistaken axis or flip could keep."""
    rng = np.random.default_rng(7)
    return rng.permutation(np.prod(shape)).reshape(shape).astype(np.uint16) % 60000 + 100


def _slice(pixels: np.ndarray, orientation: list[float], position: np.ndarray, spacing: tuple[float, float],
           number: int, uids: tuple[str, str, str]) -> Dataset:
    """One instance; ``uids``: the series' Study, Series and Frame of Reference UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = "SYN-REFORMAT", "Synthetic^Volume", "20240314", "093000"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SeriesDescription, ds.SliceThickness = "t1_mprage_sag", 1.0
    ds.WindowCenter, ds.WindowWidth = 30000, 60000
    ds.MRAcquisitionType = "3D"
    ds.ImageOrientationPatient = orientation
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def _uids() -> tuple[str, str, str]:
    return generate_uid(), generate_uid(), generate_uid()


def sagittal_series(block: np.ndarray, step: float = 1.0, pixel: tuple[float, float] = (1.0, 1.0)
                    ) -> list[Dataset]:
    """``block`` as sagittal slices (one per x, right to left), rows from head to foot, columns front to back."""
    uid = _uids()
    nx, ny, nz = block.shape
    top = ORIGIN + np.array([0.0, 0.0, (nz - 1) * pixel[0]])
    return [_slice(block[i, :, ::-1].T, [0, 1, 0, 0, 0, -1], top + np.array([i * step, 0.0, 0.0]), pixel, i + 1, uid)
            for i in range(nx)]


def coronal_series(block: np.ndarray) -> list[Dataset]:
    """``block`` as coronal slices (one per y, back to front: the scanner's order does not matter), rows from head
    to foot, columns right to left."""
    uid = _uids()
    nx, ny, nz = block.shape
    top = ORIGIN + np.array([0.0, 0.0, nz - 1.0])
    return [_slice(block[:, j, ::-1].T, [1, 0, 0, 0, 0, -1], top + np.array([0.0, j, 0.0]), (1.0, 1.0), ny - j, uid)
            for j in reversed(range(ny))]


def axial_series(block: np.ndarray) -> list[Dataset]:
    uid = _uids()
    return [_slice(block[:, :, k].T, [1, 0, 0, 0, 1, 0], ORIGIN + np.array([0.0, 0.0, k]), (1.0, 1.0), k + 1, uid)
            for k in range(block.shape[2])]


def expected_axial(block: np.ndarray) -> list[np.ndarray]:
    """The block's axial slices as display images: rows front to back, columns right to left, foot to head."""
    return [percentile_grey(block[:, :, k].T.astype(np.float64)) for k in range(block.shape[2])]


@pytest.mark.parametrize("series", [sagittal_series, coronal_series], ids=["sagittal", "coronal"])
def test_a_volume_is_cut_into_the_axial_slices_of_the_patient(series) -> None:
    block = _block()
    frames = axial_reformat(series(block))
    assert frames is not None and len(frames) == SHAPE[2]
    for k, (frame, expected) in enumerate(zip(frames, expected_axial(block))):
        assert frame.reformatted and frame.frame_number == k + 1 and frame.sop_instance_uid == ""
        assert frame.position == pytest.approx(ORIGIN[2] + k)
        np.testing.assert_allclose(frame.image, expected, atol=1e-3)


def test_an_enhanced_multiframe_volume_is_cut_alike() -> None:
    block = _block()
    classic = axial_reformat(sagittal_series(block))
    enhanced = axial_reformat([multiframe_mr(sagittal_series(block))])
    assert classic is not None and enhanced is not None and len(enhanced) == len(classic)
    for one, other in zip(classic, enhanced):
        assert one.position == pytest.approx(other.position)
        np.testing.assert_array_equal(one.image, other.image)


def test_rectangular_pixels_are_resampled_square() -> None:
    # Columns (front to back) 0.5 mm apart, rows and slices 1 mm: axial rows 0.5 mm apart, columns resampled to it.
    block = _block((130, 150, 140))
    frames = axial_reformat(sagittal_series(block, pixel=(1.0, 0.5)))
    assert frames is not None and len(frames) == 140
    assert frames[0].image.shape == (150, 260)
    assert all(frame.pixel_spacing == (0.5, 0.5) for frame in frames)  # the region checks' millimetres


@pytest.mark.parametrize("case, make", [
    ("axial already", lambda block: axial_series(block)),
    ("thick 2D slices: 5 mm apart, 1 mm pixels", lambda block: sagittal_series(block[::5], step=5.0)),
    ("a 100 mm slab, narrower than a head", lambda block: sagittal_series(block[:100])),
    ("unevenly spaced", lambda block: [ds for i, ds in enumerate(sagittal_series(block)) if i != 60]),
    ("CT", lambda block: [_ct(ds) for ds in sagittal_series(block)]),
    ("no geometry", lambda block: [_without_position(ds, i == 3) for i, ds in enumerate(sagittal_series(block))]),
])
def test_series_that_are_no_volume_to_cut_are_read_as_acquired(case: str, make) -> None:
    assert axial_reformat(make(_block())) is None, case


def _ct(ds: Dataset) -> Dataset:
    ds.Modality = "CT"
    return ds


def _without_position(ds: Dataset, drop: bool) -> Dataset:
    if drop:
        del ds.ImagePositionPatient
    return ds


def test_the_worker_reads_a_sagittal_volume_axially_for_the_brain_model_only(tmp_path: Path) -> None:
    block = _block()
    paths = []
    for index, ds in enumerate(sagittal_series(block)):
        paths.append(tmp_path / f"{index:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    brain = decode_series(paths, BRAIN_TUMOR)
    assert [frame.frame_number for frame in brain] == list(range(1, SHAPE[2] + 1))
    np.testing.assert_allclose(brain[70].image, expected_axial(block)[70], atol=1e-3)
    # A task that does not read volumes axially gets the frames as acquired.
    acquired = decode_series(paths, COVID_CT)
    assert len(acquired) == SHAPE[0] and not any(frame.reformatted for frame in acquired)
    uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}
    assert {frame.sop_instance_uid for frame in acquired} == uids
    prepared = prepare_series(paths, BRAIN_TUMOR.name, _brain_input())
    assert prepared.keys[0] == {"reformat": "axial", "slice": 1, "position": pytest.approx(ORIGIN[2])}
    assert len(prepared.keys) == len(prepared.inputs) == SHAPE[2]


def _brain_input() -> InputSpec:
    return ModelCard.load(default_model_dir(BRAIN_TUMOR.name) / CARD_FILE).input_spec


def test_half_millimetre_rows_give_a_slice_every_millimetre() -> None:
    # Rows (head to foot) 0.5 mm apart: every other row of voxels is cut, one axial slice per millimetre.
    block = _block((130, 150, 280))
    frames = axial_reformat(sagittal_series(block, pixel=(0.5, 1.0)))
    assert frames is not None and len(frames) == 140
    assert [frame.frame_number for frame in frames[:3]] == [1, 2, 3]
    assert np.diff([frame.position for frame in frames]) == pytest.approx(np.ones(139))
    np.testing.assert_allclose(frames[5].image, percentile_grey(block[:, :, 10].T.astype(np.float64)), atol=1e-3)
