"""Engines and sessions for SQLite (embedded) and PostgreSQL (scale-out).

SQLite is shared by the listener, the scheduler, the workers and the web app, each its own process, so it runs in
WAL mode (readers never block the writer, nor the writer them), with a busy timeout, and every writing
transaction starts ``BEGIN IMMEDIATE``: a deferred transaction that later tries to write can fail at once with
"database is locked" instead of waiting. :meth:`Database.read_session` is for pure readers (the web pages): a
plain deferred ``BEGIN`` on a query-only connection, so a page never queues behind a writer's lock.

A commit is on disk before it returns (``synchronous=FULL``) unless the engine is made with
``durable_commits=False`` (``synchronous=NORMAL``): then a commit is still atomic and survives a crash of the
process, and only a power loss or an OS crash can drop the last commits before SQLite's next WAL sync. The
listener's ingest uses that, because its archive files are fsynced first and a start-up scan re-records any
archived file whose row was lost (see :mod:`worker.ingest`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 60_000


def create_database_engine(url: str, *, durable_commits: bool = True, read_only: bool = False) -> Engine:
    """An engine for ``url``; for SQLite, the parent directory is created and the pragmas above are set.

    ``read_only``: for readers, transactions that cannot write and read one snapshot (SQLite: deferred transactions
    on query-only connections; PostgreSQL: read-only, repeatable read).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine, durable_commits=durable_commits, read_only=read_only)
        return engine
    if parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))  # psycopg 3 is the driver we ship
    if read_only:
        # Repeatable read: one snapshot for the whole read session, as SQLite's deferred transaction gives, so that
        # the figures of one report (status, /metrics, a worklist page) agree with each other. A read-only
        # transaction at this level never fails to serialize.
        return create_engine(url, pool_pre_ping=True,
                             execution_options={"postgresql_readonly": True, "isolation_level": "REPEATABLE READ"})
    return create_engine(url, pool_pre_ping=True)


def _configure_sqlite(engine: Engine, *, durable_commits: bool, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        _use_wal(cursor)
        cursor.execute(f"PRAGMA synchronous={'FULL' if durable_commits else 'NORMAL'}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)


def _use_wal(cursor: Any) -> None:
    """Put the database in WAL mode (kept in the file: only a new database needs it). The change takes an
    exclusive lock, and SQLite answers "database is locked" at once, without the busy timeout, or leaves the mode
    as it was, while another connection holds any lock: when several processes open a new database together
    (``serve`` and its children), all but one retry until the timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal":
                return
            failure: Exception = sqlite3.OperationalError("the journal mode stayed as it was")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            failure = exc
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"cannot put the database in WAL mode: {failure}")
        time.sleep(0.01)


class Database:
    """An engine and its session factories; ``with db.session() as s:`` is one committed transaction.

    ``durable_commits=False``: see the module's docstring (SQLite only; PostgreSQL commits stay synchronous).
    """

    def __init__(self, url: str, *, durable_commits: bool = True) -> None:
        self.url = url
        self.durable_commits = durable_commits
        self.engine = create_database_engine(url, durable_commits=durable_commits)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine: Engine | None = None
        self._read_sessions: sessionmaker[Session] | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on leaving the block and rolls back on an exception."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reading only: it never waits for a writer's lock, reads one snapshot (what was committed
        when it first read) and is rolled back at the end; a write in it fails (SQLite: query-only connection;
        PostgreSQL: a read-only transaction)."""
        if self._read_sessions is None:
            # Made on first use: most processes (listener, workers) never read this way.
            self._read_engine = create_database_engine(self.url, read_only=True)
            self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        with self._read_sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()
