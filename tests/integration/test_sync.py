"""The sync engine against the real simulator over HTTP, on SQLite and PostgreSQL.

Faults are on and seeded. Windows are short and limits high so that the file runs
in seconds; the rate behaviour at production-like ratios is in bench/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from adsync.config import Settings, load_settings
from adsync.models import RunStatus
from adsync.runner import sync_account
from adsync.simulator.testing import SimulatorHandle, running_simulator
from adsync.store import SqlStore

EMAIL = "admin@mixoads.com"
PASSWORD = "SuperSecret123!"
FAST = {"rate_limit": 40, "rate_window": 0.5, "sync_delay": 0.01, "seed": 11}


def settings_for(sim: SimulatorHandle, database_url: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "AD_PLATFORM_API_URL": sim.url,
        "AD_PLATFORM_EMAIL": EMAIL,
        "AD_PLATFORM_PASSWORD": PASSWORD,
        "AD_PLATFORM_CLIENT_ID": "acme",
        "AD_PLATFORM_RATE_LIMIT": sim.config.rate_limit,
        "AD_PLATFORM_RATE_WINDOW": sim.config.rate_window,
        # The simulator shares this process's GIL: allow for that jitter.
        "AD_PLATFORM_RATE_MARGIN": 0.04,
        "AD_PLATFORM_REQUEST_TIMEOUT": 0.3,
        "AD_PLATFORM_REQUEST_DEADLINE": 1.0,
        "AD_PLATFORM_BACKOFF_INITIAL": 0.01,
        "AD_PLATFORM_BACKOFF_MAX": 0.1,
        "DATABASE_URL": database_url,
    }
    values.update(over)
    return load_settings(**values)


@pytest.fixture
def sync_store(database_url: str) -> Iterator[SqlStore]:
    store = SqlStore.from_url(database_url)
    store.upgrade()
    try:
        yield store
    finally:
        store.dispose()


def run(settings: Settings, store: SqlStore) -> Any:
    return asyncio.run(sync_account(settings, store))


def client_stats(sim: SimulatorHandle, client_id: str = "acme") -> dict[str, Any]:
    stats: dict[str, Any] = sim.stats()["clients"][client_id]
    return stats


def duplicates(store: SqlStore) -> int:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT client_id, id FROM campaigns "
                "GROUP BY client_id, id HAVING count(*) > 1) d"
            )
        ).scalar_one()
    return int(rows)


@pytest.mark.slow
def test_every_campaign_once_with_faults_and_no_429(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(process=True, **FAST) as sim:
        settings = settings_for(sim, database_url)
        first = run(settings, sync_store)
        stats = client_stats(sim)
        assert first.status is RunStatus.SUCCEEDED, first
        assert sync_store.count_campaigns("acme") == 100
        assert duplicates(sync_store) == 0
        assert stats["rate_limited"] == 0
        assert stats["max_in_window"] <= sim.config.rate_limit
        assert stats["errors_503"] + stats["hangs"] > 0, "faults were meant to be on"
        assert all(n == 1 for n in stats["sync_ok"].values())
        assert len(stats["sync_ok"]) == 100
        assert first.counters.synced == 100
        assert first.counters.requests >= stats["requests"]

        second = run(settings, sync_store)
        assert second.status is RunStatus.SUCCEEDED
        assert second.run_id != first.run_id
        assert sync_store.count_campaigns("acme") == 100
        assert sync_store.count_snapshots("acme") == 200
        assert [r.status for r in sync_store.recent_runs("acme")] == ["succeeded", "succeeded"]
        # The second read saw larger counters; the upsert kept the latest values.
        rows = {r["id"]: r for r in sync_store.campaign_rows("acme")}
        assert rows["campaign_1"]["last_run_id"] == second.run_id


@pytest.mark.slow
def test_token_shorter_than_the_run_is_refreshed(sync_store: SqlStore, database_url: str) -> None:
    with running_simulator(process=True, **FAST, token_ttl=0.4, error_rate=0, hang_rate=0) as sim:
        outcome = run(settings_for(sim, database_url), sync_store)
        stats = sim.stats()
    assert outcome.status is RunStatus.SUCCEEDED
    assert sync_store.count_campaigns("acme") == 100
    assert stats["accounts"][EMAIL]["tokens_issued"] > 1
    assert stats["clients"]["acme"]["rate_limited"] == 0


def test_a_newer_token_invalidating_older_ones_is_survived(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(**FAST, invalidate_old_tokens=True, error_rate=0, hang_rate=0) as sim:
        settings = settings_for(sim, database_url)

        async def with_interloper() -> Any:
            task = asyncio.create_task(sync_account(settings, sync_store))
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(base_url=sim.url) as http:
                # Someone else logs in to the same account mid-run.
                answer = await http.post("/auth/token", auth=(EMAIL, PASSWORD))
                assert answer.status_code == 200
            return await task

        outcome = asyncio.run(with_interloper())
        stats = client_stats(sim)
    assert outcome.status is RunStatus.SUCCEEDED
    assert sync_store.count_campaigns("acme") == 100
    assert stats["unauthorized"] >= 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_hanging_requests_are_abandoned_and_retried(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(**FAST, hang_rate=0.3, error_rate=0) as sim:
        outcome = run(settings_for(sim, database_url), sync_store)
        stats = client_stats(sim)
    assert outcome.status is RunStatus.SUCCEEDED
    assert sync_store.count_campaigns("acme") == 100
    assert stats["hangs"] >= 20
    assert outcome.counters.retries >= stats["hangs"]


def test_a_campaign_whose_sync_always_fails_is_recorded_and_the_rest_stored(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(**FAST, fail_sync_ids="campaign_7", error_rate=0, hang_rate=0) as sim:
        outcome = run(settings_for(sim, database_url, AD_PLATFORM_MAX_ATTEMPTS=3), sync_store)
        stats = client_stats(sim)
    assert outcome.status is RunStatus.PARTIAL
    assert sync_store.count_campaigns("acme") == 99
    assert [(f.campaign_id, f.kind) for f in outcome.failures] == [("campaign_7", "sync")]
    assert "500" in outcome.failures[0].reason
    assert stats["sync_calls"]["campaign_7"] == 3  # bounded attempts
    recorded = sync_store.run_failures(outcome.run_id)
    assert [f.campaign_id for f in recorded] == ["campaign_7"]
    run_row = sync_store.get_run(outcome.run_id)
    assert run_row is not None
    assert (run_row.synced, run_row.failed, run_row.status) == (99, 1, "partial")


def test_a_malformed_campaign_is_recorded_never_written_and_the_rest_stored(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(
        **FAST, malformed_ids="campaign_3,campaign_4,campaign_5", error_rate=0, hang_rate=0
    ) as sim:
        outcome = run(settings_for(sim, database_url), sync_store)
        stats = client_stats(sim)
    assert outcome.status is RunStatus.PARTIAL
    assert sync_store.count_campaigns("acme") == 97
    failed = {f.campaign_id: f for f in sync_store.run_failures(outcome.run_id)}
    assert set(failed) <= {"campaign_3", "campaign_4", "campaign_5", ""}
    assert len(failed) + sum(1 for f in outcome.failures if not f.campaign_id) >= 3
    assert all(
        f.kind == "payload" and "invalid campaign payload" in f.reason for f in outcome.failures
    )
    # A payload that does not validate is never sent to the sync endpoint.
    assert not set(stats["sync_calls"]) & {"campaign_3", "campaign_4", "campaign_5"}


def test_names_with_quotes_and_unicode_are_stored_verbatim(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(**FAST, error_rate=0, hang_rate=0) as sim:
        outcome = run(settings_for(sim, database_url), sync_store)
        with httpx.Client(base_url=sim.url) as http:
            token = http.post("/auth/token", auth=(EMAIL, PASSWORD)).json()["access_token"]
            listed = http.get(
                "/api/campaigns",
                params={"page": 1, "limit": 100},
                headers={"Authorization": f"Bearer {token}", "X-Client-ID": "reader"},
            ).json()["data"]
    assert outcome.status is RunStatus.SUCCEEDED
    names = {c["id"]: c["name"] for c in listed}
    stored = {r["id"]: r["name"] for r in sync_store.campaign_rows("acme")}
    assert stored == names
    tricky = [n for n in stored.values() if "'" in n or '"' in n or not n.isascii()]
    assert any("DROP TABLE" in n for n in tricky)
    assert any(not n.isascii() for n in tricky)


def test_same_campaign_ids_under_two_client_ids_are_two_rows(
    sync_store: SqlStore, database_url: str
) -> None:
    with running_simulator(**FAST, error_rate=0, hang_rate=0, campaigns=20) as sim:
        a = run(settings_for(sim, database_url, AD_PLATFORM_CLIENT_ID="a"), sync_store)
        b = run(settings_for(sim, database_url, AD_PLATFORM_CLIENT_ID="b"), sync_store)
    assert a.status is b.status is RunStatus.SUCCEEDED
    assert sync_store.count_campaigns("a") == sync_store.count_campaigns("b") == 20
    assert sync_store.count_campaigns() == 40
