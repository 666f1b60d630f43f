"""STOW-RS intake, ``POST /dicomweb/studies`` (PS3.18 10.5): a sending system stores instances over HTTP.

The same durable-acknowledgement rule as C-STORE: an instance is reported stored only after its file is fsynced
in the archive and its row committed (:meth:`worker.ingest.DatabaseSink.accept`, the listener's own path); a part
that is not DICOM, malformed, or too big fails alone, with the DICOM failure reason, and is recorded as a rejected
instance. The body is streamed: each part goes to a temporary file (in memory up to a small size) and is handled
when it ends, so memory is bounded by one part, never a whole study. Auth:
:func:`worker.web.api_tokens.require_sending_system` (token or client certificate); the sending system's name is the
instance's calling AE.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from dicom_io.archive import Archive
from dicom_io.listener import validate_file_instance
from dicom_io.validation import STATUS_CANNOT_UNDERSTAND, InvalidInstance
from worker.ingest import DatabaseSink
from worker.web.api_tokens import require_sending_system

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

STATUS_PROCESSING_FAILURE = 0x0110
STATUS_OUT_OF_RESOURCES = 0xA700
#: Parts up to this size stay in memory while they arrive; bigger ones spill to a temporary file.
_SPOOL_BYTES = 1 << 20
_MAX_PREAMBLE = 64 << 10


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    body: IO[bytes] = field(default_factory=lambda: tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES))
    size: int = 0
    too_big: bool = False


@dataclass
class _Outcome:
    stored: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)


def _boundary(request: Request) -> bytes:
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/related":
        raise HTTPException(415, "the body must be multipart/related; type=\"application/dicom\"")
    if options.get(b"type", b"application/dicom") != b"application/dicom":
        raise HTTPException(415, "only type=\"application/dicom\" parts are accepted")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise HTTPException(400, "multipart/related without a valid boundary")
    return boundary


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _store_part(sink: DatabaseSink, sender: str, part: _Part, outcome: _Outcome, max_bytes: int) -> None:
    """Validate and store one part; record the outcome (runs in a worker thread: file and database I/O)."""
    sop_class = sop_instance = ""

    def fail(code: int, reason: str) -> None:
        log.warning("STOW-RS from %s: refused %s: 0x%04X %s", sender, sop_instance or "a part", code, reason)
        try:
            sink.reject(sender, sop_instance or None, reason)
        except Exception:  # the failure must still be answered
            log.exception("could not record a STOW-RS rejection")
        item = _item(sop_class, sop_instance, code)
        item["00090010"] = {"vr": "LO", "Value": ["dicom-triage"]}  # private: the reason in words
        item["00091001"] = {"vr": "LT", "Value": [reason[:1000]]}
        outcome.failed.append(item)

    content_type = part.headers.get("content-type", "").split(";")[0].strip().lower()
    if part.too_big:
        return fail(STATUS_OUT_OF_RESOURCES, f"part larger than the {max_bytes} bytes allowed")
    if content_type != "application/dicom":
        return fail(STATUS_CANNOT_UNDERSTAND, f"part of type {content_type or 'none'}, not application/dicom")
    part.body.seek(0)
    try:
        try:
            ds = dcmread(part.body)
        except InvalidDicomError:
            # No 128-byte preamble: what pydicom.dcmwrite makes of a data set read without one (dicomweb-client
            # sends such). The file meta group must still lead the part: checked below.
            part.body.seek(0)
            ds = dcmread(part.body, force=True)
        sop_class, sop_instance = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
        validate_file_instance(ds)
    except InvalidInstance as exc:
        return fail(exc.status, exc.reason)
    except Exception as exc:  # pydicom raises many types for bytes that are not a data set
        return fail(STATUS_CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}: {exc}")
    try:
        sink.accept(ds, sender[:16])
    except OSError as exc:
        return fail(STATUS_OUT_OF_RESOURCES, f"cannot store: {exc}")
    except Exception as exc:
        log.exception("STOW-RS: cannot store %s", sop_instance)
        return fail(STATUS_PROCESSING_FAILURE, f"cannot store: {exc}")
    outcome.stored.append(_item(sop_class, sop_instance))


def _sink(request: Request) -> DatabaseSink:
    state = request.app.state
    if getattr(state, "stow_sink", None) is None:
        settings = state.web.settings
        state.stow_sink = DatabaseSink(Archive(settings.archive_dir), state.web.database)
    sink: DatabaseSink = state.stow_sink
    return sink


@router.post("/dicomweb/studies")
async def store_instances(request: Request) -> JSONResponse:
    """Store every ``application/dicom`` part; 200 all stored, 202 some failed, 409 none stored (PS3.18 10.5.3)."""
    sender = require_sending_system(request)
    boundary = _boundary(request)
    max_bytes = request.app.state.web.settings.stow_max_part_mb * (1 << 20)
    sink = _sink(request)
    outcome = _Outcome()
    current: list[_Part] = []
    finished: list[_Part] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}

    def on_part_begin() -> None:
        current[:] = [_Part()]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        current[0].headers[header["field"].decode("latin-1").strip().lower()] = header["value"].decode("latin-1")
        header["field"], header["value"] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = current[0]
        part.size += end - start
        if part.size > max_bytes:
            part.too_big = True  # the rest of it is read and dropped: the next parts still count
        elif not part.too_big:
            part.body.write(data[start:end])

    def on_part_end() -> None:
        finished.append(current.pop())

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    preamble: bytearray | None = bytearray()  # RFC 2046 allows text (dicomweb-client sends a CRLF) before the first delimiter
    try:
        async for chunk in request.stream():
            if preamble is not None:
                preamble += chunk
                start = preamble.find(b"--" + boundary)
                if start < 0:
                    if len(preamble) > _MAX_PREAMBLE:
                        raise HTTPException(400, "no multipart delimiter with the boundary given")
                    continue
                chunk, preamble = bytes(preamble[start:]), None
            try:
                parser.write(chunk)
            except Exception as exc:  # a wrong boundary or broken framing: what was stored stays stored
                outcome.failed.append(_item("", "", STATUS_CANNOT_UNDERSTAND)
                                      | {"00091001": {"vr": "LT", "Value": [f"malformed multipart body: {exc}"]}})
                break
            while finished:
                part = finished.pop(0)
                try:
                    await run_in_threadpool(_store_part, sink, sender, part, outcome, max_bytes)
                finally:
                    part.body.close()
        if current:
            current[0].body.close()
            outcome.failed.append(_item("", "", STATUS_CANNOT_UNDERSTAND)
                                  | {"00091001": {"vr": "LT", "Value": ["the body ended inside a part"]}})
    finally:
        for part in finished:
            part.body.close()
    if not outcome.stored and not outcome.failed:
        raise HTTPException(400, "no part found: is the boundary right?")
    body: dict[str, Any] = {}
    if outcome.stored:
        body["00081199"] = {"vr": "SQ", "Value": outcome.stored}
    if outcome.failed:
        body["00081198"] = {"vr": "SQ", "Value": outcome.failed}
    status = 200 if not outcome.failed else 202 if outcome.stored else 409
    return JSONResponse(body, status_code=status, media_type="application/dicom+json")
