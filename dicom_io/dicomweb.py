"""A DICOMweb source: QIDO-RS search (study, series, instance level) and streamed WADO-RS retrieve, through
dicomweb-client.

The DICOMweb counterpart of :mod:`dicom_io.retrieve`: it asks and reports what the origin server answered and knows
nothing of plans or the worker. Retrieved instances are yielded one at a time as their multipart part ends
(dicomweb-client streams the response), so memory holds one instance, never a whole series.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from dicom_io.retrieve import QueryError, SeriesMatch, StudyMatch

#: Seconds to connect, and between two reads of a response: a source that stalls mid-retrieve ends here.
DEFAULT_TIMEOUT = 60.0
_PAGE = 500  # QIDO-RS results asked for at once
#: Bytes read from a WADO-RS response at once. A response that breaks loses the read under way, so a small read keeps
#: the instances that arrived whole before the break (dicomweb-client's default is 1 MB).
_CHUNK = 1 << 14


class DicomwebError(RuntimeError):
    """The source could not be reached, refused a request, or a response ended or broke mid-body."""


def is_dicomweb_url(text: str) -> bool:
    """Whether ``text`` names a DICOMweb service (an http or https URL) rather than a DIMSE peer."""
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def shown_url(url: str) -> str:
    """``url`` without credentials (``user:password@``), for logs, reasons and the plan's source column."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def describe(exc: BaseException) -> str:
    """A failure in words, with the HTTP status and the start of the body where the server answered one."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        body = exc.response.text[:200].strip()
        return f"HTTP {exc.response.status_code} {exc.response.reason}" + (f": {body}" if body else "")
    return f"{type(exc).__name__}: {exc}"


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


class _Session(requests.Session):
    """Sends the wildcard ``*`` of a matching key as is: requests percent-encodes it, which RFC 3986 allows but some
    servers (Orthanc 1.10's DICOMweb plugin) then match literally, finding nothing."""

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        prepared = super().prepare_request(request)
        prepared.url = (prepared.url or "").replace("%2A", "*")
        return prepared


@dataclass(frozen=True)
class DicomwebSource:
    """A DICOMweb service root (the URL that ``/studies`` follows) and its bearer token, if it wants one."""

    url: str
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __str__(self) -> str:
        return shown_url(self.url)

    @cached_property
    def client(self) -> DICOMwebClient:
        """One client, so that its session's connections are reused from request to request."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(self.url.rstrip("/"), session=_Session(), headers=headers, timeout=self.timeout,
                                chunk_size=_CHUNK)
        # Its own retries (5, over 30 s, on any exception) would hide a failing source from the caller, who retries
        # with its own bounds and records why.
        client.set_http_retry_params(retry=False)
        return client

    def _search(self, what: str, call: Any, max_matches: int, **kwargs: Any) -> list[dict[str, Any]]:
        """Every match, a page (``limit``/``offset``) at a time; a server that ignores ``limit`` answers all at once."""
        found: list[dict[str, Any]] = []
        while True:
            try:
                page: list[dict[str, Any]] = call(limit=_PAGE, offset=len(found), **kwargs)
            except (requests.RequestException, ValueError) as exc:
                raise DicomwebError(f"{self}: QIDO-RS {what}: {describe(exc)}") from exc
            found += page
            if len(found) > max_matches:
                raise QueryError(f"{self}: more than {max_matches} matches; narrow the query")
            if len(page) != _PAGE:
                return found

    def find_studies(self, modality: str, study_date: str, description: str = "",
                     max_matches: int = 10000) -> list[StudyMatch]:
        """Studies with a series of ``modality`` in ``study_date`` (``A-B``) whose description matches
        ``description`` (DICOM wildcards; empty: any), as :func:`dicom_io.retrieve.find_studies` asks by C-FIND."""
        filters = {"ModalitiesInStudy": modality, "StudyDate": study_date}
        if description:
            filters["StudyDescription"] = description
        found = self._search("studies", self.client.search_for_studies, max_matches, search_filters=filters,
                             fields=["StudyDate", "StudyDescription"])
        return [StudyMatch(str(_value(m, "0020000D")), str(_value(m, "00080020") or ""),
                           str(_value(m, "00081030") or "")) for m in found if _value(m, "0020000D")]

    def find_series(self, study_instance_uid: str, modality: str, max_matches: int = 10000) -> list[SeriesMatch]:
        """The series of ``modality`` in one study (a server that ignores Modality is filtered here)."""
        found = self._search("series", self.client.search_for_series, max_matches,
                             study_instance_uid=study_instance_uid, search_filters={"Modality": modality},
                             fields=["NumberOfSeriesRelatedInstances"])
        matches = []
        for match in found:
            uid, count = _value(match, "0020000E"), _value(match, "00201209")
            if uid and (_value(match, "00080060") or modality) == modality:
                matches.append(SeriesMatch(str(uid), modality, int(count) if count not in (None, "") else None))
        return matches

    def find_instances(self, study_instance_uid: str, series_instance_uid: str,
                       max_matches: int = 100000) -> list[str]:
        """The SOP Instance UIDs of one series."""
        found = self._search("instances", self.client.search_for_instances, max_matches,
                             study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid)
        return [str(uid) for uid in (_value(m, "00080018") for m in found) if uid]

    def iter_series(self, study_instance_uid: str, series_instance_uid: str) -> Iterator[Dataset]:
        """WADO-RS retrieve of a series, each instance as its part ends. Raises :class:`DicomwebError` (possibly
        after some instances were yielded) when the request fails or the response breaks."""
        try:
            yield from self.client.iter_series(study_instance_uid, series_instance_uid)
        except Exception as exc:  # requests, urllib3 and pydicom raise many types for a broken body
            raise DicomwebError(f"{self}: WADO-RS of series {series_instance_uid}: {describe(exc)}") from exc

    def retrieve_instance(self, study_instance_uid: str, series_instance_uid: str,
                          sop_instance_uid: str) -> Dataset:
        """WADO-RS retrieve of one instance."""
        try:
            return self.client.retrieve_instance(study_instance_uid, series_instance_uid, sop_instance_uid)
        except Exception as exc:
            raise DicomwebError(f"{self}: WADO-RS of instance {sop_instance_uid}: {describe(exc)}") from exc


__all__ = ["DEFAULT_TIMEOUT", "DicomwebError", "DicomwebSource", "describe", "is_dicomweb_url", "shown_url"]
