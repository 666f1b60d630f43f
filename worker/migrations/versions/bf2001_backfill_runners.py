"""Backfill: which runner moves a study, when a plan last started one, its pauses for live ingest (issue 19).

Revision ID: bf2001
Revises: bf0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "bf2001"
down_revision: Union[str, Sequence[str], None] = "bf0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("backfill_studies") as table:
        table.add_column(sa.Column("runner", sa.String(length=128), nullable=True))
    with op.batch_alter_table("backfill_plans") as table:
        table.add_column(sa.Column("last_started_at", _WHEN, nullable=True))
        table.add_column(sa.Column("paused_since", _WHEN, nullable=True))
        table.add_column(sa.Column("pause_reason", sa.Text(), nullable=False, server_default=""))
        table.add_column(sa.Column("paused_seconds", sa.Double(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("backfill_plans") as table:
        table.drop_column("paused_seconds")
        table.drop_column("pause_reason")
        table.drop_column("paused_since")
        table.drop_column("last_started_at")
    with op.batch_alter_table("backfill_studies") as table:
        table.drop_column("runner")
