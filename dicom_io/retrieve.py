"""Query/retrieve against a PACS: C-FIND (study and series level, Study Root) and C-MOVE of one series.

Knows nothing of plans or the worker: it asks and reports what the peer answered. Every association sets
TCP_NODELAY (through :func:`dicom_io.scu.associate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_io.scu import DEFAULT_CALLING_AE, AssociationError, associate, describe_failure, new_ae

_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000


class QueryError(RuntimeError):
    """The peer ended a C-FIND with a failure status, or answered more than the caller allows."""


@dataclass(frozen=True)
class Peer:
    """A query/retrieve SCP."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    study_date: str
    study_description: str


@dataclass(frozen=True)
class SeriesMatch:
    series_instance_uid: str
    modality: str
    #: NumberOfSeriesRelatedInstances where the peer returns it; None where it does not.
    instances: int | None


@dataclass(frozen=True)
class MoveOutcome:
    """The final C-MOVE response: its status and the sub-operation counts (None where the peer left them out)."""

    status: int
    completed: int | None
    failed: int | None
    warning: int | None

    @property
    def succeeded(self) -> bool:
        # 0xB000 is "some sub-operations failed"; a peer may also say success while counting failures.
        return self.status in (_SUCCESS, 0xB000) and not self.failed


def _find(peer: Peer, identifier: Dataset, calling_ae: str, max_matches: int) -> Iterator[Dataset]:
    ae = new_ae(calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc, refusal, _ = associate(ae, peer.host, peer.port, peer.ae_title, None)
    if not assoc.is_established:
        raise AssociationError(f"{peer}: {describe_failure(assoc, refusal)}")
    count = 0
    try:
        for status, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status:
                raise AssociationError(f"{peer}: no answer to C-FIND ({describe_failure(assoc, refusal)})")
            code = int(status.Status)
            if code in _PENDING:
                count += 1
                if count > max_matches:
                    assoc.abort()  # the peer may have thousands more to send; no point reading them
                    raise QueryError(f"{peer}: more than {max_matches} matches; narrow the query")
                if match is not None:
                    yield match
            elif code != _SUCCESS:
                raise QueryError(f"{peer}: C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def find_studies(peer: Peer, modality: str, study_date: str, description: str = "",
                 calling_ae: str = DEFAULT_CALLING_AE, max_matches: int = 10000) -> list[StudyMatch]:
    """Studies with a series of ``modality`` in ``study_date`` (a DICOM date or range, ``A-B``) whose description
    matches ``description`` (DICOM wildcards; empty: any)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = study_date
    query.StudyDescription = description
    query.ModalitiesInStudy = modality
    return [StudyMatch(str(m.StudyInstanceUID), str(m.get("StudyDate", "")), str(m.get("StudyDescription", "")))
            for m in _find(peer, query, calling_ae, max_matches) if m.get("StudyInstanceUID")]


def find_series(peer: Peer, study_instance_uid: str, modality: str,
                calling_ae: str = DEFAULT_CALLING_AE, max_matches: int = 10000) -> list[SeriesMatch]:
    """The series of ``modality`` in one study (a peer that ignores Modality at series level is filtered here)."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = ""
    query.Modality = modality
    query.NumberOfSeriesRelatedInstances = ""
    found = []
    for match in _find(peer, query, calling_ae, max_matches):
        if not match.get("SeriesInstanceUID") or str(match.get("Modality", modality)) != modality:
            continue
        count = match.get("NumberOfSeriesRelatedInstances")
        found.append(SeriesMatch(str(match.SeriesInstanceUID), modality,
                                 int(count) if count not in (None, "") else None))
    return found


def move_series(peer: Peer, study_instance_uid: str, series_instance_uid: str, destination_ae: str,
                calling_ae: str = DEFAULT_CALLING_AE, timeout_seconds: float = 600.0) -> MoveOutcome:
    """C-MOVE one series to ``destination_ae`` and return the final response. Raises :class:`AssociationError`
    when no association is made or it breaks before the final response."""
    ae = new_ae(calling_ae)
    ae.dimse_timeout = timeout_seconds  # a peer answering "pending" forever ends here
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc, refusal, _ = associate(ae, peer.host, peer.port, peer.ae_title, None)
    if not assoc.is_established:
        raise AssociationError(f"{peer}: {describe_failure(assoc, refusal)}")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    final: Dataset | None = None
    try:
        for status, _identifier in assoc.send_c_move(query, destination_ae, StudyRootQueryRetrieveInformationModelMove):
            if "Status" not in status:
                raise AssociationError(f"{peer}: no final answer to C-MOVE ({describe_failure(assoc, refusal)})")
            if int(status.Status) not in _PENDING:
                final = status
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise AssociationError(f"{peer}: C-MOVE ended without a final status")

    def count(keyword: str) -> int | None:
        value = final.get(keyword)
        return int(value) if value not in (None, "") else None

    return MoveOutcome(int(final.Status), count("NumberOfCompletedSuboperations"),
                       count("NumberOfFailedSuboperations"), count("NumberOfWarningSuboperations"))


__all__ = ["MoveOutcome", "Peer", "QueryError", "SeriesMatch", "StudyMatch", "find_series", "find_studies",
           "move_series"]
