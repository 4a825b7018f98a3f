"""A process whose wall clock is wrong changes nothing about who holds a run.

Leases are decided by the database's clock, read in the claiming transaction
(``clock_timestamp()`` on PostgreSQL; on SQLite the one host's clock). Each test
has two processes' jobs on one database, one of them on a clock skewed as a
badly set host's would be (monotonic time is right, wall time is not).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from _client_standin import SkewedClock, StandIn, campaign, job

from adsync.errors import RunLocked
from adsync.models import RunStatus
from adsync.store import SqlStore
from adsync.sync import SyncOutcome

pytestmark = pytest.mark.timeout(60)

CAMPAIGNS = [campaign(i) for i in range(1, 41)]
LEASE = 30.0


async def holding_a_run(
    store: SqlStore, holder: SkewedClock, stop: asyncio.Event
) -> tuple[asyncio.Task[SyncOutcome], StandIn]:
    """A job that holds the client's run (slowly syncing) until ``stop`` is set."""
    platform = StandIn(CAMPAIGNS, delay=0.05)
    running = job(
        platform,
        store,
        owner="host-a:100:aaaa",
        clock=holder,
        stop=stop,
        concurrency=2,
        lease_seconds=LEASE,
    )
    task = asyncio.create_task(running.run())
    for _ in range(500):
        if platform.sync_calls:
            break
        await asyncio.sleep(0.01)
    assert platform.sync_calls, "the first job never started syncing"
    return task, platform


@pytest.mark.parametrize(
    ("holder_skew", "claimer_skew"),
    [
        pytest.param(0.0, 120.0, id="claimer-ahead-120s"),
        pytest.param(-30.0, 0.0, id="holder-behind-30s"),
    ],
)
async def test_a_live_run_is_not_taken_over_whatever_the_clocks_say(
    store: SqlStore, holder_skew: float, claimer_skew: float
) -> None:
    stop = asyncio.Event()
    task, platform = await holding_a_run(store, SkewedClock(holder_skew), stop)
    try:
        second = StandIn(CAMPAIGNS)
        claimer = job(
            second,
            store,
            owner="host-b:200:bbbb",
            clock=SkewedClock(claimer_skew),
            lease_seconds=LEASE,
        )
        with pytest.raises(RunLocked, match="already has a run in progress"):
            await claimer.run()
        assert second.sync_calls == Counter()
    finally:
        stop.set()
        outcome = await asyncio.wait_for(task, 20)
    # The first job kept its run to the end, and no campaign was synced twice.
    assert outcome.status is RunStatus.INTERRUPTED
    assert not outcome.taken_over
    assert set(platform.sync_calls.values()) == {1}


def test_a_claim_reads_the_databases_clock(store: SqlStore) -> None:
    def database_time() -> datetime:
        if store.engine.dialect.name == "sqlite":
            return datetime.now(UTC)  # SQLite's clock is the host's
        with store.engine.connect() as conn:
            value: datetime = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
        return value.astimezone(UTC)

    before = database_time()
    run = store.claim_run("acme", "host-a:100:aaaa", LEASE)
    after = database_time()
    assert before <= run.started_at <= after
    assert run.lease_until == run.heartbeat_at + timedelta(seconds=LEASE)
