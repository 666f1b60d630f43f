"""Scratch PostgreSQL databases for tests: one per test or module, on the server CI starts (trust authentication);
and scratch Redis databases (a fixed number per test file, so that files running at once do not share one)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

#: The server's own database, used only to create and drop the scratch ones.
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@contextmanager
def scratch_postgres(prefix: str = "triage_test") -> Iterator[str]:
    """A fresh, empty PostgreSQL database on 127.0.0.1:5432 (its URL), dropped afterwards even if still in use."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_redis(db: int) -> Iterator[str]:
    """Redis database ``db`` on 127.0.0.1:6379, emptied before and after (its URL)."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    try:
        yield f"redis://127.0.0.1:6379/{db}"
    finally:
        client.flushdb()
        client.close()
