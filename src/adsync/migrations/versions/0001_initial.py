"""Initial schema: runs, checkpoints, campaigns, history, failures.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types are spelled out here rather than imported from adsync.store.schema: a
# migration must keep describing the schema as it was, whatever the store becomes.
_TS = sa.DateTime(timezone=True)
_RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("heartbeat_at", _TS, nullable=False),
        sa.Column("lease_until", _TS, nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("seen", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("synced", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("requests", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("rate_limited", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pages", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("listing_complete", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("resumable", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sync_runs"),
    )
    op.create_index("ix_sync_runs_client_id", "sync_runs", ["client_id"])
    op.create_index("ix_sync_runs_started_at", "sync_runs", ["started_at"])
    # The database itself guarantees one live run per client, whatever the code does.
    op.create_index(
        "uq_sync_runs_one_running",
        "sync_runs",
        ["client_id"],
        unique=True,
        sqlite_where=_RUNNING,
        postgresql_where=_RUNNING,
    )

    op.create_table(
        "run_items",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("campaign_id", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "campaign_id", name="pk_run_items"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name="fk_run_items_run_id", ondelete="CASCADE"
        ),
    )

    op.create_table(
        "campaigns",
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("budget", sa.Double(), nullable=False),
        sa.Column("impressions", sa.BigInteger(), nullable=False),
        sa.Column("clicks", sa.BigInteger(), nullable=False),
        sa.Column("conversions", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=True),
        sa.Column("first_synced_at", _TS, nullable=False),
        sa.Column("last_synced_at", _TS, nullable=False),
        sa.Column("last_run_id", sa.String(36), nullable=True),
        sa.PrimaryKeyConstraint("client_id", "id", name="pk_campaigns"),
    )

    op.create_table(
        "campaign_snapshots",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("campaign_id", sa.String(255), nullable=False),
        sa.Column("synced_at", _TS, nullable=False),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("budget", sa.Double(), nullable=False),
        sa.Column("impressions", sa.BigInteger(), nullable=False),
        sa.Column("clicks", sa.BigInteger(), nullable=False),
        sa.Column("conversions", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_snapshots"),
        sa.UniqueConstraint(
            "run_id", "client_id", "campaign_id", name="uq_campaign_snapshots_run_campaign"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_campaign_snapshots_run_id"),
    )
    op.create_index(
        "ix_campaign_snapshots_campaign",
        "campaign_snapshots",
        ["client_id", "campaign_id", "synced_at"],
    )

    op.create_table(
        "sync_failures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("campaign_id", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("failed_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sync_failures"),
        sa.UniqueConstraint(
            "run_id", "client_id", "campaign_id", name="uq_sync_failures_run_campaign"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name="fk_sync_failures_run_id", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("sync_failures")
    op.drop_index("ix_campaign_snapshots_campaign", table_name="campaign_snapshots")
    op.drop_table("campaign_snapshots")
    op.drop_table("campaigns")
    op.drop_table("run_items")
    op.drop_index("uq_sync_runs_one_running", table_name="sync_runs")
    op.drop_index("ix_sync_runs_started_at", table_name="sync_runs")
    op.drop_index("ix_sync_runs_client_id", table_name="sync_runs")
    op.drop_table("sync_runs")
