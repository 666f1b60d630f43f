"""Bring a database to the newest schema with the Alembic migrations in ``worker/migrations``.

Every process calls :func:`upgrade_database` at start. Concurrent calls are safe: on SQLite the migration runs
inside one ``BEGIN IMMEDIATE`` transaction (SQLite DDL is transactional), on PostgreSQL under an advisory lock.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from worker.db import triage
from worker.db.engine import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_PG_MIGRATION_LOCK = 0x64_69_63_6F_6D  # an arbitrary constant shared by every dicom-triage process


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_database(url: str | Database) -> None:
    """Apply every migration not yet applied to the database at ``url``."""
    database = url if isinstance(url, Database) else Database(url)
    try:
        config = alembic_config()
        with database.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            # The worklist summary's triggers: reinstalled (and the summary rebuilt) if their definition changed
            # or a migration that copied a table dropped them (worker.db.triage).
            triage.ensure(connection)
    finally:
        if not isinstance(url, Database):
            database.dispose()
