"""The tables of adsync, as SQLAlchemy Core metadata, and the migrations they match.

The schema is made by the Alembic migrations (``adsync/migrations``); this
metadata must describe exactly what they leave (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = [
    "MIGRATIONS_DIR",
    "UTCDateTime",
    "campaign_snapshots",
    "campaigns",
    "metadata",
    "rate_sends",
    "run_items",
    "schema_problem",
    "sync_failures",
    "sync_runs",
]

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent.parent / "migrations"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every backend.

    SQLite stores no offset, so values go in as naive UTC and get ``tzinfo`` back on
    the way out. Naive input is taken as UTC: platform timestamps without an offset
    are UTC by the platform's contract.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Must match migrations/versions (a test compares them).
metadata = sa.MetaData()

_RUNNING_ONLY = sa.text("status = 'running'")
_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PK = rowid

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    sa.Column("lease_until", UTCDateTime(), nullable=False),
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
    # The client's run order (1, 2, ...): what decides which write to `campaigns` wins.
    sa.Column("run_seq", sa.BigInteger(), nullable=False, server_default="0"),
    # Time some process was running the run, summed over claims (gaps left out).
    sa.Column("active_seconds", sa.Double(), nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("id", name="pk_sync_runs"),
    sa.Index("ix_sync_runs_client_id", "client_id"),
    sa.Index("ix_sync_runs_started_at", "started_at"),
    sa.Index("uq_sync_runs_client_seq", "client_id", "run_seq", unique=True),
    sa.Index(
        "uq_sync_runs_one_running",
        "client_id",
        unique=True,
        sqlite_where=_RUNNING_ONLY,
        postgresql_where=_RUNNING_ONLY,
    ),
)

run_items = sa.Table(
    "run_items",
    metadata,
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("campaign_id", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("run_id", "campaign_id", name="pk_run_items"),
    sa.ForeignKeyConstraint(
        ["run_id"], ["sync_runs.id"], name="fk_run_items_run_id", ondelete="CASCADE"
    ),
)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("id", sa.String(255), nullable=False),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("status", sa.String(64), nullable=False),
    sa.Column("budget", sa.Double(), nullable=False),
    sa.Column("impressions", sa.BigInteger(), nullable=False),
    sa.Column("clicks", sa.BigInteger(), nullable=False),
    sa.Column("conversions", sa.BigInteger(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=True),
    sa.Column("first_synced_at", UTCDateTime(), nullable=False),
    sa.Column("last_synced_at", UTCDateTime(), nullable=False),
    sa.Column("last_run_id", sa.String(36), nullable=True),
    # The run_seq of last_run_id: a row is only overwritten by a run as late or later.
    sa.Column("last_run_seq", sa.BigInteger(), nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("client_id", "id", name="pk_campaigns"),
)

campaign_snapshots = sa.Table(
    "campaign_snapshots",
    metadata,
    sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("campaign_id", sa.String(255), nullable=False),
    sa.Column("synced_at", UTCDateTime(), nullable=False),
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
    sa.Index("ix_campaign_snapshots_campaign", "client_id", "campaign_id", "synced_at"),
)

sync_failures = sa.Table(
    "sync_failures",
    metadata,
    sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("campaign_id", sa.String(255), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("failed_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_sync_failures"),
    sa.UniqueConstraint("run_id", "client_id", "campaign_id", name="uq_sync_failures_run_campaign"),
    sa.ForeignKeyConstraint(
        ["run_id"], ["sync_runs.id"], name="fk_sync_failures_run_id", ondelete="CASCADE"
    ),
)

# Every send to the platform by any process, for the shared rate budget. ``sent_at``
# is unix seconds on the database's clock (a double: microseconds survive), so that
# processes agree on it whatever their own clocks say, and it outlives a restart.
rate_sends = sa.Table(
    "rate_sends",
    metadata,
    sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("sent_at", sa.Double(), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_rate_sends"),
    sa.Index("ix_rate_sends_client_sent", "client_id", "sent_at"),
)


# The revisions of src/adsync/migrations/versions, oldest first: the last is the
# head. Read-only commands compare the database with these without loading
# Alembic (a tenth of a second of start-up); a test keeps them equal to the
# scripts, so a new migration fails it until it is listed here.
REVISIONS: Final = ("0001", "0002", "0003", "0004")
VERSION_TABLE: Final = "alembic_version"


def schema_problem(
    current: frozenset[str], heads: frozenset[str], known: frozenset[str]
) -> str | None:
    """What is wrong with a database at Alembic revisions ``current``, if anything.

    ``heads`` are the revisions this adsync's migrations end at, ``known`` all of
    its revisions.
    """
    if current == heads:
        return None
    if not current:
        return "the database has no adsync schema yet: run `adsync db upgrade`"
    at = ", ".join(sorted(current))
    if current <= known:
        return (
            f"the database schema is older than this adsync (revision {at}, needs "
            f"{', '.join(sorted(heads))}): run `adsync db upgrade`"
        )
    return f"the database schema (revision {at}) is newer than this adsync: upgrade adsync"
