"""Login throttling: failed logins per account name and per client address (issue 18).

Revision ID: auth0001
Revises: wl0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "auth0001"
down_revision: Union[str, Sequence[str], None] = "wl0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index(op.f("ix_login_failures_last_failure_at"), "login_failures", ["last_failure_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_login_failures_last_failure_at"), table_name="login_failures")
    op.drop_table("login_failures")
