"""Query/retrieve against a PACS: C-FIND (study and series level, Study Root), C-MOVE and C-GET of one series.

Knows nothing of plans or the worker: it asks and reports what the peer answered. Every association sets
TCP_NODELAY (through :func:`dicom_io.scu.associate`). A C-GET's instances come back on its own association (we
take the Storage SCP role for every SOP class the listener accepts) and are answered by the caller's store
handler, the listener's (:class:`dicom_io.listener.StoreHandler`), so they are stored as a C-STORE's are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_io.listener import (
    COMPRESSED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    NATIVE_TRANSFER_SYNTAXES,
    SR_STORAGE_SOP_CLASSES,
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
    """The final C-MOVE or C-GET response: its status and the sub-operation counts (None where the peer left them
    out); for a C-GET also how many instances our store handler stored and refused."""

    status: int
    completed: int | None
    failed: int | None
    warning: int | None
    stored: int | None = None
    refused: int | None = None

    @property
    def succeeded(self) -> bool:
        # 0xB000 is "some sub-operations failed"; a peer may also say success while counting failures.
        return self.status in (_SUCCESS, 0xB000) and not self.failed


@contextmanager
def _find_association(peer: Peer, calling_ae: str) -> Iterator[Association]:
    """An association for C-FINDs, released (or already aborted) when the block ends."""
    ae = new_ae(calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc, refusal, _ = associate(ae, peer.host, peer.port, peer.ae_title, None)
    if not assoc.is_established:
        raise AssociationError(f"{peer}: {describe_failure(assoc, refusal)}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _matches(assoc: Association, peer: Peer, identifier: Dataset, max_matches: int) -> Iterator[Dataset]:
    """The matches of one C-FIND on ``assoc``; past ``max_matches`` the association is aborted (the peer may have
    thousands more to send: none of them is read) and :class:`QueryError` raised."""
    count = 0
    for status, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if "Status" not in status:
            raise AssociationError(f"{peer}: no answer to C-FIND (association ended)")
        code = int(status.Status)
        if code in _PENDING:
            count += 1
            if count > max_matches:
                assoc.abort()
                raise QueryError(f"{peer}: more than {max_matches} matches; narrow the query")
            if match is not None:
                yield match
        elif code != _SUCCESS:
            raise QueryError(f"{peer}: C-FIND failed with status 0x{code:04X}")


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
    with _find_association(peer, calling_ae) as assoc:
        return [StudyMatch(str(m.StudyInstanceUID), str(m.get("StudyDate", "")), str(m.get("StudyDescription", "")))
                for m in _matches(assoc, peer, query, max_matches) if m.get("StudyInstanceUID")]


def find_series_of_studies(peer: Peer, study_instance_uids: Iterable[str], modality: str,
                           calling_ae: str = DEFAULT_CALLING_AE,
                           max_matches: int = 10000) -> dict[str, list[SeriesMatch]]:
    """The series of ``modality`` in each study (a peer that ignores Modality at series level is filtered here),
    by Study Instance UID: one C-FIND a study, all on one association (thousands of studies need not cost
    thousands of associations)."""
    found: dict[str, list[SeriesMatch]] = {}
    with _find_association(peer, calling_ae) as assoc:
        for study_instance_uid in study_instance_uids:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_instance_uid
            query.SeriesInstanceUID = ""
            query.Modality = modality
            query.NumberOfSeriesRelatedInstances = ""
            series = found.setdefault(study_instance_uid, [])
            for match in _matches(assoc, peer, query, max_matches):
                if not match.get("SeriesInstanceUID") or str(match.get("Modality", modality)) != modality:
                    continue
                count = match.get("NumberOfSeriesRelatedInstances")
                series.append(SeriesMatch(str(match.SeriesInstanceUID), modality,
                                          int(count) if count not in (None, "") else None))
    return found


def _series_query(study_instance_uid: str, series_instance_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    return query


def _final(assoc: Association, responses: Iterator[tuple[Dataset, Dataset | None]], peer: Peer,
           describe: Callable[[], str], verb: str, timeout_seconds: float) -> Dataset:
    """The final (not pending) response of a C-MOVE or C-GET. A peer that stays silent for ``timeout_seconds``
    (pynetdicom's DIMSE time-out) or still answers "pending" that long after the request is aborted."""
    deadline = time.monotonic() + timeout_seconds
    final: Dataset | None = None
    for status, _identifier in responses:
        if "Status" not in status:
            raise AssociationError(f"{peer}: no final answer to {verb} within {timeout_seconds:g} s, or the "
                                   f"association ended ({describe()})")
        if int(status.Status) not in _PENDING:
            final = status
        elif time.monotonic() > deadline:
            assoc.abort()
            raise AssociationError(f"{peer}: {verb} still pending after {timeout_seconds:g} s; aborted")
    if final is None:
        raise AssociationError(f"{peer}: {verb} ended without a final status")
    return final


def _outcome(final: Dataset, stored: int | None = None, refused: int | None = None) -> MoveOutcome:
    def count(keyword: str) -> int | None:
        value = final.get(keyword)
        return int(value) if value not in (None, "") else None

    return MoveOutcome(int(final.Status), count("NumberOfCompletedSuboperations"),
                       count("NumberOfFailedSuboperations"), count("NumberOfWarningSuboperations"), stored, refused)


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
    try:
        final = _final(assoc, assoc.send_c_move(_series_query(study_instance_uid, series_instance_uid),
                                                destination_ae, StudyRootQueryRetrieveInformationModelMove),
                       peer, lambda: describe_failure(assoc, refusal), "C-MOVE", timeout_seconds)
    finally:
        if assoc.is_established:
            assoc.release()
    return _outcome(final)


#: What a C-GET's association proposes for the instances coming back: every storage class the listener accepts.
_GET_STORAGE = [(uid, list(NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES))
                for uid in IMAGE_STORAGE_SOP_CLASSES] + [(uid, list(NATIVE_TRANSFER_SYNTAXES))
                                                         for uid in SR_STORAGE_SOP_CLASSES]


def get_series(peer: Peer, study_instance_uid: str, series_instance_uid: str,
               store: Callable[[Event], Dataset | int], calling_ae: str = DEFAULT_CALLING_AE,
               timeout_seconds: float = 600.0) -> MoveOutcome:
    """C-GET one series: the peer sends its instances on this association, each answered by ``store(event)`` (a
    C-STORE event; its status is what the peer is told). Returns the final response with how many instances
    ``store`` stored (status 0x0000) and refused. Raises :class:`AssociationError` as :func:`move_series` does."""
    tally = {"stored": 0, "refused": 0}

    def on_store(event: Event) -> Dataset | int:
        status = store(event)
        code = int(status.Status) if isinstance(status, Dataset) else int(status)
        tally["stored" if code == _SUCCESS else "refused"] += 1
        return status

    ae = new_ae(calling_ae)
    ae.dimse_timeout = timeout_seconds  # a peer answering "pending" forever ends here
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid, syntaxes in _GET_STORAGE:
        ae.add_requested_context(uid, syntaxes)
    roles = [build_role(uid, scp_role=True) for uid, _ in _GET_STORAGE]
    assoc, refusal, _ = associate(ae, peer.host, peer.port, peer.ae_title, None, ext_neg=roles,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise AssociationError(f"{peer}: {describe_failure(assoc, refusal)}")
    try:
        final = _final(assoc, assoc.send_c_get(_series_query(study_instance_uid, series_instance_uid),
                                               StudyRootQueryRetrieveInformationModelGet),
                       peer, lambda: describe_failure(assoc, refusal), "C-GET", timeout_seconds)
    finally:
        if assoc.is_established:
            assoc.release()
    return _outcome(final, tally["stored"], tally["refused"])


__all__ = ["MoveOutcome", "Peer", "QueryError", "SeriesMatch", "StudyMatch", "find_series_of_studies",
           "find_studies", "get_series", "move_series"]
