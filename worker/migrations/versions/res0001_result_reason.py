"""Results: the reason a series was judged indeterminate (``results.reason``, nullable text).

Existing results keep ``NULL``: they all carry a class label. ``batch_alter_table`` so that SQLite, which cannot
alter a column in place, gets the same schema as PostgreSQL (adding a nullable column is a plain ALTER on both).

Revision ID: res0001
Revises: reg0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "res0001"
down_revision: Union[str, Sequence[str], None] = "reg0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("reason")
