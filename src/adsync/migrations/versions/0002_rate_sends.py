"""The shared rate budget: every send to the platform, by every process.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_sends",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        # Wall-clock unix seconds, so processes (and restarts) agree on it.
        sa.Column("sent_at", sa.Double(), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rate_sends"),
    )
    op.create_index("ix_rate_sends_client_sent", "rate_sends", ["client_id", "sent_at"])


def downgrade() -> None:
    op.drop_index("ix_rate_sends_client_sent", table_name="rate_sends")
    op.drop_table("rate_sends")
