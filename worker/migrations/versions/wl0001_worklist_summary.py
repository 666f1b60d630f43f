"""The worklist's maintained summary (issue 22): ``study_triage``, ``study_tags``, ``model_result_counts``, their
indexes, the triggers that keep them (:mod:`worker.db.triage`) and their first fill from the existing rows.

Only new tables get indexes, so no existing table is rebuilt or index-locked. The fill runs in the migration's
transaction after the triggers are created; creating a trigger locks its table against writes until the commit
(PostgreSQL: SHARE ROW EXCLUSIVE; SQLite: the migration holds the write lock throughout), so writers wait for the
fill: the documented downtime of this upgrade, measured by ``bench/worklist.py`` ("rebuild" line: the same
statements) at about a minute for 1,000,000 studies. Stop the old version's processes before upgrading; the new
ones wait for the migration at start.

Revision ID: wl0001
Revises: res0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from worker.db import triage

revision: str = "wl0001"
down_revision: Union[str, Sequence[str], None] = "res0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "study_triage",
        sa.Column("study_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("triage_group", sa.SmallInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("review_state", sa.String(length=16), nullable=False),
        sa.Column("tasks", sa.String(length=400), nullable=True),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_pk"),
    )
    op.create_index("ix_study_triage_order", "study_triage", ["triage_group", "received_at", "study_pk"])
    op.create_table(
        "study_tags",
        sa.Column("study_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tag", sa.String(length=80), nullable=False),
        sa.Column("triage_group", sa.SmallInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["study_triage.study_pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_pk", "tag"),
    )
    op.create_index("ix_study_tags_order", "study_tags", ["tag", "triage_group", "received_at", "study_pk"])
    op.create_table(
        "model_result_counts",
        sa.Column("model_uid", sa.String(length=64), nullable=False),
        sa.Column("results", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model_uid"),
    )
    connection = op.get_bind()
    triage.install(connection)
    triage.rebuild(connection)


def downgrade() -> None:
    triage.uninstall(op.get_bind())
    op.drop_table("model_result_counts")
    op.drop_index("ix_study_tags_order", table_name="study_tags")
    op.drop_table("study_tags")
    op.drop_index("ix_study_triage_order", table_name="study_triage")
    op.drop_table("study_triage")
