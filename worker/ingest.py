"""The listener's :class:`InstanceSink`: archive an instance and commit its rows before success goes back.

For each instance: ``archive.store(ds)`` (durable file), then one transaction that upserts the patient, study and
series, inserts the instance (idempotent on SOP Instance UID) and marks the series pending with a fresh
last-received time. A late instance of a series already classified marks it pending again; the scheduler then
re-runs it and the new result supersedes the old. A repeated SOP Instance UID changes nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from dicom_io.archive import Archive, StoredInstance
from dicom_io.listener import received_file
from worker.db import Database, Instance, Patient, RejectedInstance, Series, Study, utcnow

STATUS_SUCCESS = 0x0000

_PATIENTS: Table = Patient.__table__  # type: ignore[assignment]
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """An attribute as text, cut to the column's length (a bad sender can exceed the VR's maximum)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    # Only a multi-valued element is joined: a PersonName iterates over its characters.
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip().replace("\x00", "")[:limit]


def _integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class _PendingRow:
    """An archived instance waiting for the group commit that records its row."""

    ds: Dataset
    stored: StoredInstance
    calling_ae: str
    received: datetime
    #: Set once the row's transaction committed (or failed, with ``error``).
    done: bool = False
    committed: bool = False
    error: BaseException | None = None


class DatabaseSink:
    """Archives instances and records them (and rejections) in the database; safe to call from many threads.

    Group commit, leader/follower: the caller that finds no commit running records every row handed in meanwhile
    in one transaction, so eight associations share one commit instead of queueing for eight, and a lone
    association pays no hand-off to another thread. The batch is first written without savepoints; if any row
    fails, it is written again with a savepoint per row, so one bad row fails alone. Each caller returns only
    after the commit that holds its row. The per-instance statements are SQLAlchemy Core, built once (the ORM's
    per-statement work cost more than the rows themselves).
    """

    def __init__(self, archive: Archive, database: Database) -> None:
        self.archive = archive
        self.database = database
        # Series primary key and the image types recorded for it, per SeriesInstanceUID; rows are never deleted,
        # so the cache only saves the upserts of patient, study and series for every instance after the first.
        # Read and written by the current leader only.
        self._series: dict[str, tuple[int, frozenset[str]]] = {}
        dialect = postgresql if database.engine.dialect.name == "postgresql" else sqlite
        self._insert_patient = dialect.insert(_PATIENTS).on_conflict_do_nothing(
            index_elements=["patient_id", "issuer_of_patient_id"]
        )
        self._insert_study = dialect.insert(_STUDIES).on_conflict_do_nothing(index_elements=["study_instance_uid"])
        self._insert_series = dialect.insert(_SERIES).on_conflict_do_nothing(index_elements=["series_instance_uid"])
        self._insert_instance = dialect.insert(_INSTANCES).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        self._touch_series = (
            update(_SERIES)
            .where(_SERIES.c.id == bindparam("series_key"))
            .values(last_received_at=bindparam("received"), pending=True)
        )
        self._turn = threading.Condition()
        self._waiting: list[_PendingRow] = []  # rows handed in, not yet taken by a leader
        self._leading = False

    def accept(self, ds: Dataset, calling_ae: str) -> int:
        """Archive ``ds`` and commit its row, then return 0x0000 (success): the instance is durable and will be
        classified. Errors propagate to the listener, which answers a failure status."""
        stored = self.archive.store(ds, encoded=received_file(ds))  # the bytes as received: no re-encoding
        row = _PendingRow(ds, stored, calling_ae, utcnow())
        self._commit(row)
        if row.error is not None:
            raise row.error
        if not row.committed:
            raise RuntimeError(f"instance {stored.sop_instance_uid}: its commit was interrupted")
        return STATUS_SUCCESS

    def _commit(self, row: _PendingRow) -> None:
        """Return once ``row``'s transaction has ended, leading the next group commit if no other caller is."""
        with self._turn:
            self._waiting.append(row)
            while self._leading and not row.done:
                self._turn.wait()
            if row.done:  # an earlier leader took and committed it
                return
            self._leading = True
            batch, self._waiting = self._waiting, []
        try:
            self._write(batch)
        finally:
            with self._turn:
                for pending in batch:
                    pending.done = True
                self._leading = False
                self._turn.notify_all()

    def _write(self, batch: list[_PendingRow]) -> None:
        try:
            recorded = self._transaction(batch, isolate=False)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            try:  # some row failed the batch: again, each row in its own savepoint so that it fails alone
                recorded = self._transaction(batch, isolate=True)
            except Exception as exc:  # the commit itself failed: no row of the batch is recorded
                for row in batch:
                    row.error = row.error or exc
                return
        # Cached only after the commit: a rolled-back series row must never be referenced later.
        self._series.update(recorded)
        for row in batch:
            row.committed = row.error is None

    def _transaction(self, batch: list[_PendingRow], isolate: bool) -> dict[str, tuple[int, frozenset[str]]]:
        """Record ``batch`` in one transaction; with ``isolate``, a failing row sets its ``error`` and is skipped."""
        recorded: dict[str, tuple[int, frozenset[str]]] = {}
        with self.database.engine.begin() as connection:
            for row in batch:
                series_uid = row.stored.series_instance_uid
                cached = recorded.get(series_uid) or self._series.get(series_uid)
                if isolate:
                    try:
                        with connection.begin_nested():
                            result = self._record(connection, row, cached)
                    except Exception as exc:  # this row only; its savepoint is rolled back
                        row.error = exc
                        continue
                else:
                    result = self._record(connection, row, cached)
                if result is not None:
                    recorded[series_uid] = result
        return recorded

    def reject(self, calling_ae: str, sop_instance_uid: str | None, reason: str) -> None:
        """Record an instance (or, with ``sop_instance_uid`` None, an association) the listener refused."""
        with self.database.session() as session:
            session.add(
                RejectedInstance(
                    calling_ae=calling_ae[:64], sop_instance_uid=(sop_instance_uid or "")[:128], reason=reason
                )
            )

    def _record(
        self, connection: Connection, row: _PendingRow, cached: tuple[int, frozenset[str]] | None
    ) -> tuple[int, frozenset[str]] | None:
        """Insert the instance row; return the series' key and image types, or ``None`` for a repeat."""
        ds, stored, calling_ae, now = row.ds, row.stored, row.calling_ae, row.received
        image_types = frozenset(t for t in _text(ds, "ImageType", 256).upper().split("\\") if t)
        series_pk = cached[0] if cached else self._upsert_series(connection, ds, stored, now)
        inserted = connection.execute(
            self._insert_instance,
            {
                "sop_instance_uid": stored.sop_instance_uid,
                "series_pk": series_pk,
                "sop_class_uid": stored.sop_class_uid,
                "instance_number": _integer(ds, "InstanceNumber"),
                "number_of_frames": max(1, _integer(ds, "NumberOfFrames") or 1),
                "transfer_syntax_uid": stored.transfer_syntax_uid,
                "archive_path": str(stored.path),
                "calling_ae": calling_ae[:16],
                "received_at": now,
            },
        )
        if inserted.rowcount == 0:
            return None  # a repeated SOP Instance UID: already recorded, nothing changes
        connection.execute(self._touch_series, {"series_key": series_pk, "received": now})
        known_types = cached[1] if cached else None
        if known_types is None or not image_types <= known_types:
            current = connection.scalar(select(_SERIES.c.image_types).where(_SERIES.c.id == series_pk)) or ""
            known_types = frozenset(t for t in current.split("\\") if t) | image_types
            connection.execute(
                update(_SERIES)
                .where(_SERIES.c.id == series_pk)
                .values(image_types="\\".join(sorted(known_types))[:256])
            )
        return series_pk, known_types

    def _upsert_series(self, connection: Connection, ds: Dataset, stored: StoredInstance, now: datetime) -> int:
        patient_id = _text(ds, "PatientID", 64)
        issuer = _text(ds, "IssuerOfPatientID", 64)
        connection.execute(
            self._insert_patient,
            {
                "patient_id": patient_id,
                "issuer_of_patient_id": issuer,
                "patient_name": _text(ds, "PatientName", 324),
                "birth_date": _text(ds, "PatientBirthDate", 8),
                "sex": _text(ds, "PatientSex", 16),
                "created_at": now,
            },
        )
        patient_pk = connection.scalar(
            select(_PATIENTS.c.id).where(
                _PATIENTS.c.patient_id == patient_id, _PATIENTS.c.issuer_of_patient_id == issuer
            )
        )
        connection.execute(
            self._insert_study,
            {
                "study_instance_uid": stored.study_instance_uid,
                "patient_pk": patient_pk,
                "accession_number": _text(ds, "AccessionNumber", 16),
                "study_date": _text(ds, "StudyDate", 8),
                "study_description": _text(ds, "StudyDescription", 64),
                "created_at": now,
            },
        )
        study_pk = connection.scalar(
            select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == stored.study_instance_uid)
        )
        connection.execute(
            self._insert_series,
            {
                "series_instance_uid": stored.series_instance_uid,
                "study_pk": study_pk,
                "modality": _text(ds, "Modality", 16),
                "body_part_examined": _text(ds, "BodyPartExamined", 16).upper(),
                "series_description": _text(ds, "SeriesDescription", 64),
                "series_number": _integer(ds, "SeriesNumber"),
                "image_types": "",
                "first_received_at": now,
                "last_received_at": now,
                "pending": True,
                "revision": 0,
            },
        )
        series_pk = connection.scalar(
            select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == stored.series_instance_uid)
        )
        if series_pk is None:
            raise RuntimeError(f"series {stored.series_instance_uid} was not recorded")
        return int(series_pk)
