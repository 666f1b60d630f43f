"""Backfill plans, their studies and series; API tokens of sending systems (issue 19).

Revision ID: bf0001
Revises: auth0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "bf0001"
down_revision: Union[str, Sequence[str], None] = "auth0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_UID = sa.String(length=64)
_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "backfill_plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("max_in_flight", sa.Integer(), nullable=False),
        sa.Column("per_minute", sa.Double(), nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.Column("started_at", _WHEN, nullable=True),
        sa.Column("finished_at", _WHEN, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_backfill_plans_state"), "backfill_plans", ["state"])
    op.create_table(
        "backfill_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_pk", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", _UID, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", _WHEN, nullable=False),
        sa.ForeignKeyConstraint(["plan_pk"], ["backfill_plans.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_backfill_studies_plan_pk"), "backfill_studies", ["plan_pk"])
    op.create_index(op.f("ix_backfill_studies_study_instance_uid"), "backfill_studies", ["study_instance_uid"])
    op.create_index(op.f("ix_backfill_studies_state"), "backfill_studies", ["state"])
    op.create_table(
        "backfill_series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", _UID, nullable=False),
        sa.Column("planned_instances", sa.Integer(), nullable=True),
        sa.Column("moves", sa.Integer(), nullable=False),
        sa.Column("received", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["backfill_studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_backfill_series_study_pk"), "backfill_series", ["study_pk"])
    op.create_index(op.f("ix_backfill_series_series_instance_uid"), "backfill_series", ["series_instance_uid"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("token_sha256"),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_table("backfill_series")
    op.drop_table("backfill_studies")
    op.drop_table("backfill_plans")
