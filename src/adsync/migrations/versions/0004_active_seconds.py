"""The time a run was running: ``sync_runs.active_seconds``.

Summed over the processes that ran it (each claim, beat and finish adds the time
since the last), without the gaps between them. Existing runs are credited with
start to finish (or to their last beat): their gaps can no longer be told apart.

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sync_runs",
        sa.Column("active_seconds", sa.Double(), nullable=False, server_default="0"),
    )
    if op.get_bind().dialect.name == "sqlite":
        # julianday() keeps whole milliseconds: round the difference to them.
        days = "julianday(coalesce(finished_at, heartbeat_at)) - julianday(started_at)"
        seconds = f"max(0.0, round(({days}) * 86400000.0) / 1000.0)"
    else:
        seconds = (
            "greatest(0.0, extract(epoch FROM coalesce(finished_at, heartbeat_at) - started_at))"
        )
    op.execute(f"UPDATE sync_runs SET active_seconds = {seconds}")  # noqa: S608 - no input


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("active_seconds")
