"""DICOMweb sources of backfill plans (issue 19).

Revision ID: dw0001
Revises: bf2001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "dw0001"
down_revision: Union[str, Sequence[str], None] = "bf2001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "backfill_dicomweb_sources",
        sa.Column("plan_pk", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("token", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["plan_pk"], ["backfill_plans.id"]),
        sa.PrimaryKeyConstraint("plan_pk"),
    )


def downgrade() -> None:
    op.drop_table("backfill_dicomweb_sources")
