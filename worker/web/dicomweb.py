"""QIDO-RS search and WADO-RS retrieve of the Structured Reports we produced (PS3.18 10.4, 10.6), so that a DICOMweb
viewer or archive can pull our results. Only our SRs (``sr_documents``) are served, never a received image: a study
we received but reported nothing on is unknown here.

Search (``application/dicom+json``; no match: 200 with ``[]``)::

    GET /dicomweb/studies
    GET /dicomweb/studies/{study}/series
    GET /dicomweb/studies/{study}/series/{series}/instances

Matching keys, by keyword or tag (``PatientID`` or ``00100020``): StudyInstanceUID, SeriesInstanceUID and
SOPInstanceUID (UID lists), PatientID, AccessionNumber, PatientName (``*``/``?`` wildcards), StudyDate (``A-B``),
Modality and ModalitiesInStudy (``SR``), SOPClassUID; ``limit`` (at most 1000, the default) and ``offset``;
``includefield`` and ``fuzzymatching`` are accepted, every attribute we have is returned. Another key: 400.

Retrieve (``multipart/related; type="application/dicom"``, each instance as archived) and metadata
(``application/dicom+json``)::

    GET /dicomweb/studies/{study}[/series/{series}[/instances/{sop}]][/metadata]

Nothing of ours there: 404. An Accept that allows neither: 406. Auth as STOW-RS (a sending system's API token or
client certificate).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import Dataset, dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.filereader import read_file_meta_info
from sqlalchemy import Select, func, select

from worker.db import Patient, Result, Series, SrDocument, Study
from worker.web.api_tokens import require_sending_system

router = APIRouter(include_in_schema=False)

MAX_LIMIT = 1000
_CHUNK = 1 << 16
_DICOM_JSON = "application/dicom+json"
_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}
_UID_KEYS = {"StudyInstanceUID": Study.study_instance_uid, "SeriesInstanceUID": SrDocument.series_instance_uid,
             "SOPInstanceUID": SrDocument.sop_instance_uid}
_EXACT_KEYS = {"PatientID": Patient.patient_id, "AccessionNumber": Study.accession_number}
_LEVEL_KEYS = {
    "study": {"StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "ModalitiesInStudy"},
    "series": {"SeriesInstanceUID", "Modality"},
    "instance": {"SOPInstanceUID", "SOPClassUID"},
}
#: Study-level attributes of a search answer, series-level ones, and instance-level ones (PS3.18 10.6.3.3).
_STUDY_ATTRIBUTES = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "PatientName",
                     "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                     "StudyDescription")
_SERIES_ATTRIBUTES = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber")
_INSTANCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "ContentDate", "ContentTime")


@dataclass(frozen=True)
class _Row:
    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path


def _keyword(key: str) -> str:
    """A query key as a DICOM keyword (a tag in hex, ``0020000D``, is accepted too)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return keyword_for_tag(int(key, 16)) or key
    return key


def _wildcard(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _uids(value: str) -> list[str]:
    return [uid.strip() for uid in re.split(r"[,\\]", value) if uid.strip()]


def _page(request: Request) -> tuple[int, int]:
    def number(name: str, default: int) -> int:
        text = request.query_params.get(name)
        if text is None:
            return default
        if not text.isdigit():
            raise HTTPException(400, f"{name} must be a non-negative integer")
        return int(text)

    return min(number("limit", MAX_LIMIT), MAX_LIMIT), number("offset", 0)


def _filtered(request: Request, level: str, statement: Select[Any]) -> tuple[Select[Any], bool, list[str]]:
    """``statement`` with the request's matching keys applied; False where a key can match none of our SRs; the
    SOP classes asked for (matched on the files: not a column)."""
    levels = list(_LEVEL_KEYS)
    allowed = set().union(*(_LEVEL_KEYS[name] for name in levels[:levels.index(level) + 1]))
    possible, classes = True, []
    for key, value in request.query_params.multi_items():
        if key in _PARAMETERS or not value:
            continue
        keyword = _keyword(key)
        if keyword not in allowed:
            raise HTTPException(400, f"{key} is not a matching key here; supported: {', '.join(sorted(allowed))}")
        if keyword in _UID_KEYS:
            statement = statement.where(_UID_KEYS[keyword].in_(_uids(value)))
        elif keyword in _EXACT_KEYS:
            column = _EXACT_KEYS[keyword]
            statement = statement.where(column.like(_wildcard(value), escape="\\") if "*" in value or "?" in value
                                        else column == value)
        elif keyword == "PatientName":
            statement = statement.where(func.lower(Patient.patient_name).like(_wildcard(value.lower()), escape="\\"))
        elif keyword == "StudyDate":
            low, dash, high = value.partition("-")
            if not re.fullmatch(r"\d{8}", low or "00000000") or not re.fullmatch(r"\d{8}", high or "99999999"):
                raise HTTPException(400, "StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
            if not dash:
                statement = statement.where(Study.study_date == low)
            else:
                statement = statement.where(Study.study_date >= (low or "00000000"),
                                            Study.study_date <= (high or "99999999"))
        elif keyword in ("Modality", "ModalitiesInStudy"):
            possible = possible and "SR" in _uids(value.upper())
        elif keyword == "SOPClassUID":
            classes += _uids(value)
    return statement, possible, classes


def _rows(request: Request, level: str, **path: str) -> list[_Row]:
    """Our SRs under ``path`` (study, series, sop UIDs) that match the request's keys, oldest first."""
    statement = (select(Study.study_instance_uid, SrDocument.series_instance_uid, SrDocument.sop_instance_uid,
                        SrDocument.archive_path)
                 .join(Result, SrDocument.result_pk == Result.id).join(Series, Result.series_pk == Series.id)
                 .join(Study, Series.study_pk == Study.id).join(Patient, Study.patient_pk == Patient.id)
                 .order_by(SrDocument.id))
    for name, column in (("study", Study.study_instance_uid), ("series", SrDocument.series_instance_uid),
                         ("sop", SrDocument.sop_instance_uid)):
        if name in path:
            statement = statement.where(column == path[name])
    possible, classes = True, []
    if level:
        statement, possible, classes = _filtered(request, level, statement)
    if not possible:
        return []
    with request.app.state.web.database.read_session() as session:
        rows = [_Row(*row[:3], Path(row[3])) for row in session.execute(statement).all()]
    if classes:
        rows = [row for row in rows if str(read_file_meta_info(row.path).MediaStorageSOPClassUID) in classes]
    return rows


def _json(path: Path, keywords: tuple[str, ...]) -> dict[str, Any]:
    ds = dcmread(path, stop_before_pixels=True)
    subset = Dataset()
    for keyword in keywords:
        if keyword in ds:
            subset[keyword] = ds[keyword]
    answer: dict[str, Any] = subset.to_json_dict()
    return answer


def _search(request: Request, groups: dict[str, list[_Row]], keywords: tuple[str, ...],
            counts: dict[str, Any]) -> JSONResponse:
    limit, offset = _page(request)
    answer = []
    for key in list(groups)[offset:offset + limit]:
        rows = groups[key]
        item = _json(rows[0].path, keywords)
        for tag, (vr, count) in counts.items():
            item[tag] = {"vr": vr, "Value": [count(rows)]}
        answer.append(item)
    return JSONResponse(answer, media_type=_DICOM_JSON)


def _grouped(rows: list[_Row], key: str) -> dict[str, list[_Row]]:
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(getattr(row, key), []).append(row)
    return groups


@router.get("/dicomweb/studies")
def search_studies(request: Request) -> JSONResponse:
    require_sending_system(request)
    groups = _grouped(_rows(request, "study"), "study_uid")
    return _search(request, groups, _STUDY_ATTRIBUTES, {
        "00080061": ("CS", lambda rows: "SR"),  # ModalitiesInStudy
        "00201206": ("IS", lambda rows: len({r.series_uid for r in rows})),  # NumberOfStudyRelatedSeries
        "00201208": ("IS", len),  # NumberOfStudyRelatedInstances
    })


@router.get("/dicomweb/studies/{study}/series")
def search_series(request: Request, study: str) -> JSONResponse:
    require_sending_system(request)
    groups = _grouped(_rows(request, "series", study=study), "series_uid")
    return _search(request, groups, ("StudyInstanceUID",) + _SERIES_ATTRIBUTES,
                   {"00201209": ("IS", len)})  # NumberOfSeriesRelatedInstances


@router.get("/dicomweb/studies/{study}/series/{series}/instances")
def search_instances(request: Request, study: str, series: str) -> JSONResponse:
    require_sending_system(request)
    groups = _grouped(_rows(request, "instance", study=study, series=series), "sop_uid")
    return _search(request, groups, ("StudyInstanceUID", "SeriesInstanceUID") + _SERIES_ATTRIBUTES[:1]
                   + _INSTANCE_ATTRIBUTES, {})


def _found(request: Request, **path: str) -> list[_Row]:
    require_sending_system(request)
    rows = _rows(request, "", **path)
    if not rows:
        raise HTTPException(404, "no report of ours there")
    missing = [row.sop_uid for row in rows if not row.path.is_file()]
    if missing:
        raise HTTPException(500, f"archived report {missing[0]} is missing from the archive")
    return rows


def _accepts_dicom(accept: str, syntaxes: set[str]) -> bool:
    """Whether an Accept header allows ``multipart/related; type="application/dicom"`` in the archived syntaxes."""
    if not accept.strip():
        return True
    for media_range in accept.split(","):
        media_type, *options = [part.strip() for part in media_range.split(";")]
        params = {k.strip().lower(): v.strip().strip('"') for k, _, v in (o.partition("=") for o in options)}
        if media_type in ("*/*", "multipart/*"):
            return True
        if media_type == "multipart/related" and params.get("type", "application/dicom") in (
                "application/dicom", "application/*", "*/*"):
            syntax = params.get("transfer-syntax", "*")
            if syntax == "*" or {syntax} >= syntaxes:
                return True
    return False


def _multipart(rows: list[_Row], request: Request) -> StreamingResponse:
    syntaxes = {str(read_file_meta_info(row.path).TransferSyntaxUID) for row in rows}
    if not _accepts_dicom(request.headers.get("accept", ""), syntaxes):
        raise HTTPException(406, 'our reports are served as multipart/related; type="application/dicom" in '
                                 f"transfer syntax {', '.join(sorted(syntaxes))}")
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        # One file at a time, in chunks: memory holds a chunk, never a study.
        for row in rows:
            syntax = read_file_meta_info(row.path).TransferSyntaxUID
            yield (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n"
                   f"Content-Location: /dicomweb/studies/{row.study_uid}/series/{row.series_uid}/instances/"
                   f"{row.sop_uid}\r\n\r\n").encode()
            with row.path.open("rb") as file:
                while chunk := file.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _metadata(rows: list[_Row]) -> JSONResponse:
    return JSONResponse([dcmread(row.path).to_json_dict() for row in rows], media_type=_DICOM_JSON)


@router.get("/dicomweb/studies/{study}")
def retrieve_study(request: Request, study: str) -> StreamingResponse:
    return _multipart(_found(request, study=study), request)


@router.get("/dicomweb/studies/{study}/series/{series}")
def retrieve_series(request: Request, study: str, series: str) -> StreamingResponse:
    return _multipart(_found(request, study=study, series=series), request)


@router.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}")
def retrieve_instance(request: Request, study: str, series: str, sop: str) -> StreamingResponse:
    return _multipart(_found(request, study=study, series=series, sop=sop), request)


@router.get("/dicomweb/studies/{study}/metadata")
def study_metadata(request: Request, study: str) -> JSONResponse:
    return _metadata(_found(request, study=study))


@router.get("/dicomweb/studies/{study}/series/{series}/metadata")
def series_metadata(request: Request, study: str, series: str) -> JSONResponse:
    return _metadata(_found(request, study=study, series=series))


@router.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata")
def instance_metadata(request: Request, study: str, series: str, sop: str) -> JSONResponse:
    return _metadata(_found(request, study=study, series=series, sop=sop))
