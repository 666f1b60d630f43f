"""dicom_io.reading.read_received: the listener's one-pass reader gives the Dataset pydicom's reader gives, checks
sequence depth on the way, and leaves anything it does not take to pydicom."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

from dicom_factory import brain_images, nested_sequence
from dicom_io import synthesis
from dicom_io.listener import encode_file_meta
from dicom_io.reading import read_received
from dicom_io.validation import MAX_SEQUENCE_DEPTH, STATUS_TOO_DEEP, InvalidInstance, element_text


def _received(ds: Dataset, transfer_syntax: str) -> bytes:
    """What the listener builds: our File Meta Information, then the data set as a peer encodes it."""
    encoded = synthesis.encode(ds, transfer_syntax)
    buffer = BytesIO()
    encoded.save_as(buffer, enforce_file_format=True)
    whole = buffer.getvalue()
    meta_end = 132 + 12 + struct.unpack_from("<I", whole, 132 + 8)[0]
    meta = encode_file_meta(encoded.SOPClassUID, encoded.SOPInstanceUID, transfer_syntax, "SENDER")
    return meta + whole[meta_end:]


def _assert_same(mine: Dataset, theirs: Dataset) -> None:
    assert list(mine.keys()) == list(theirs.keys())
    for tag in theirs.keys():
        a, b = mine[tag], theirs[tag]
        assert a.VR == b.VR, tag
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), tag
            for item_a, item_b in zip(a.value, b.value):
                _assert_same(item_a, item_b)
        else:
            assert a.value == b.value, tag


@pytest.fixture(scope="module")
def mr() -> Dataset:
    ds = synthesis.mr_series(brain_images(1))[0]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    ds.AnatomicRegionSequence = Sequence([code])
    return ds


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1, DeflatedExplicitVRLittleEndian,
     ExplicitVRBigEndian],
)
def test_reads_what_pydicom_reads(mr: Dataset, transfer_syntax: str) -> None:
    received = _received(mr, transfer_syntax)
    ds = read_received(received, UID(transfer_syntax))
    reference = dcmread(BytesIO(received))
    _assert_same(ds, reference)
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert ds.file_meta.SourceApplicationEntityTitle.strip() == "SENDER"
    assert element_text(ds, "SOPInstanceUID").rstrip("\x00") == mr.SOPInstanceUID
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Brain"


def test_pydicoms_own_test_files_read_alike() -> None:
    compared = 0
    # The files pydicom ships (get_testdata_files also searches a download cache, which takes seconds).
    for path in sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm")):
        if path.stat().st_size > 256 * 1024:  # the large ones add time, not cases
            continue
        raw = path.read_bytes()
        # Part 10 files whose File Meta Information starts with its group length: the data set starts after it.
        if raw[128:132] != b"DICM" or raw[132:138] != b"\x02\x00\x00\x00UL":
            continue
        start = 132 + 12 + struct.unpack_from("<I", raw, 132 + 8)[0]
        try:
            transfer_syntax = UID(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            received = encode_file_meta("1.2.3", "1.2.3.4", transfer_syntax, "AE") + raw[start:]
            reference = dcmread(BytesIO(received))
            list(reference.iterall())  # every element decodes
        except Exception:  # noqa: BLE001 - pydicom cannot read it as received: nothing to compare
            continue
        _assert_same(read_received(received, transfer_syntax), reference)
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_sequences_nested_too_deep_are_refused(mr: Dataset, transfer_syntax: str) -> None:
    ok, deep = Dataset(), Dataset()
    ok.update(mr)
    deep.update(mr)
    ok.ContentSequence = nested_sequence(MAX_SEQUENCE_DEPTH - 1)
    deep.ContentSequence = nested_sequence(MAX_SEQUENCE_DEPTH + 1)
    ok.file_meta = deep.file_meta = mr.file_meta
    read_received(_received(ok, transfer_syntax), UID(transfer_syntax))
    with pytest.raises(InvalidInstance) as refused:
        read_received(_received(deep, transfer_syntax), UID(transfer_syntax))
    assert refused.value.status == STATUS_TOO_DEEP


def test_undefined_length_sequences_read_back() -> None:
    # (0040,A730) Content Sequence of undefined length holding one item of undefined length.
    item = b"\x08\x00\x04\x01LO\x06\x00Brain "
    body = (
        b"\x08\x00\x16\x00UI\x1a\x00" + MRImageStorage.encode().ljust(26, b"\x00")
        + b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )  # fmt: skip
    received = encode_file_meta(MRImageStorage, generate_uid(), ExplicitVRLittleEndian, "AE") + body
    ds = read_received(received, UID(ExplicitVRLittleEndian))
    _assert_same(ds, dcmread(BytesIO(received)))
    assert ds.ContentSequence[0].CodeMeaning == "Brain"


def test_truncated_pixel_data_is_kept_short(mr: Dataset) -> None:
    received = _received(mr, ExplicitVRLittleEndian)[:-5000]
    ds = read_received(received, UID(ExplicitVRLittleEndian))
    assert len(ds.PixelData) == len(mr.PixelData) - 5000  # as pydicom reads it: validation reports the shortfall
