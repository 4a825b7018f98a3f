"""The pipeline's endings against a scripted client, on SQLite and PostgreSQL.

Each test drives one way a run can end badly (a fatal error mid-flight, a
cancellation as a write arrives, a lease lost or not renewable, a page that
cannot be listed, a run whose data the database refuses) and checks that the
run ends, with the right status, and that nothing else is harmed.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from adsync.auth import TokenProvider
from adsync.client import ClientStats, PlatformClient, parse_page
from adsync.clock import SystemClock
from adsync.errors import AuthError, StoreError, TransientError
from adsync.events import ClientCounters
from adsync.gate import SendGate
from adsync.models import (
    Campaign,
    ListedItem,
    Page,
    RunCounters,
    RunStatus,
    RunWrite,
    SyncedCampaign,
    SyncReceipt,
)
from adsync.ratelimit import RateBudget
from adsync.retry import RetryPolicy
from adsync.runwriter import RunWriter
from adsync.store import SqlStore
from adsync.sync import PipelineOptions, SyncJob

pytestmark = pytest.mark.timeout(60)


class ScriptedClient:
    """Lists ``n`` campaigns and syncs each after ``delay``; hooks make it misbehave."""

    def __init__(self, n: int = 40, *, delay: float = 0.01, page_size: int = 10) -> None:
        self.n, self.delay, self.page_size = n, delay, page_size
        self.stats = ClientStats()
        self.gate = SendGate(SystemClock())
        self.synced: list[str] = []
        self.pages_done: list[int] = []
        self.fail_sync: dict[str, BaseException] = {}
        self.page_delay: dict[int, float] = {}
        self.fail_page: dict[int, BaseException] = {}
        # Items listed on the first page besides the n campaigns.
        self.extra: list[ListedItem] = []
        # Campaigns listed as they are given here instead of the plain ones.
        self.listed_as: dict[str, Campaign] = {}

    def counters(self) -> ClientCounters:
        return ClientCounters(requests=self.stats.requests)

    def seconds_for(self, requests: int) -> float:
        return 0.0

    async def list_page(self, number: int, limit: int) -> Page:
        self.stats.requests += 1
        await asyncio.sleep(self.page_delay.get(number, 0.001))
        if number in self.fail_page:
            raise self.fail_page[number]
        start = (number - 1) * limit
        ids = range(start + 1, min(self.n, start + limit) + 1)
        items = tuple(
            ListedItem(
                f"c{i}",
                self.listed_as.get(f"c{i}", Campaign(f"c{i}", "n", "active", 1.0, 1, 1, 1, None)),
            )
            for i in ids
        )
        if number == 1:
            items += tuple(self.extra)
        self.pages_done.append(number)
        return Page(number, limit, self.n + len(self.extra), start + limit < self.n, items)

    async def sync_campaign(self, campaign_id: str) -> SyncReceipt:
        self.stats.requests += 1
        await asyncio.sleep(self.delay)
        if campaign_id in self.fail_sync:
            raise self.fail_sync[campaign_id]
        self.synced.append(campaign_id)
        return SyncReceipt(campaign_id, datetime.now(UTC))


def job(
    client: ScriptedClient | PlatformClient,
    store: SqlStore,
    client_id: str = "acme",
    *,
    stop: asyncio.Event | None = None,
    **opts: Any,
) -> SyncJob:
    options = PipelineOptions(
        **{"concurrency": 4, "lease_seconds": 30.0, "request_seconds": 0.1, **opts}
    )
    return SyncJob(
        client,
        store,
        client_id=client_id,
        owner=f"host:1:{client_id}",
        clock=SystemClock(),
        options=options,
        stop=stop,
    )


class MockPlatform:
    """``n`` campaigns on one page over httpx.MockTransport; records the calls that reached it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        self.calls.append(request.url.path)
        if request.url.path == "/api/campaigns":
            data = [
                {"id": f"c{i}", "name": "n", "status": "active", "budget": 1, "impressions": 1}
                | {"clicks": 1, "conversions": 1, "created_at": None}
                for i in range(1, self.n + 1)
            ]
            pagination = {"page": 1, "limit": 100, "total": self.n, "has_more": False}
            return httpx.Response(200, json={"data": data, "pagination": pagination})
        campaign_id = request.url.path.split("/")[-2]
        return httpx.Response(200, json={"success": True, "campaign_id": campaign_id})


def platform_client(platform: MockPlatform, *, limit: int, window: float) -> PlatformClient:
    """A real client whose rate budget lets ``limit`` requests through per ``window``."""
    clock = SystemClock()
    http = httpx.AsyncClient(transport=httpx.MockTransport(platform), base_url="http://p")
    auth = TokenProvider(http, email="e@x.io", password=SecretStr("pw"), clock=clock)
    return PlatformClient(
        http,
        auth=auth,
        budget=RateBudget(limit, window, clock),
        clock=clock,
        client_id="acme",
        policy=RetryPolicy(),
    )


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(2000):  # ten seconds
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"10 s went by waiting for {what}")


async def _ended(task: asyncio.Task[Any], within: float) -> Any:
    done, _ = await asyncio.wait({task}, timeout=within)
    assert done, f"the run was still going {within}s later"
    return task.result()


async def test_a_writer_cancelled_as_a_campaign_arrives_stops(store: SqlStore) -> None:
    # The writer holds a part-filled batch (so it waits with a timeout); a campaign
    # arrives and the writer is cancelled in the same step of the loop.
    j = job(ScriptedClient(), store, batch_interval=60.0)
    campaign = Campaign("c1", "n", "active", 1.0, 1, 1, 1, None)
    writer = asyncio.create_task(j._writer())
    j._writes.put_nowait(SyncedCampaign(campaign, datetime.now(UTC)))
    await asyncio.sleep(0.01)
    j._writes.put_nowait(SyncedCampaign(campaign, datetime.now(UTC)))
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writer, 2.0)


async def test_a_fatal_error_at_any_moment_ends_the_run(store: SqlStore) -> None:
    rng = random.Random(5)
    for attempt in range(12):
        client = ScriptedClient(n=150, delay=rng.uniform(0.001, 0.01))
        client.fail_sync[f"c{rng.randint(20, 120)}"] = AuthError("credentials refused")
        outcome = await asyncio.wait_for(
            job(client, store, client_id=f"a{attempt}", batch_interval=0.02).run(), 10.0
        )
        assert outcome.status is RunStatus.FAILED
        assert isinstance(outcome.fatal, AuthError)


async def test_an_unexpected_error_ends_the_run_failed_and_resumable(store: SqlStore) -> None:
    client = ScriptedClient(n=30)
    client.fail_sync["c7"] = RuntimeError("a bug's message")
    outcome = await asyncio.wait_for(job(client, store).run(), 10.0)
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.fatal, RuntimeError)
    assert outcome.error == "unexpected RuntimeError: a bug's message"
    stored = store.get_run(outcome.run_id)
    assert stored is not None
    assert stored.status is RunStatus.FAILED
    assert stored.resumable
    assert stored.error == outcome.error


async def test_a_page_that_cannot_be_listed_stops_the_other_page_fetches(
    store: SqlStore,
) -> None:
    client = ScriptedClient(n=100)
    client.fail_page[3] = TransientError("503 after every retry")
    for number in (2, 4, 5, 6, 7, 8, 9, 10):
        client.page_delay[number] = 0.3
    outcome = await job(client, store).run()
    assert outcome.status is RunStatus.FAILED
    await asyncio.sleep(0.5)
    # Only the first page completed; the slow ones were abandoned with the run.
    assert client.pages_done == [1]


async def test_a_run_taken_over_ends_interrupted_and_left_to_the_new_owner(
    store: SqlStore,
) -> None:
    client = ScriptedClient(n=40, delay=0.1)
    task = asyncio.create_task(job(client, store, concurrency=2, lease_seconds=0.6).run())
    await asyncio.sleep(0.5)
    # Another process claims the run as if our lease had run out.
    taken = await asyncio.to_thread(
        store.claim_run, "acme", "host:2:other", 60, owner_is_dead=lambda _owner: True
    )
    outcome = await asyncio.wait_for(task, 10.0)
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.taken_over
    assert outcome.error == "another process took the run over"
    assert outcome.fatal is None
    record = store.get_run(taken.id)
    assert record is not None
    assert record.status is RunStatus.RUNNING
    assert record.owner == "host:2:other"


async def test_a_heartbeat_that_fails_once_is_tried_again(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store.heartbeat
    calls: list[bool] = []

    def flaky(*args: Any, **kwargs: Any) -> bool:
        calls.append(True)
        if len(calls) == 1:
            raise StoreError("database unavailable after 1 attempts")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "heartbeat", flaky)
    client = ScriptedClient(n=30, delay=0.05)
    outcome = await job(client, store, concurrency=2, lease_seconds=0.6).run()
    assert outcome.status is RunStatus.SUCCEEDED
    assert len(calls) >= 3
    assert sorted(client.synced) == sorted(f"c{i}" for i in range(1, 31))


async def test_a_lease_that_cannot_be_renewed_stops_the_run_resumable(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any, **kwargs: Any) -> bool:
        raise StoreError("database unavailable after 1 attempts")

    monkeypatch.setattr(store, "heartbeat", down)
    client = ScriptedClient(n=200, delay=0.05)
    outcome = await asyncio.wait_for(
        job(client, store, concurrency=2, lease_seconds=0.6).run(), 10.0
    )
    assert outcome.status is RunStatus.INTERRUPTED
    assert not outcome.taken_over
    assert outcome.error == "could not renew the run's lease; resumable"
    assert len(client.synced) < 200
    record = store.get_run(outcome.run_id)
    assert record is not None
    assert record.status is RunStatus.INTERRUPTED
    assert record.resumable


async def test_a_run_the_database_refuses_does_not_fail_the_runs_it_shared_a_write_with(
    store: SqlStore,
) -> None:
    now = datetime.now(UTC)
    good = store.claim_run("good", "o1", 60)
    bad = store.claim_run("bad", "o2", 60)
    # Built directly, past validation: a date that overflows once moved to UTC.
    edge = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    writes = [
        RunWrite(
            good.id,
            "good",
            (SyncedCampaign(Campaign("g1", "g", "active", 1.0, 1, 1, 1, None), now),),
            (),
            RunCounters(synced=1),
        ),
        RunWrite(
            bad.id,
            "bad",
            (SyncedCampaign(Campaign("b1", "b", "active", 1.0, 1, 1, 1, edge), now),),
            (),
            RunCounters(synced=1),
        ),
    ]
    writer = RunWriter(store)
    results = await asyncio.gather(*(writer.write(w) for w in writes), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], StoreError)
    assert store.count_campaigns("good") == 1
    assert store.count_campaigns("bad") == 0


def test_a_created_at_outside_the_calendar_in_utc_is_bad_data() -> None:
    def listed(created_at: str) -> ListedItem:
        item = {
            "id": "c1",
            "name": "x",
            "status": "active",
            "budget": 1,
            "impressions": 1,
            "clicks": 1,
            "conversions": 1,
            "created_at": created_at,
        }
        page = parse_page(
            {"data": [item], "pagination": {"page": 1, "limit": 10, "total": 1, "has_more": False}}
        )
        return page.items[0]

    early = listed("0001-01-01T00:00:00+05:00")
    assert early.campaign is None
    assert early.error is not None
    assert "created_at" in early.error
    fine = listed("2026-03-01T12:00:00+02:00")
    assert fine.campaign is not None
    assert fine.campaign.created_at == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


async def test_a_campaign_the_database_refuses_is_recorded_and_the_others_stored(
    store: SqlStore,
) -> None:
    client = ScriptedClient(n=30)
    # Built directly, past validation: a date that overflows once moved to UTC.
    edge = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    client.listed_as["c7"] = Campaign("c7", "n", "active", 1.0, 1, 1, 1, edge)
    outcome = await job(client, store).run()
    assert outcome.status is RunStatus.PARTIAL
    assert [(f.campaign_id, f.kind) for f in outcome.failures] == [("c7", "store")]
    assert "the database refused it" in outcome.failures[0].reason
    assert store.count_campaigns("acme") == 29
    assert [f.campaign_id for f in store.run_failures(outcome.run_id)] == ["c7"]
    assert outcome.counters.synced == 29
    assert outcome.counters.failed == 1


async def test_a_malformed_campaign_with_an_id_the_database_cannot_hold_is_recorded(
    store: SqlStore,
) -> None:
    page = parse_page(
        {
            "data": [{"id": "bad\x00id", "name": 1}, {"id": "x" * 300, "name": 2}],
            "pagination": {"page": 1, "limit": 10, "total": 2, "has_more": False},
        }
    )
    assert [item.campaign_id for item in page.items] == [None, None]
    client = ScriptedClient(n=20)
    client.extra = list(page.items)
    outcome = await job(client, store).run()
    assert outcome.status is RunStatus.PARTIAL
    assert [f.kind for f in outcome.failures] == ["payload", "payload"]
    assert store.count_campaigns("acme") == 20


async def test_a_stop_while_the_run_waits_for_its_window_ends_it_at_once(
    store: SqlStore,
) -> None:
    platform = MockPlatform(20)
    client = platform_client(platform, limit=4, window=60.0)
    stop = asyncio.Event()
    task = asyncio.create_task(job(client, store, stop=stop, batch_interval=0.01).run())
    await _until(lambda: store.count_campaigns("acme") >= 3, "three campaigns stored")
    stop.set()
    outcome = await _ended(task, 2.0)
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.error == "stopped by a signal; resumable"
    # The list call and three sync calls, then nothing: the rest waited for the window.
    assert len(platform.calls) == 4
    assert outcome.counters.requests == 4
    assert outcome.counters.synced == 3
    assert outcome.failures == []
    record = store.get_run(outcome.run_id)
    assert record is not None
    assert (record.status, record.resumable, record.synced) == (RunStatus.INTERRUPTED, True, 3)


async def test_a_lease_taken_over_while_the_run_waits_for_its_window_sends_nothing_more(
    store: SqlStore,
) -> None:
    platform = MockPlatform(20)
    client = platform_client(platform, limit=4, window=60.0)
    task = asyncio.create_task(job(client, store, lease_seconds=0.6, batch_interval=0.01).run())
    await _until(lambda: store.count_campaigns("acme") >= 3, "three campaigns stored")
    # Another process claims the run as if our lease had run out.
    await asyncio.to_thread(
        store.claim_run, "acme", "host:2:other", 60, owner_is_dead=lambda _owner: True
    )
    # The next heartbeat (every 0.2 s) tells the run it is no longer ours.
    outcome = await _ended(task, 2.0)
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.taken_over
    assert len(platform.calls) == 4


async def test_a_run_its_last_calls_complete_after_the_stop_is_still_interrupted(
    store: SqlStore,
) -> None:
    client = ScriptedClient(n=10, delay=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(job(client, store, stop=stop, concurrency=10).run())
    # The page and all ten sync calls are under way.
    await _until(lambda: client.stats.requests >= 11, "every call under way")
    stop.set()
    outcome = await _ended(task, 5.0)
    assert len(client.synced) == 10
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.counters.synced == 10
    record = store.get_run(outcome.run_id)
    assert record is not None
    assert (record.status, record.resumable) == (RunStatus.INTERRUPTED, True)


async def test_a_hard_stop_writes_every_campaign_whose_sync_call_succeeded(
    store: SqlStore,
) -> None:
    # The writer holds its batch for a minute: a cancellation finds it unwritten.
    client = ScriptedClient(n=200, delay=0.02)
    task = asyncio.create_task(job(client, store, batch_interval=60.0).run())
    await _until(lambda: len(client.synced) >= 12, "a dozen campaigns synced")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    synced = set(client.synced)
    (record,) = store.recent_runs("acme")
    assert (record.status, record.resumable) == (RunStatus.INTERRUPTED, True)
    assert store.checkpoint(record.id).synced == synced
    assert store.count_campaigns("acme") == len(synced)
    assert record.synced == len(synced)


async def test_a_heartbeat_stuck_past_the_lease_stops_the_run_by_the_clock(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hung database: the heartbeat never comes back to say anything.
    release = threading.Event()

    def hung(*args: Any, **kwargs: Any) -> bool:
        release.wait(10)
        return False

    monkeypatch.setattr(store, "heartbeat", hung)
    client = ScriptedClient(n=400, delay=0.02)
    try:
        outcome = await asyncio.wait_for(
            job(client, store, concurrency=2, lease_seconds=0.6).run(), 10.0
        )
    finally:
        release.set()
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.error == "could not renew the run's lease; resumable"
    # Sends stopped a request's length before the lease ran out (0.5 s in, at
    # about 100 calls a second), not at the end of the run.
    assert len(client.synced) < 100


async def test_a_lease_lost_by_one_account_does_not_stop_the_others(store: SqlStore) -> None:
    # Accounts synced side by side share the stop of their process (a signal);
    # one run losing its lease stops that run alone.
    stop = asyncio.Event()
    lost, kept = ScriptedClient(n=40, delay=0.05), ScriptedClient(n=40, delay=0.05)
    options = {"concurrency": 2, "lease_seconds": 0.6}
    tasks = [
        asyncio.create_task(job(lost, store, "lost", stop=stop, **options).run()),
        asyncio.create_task(job(kept, store, "kept", stop=stop, **options).run()),
    ]
    await _until(lambda: len(lost.synced) >= 4, "the runs under way")
    await asyncio.to_thread(
        store.claim_run, "lost", "host:2:other", 60, owner_is_dead=lambda _owner: True
    )
    gone, going_on = await asyncio.gather(*(_ended(t, 10.0) for t in tasks))
    assert gone.taken_over
    assert not stop.is_set()
    assert going_on.status is RunStatus.SUCCEEDED
    assert len(kept.synced) == 40
