"""Reading a received instance's bytes into a pydicom :class:`Dataset` of raw (undecoded) elements, in one pass.

pydicom's reader costs ~8 us per element (its generator, tag objects, a file object's reads), which was a large
part of the listener's work per instance. :func:`read_received` walks the little endian encodings (every transfer
syntax we accept but Deflated and Explicit VR Big Endian, which go to pydicom) with ``struct.unpack_from`` over the
bytes, checks on the way what :func:`dicom_io.validation.check_sequence_depth` checks (the walk descends into every
sequence anyway), and builds the Dataset from the same raw elements pydicom's reader makes: elements are decoded
only when something reads them. A sequence is kept raw too (pydicom parses it when it is read; one of undefined
length is kept as the bytes of its items, read back the same).
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom_io.validation import (
    MAX_SEQUENCE_DEPTH,
    STATUS_TOO_DEEP,
    InvalidInstance,
    check_sequence_depth,
)

#: Every VR of PS3.5 6.2, by its two bytes; an element with another VR goes to pydicom's reader.
_VRS = {vr.encode(): vr for vr in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)}
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_CHARACTER_SET = 0x00080005
_UNDEFINED = 0xFFFFFFFF
_PREAMBLE = 132  # 128-byte preamble and "DICM"
_TAG = struct.Struct("<HH")
_SHORT = struct.Struct("<HH2sH")  # tag, VR, 2-byte length
_LONG = struct.Struct("<HHL")  # tag, 4-byte length (implicit VR; and an item's header)
_U32 = struct.Struct("<L")


class _Unreadable(Exception):
    """Bytes the fast walk does not take as elements: pydicom reads them instead (it tolerates more)."""


class _Walker:
    """One pass over little endian elements; ``top`` collects the top level's raw elements."""

    def __init__(self, data: bytes, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.top: dict[BaseTag, RawDataElement] = {}

    def is_sequence(self, tag: int, vr: str | None, length: int, at: int, end: int) -> bool:
        if vr == "SQ":
            return True
        if vr is not None and vr != "UN":
            return False
        if length == _UNDEFINED and self.next_is_item(at, end):
            return True  # items of undefined length: a sequence (sent as UN too, PS3.5 6.2.2)
        if vr is None and not tag >> 16 & 1:  # implicit VR, a public tag: the dictionary knows
            try:
                return dictionary_VR(tag) == "SQ"
            except KeyError:
                return False
        return False

    def next_is_item(self, at: int, end: int) -> bool:
        return at + 4 <= end and _TAG.unpack_from(self.data, at) == (0xFFFE, 0xE000)

    def dataset(self, at: int, end: int, depth: int, delimited: bool) -> int:
        """Walk a data set from ``at`` to ``end`` (or, ``delimited``, to its Item Delimitation Item); return where
        it ends. Raises :class:`InvalidInstance` for sequences nested deeper than the limit, :class:`_Unreadable`
        for bytes it does not take as elements. (One loop, headers decoded inline: this runs for every element.)"""
        data, implicit, top = self.data, self.implicit, self.top if depth == 1 else None
        while at < end:
            if at + 8 > end:
                if depth == 1 and not delimited:
                    break  # a few stray bytes after the last element: pydicom ignores them too
                raise _Unreadable(f"element header at byte {at} runs past the end")
            vr: str | None
            if implicit:
                group, element, length = _LONG.unpack_from(data, at)
                vr, value_at = None, at + 8
            else:
                group, element, vr_bytes, length = _SHORT.unpack_from(data, at)
                if group == 0xFFFE:  # items and delimiters have no VR, whatever the transfer syntax
                    vr, length, value_at = None, _U32.unpack_from(data, at + 4)[0], at + 8
                else:
                    vr = _VRS.get(vr_bytes)
                    if vr is None:
                        raise _Unreadable(f"element ({group:04X},{element:04X}) has no known VR")
                    if vr in _LONG_VRS:
                        if at + 12 > end:
                            raise _Unreadable(f"element header at byte {at} runs past the end")
                        length, value_at = _U32.unpack_from(data, at + 8)[0], at + 12
                    else:
                        value_at = at + 8
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and delimited:
                    return value_at
                raise _Unreadable(f"an item tag where an element was expected at byte {at}")
            if (vr == "SQ" or vr is None or vr == "UN") and self.is_sequence(tag, vr, length, value_at, end):
                if depth > MAX_SEQUENCE_DEPTH:
                    raise InvalidInstance(STATUS_TOO_DEEP, f"sequences nest deeper than {MAX_SEQUENCE_DEPTH} levels")
                stop = self.sequence(value_at, end, length, depth + 1)
                value_end = stop - 8 if length == _UNDEFINED else stop  # the items, without the delimiter
                vr = "SQ"
            elif length == _UNDEFINED:  # encapsulated Pixel Data (or another undefined length value): its items
                value_end = self.fragments(value_at, end, tag)
                stop = value_end + 8
            else:
                stop = value_end = value_at + length
                if stop > end:
                    if tag != _PIXEL_DATA or top is None:
                        raise _Unreadable(f"element ({group:04X},{element:04X}) runs past the end")
                    # Kept short, as pydicom reads it: the Pixel Data check reports the missing bytes.
                    stop = value_end = end
            if top is not None:
                key = BaseTag(tag)
                top[key] = RawDataElement(key, vr, length, data[value_at:value_end], value_at, implicit, True)
            at = stop
        if delimited:
            raise _Unreadable("an item of undefined length has no Item Delimitation Item")
        return at

    def sequence(self, at: int, end: int, length: int, depth: int) -> int:
        """Walk a sequence's items; return the offset after it (after its delimiter when of undefined length)."""
        if length != _UNDEFINED:
            if at + length > end:
                raise _Unreadable(f"a sequence at byte {at} runs past the end")
            end = at + length
        while at < end:
            if at + 8 > end:
                raise _Unreadable(f"an item header at byte {at} runs past the end")
            group, element, item_length = _LONG.unpack_from(self.data, at)
            tag = group << 16 | element
            at += 8
            if tag == _SEQUENCE_END:
                if length != _UNDEFINED:
                    raise _Unreadable(f"a Sequence Delimitation Item in a sequence of defined length at {at - 8}")
                return at
            if tag != _ITEM:
                raise _Unreadable(f"a sequence holds ({group:04X},{element:04X}) where an item was expected")
            if item_length == _UNDEFINED:
                at = self.dataset(at, end, depth, delimited=True)
            else:
                if at + item_length > end:
                    raise _Unreadable(f"an item at byte {at - 8} runs past the end")
                self.dataset(at, at + item_length, depth, delimited=False)
                at += item_length
        if length == _UNDEFINED:
            raise _Unreadable("a sequence of undefined length has no Sequence Delimitation Item")
        return at

    def fragments(self, at: int, end: int, tag: int) -> int:
        """Skip the items of an undefined length value (encapsulated Pixel Data); return where its Sequence
        Delimitation Item starts."""
        while at + 8 <= end:
            group, element, item_length = _LONG.unpack_from(self.data, at)
            if group << 16 | element == _SEQUENCE_END:
                return at
            if group << 16 | element != _ITEM or item_length == _UNDEFINED:
                raise _Unreadable(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length is not items")
            at += 8 + item_length
        raise _Unreadable(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no Sequence Delimitation Item")


def _with_encoding(raw: dict[BaseTag, RawDataElement], implicit: bool, little: bool) -> Dataset:
    """A Dataset of ``raw`` elements, its original encoding and character set set as pydicom's reader sets them."""
    ds = Dataset(raw)
    encoding: str | list[str] = default_encoding
    if _CHARACTER_SET in raw:
        encoding = convert_encodings(convert_raw_data_element(raw[BaseTag(_CHARACTER_SET)]).value)
    ds.set_original_encoding(implicit, little, encoding)
    return ds


def read_received(received: bytes, transfer_syntax: UID) -> Dataset:
    """The Dataset of a received Part 10 stream (preamble, our File Meta Information, the data set as sent), with
    ``file_meta`` set; no element decoded.

    Raises :class:`InvalidInstance` (``0xC003``) for sequences nested deeper than
    :data:`~dicom_io.validation.MAX_SEQUENCE_DEPTH`, and whatever pydicom raises for bytes that are not a data
    set. Deflated and big endian data sets, and any the walk does not take, are read by pydicom (then checked for
    depth), so what is accepted is what pydicom's reader accepted.
    """
    if transfer_syntax.is_little_endian and not transfer_syntax.is_deflated:
        try:
            return _walk(received, transfer_syntax)
        except _Unreadable:
            pass  # malformed or unusual: pydicom's reader decides, as it did for every instance before
    ds = dcmread(BytesIO(received))
    check_sequence_depth(ds)
    return ds


def _walk(received: bytes, transfer_syntax: UID) -> Dataset:
    # The File Meta Information is ours (listener.encode_file_meta): explicit VR little endian, group length first.
    meta_walk = _Walker(received, implicit=False)
    meta_end = _PREAMBLE + 12 + _U32.unpack_from(received, _PREAMBLE + 8)[0]
    meta_walk.dataset(_PREAMBLE, meta_end, depth=1, delimited=False)
    walk = _Walker(received, implicit=transfer_syntax.is_implicit_VR)
    walk.dataset(meta_end, len(received), depth=1, delimited=False)
    if next(iter(walk.top), 0) >> 16 == 2:  # pydicom would read these as part of the File Meta Information
        raise _Unreadable("the data set starts with File Meta Information elements")
    ds = _with_encoding(walk.top, transfer_syntax.is_implicit_VR, True)
    ds.file_meta = FileMetaDataset(meta_walk.top)
    return ds


__all__ = ["read_received"]
