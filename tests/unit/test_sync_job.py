"""SyncJob end to end in memory: a real PlatformClient over httpx.MockTransport,
InMemoryStore, and a FakeClock shared by the client, its budget and the store.

No sockets, no sleeping, no database: each run takes milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from adsync.auth import TokenProvider
from adsync.client import PlatformClient
from adsync.clock import FakeClock
from adsync.errors import AuthError, StoreUnavailable
from adsync.models import RunStatus, RunWrite
from adsync.ratelimit import RateBudget
from adsync.retry import RetryPolicy
from adsync.store.memory import InMemoryStore
from adsync.sync import PipelineOptions, SyncJob, SyncOutcome

CLIENT = "acme"
EMAIL = "me@x.io"
PASSWORD = "pw"
CAMPAIGNS = 30
PAGE = 10
BASIC = "Basic " + base64.b64encode(f"{EMAIL}:{PASSWORD}".encode()).decode()

pytestmark = pytest.mark.timeout(10)


class Platform:
    """The platform's API (tokens, pages, sync calls) as a MockTransport handler.

    ``refuse``: campaigns whose sync call gets a 403. ``credentials_ok``: turned off,
    every token is refused (401) and no new one is issued. ``on_synced``: called
    with the number of successful sync answers after each one.
    """

    def __init__(self, clock: FakeClock, campaigns: int = CAMPAIGNS) -> None:
        self.clock = clock
        self.ids = [f"campaign_{i}" for i in range(1, campaigns + 1)]
        self.refuse: set[str] = set()
        self.credentials_ok = True
        self.tokens = 0
        self.valid: set[str] = set()
        self.sync_calls: Counter[str] = Counter()
        self.synced: list[str] = []
        self.pages: list[int] = []
        self.on_synced: list[Any] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            if not self.credentials_ok or request.headers.get("authorization") != BASIC:
                return httpx.Response(401, json={"error": "Unauthorized", "message": "bad"})
            self.tokens += 1
            token = f"tok-{self.tokens}"
            self.valid.add(token)
            body = {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
            return httpx.Response(200, json=body | {"issued_at": self.clock.wall()})
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not self.credentials_ok or token not in self.valid:
            return httpx.Response(401, json={"error": "Token expired", "message": "x"})
        if request.url.path == "/api/campaigns":
            return self._page(int(request.url.params["page"]), int(request.url.params["limit"]))
        campaign_id = request.url.path.split("/")[-2]
        self.sync_calls[campaign_id] += 1
        if campaign_id in self.refuse:
            return httpx.Response(403, json={"error": "Forbidden", "message": "not yours"})
        self.synced.append(campaign_id)
        for hook in self.on_synced:
            hook(len(self.synced))
        synced_at = datetime.fromtimestamp(self.clock.wall(), UTC).isoformat()
        return httpx.Response(
            200, json={"success": True, "campaign_id": campaign_id, "synced_at": synced_at}
        )

    def _page(self, number: int, limit: int) -> httpx.Response:
        self.pages.append(number)
        start = (number - 1) * limit
        data = [
            {
                "id": cid,
                "name": f"Campaign {cid}",
                "status": "active",
                "budget": 1000,
                "impressions": 10,
                "clicks": 1,
                "conversions": 0,
                "created_at": "2024-12-11T10:30:00.000Z",
            }
            for cid in self.ids[start : start + limit]
        ]
        more = start + limit < len(self.ids)
        pagination = {"page": number, "limit": limit, "total": len(self.ids), "has_more": more}
        return httpx.Response(200, json={"data": data, "pagination": pagination})


class FlakyStore(InMemoryStore):
    """An in-memory store whose writes fail (database unreachable) once ``down`` is set."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(now=lambda: datetime.fromtimestamp(clock.wall(), UTC))
        self.down = False
        self.writes = 0

    def write_runs(self, writes: Sequence[RunWrite]) -> None:
        if self.down:
            raise StoreUnavailable("the database is unreachable")
        self.writes += 1
        super().write_runs(writes)


def make_job(
    platform: Platform,
    store: InMemoryStore,
    clock: FakeClock,
    *,
    stop: asyncio.Event | None = None,
    concurrency: int = 4,
) -> SyncJob:
    http = httpx.AsyncClient(transport=httpx.MockTransport(platform), base_url="http://platform")
    rng = random.Random(0)
    auth = TokenProvider(
        http,
        email=EMAIL,
        password=SecretStr(PASSWORD),
        clock=clock,
        policy=RetryPolicy(max_attempts=2),
        rng=rng,
    )
    client = PlatformClient(
        http,
        auth=auth,
        budget=RateBudget(1000, 1.0, clock),
        clock=clock,
        client_id=CLIENT,
        policy=RetryPolicy(max_attempts=2, backoff_initial=0.01, backoff_max=0.1),
        rng=rng,
    )
    options = PipelineOptions(
        page_size=PAGE,
        concurrency=concurrency,
        lease_seconds=600.0,
        request_seconds=1.0,
        batch_size=5,
        batch_interval=0.001,
        resume_within=10**9,
    )
    return SyncJob(
        client,
        store,
        client_id=CLIENT,
        owner="host:1:test",
        clock=clock,
        options=options,
        stop=stop,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> FlakyStore:
    return FlakyStore(clock)


def stored_ids(store: InMemoryStore) -> set[str]:
    return {row["id"] for row in store.campaign_rows(CLIENT)}


def assert_consistent(store: InMemoryStore, outcome: SyncOutcome) -> None:
    """The run's record agrees with what is stored for it."""
    record = store.get_run(outcome.run_id)
    assert record is not None
    assert record.status is outcome.status
    assert record.synced == outcome.counters.synced
    assert record.synced == len(store.checkpoint(outcome.run_id).synced)
    assert record.failed == len(store.run_failures(outcome.run_id))


async def test_a_full_run_syncs_every_campaign_once_and_succeeds(
    clock: FakeClock, store: FlakyStore
) -> None:
    platform = Platform(clock)
    outcome = await make_job(platform, store, clock).run()

    assert outcome.status is RunStatus.SUCCEEDED
    assert outcome.error is None
    assert not outcome.resumed
    assert stored_ids(store) == set(platform.ids)
    assert set(platform.sync_calls.values()) == {1}
    assert sorted(platform.pages) == [1, 2, 3]
    assert outcome.counters.synced == CAMPAIGNS
    assert outcome.counters.failed == 0
    # Every request the platform answered is counted: 3 pages and the sync calls.
    assert outcome.counters.requests == 3 + CAMPAIGNS
    assert outcome.counters.pages == 3
    assert_consistent(store, outcome)
    record = store.get_run(outcome.run_id)
    assert record is not None
    assert record.finished_at is not None
    assert not record.resumable


async def test_a_resumed_run_does_not_sync_again_what_was_synced(
    clock: FakeClock, store: FlakyStore
) -> None:
    platform = Platform(clock)
    stop = asyncio.Event()
    platform.on_synced.append(lambda n: stop.set() if n == 12 else None)
    first = await make_job(platform, store, clock, stop=stop).run()

    assert first.status is RunStatus.INTERRUPTED
    done_first = stored_ids(store)
    # Calls in flight when told to stop complete and are written, none is lost.
    assert done_first == set(platform.synced)
    assert len(done_first) >= 12
    assert_consistent(store, first)

    second = await make_job(platform, store, clock).run()

    assert second.resumed
    assert second.run_id == first.run_id
    assert second.status is RunStatus.SUCCEEDED
    assert stored_ids(store) == set(platform.ids)
    # Nothing synced by the first process was called again.
    assert set(platform.sync_calls.values()) == {1}
    assert second.counters.synced == CAMPAIGNS
    assert_consistent(store, second)


async def test_a_refused_campaign_is_recorded_and_the_run_is_partial(
    clock: FakeClock, store: FlakyStore
) -> None:
    platform = Platform(clock)
    platform.refuse = {"campaign_7", "campaign_23"}
    outcome = await make_job(platform, store, clock).run()

    assert outcome.status is RunStatus.PARTIAL
    assert {f.campaign_id for f in outcome.failures} == {"campaign_7", "campaign_23"}
    assert {f.kind for f in outcome.failures} == {"sync"}
    assert all("403" in f.reason for f in outcome.failures)
    recorded = store.run_failures(outcome.run_id)
    assert {f.campaign_id for f in recorded} == {"campaign_7", "campaign_23"}
    assert stored_ids(store) == set(platform.ids) - platform.refuse
    assert outcome.counters.failed == 2
    assert outcome.counters.synced == CAMPAIGNS - 2
    # A permanent refusal is not retried.
    assert platform.sync_calls["campaign_7"] == 1
    assert_consistent(store, outcome)


# A fatal error after the k-th successful sync answer, k drawn once (seeded).
FATAL_POINTS = sorted(random.Random(7).sample(range(1, CAMPAIGNS), 4))


@pytest.mark.parametrize("k", FATAL_POINTS)
async def test_credentials_refused_mid_run_fail_it_and_lose_nothing(
    clock: FakeClock, store: FlakyStore, k: int
) -> None:
    platform = Platform(clock)

    def revoke(n: int) -> None:
        if n == k:
            platform.credentials_ok = False

    platform.on_synced.append(revoke)
    # One call at a time: every answer before the k-th is in the client's hands.
    outcome = await make_job(platform, store, clock, concurrency=1).run()

    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.fatal, AuthError)
    assert outcome.error is not None
    assert "refused the credentials" in outcome.error
    # Every campaign the platform said it synced is written.
    assert stored_ids(store) == set(platform.synced)
    assert len(platform.synced) == k
    assert_consistent(store, outcome)
    record = store.get_run(outcome.run_id)
    assert record is not None
    assert record.resumable

    platform.credentials_ok = True
    again = await make_job(platform, store, clock).run()

    assert again.resumed
    assert again.status is RunStatus.SUCCEEDED
    assert stored_ids(store) == set(platform.ids)
    assert set(platform.sync_calls.values()) == {1}


@pytest.mark.parametrize("k", FATAL_POINTS)
async def test_a_database_outage_mid_run_fails_it_and_the_next_run_finishes(
    clock: FakeClock, store: FlakyStore, k: int
) -> None:
    platform = Platform(clock)

    def outage(n: int) -> None:
        if n == k:
            store.down = True

    platform.on_synced.append(outage)
    outcome = await make_job(platform, store, clock).run()

    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.fatal, StoreUnavailable)
    written = stored_ids(store)
    assert written <= set(platform.synced)
    assert len(written) < k + 1

    store.down = False
    again = await make_job(platform, store, clock).run()

    assert again.status is RunStatus.SUCCEEDED
    assert stored_ids(store) == set(platform.ids)
    # Only what the outage kept from being written is synced a second time.
    assert {c for c, n in platform.sync_calls.items() if n > 1} <= set(platform.synced) - written
    assert_consistent(store, again)


@pytest.mark.parametrize("k", FATAL_POINTS)
async def test_a_cancelled_run_ends_interrupted_and_resumable(
    clock: FakeClock, store: FlakyStore, k: int
) -> None:
    platform = Platform(clock)
    reached = asyncio.Event()
    platform.on_synced.append(lambda n: reached.set() if n == k else None)
    task = asyncio.create_task(make_job(platform, store, clock).run())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    (record,) = store.recent_runs(CLIENT)
    assert record.status is RunStatus.INTERRUPTED
    assert record.resumable
    assert record.error == "stopped before finishing"
    written = stored_ids(store)
    assert written <= set(platform.synced)
    assert record.synced == len(written)

    again = await make_job(platform, store, clock).run()

    assert again.resumed
    assert again.run_id == record.id
    assert again.status is RunStatus.SUCCEEDED
    assert stored_ids(store) == set(platform.ids)
    assert {c for c, n in platform.sync_calls.items() if n > 1} <= set(platform.synced) - written
