"""The stored row is the latest run's, whatever the platform's clock says.

The platform stamps each sync call (``synced_at``); its clock may jump far ahead
once or run minutes behind. ``campaigns`` follows adsync's own order of runs,
and keeps the platform's stamp as data.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from _client_standin import StandIn, campaign, job
from alembic import command
from alembic.config import Config

from adsync.models import RunStatus, SyncedCampaign
from adsync.store import MIGRATIONS_DIR, SqlStore, metadata

pytestmark = pytest.mark.timeout(60)

FAR_FUTURE = datetime(2099, 1, 1, tzinfo=UTC)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


async def test_a_later_run_wins_over_a_receipt_from_2099(store: SqlStore) -> None:
    first = await job(StandIn([campaign(1)], synced_at=FAR_FUTURE), store).run()
    assert first.status is RunStatus.SUCCEEDED
    [row] = store.campaign_rows("acme")
    assert row["last_synced_at"] == FAR_FUTURE

    ended = campaign(1, name="Campaign 1 (renamed)", status="ended")
    second = await job(StandIn([ended]), store).run()
    assert second.status is RunStatus.SUCCEEDED

    [row] = store.campaign_rows("acme")
    assert (row["name"], row["status"]) == ("Campaign 1 (renamed)", "ended")
    assert row["last_run_id"] == second.run_id
    # The platform's stamp is kept as it said it, not as adsync orders runs.
    assert row["last_synced_at"] < FAR_FUTURE
    assert row["first_synced_at"] == FAR_FUTURE


async def test_a_later_run_wins_when_the_platforms_clock_goes_back(store: SqlStore) -> None:
    now = datetime.now(UTC)
    await job(StandIn([campaign(1)], synced_at=now), store).run()
    # Skew of a few minutes between the platform's servers.
    paused = campaign(1, status="paused", impressions=2_000)
    later = await job(StandIn([paused], synced_at=now - timedelta(minutes=5)), store).run()

    [row] = store.campaign_rows("acme")
    assert (row["status"], row["impressions"]) == ("paused", 2_000)
    assert row["last_run_id"] == later.run_id
    assert row["last_synced_at"] == now - timedelta(minutes=5)
    assert store.count_snapshots("acme") == 2


def upgrade_to(store: SqlStore, revision: str) -> None:
    """Migrate to ``revision`` only, as an older adsync would have left the database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def test_an_existing_database_is_carried_over(fresh_database_url: str) -> None:
    store = SqlStore.from_url(fresh_database_url, sleep=lambda _s: None)
    try:
        upgrade_to(store, "0002")
        runs, rows = metadata.tables["sync_runs"], metadata.tables["campaigns"]
        old_runs = [
            # (id, client, started, minutes run, status)
            ("r-acme-2", "acme", T0 + timedelta(hours=1), 5, "succeeded"),
            ("r-acme-1", "acme", T0, 2, "succeeded"),
            ("r-globex-1", "globex", T0 + timedelta(hours=2), 1, "partial"),
        ]
        with store.engine.begin() as conn:
            for run_id, client, started, minutes, status in old_runs:
                ended = started + timedelta(minutes=minutes)
                conn.execute(
                    sa.insert(old_table(runs, OLD_RUN_COLUMNS)),
                    {
                        "id": run_id,
                        "client_id": client,
                        "status": status,
                        "started_at": started,
                        "finished_at": ended,
                        "heartbeat_at": ended,
                        "lease_until": ended,
                        "owner": "host:1:x",
                    },
                )
            conn.execute(
                sa.insert(old_table(rows, OLD_CAMPAIGN_COLUMNS)),
                {
                    "client_id": "acme",
                    "id": "campaign_1",
                    "name": "Old name",
                    "status": "active",
                    "budget": 1.0,
                    "impressions": 1,
                    "clicks": 1,
                    "conversions": 1,
                    "first_synced_at": FAR_FUTURE,
                    "last_synced_at": FAR_FUTURE,
                    "last_run_id": "r-acme-2",
                },
            )

        store.upgrade()

        seqs = {r.id: (r.run_seq, r.duration) for r in store.recent_runs()}
        assert seqs == {
            "r-acme-1": (1, timedelta(minutes=2)),
            "r-acme-2": (2, timedelta(minutes=5)),
            "r-globex-1": (1, timedelta(minutes=1)),
        }
        [row] = store.campaign_rows("acme")
        assert row["last_run_seq"] == 2
        # The next run comes after them, and its write wins over the 2099 row.
        run = store.claim_run("acme", "host:2:y", 30)
        assert run.run_seq == 3
        store.write_synced(
            run.id, "acme", [SyncedCampaign(campaign(1, name="New name"), datetime.now(UTC))]
        )
        assert [r["name"] for r in store.campaign_rows("acme")] == ["New name"]
    finally:
        store.dispose()


OLD_RUN_COLUMNS = (
    "id",
    "client_id",
    "status",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "lease_until",
    "owner",
)
OLD_CAMPAIGN_COLUMNS = (
    "client_id",
    "id",
    "name",
    "status",
    "budget",
    "impressions",
    "clicks",
    "conversions",
    "first_synced_at",
    "last_synced_at",
    "last_run_id",
)


def old_table(table: sa.Table, columns: tuple[str, ...]) -> sa.TableClause:
    """``table`` as it was before this migration: only ``columns``, with their types."""
    return sa.table(table.name, *(sa.column(c, table.c[c].type) for c in columns))
