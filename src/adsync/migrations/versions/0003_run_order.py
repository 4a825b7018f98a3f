"""Runs in order: ``sync_runs.run_seq`` and ``campaigns.last_run_seq``.

``run_seq`` numbers each client's runs in the order they started (a resumed run
keeps its number); ``last_run_seq`` is the number of the run whose values the
campaign row holds, so that a later run's write wins whatever the platform's
``synced_at`` says. Existing runs are numbered by start time, and each campaign
gets its last run's number.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sync_runs", sa.Column("run_seq", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column(
        "campaigns",
        sa.Column("last_run_seq", sa.BigInteger(), nullable=False, server_default="0"),
    )
    # UPDATE ... FROM: PostgreSQL, and SQLite since 3.33.
    op.execute(
        "UPDATE sync_runs SET run_seq = numbered.n FROM ("
        " SELECT id, ROW_NUMBER() OVER (PARTITION BY client_id ORDER BY started_at, id) AS n"
        " FROM sync_runs) AS numbered"
        " WHERE numbered.id = sync_runs.id"
    )
    op.execute(
        "UPDATE campaigns SET last_run_seq = sync_runs.run_seq FROM sync_runs"
        " WHERE sync_runs.id = campaigns.last_run_id"
    )
    # The order of one client's runs, in the database itself.
    op.create_index("uq_sync_runs_client_seq", "sync_runs", ["client_id", "run_seq"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_sync_runs_client_seq", table_name="sync_runs")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("last_run_seq")
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("run_seq")
