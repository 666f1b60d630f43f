"""A misbehaving PACS for the backfill tests (no tests here): a real pynetdicom Query/Retrieve SCP on a loopback
port whose C-FIND, C-MOVE and C-GET answers are what a test sets. It does what Orthanc cannot be made to do:
answer thousands of matches, refuse a move destination, go silent or stay "pending" mid-retrieval, send instances
nobody asked for. Every request it gets is recorded, so a test can count retrievals per series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_io.listener import IMAGE_STORAGE_SOP_CLASSES
from processes import free_port

AE_TITLE = "FAKEPACS"
PENDING = 0xFF00


@dataclass
class FakePacs:
    """What the PACS holds and how it answers; ``requests`` is every C-MOVE/C-GET (verb, series UID) it got."""

    port: int
    #: The series it serves, by SeriesInstanceUID: their datasets (with file meta).
    series: dict[str, list[Dataset]] = field(default_factory=dict)
    #: C-FIND at study level answers this many made-up matches (then success), when set.
    study_matches: int | None = None
    #: "serve" (send the series), "unknown-destination" (C-MOVE: 0xA801), "silent" (no answer at all),
    #: "pending-forever" (an instance and a pending status every 0.2 s, never a final one).
    retrieve: str = "serve"
    #: Series whose C-MOVE it refuses as with "unknown-destination" (0xA801) while it serves the others.
    refused: set[str] = field(default_factory=set)
    #: Instances a C-GET or C-MOVE sends after the ones asked for (of another study).
    strays: list[Dataset] = field(default_factory=list)
    #: Where a C-MOVE sends what it serves (host, port): the requestor's listener, as the PACS's table says.
    move_destination: tuple[str, int] | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: Set on each retrieval request (a test waits on it with a bound).
    retrieved: threading.Event = field(default_factory=threading.Event)
    #: Set when a C-FIND's requestor aborted the association.
    aborted: threading.Event = field(default_factory=threading.Event)
    finds_answered: int = 0
    #: Associations accepted so far.
    associations: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def source(self) -> str:
        return f"{AE_TITLE}@127.0.0.1:{self.port}"

    def add_series(self, datasets: list[Dataset]) -> None:
        self.series[str(datasets[0].SeriesInstanceUID)] = datasets

    def retrievals(self) -> list[str]:
        with self.lock:
            return [uid for _verb, uid in self.requests]

    # Handlers (pynetdicom's association threads).

    def _on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        if query.QueryRetrieveLevel == "STUDY" and self.study_matches is not None:
            for index in range(self.study_matches):
                if self.stop.is_set() or event.is_cancelled or self.aborted.is_set():
                    return
                match = Dataset()
                match.QueryRetrieveLevel = "STUDY"
                match.StudyInstanceUID = f"2.25.{1000 + index}"
                match.StudyDate = "20240101"
                self.finds_answered += 1
                yield PENDING, match
            yield 0x0000, None
            return
        studies: set[str] = set()  # a study of several series matches once at study level
        for uid, datasets in self.series.items():
            first = datasets[0]
            if query.QueryRetrieveLevel == "STUDY":
                if str(first.StudyInstanceUID) in studies:
                    continue
                studies.add(str(first.StudyInstanceUID))
                match = Dataset()
                match.StudyInstanceUID, match.StudyDate = first.StudyInstanceUID, first.StudyDate
            elif str(query.StudyInstanceUID) == str(first.StudyInstanceUID):
                match = Dataset()
                match.StudyInstanceUID, match.SeriesInstanceUID = first.StudyInstanceUID, uid
                match.Modality, match.NumberOfSeriesRelatedInstances = first.Modality, len(datasets)
            else:
                continue
            match.QueryRetrieveLevel = query.QueryRetrieveLevel
            yield PENDING, match
        yield 0x0000, None

    def _on_accepted(self, _event: Event) -> None:
        with self.lock:
            self.associations += 1

    def _record(self, verb: str, event: Event) -> list[Dataset]:
        uid = str(event.identifier.SeriesInstanceUID)
        with self.lock:
            self.requests.append((verb, uid))
        self.retrieved.set()
        return self.series.get(uid, [])

    def _misbehave(self, datasets: list[Dataset]) -> Iterator[tuple[int, Dataset | None]]:
        if self.retrieve == "silent":
            self.stop.wait(60)  # the requestor's DIMSE time-out ends it first
            return
        # "Pending" forever: the same instance again and again (a pending response follows each sub-operation).
        while self.retrieve == "pending-forever" and not self.stop.wait(0.2):
            yield PENDING, datasets[0]

    def _on_move(self, event: Event) -> Iterator[Any]:
        datasets = self._record("C-MOVE", event)
        if self.retrieve == "unknown-destination" or str(event.identifier.SeriesInstanceUID) in self.refused:
            yield None, None  # pynetdicom answers 0xA801, move destination unknown
            return
        if self.retrieve == "serve":
            assert self.move_destination is not None
            yield self.move_destination
            yield from self._serve(datasets)
            return
        yield "127.0.0.1", self.port  # itself: the misbehaving answers below send nothing on it
        yield 1000
        yield from self._misbehave(datasets)

    def _serve(self, datasets: list[Dataset]) -> Iterator[Any]:
        sent = [*datasets, *self.strays]
        yield len(sent)
        for ds in sent:
            yield PENDING, ds

    def _on_get(self, event: Event) -> Iterator[Any]:
        datasets = self._record("C-GET", event)
        if self.retrieve != "serve":
            yield 1000
            yield from self._misbehave(datasets)
            return
        yield from self._serve(datasets)


@contextmanager
def fake_pacs() -> Iterator[FakePacs]:
    """The fake PACS serving on a free loopback port until the block ends."""
    pacs = FakePacs(port=free_port())
    ae = AE(ae_title=AE_TITLE)
    ae.network_timeout = 30
    for context in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                    StudyRootQueryRetrieveInformationModelMove):
        ae.add_supported_context(context)
    for uid in IMAGE_STORAGE_SOP_CLASSES:  # the C-GET requestor takes the Storage SCP role for these
        ae.add_supported_context(uid, scu_role=True, scp_role=True)
    ae.add_requested_context(MRImageStorage)  # for a C-MOVE's sub-association
    handlers = [(evt.EVT_C_FIND, pacs._on_find), (evt.EVT_C_MOVE, pacs._on_move), (evt.EVT_C_GET, pacs._on_get),
                (evt.EVT_ABORTED, lambda _event: pacs.aborted.set()), (evt.EVT_ACCEPTED, pacs._on_accepted)]
    server = ae.start_server(("127.0.0.1", pacs.port), block=False, evt_handlers=handlers)
    try:
        yield pacs
    finally:
        pacs.stop.set()
        server.shutdown()

