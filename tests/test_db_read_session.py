"""Database.read_session: readers never wait behind a writer's lock, read one snapshot, and cannot write."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from worker.db import Database, RejectedInstance


def test_reads_while_a_writer_holds_its_lock(database: Database) -> None:
    with database.session() as writer:
        writer.add(RejectedInstance(calling_ae="A", sop_instance_uid="1.2", reason="test"))
        writer.flush()  # SQLite: the write lock (BEGIN IMMEDIATE) is held until the block ends
        started = time.monotonic()
        with database.read_session() as reader:
            assert reader.scalar(select(func.count(RejectedInstance.id))) == 0  # the uncommitted row is not seen
        assert time.monotonic() - started < 1.0  # not the busy timeout
    with database.read_session() as reader:
        assert reader.scalar(select(func.count(RejectedInstance.id))) == 1


def test_a_read_session_cannot_write(database: Database) -> None:
    with pytest.raises(DBAPIError, match="readonly|read-only"):
        with database.read_session() as reader:
            reader.execute(text("DELETE FROM rejected_instances"))


def test_a_read_session_reads_one_snapshot(database: Database) -> None:
    # status read the queue's depth and its oldest job in two statements; on PostgreSQL (read committed then) a
    # job taken between them gave a depth of 1 with no oldest job (CI failure).
    with database.read_session() as reader:
        assert reader.scalar(select(func.count(RejectedInstance.id))) == 0
        with database.session() as writer:
            writer.add(RejectedInstance(calling_ae="A", sop_instance_uid="1.3", reason="test"))
        assert reader.scalar(select(func.count(RejectedInstance.id))) == 0  # committed after its first read
    with database.read_session() as reader:
        assert reader.scalar(select(func.count(RejectedInstance.id))) == 1
