"""The listener's :class:`InstanceSink`: archive an instance and commit its rows before success goes back.

For each instance: ``archive.store(ds)`` (durable file), then one transaction that upserts the patient, study and
series, inserts the instance (idempotent on SOP Instance UID) and marks the series pending with a fresh
last-received time. A late instance of a series already classified marks it pending again; the scheduler then
re-runs it and the new result supersedes the old. A repeated SOP Instance UID changes nothing.

On SQLite the listener commits with ``synchronous=NORMAL`` (``Database(durable_commits=False)``): a commit is
atomic and survives the process, but a power loss can drop the last commits before SQLite's next WAL sync. The
acknowledged instance is not lost with it, because its file was fsynced before the commit: while such a sink is
open, a marker file ``.ingest-open-<pid>`` in the archive root says so, and its modification time says from when
rows may be missing (it moves forward each time the sink fsyncs the WAL itself, every few seconds). A sink that
opens and finds the marker of a process that is gone re-records every archived file in the series directories
changed since then that has no row (:meth:`DatabaseSink.recover`). A clean close fsyncs the WAL and removes the
marker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Dialect, Table, bindparam, select, update
from sqlalchemy.sql import Executable
from sqlalchemy.dialects import postgresql, sqlite

from dicom_io.archive import Archive, StoredInstance, fsync_path
from dicom_io.listener import received_file
from dicom_io.validation import element_text, integer_value
from worker.db import Database, Instance, Patient, RejectedInstance, Series, Study, utcnow
from worker.metrics import (ARCHIVED_BYTES, ASSOCIATIONS_ACCEPTED, ASSOCIATIONS_OPEN, INSTANCES_RECEIVED, ae_label,
                            count_rejection)
from worker.workers import other_process_alive

LOGGER = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000

#: Name prefix of the marker of an open sink with relaxed commits (see the module's docstring); then its pid.
MARKER_PREFIX = ".ingest-open-"
#: How often (at most) an open sink with relaxed commits fsyncs the WAL and moves its marker's time forward.
DURABLE_EVERY_SECONDS = 5.0
#: Subtracted from every time written to a marker: file systems stamp times from a coarser clock than time.time().
_CLOCK_SLACK_SECONDS = 2.0

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


def _image_types(ds: Dataset) -> frozenset[str]:
    """The values of Image Type (CS: ASCII), upper case."""
    values = (element_text(ds, "ImageType") or "").upper().split("\\")
    return frozenset(t for t in (value.strip(" \x00") for value in values) if t)


class _Statement:
    """A Core statement compiled once for one dialect and run on a DBAPI cursor.

    SQLAlchemy's per-execution work (events, execution context, result object) cost several times what SQLite
    itself spends on the row, on every instance; the SQL, the parameter order and each type's conversion (UTC
    datetimes) are still SQLAlchemy's own.
    """

    def __init__(self, statement: Executable, dialect: Dialect, columns: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=columns)
        self._compiled = compiled
        self.sql = compiled.string
        self._order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        processors = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        self._processors: dict[str, Callable[[Any], Any]] = processors

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The DBAPI parameters for ``values`` (by bind name; literal values of the statement filled in)."""
        params = self._compiled.construct_params(dict(values))
        for name, processor in self._processors.items():
            params[name] = processor(params[name])
        return tuple(params[name] for name in self._order) if self._order is not None else params

    def execute(self, cursor: Any, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run with ``values``; the rows it returns (none for a statement without results)."""
        cursor.execute(self.sql, self.parameters(values))
        return cursor.fetchall() if cursor.description is not None else []


@dataclass
class _PendingRow:
    """An archived instance waiting for the group commit that records its row."""

    ds: Dataset
    stored: StoredInstance
    calling_ae: str
    received: datetime
    committed: bool = False
    error: BaseException | None = None


@dataclass
class _Ticket:
    """The rows of one caller of :meth:`DatabaseSink._commit`, waiting for a leader (or to become one)."""

    rows: list[_PendingRow]
    wake: threading.Event = field(default_factory=threading.Event)
    #: Set before ``wake`` when the finishing leader hands this caller the lead instead of its rows' outcome.
    lead: bool = False


class DatabaseSink:
    """Archives instances and records them (and rejections) in the database; safe to call from many threads.

    Group commit, leader/follower: the caller that finds no commit running records every row handed in meanwhile
    in one transaction, so eight associations share one commit instead of queueing for eight, and a lone
    association pays no hand-off to another thread. The batch is first written without savepoints; if any row
    fails, it is written again with a savepoint per row, so one bad row fails alone. Each caller returns only
    after the commit that holds its row. The per-instance statements are SQLAlchemy Core, compiled once and run on
    a DBAPI cursor (see :class:`_Statement`): the ORM's, then Core's, per-statement work cost more than the rows.
    """

    def __init__(self, archive: Archive, database: Database) -> None:
        self.archive = archive
        self.database = database
        # Series primary key and the image types recorded for it, per SeriesInstanceUID; rows are never deleted,
        # so the cache only saves the upserts of patient, study and series for every instance after the first.
        # Read and written by the current leader only.
        self._series: dict[str, tuple[int, frozenset[str]]] = {}
        engine_dialect = database.engine.dialect
        dialect = postgresql if engine_dialect.name == "postgresql" else sqlite

        def compiled(statement: Executable, columns: list[str] | None = None) -> _Statement:
            return _Statement(statement, engine_dialect, columns)

        def upsert(table: Table, keys: list[str], columns: list[str]) -> tuple[_Statement, _Statement]:
            # An insert that leaves an existing row alone, and the select of the row's id by its unique ``keys``.
            insert = compiled(dialect.insert(table).on_conflict_do_nothing(index_elements=keys), columns)
            return insert, compiled(select(table.c.id).where(*(table.c[key] == bindparam(key) for key in keys)))

        self._insert_patient, self._select_patient = upsert(
            _PATIENTS, ["patient_id", "issuer_of_patient_id"],
            ["patient_id", "issuer_of_patient_id", "patient_name", "birth_date", "sex", "created_at"],
        )
        self._insert_study, self._select_study = upsert(
            _STUDIES, ["study_instance_uid"],
            ["study_instance_uid", "patient_pk", "accession_number", "study_date", "study_description", "created_at"],
        )
        self._insert_series, self._select_series = upsert(
            _SERIES, ["series_instance_uid"],
            ["series_instance_uid", "study_pk", "modality", "body_part_examined", "series_description",
             "series_number", "image_types", "first_received_at", "last_received_at", "pending", "revision"],
        )
        instance_columns = [
            "sop_instance_uid", "series_pk", "sop_class_uid", "instance_number", "number_of_frames",
            "transfer_syntax_uid", "archive_path", "calling_ae", "received_at",
        ]  # fmt: skip
        # RETURNING says whether the row was really inserted: repeats are told apart without another query.
        self._insert_instance = compiled(
            dialect.insert(_INSTANCES)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(_INSTANCES.c.sop_instance_uid),
            instance_columns,
        )
        self._touch_series = compiled(
            update(_SERIES)
            .where(_SERIES.c.id == bindparam("series_key"))
            .values(last_received_at=bindparam("received"), pending=True)
        )
        self._select_image_types = compiled(
            select(_SERIES.c.image_types).where(_SERIES.c.id == bindparam("series_key"))
        )
        self._set_image_types = compiled(
            update(_SERIES).where(_SERIES.c.id == bindparam("series_key")).values(image_types=bindparam("types"))
        )
        self._lock = threading.Lock()
        self._waiting: list[_Ticket] = []  # callers whose rows no leader has taken yet, oldest first
        self._leading = False
        # When each accept() now running began (time.time(), by thread): its file may be linked, its row not yet
        # committed, so a durable point cannot be later than the earliest of these.
        self._in_flight: dict[int, float] = {}
        self._marker: Path | None = None  # ours, while open with relaxed commits
        self._connection: Any = None  # see _cursor
        self._durable_at = time.monotonic()

    @property
    def relaxed_commits(self) -> bool:
        """Whether a commit may be lost to a power loss (SQLite with ``synchronous=NORMAL``)."""
        return self.database.is_sqlite and not self.database.durable_commits

    def open(self) -> int:
        """Call before serving: recover what a sink that ended uncleanly may have lost (see the module), then, with
        relaxed commits, put down this process's marker. Returns how many instances were recovered."""
        recovered = 0
        # A marker whose pid now names another live process is left for a later start (scanning is only deferred).
        stale = [m for m in self._markers() if not other_process_alive(int(m.name[len(MARKER_PREFIX):]))]
        if stale:
            since = min(m.stat().st_mtime for m in stale)
            recovered = self.recover(since)
            LOGGER.warning("an earlier listener ended uncleanly: re-recorded %d archived instance(s)", recovered)
            self._sync_database()
            for marker in stale:
                marker.unlink(missing_ok=True)
        if self.relaxed_commits:
            marker = self.archive.root / f"{MARKER_PREFIX}{os.getpid()}"
            marker.touch(mode=0o644)
            fsync_path(marker)
            since = time.time() - _CLOCK_SLACK_SECONDS
            os.utime(marker, (since, since))
            fsync_path(self.archive.root)  # the marker exists on disk before any instance relies on it
            self._marker = marker
            self._durable_at = time.monotonic()
        return recovered

    def close(self, timeout: float = 10.0) -> None:
        """Call after the listener stopped: let the stores still running finish (at most ``timeout`` s), make every
        commit durable, remove this process's marker and give the sink's connection back (both kept if a store is
        still running then)."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:  # aborted associations' last commits
            time.sleep(0.01)
        if self._marker is not None:
            self._sync_database()
        if self._in_flight:
            LOGGER.warning("ingest closed with %d store(s) still running%s", len(self._in_flight),
                           "; a restart re-checks them" if self._marker is not None else "")
            return
        self._release_connection()
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None

    def _markers(self) -> list[Path]:
        return [
            path
            for path in self.archive.root.glob(f"{MARKER_PREFIX}*")
            if path.name[len(MARKER_PREFIX):].isdigit()
        ]

    def recover(self, modified_since: float) -> int:
        """Record every archived file without a row in the series directories changed since ``modified_since``
        (a ``time.time()``); return how many. Its calling AE comes from the file's Source Application Entity
        Title (the listener writes it there)."""
        recovered = 0
        for directory in self.archive.series_directories(modified_since):
            files = self.archive.files_in(directory)
            if not files:
                continue
            with self.database.engine.connect() as connection:
                known = set(
                    connection.scalars(
                        select(_INSTANCES.c.sop_instance_uid)
                        .join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_pk)
                        .where(_SERIES.c.series_instance_uid == directory.name)
                    )
                )
            rows = []
            for path in files:
                if path.name.removesuffix(".dcm") in known:
                    continue
                try:
                    ds, stored = self.archive.read_stored(path)
                except Exception as exc:  # a file we cannot read back is reported, not guessed at
                    LOGGER.error("cannot re-record archived file %s: %s", path, exc)
                    continue
                calling_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip()
                rows.append(_PendingRow(ds, stored, calling_ae, utcnow()))
            if rows:
                self._commit(rows)
                for row in rows:
                    if row.error is not None:
                        LOGGER.error("cannot re-record archived file %s: %s", row.stored.path, row.error)
                recovered += sum(row.committed for row in rows)
        return recovered

    def accept(self, ds: Dataset, calling_ae: str) -> int:
        """Archive ``ds`` and commit its row, then return 0x0000 (success): the instance is durable and will be
        classified. Errors propagate to the listener, which answers a failure status."""
        caller = threading.get_ident()
        with self._lock:
            self._in_flight[caller] = time.time()
        try:
            stored = self.archive.store(ds, encoded=received_file(ds))  # the bytes as received: no re-encoding
            row = _PendingRow(ds, stored, calling_ae, utcnow())
            self._commit([row])
        finally:
            with self._lock:
                del self._in_flight[caller]
        if row.error is not None:
            raise row.error
        if not row.committed:
            raise RuntimeError(f"instance {stored.sop_instance_uid}: its commit was interrupted")
        INSTANCES_RECEIVED.labels(ae_label(calling_ae)).inc()
        if not stored.duplicate:
            ARCHIVED_BYTES.inc(stored.size_bytes)
        return STATUS_SUCCESS

    def _commit(self, rows: list[_PendingRow]) -> None:
        """Return once the transaction holding ``rows`` has ended, leading the next group commit if no other caller
        is. Each waiting caller is woken once: with its outcome, or to lead."""
        ticket = _Ticket(rows)
        with self._lock:
            if self._leading:
                self._waiting.append(ticket)
            else:
                self._leading = ticket.lead = True
        if not ticket.lead:
            ticket.wake.wait()
            if not ticket.lead:  # a leader took and committed our rows
                return
        with self._lock:
            taken, self._waiting = self._waiting, []
        batch = rows + [row for waiting in taken for row in waiting.rows]
        try:
            self._write(batch)
            if self._marker is not None and time.monotonic() - self._durable_at >= DURABLE_EVERY_SECONDS:
                self._move_marker()
        finally:
            for waiting in taken:
                waiting.wake.set()
            with self._lock:
                if self._waiting:  # hand the lead to the oldest caller that came meanwhile
                    successor = self._waiting.pop(0)
                    successor.lead = True
                    successor.wake.set()
                else:
                    self._leading = False

    def _move_marker(self) -> None:
        """Fsync the WAL, then move the marker's time to when the earliest row not surely covered began."""
        assert self._marker is not None
        with self._lock:
            horizon = min(self._in_flight.values(), default=time.time()) - _CLOCK_SLACK_SECONDS
        try:
            self._sync_database()
            os.utime(self._marker, (horizon, horizon))
        except OSError as exc:  # the marker keeps its older time: a recovery would scan more, nothing is lost
            LOGGER.warning("cannot move the ingest marker forward: %s", exc)
        self._durable_at = time.monotonic()

    def _sync_database(self) -> None:
        """Make every commit so far durable: fsync SQLite's WAL and the directory that holds it."""
        if not self.database.is_sqlite or not self.database.engine.url.database:
            return
        database_file = Path(self.database.engine.url.database)
        try:
            fsync_path(Path(f"{database_file}-wal"))
        except FileNotFoundError:  # no WAL now: every commit is in the database file, synced by the checkpoint
            pass
        fsync_path(database_file.parent)

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

    def association_accepted(self, calling_ae: str) -> None:
        """Counted for the metrics (the listener calls it for each association it accepts)."""
        ASSOCIATIONS_ACCEPTED.labels(ae_label(calling_ae)).inc()
        ASSOCIATIONS_OPEN.inc()

    def association_ended(self) -> None:
        """An accepted association's connection closed (released, aborted or timed out)."""
        ASSOCIATIONS_OPEN.dec()

    def reject(self, calling_ae: str, sop_instance_uid: str | None, reason: str) -> None:
        """Record an instance (or, with ``sop_instance_uid`` None, an association) the listener refused."""
        count_rejection(calling_ae, sop_instance_uid, reason)
        with self.database.session() as session:
            session.add(
                RejectedInstance(
                    calling_ae=calling_ae[:64], sop_instance_uid=(sop_instance_uid or "")[:128], reason=reason
                )
            )

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        """A DBAPI cursor in one transaction (``BEGIN IMMEDIATE`` on SQLite, as the engine's own), committed on
        leaving the block and rolled back on an exception.

        The connection is the sink's own, kept between commits (only the current leader uses it): a checkout from
        the pool for each commit cost a round trip more on PostgreSQL (the pool's pre-ping) and the pool's own
        work. A connection found lost (server restarted, idle timeout) is invalidated and :attr:`_connection`
        left None, so that the next transaction takes a new one.
        """
        if self._connection is None:
            self._connection = self.database.engine.raw_connection()
        connection = self._connection
        cursor = connection.cursor()
        try:
            if self.database.is_sqlite:  # the engine's connections are in autocommit mode: we begin ourselves
                cursor.execute("BEGIN IMMEDIATE")
            yield cursor
            connection.commit()
        except BaseException as exc:
            dialect = self.database.engine.dialect
            lost = isinstance(exc, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
                exc, connection.dbapi_connection, cursor
            )
            if not lost:
                try:
                    connection.rollback()
                except Exception:  # a connection that cannot roll back is as good as lost
                    lost = True
            if lost:
                connection.invalidate(exc)
                self._connection = None
            raise
        finally:
            with suppress(Exception):  # a lost connection's cursor may fail to close; it is gone with it
                cursor.close()

    def _release_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()  # back to the pool
            self._connection = None

    def _transaction(self, batch: list[_PendingRow], isolate: bool) -> dict[str, tuple[int, frozenset[str]]]:
        """Record ``batch`` in one transaction, the rows of each series together; with ``isolate``, each row in its
        own savepoint, and a failing row sets its ``error`` and is skipped. A batch whose connection was found lost
        is written once more on a new one (rows a lost commit did record are then repeats, which change nothing)."""
        try:
            return self._record_batch(batch, isolate)
        except Exception:
            if isolate or self._connection is not None:  # not a lost connection (or rows' errors already set)
                raise
            LOGGER.warning("the database connection was lost; writing %d instance row(s) again", len(batch))
            return self._record_batch(batch, isolate)

    def _record_batch(self, batch: list[_PendingRow], isolate: bool) -> dict[str, tuple[int, frozenset[str]]]:
        recorded: dict[str, tuple[int, frozenset[str]]] = {}
        groups: dict[str, list[_PendingRow]] = {}
        for row in batch:
            groups.setdefault(row.stored.series_instance_uid, []).append(row)
        with self._cursor() as cursor:
            for series_uid, rows in groups.items():
                if not isolate:
                    result = self._record(cursor, rows, recorded.get(series_uid) or self._series.get(series_uid))
                    if result is not None:
                        recorded[series_uid] = result
                    continue
                for row in rows:
                    cursor.execute("SAVEPOINT ingest_row")
                    try:
                        cached = recorded.get(series_uid) or self._series.get(series_uid)
                        result = self._record(cursor, [row], cached)
                    except Exception as exc:  # this row only: its savepoint is rolled back
                        cursor.execute("ROLLBACK TO SAVEPOINT ingest_row")
                        row.error = exc
                        continue
                    finally:
                        cursor.execute("RELEASE SAVEPOINT ingest_row")
                    if result is not None:
                        recorded[series_uid] = result
        return recorded

    def _record(
        self, cursor: Any, rows: list[_PendingRow], cached: tuple[int, frozenset[str]] | None
    ) -> tuple[int, frozenset[str]] | None:
        """Insert the instance rows of one series; return the series' key and image types, or ``None`` when every
        row was a repeat."""
        first = rows[0]
        series_pk = cached[0] if cached else self._upsert_series(cursor, first.ds, first.stored, first.received)
        new = []
        for row in rows:
            inserted = self._insert_instance.execute(
                cursor,
                {
                    "sop_instance_uid": row.stored.sop_instance_uid,
                    "series_pk": series_pk,
                    "sop_class_uid": row.stored.sop_class_uid,
                    "instance_number": integer_value(row.ds, "InstanceNumber"),
                    "number_of_frames": max(1, integer_value(row.ds, "NumberOfFrames") or 1),
                    "transfer_syntax_uid": row.stored.transfer_syntax_uid,
                    "archive_path": str(row.stored.path),
                    "calling_ae": row.calling_ae[:16],
                    "received_at": row.received,
                },
            )
            if inserted:  # else a repeated SOP Instance UID: already recorded, nothing changes
                new.append(row)
        if not new:
            return None
        self._touch_series.execute(cursor, {"series_key": series_pk, "received": max(r.received for r in new)})
        image_types = frozenset().union(*(_image_types(row.ds) for row in new))
        known_types = cached[1] if cached else None
        if known_types is None or not image_types <= known_types:
            found = self._select_image_types.execute(cursor, {"series_key": series_pk})
            current = (found[0][0] if found else "") or ""
            known_types = frozenset(t for t in current.split("\\") if t) | image_types
            self._set_image_types.execute(
                cursor, {"series_key": series_pk, "types": "\\".join(sorted(known_types))[:256]}
            )
        return series_pk, known_types

    def _upsert_series(self, cursor: Any, ds: Dataset, stored: StoredInstance, now: datetime) -> int:
        patient = {"patient_id": _text(ds, "PatientID", 64), "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64)}
        self._insert_patient.execute(
            cursor,
            {
                **patient,
                "patient_name": _text(ds, "PatientName", 324),
                "birth_date": _text(ds, "PatientBirthDate", 8),
                "sex": _text(ds, "PatientSex", 16),
                "created_at": now,
            },
        )
        patient_pk = self._select_patient.execute(cursor, patient)[0][0]
        study = {"study_instance_uid": stored.study_instance_uid}
        self._insert_study.execute(
            cursor,
            {
                **study,
                "patient_pk": patient_pk,
                "accession_number": _text(ds, "AccessionNumber", 16),
                "study_date": _text(ds, "StudyDate", 8),
                "study_description": _text(ds, "StudyDescription", 64),
                "created_at": now,
            },
        )
        study_pk = self._select_study.execute(cursor, study)[0][0]
        series = {"series_instance_uid": stored.series_instance_uid}
        self._insert_series.execute(
            cursor,
            {
                **series,
                "study_pk": study_pk,
                "modality": _text(ds, "Modality", 16),
                "body_part_examined": _text(ds, "BodyPartExamined", 16).upper(),
                "series_description": _text(ds, "SeriesDescription", 64),
                "series_number": integer_value(ds, "SeriesNumber"),
                "image_types": "",
                "first_received_at": now,
                "last_received_at": now,
                "pending": True,
                "revision": 0,
            },
        )
        found = self._select_series.execute(cursor, series)
        if not found:
            raise RuntimeError(f"series {stored.series_instance_uid} was not recorded")
        return int(found[0][0])
