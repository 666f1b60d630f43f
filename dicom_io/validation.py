"""Cheap checks on a received instance, before anything is archived.

Nothing here decodes pixel data (that is the worker's job and costly); the checks only compare what the header
declares with what arrived, so that an instance we acknowledge can later be read and decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.uid import UID

#: C-STORE failure statuses. 0xC000-0xCFFF means "cannot understand"; the low bits say which check failed.
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_MISSING_ATTRIBUTE = 0xC001
STATUS_BAD_PIXEL_DATA = 0xC002
STATUS_TOO_DEEP = 0xC003
STATUS_BAD_UID = 0xC004
#: "Data Set does not match SOP Class" (PS3.4 Annex B.2.3).
STATUS_SOP_CLASS_MISMATCH = 0xA900

#: Deeper than any real IOD (Enhanced objects reach about 4 levels); guards the worker's recursive readers.
MAX_SEQUENCE_DEPTH = 16
#: Largest decoded pixel data we accept: more than any real series and far less than a decompression bomb.
MAX_DECODED_PIXEL_BYTES = 2**31

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"
_ITEM_TAG_BE = b"\xff\xfe\xe0\x00"


@dataclass(frozen=True)
class InvalidInstance(Exception):
    """The instance cannot be accepted; ``status`` is the DIMSE status to answer, ``reason`` says why."""

    status: int
    reason: str

    def __str__(self) -> str:
        return f"0x{self.status:04X}: {self.reason}"


def is_valid_uid(value: object) -> bool:
    """True for a DICOM UID: digits and dots, no empty component, at most 64 characters (safe in a path)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def element_text(ds: Dataset, keyword: str) -> str | None:
    """The value of an element of an ASCII VR (UI, CS, IS, ...) as encoded: values joined by backslashes, padding
    kept; None when absent.

    A raw element (as read, not yet decoded) is decoded here from its bytes: pydicom's own conversion costs ~30 us
    an element, which for the few elements read per received instance was a large part of the listener's work.
    """
    tag = tag_for_keyword(keyword)
    element = ds.get_item(tag) if tag is not None else None
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        return element.value.decode("ascii", "replace") if element.value else ""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def integer_value(ds: Dataset, keyword: str) -> int | None:
    """An IS attribute as one integer; ``None`` when absent, empty or not one integer (a header's own mistake, such
    as Number of Frames "1A", must not stop a reader that only counts)."""
    text = (element_text(ds, keyword) or "").strip(" \x00")
    try:
        return int(text) if text else None
    except ValueError:
        return None


def require_uid(ds: Dataset, keyword: str) -> str:
    """Return the UID attribute ``keyword`` of ``ds`` or raise :class:`InvalidInstance`."""
    value = element_text(ds, keyword)
    text = "" if value is None else value.rstrip("\x00 ")
    if text == "":
        raise InvalidInstance(STATUS_MISSING_ATTRIBUTE, f"{keyword} is missing")
    if not is_valid_uid(text):
        raise InvalidInstance(STATUS_BAD_UID, f"{keyword} {text[:80]!r} is not a valid UID")
    return text


def check_sequence_depth(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH) -> None:
    """Raise :class:`InvalidInstance` when sequences nest deeper than ``limit``.

    Only sequence elements are converted from their raw form; other elements stay raw (cheap).
    """
    stack: list[tuple[Dataset, int]] = [(ds, 1)]
    while stack:
        current, depth = stack.pop()
        for tag in current.keys():
            raw = current.get_item(tag)
            if isinstance(raw, RawDataElement):
                vr = raw.VR
                if vr is None:
                    try:
                        vr = dictionary_VR(tag)
                    except KeyError:
                        continue
                if vr != "SQ":
                    continue
            elif not (isinstance(raw, DataElement) and raw.VR == "SQ"):
                continue
            if depth > limit:
                raise InvalidInstance(STATUS_TOO_DEEP, f"sequences nest deeper than {limit} levels")
            stack.extend((item, depth + 1) for item in current[tag].value)


def _native_pixel_bytes(rows: int, columns: int, samples: int, bits: int, frames: int) -> int:
    if bits == 1:  # bit-packed across frame boundaries
        return (rows * columns * samples * frames + 7) // 8
    return rows * columns * samples * frames * (bits // 8)


def _int_attribute(ds: Dataset, keyword: str, default: int | None = None) -> int:
    element = ds.get_item(keyword)
    if isinstance(element, RawDataElement) and element.is_little_endian and element.value is not None:
        # The common encodings read from their bytes (see element_text); anything else through pydicom.
        if element.length == 2 and element.VR in ("US", None) and dictionary_VR(element.tag) == "US":
            return int.from_bytes(element.value, "little")
        if element.VR in ("IS", None) and dictionary_VR(element.tag) == "IS":
            text = element.value.decode("ascii", "replace").strip(" \x00")
            if text.isdigit():
                return int(text)
    value = ds.get(keyword, default)
    if value is None or value == "":
        raise InvalidInstance(STATUS_MISSING_ATTRIBUTE, f"{keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInstance(STATUS_MISSING_ATTRIBUTE, f"{keyword} {value!r} is not an integer") from None


def check_pixel_data(ds: Dataset, transfer_syntax: UID) -> None:
    """Raise :class:`InvalidInstance` unless the Pixel Data can hold the image the header declares.

    Native data must have exactly ``Rows*Columns*Samples*Bits/8*Frames`` bytes (plus one pad byte);
    encapsulated data must hold a Basic Offset Table item and at least one fragment.
    """
    rows = _int_attribute(ds, "Rows")
    columns = _int_attribute(ds, "Columns")
    samples = _int_attribute(ds, "SamplesPerPixel")
    bits = _int_attribute(ds, "BitsAllocated")
    frames = _int_attribute(ds, "NumberOfFrames", 1)
    if min(rows, columns, samples, frames) < 1:
        raise InvalidInstance(
            STATUS_BAD_PIXEL_DATA, f"image size {rows}x{columns}x{samples}, {frames} frame(s) is not positive"
        )
    if bits not in (1, 8, 16, 32, 64):
        raise InvalidInstance(STATUS_BAD_PIXEL_DATA, f"BitsAllocated {bits} is not 1, 8, 16, 32 or 64")
    expected = _native_pixel_bytes(rows, columns, samples, bits, frames)
    if expected > MAX_DECODED_PIXEL_BYTES:
        raise InvalidInstance(
            STATUS_BAD_PIXEL_DATA,
            f"declared image {rows}x{columns}x{samples}x{bits} bits x {frames} frame(s) needs {expected} bytes, "
            f"more than the {MAX_DECODED_PIXEL_BYTES} we accept",
        )
    element = ds.get_item(0x7FE00010)
    if element is None:
        raise InvalidInstance(STATUS_MISSING_ATTRIBUTE, "Pixel Data is missing from an image instance")
    value = element.value
    if transfer_syntax.is_encapsulated:
        data = value or b""  # sliced only: no copy of the whole Pixel Data
        item_tag = _ITEM_TAG_LE if transfer_syntax.is_little_endian else _ITEM_TAG_BE
        # Basic Offset Table item, then at least one fragment item.
        if bytes(data[:4]) != item_tag:
            raise InvalidInstance(STATUS_BAD_PIXEL_DATA, "encapsulated Pixel Data does not start with an item")
        bot_length = int.from_bytes(data[4:8], "little" if transfer_syntax.is_little_endian else "big")
        fragment_at = 8 + bot_length
        if bytes(data[fragment_at : fragment_at + 4]) != item_tag:
            raise InvalidInstance(STATUS_BAD_PIXEL_DATA, "encapsulated Pixel Data has no fragments")
        return
    length = len(value) if value is not None else element.length
    if length not in (expected, expected + 1):
        raise InvalidInstance(
            STATUS_BAD_PIXEL_DATA,
            f"Pixel Data has {length} bytes but {rows}x{columns}x{samples}x{bits} bits x {frames} frame(s) "
            f"needs {expected}",
        )


def validate_instance(
    ds: Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: UID,
    is_image: bool,
) -> None:
    """Raise :class:`InvalidInstance` unless ``ds`` can be archived and later read.

    ``sop_class_uid`` and ``sop_instance_uid`` are the C-STORE request's Affected SOP Class/Instance UIDs, which
    the dataset must repeat; ``is_image`` says whether the SOP class requires Pixel Data. Sequence depth is checked
    while the bytes are read (:func:`dicom_io.reading.read_received`), or by :func:`check_sequence_depth`.
    """
    dataset_class = require_uid(ds, "SOPClassUID")
    if dataset_class != sop_class_uid:
        raise InvalidInstance(
            STATUS_SOP_CLASS_MISMATCH,
            f"SOPClassUID {dataset_class} differs from the request's Affected SOP Class UID {sop_class_uid}",
        )
    dataset_instance = require_uid(ds, "SOPInstanceUID")
    if dataset_instance != sop_instance_uid:
        raise InvalidInstance(
            STATUS_BAD_UID,
            f"SOPInstanceUID {dataset_instance} differs from the request's Affected SOP Instance UID "
            f"{sop_instance_uid}",
        )
    require_uid(ds, "StudyInstanceUID")
    require_uid(ds, "SeriesInstanceUID")
    if is_image:
        check_pixel_data(ds, transfer_syntax)
