"""Client certificate subjects bound to sending systems, for DICOMweb auth without a token (issue 19).

Revision ID: cc0001
Revises: dw0001
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "cc0001"
down_revision: Union[str, Sequence[str], None] = "dw0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "api_certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("subject"),
    )
    op.create_index(op.f("ix_api_certificates_name"), "api_certificates", ["name"])


def downgrade() -> None:
    op.drop_index(op.f("ix_api_certificates_name"), table_name="api_certificates")
    op.drop_table("api_certificates")
