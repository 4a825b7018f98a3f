"""Resuming a run only while it is recent, and counting by the run's own listing.

A 100-campaign run is interrupted at about 40 synced; then the platform lists 5
campaigns. The next sync comes half an hour later (within the default hour: the
run is resumed) or two hours later (past it: the run is abandoned and a new one
starts). The gap is made by moving the interrupted run's times back in the
database, as if it had run that long ago.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa
from _client_standin import StandIn, campaign, job, move_run_back, stop_after

from adsync.models import RunStatus
from adsync.store import SqlStore, metadata

pytestmark = pytest.mark.timeout(60)

HUNDRED = [campaign(i) for i in range(1, 101)]
FIVE = HUNDRED[:5]


async def interrupted_at_about_40(store: SqlStore) -> str:
    platform = StandIn(HUNDRED, delay=0.005)
    outcome = await job(platform, store, stop=stop_after(platform, 40)).run()
    assert outcome.status is RunStatus.INTERRUPTED
    assert 40 <= outcome.counters.synced < 100
    return outcome.run_id


def item_states(store: SqlStore, run_id: str) -> Counter[str]:
    items = metadata.tables["run_items"]
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(items.c.state).where(items.c.run_id == run_id)).all()
    return Counter(r.state for r in rows)


async def test_a_run_resumed_within_the_bound_counts_by_its_new_listing(
    store: SqlStore, database_url: str
) -> None:
    run_id = await interrupted_at_about_40(store)
    move_run_back(database_url, run_id, timedelta(minutes=30).total_seconds())

    five = StandIn(FIVE)
    outcome = await job(five, store).run()

    assert outcome.run_id == run_id
    assert outcome.resumed
    assert outcome.status is RunStatus.SUCCEEDED
    assert (outcome.counters.seen, outcome.counters.synced, outcome.counters.failed) == (5, 5, 0)
    record = store.get_run(run_id)
    assert record is not None
    assert (record.seen, record.synced, record.failed) == (5, 5, 0)
    # Every campaign of the run's earlier listing that this one no longer has is
    # recorded as such; nothing stays pending in a finished run.
    states = item_states(store, run_id)
    assert states == Counter({"synced": 5, "unlisted": 95})
    # The half hour between the two processes is not time the run was running.
    assert record.duration is not None
    assert record.duration < timedelta(minutes=1)
    # Campaigns synced before the interruption were not synced again.
    assert sum(five.sync_calls.values()) <= 5


async def test_a_run_past_the_bound_is_abandoned_and_a_new_one_syncs_the_listing(
    store: SqlStore, database_url: str
) -> None:
    run_id = await interrupted_at_about_40(store)
    move_run_back(database_url, run_id, timedelta(hours=2).total_seconds())

    five = StandIn(FIVE)
    outcome = await job(five, store).run()

    assert outcome.run_id != run_id
    assert not outcome.resumed
    assert outcome.status is RunStatus.SUCCEEDED
    assert (outcome.counters.seen, outcome.counters.synced) == (5, 5)
    # Every listed campaign was synced afresh: two hours old is not "already synced".
    assert five.sync_calls == Counter({c.id: 1 for c in FIVE})
    old = store.get_run(run_id)
    assert old is not None
    assert old.status.value == "abandoned"
    assert not old.resumable
    # It is closed for good: the run after this one is a new one too.
    again = await job(StandIn(FIVE), store).run()
    assert again.run_id not in {run_id, outcome.run_id}


async def test_the_bound_is_a_setting(store: SqlStore, database_url: str) -> None:
    run_id = await interrupted_at_about_40(store)
    move_run_back(database_url, run_id, timedelta(minutes=30).total_seconds())
    outcome = await job(StandIn(FIVE), store, resume_within=600.0).run()
    assert outcome.run_id != run_id
    old = store.get_run(run_id)
    assert old is not None
    assert old.status.value == "abandoned"
