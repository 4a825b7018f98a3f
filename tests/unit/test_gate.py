"""The send gate: a request that waited asks again, right before it leaves, whether it may.

A fake clock whose sleeps last until the test moves time shows that a closed
gate ends a wait at once (time does not move) and that nothing is sent after it.
No sockets, no sleeping.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable

import httpx
import pytest
from pydantic import SecretStr

from adsync.auth import TokenProvider
from adsync.client import PlatformClient
from adsync.clock import FakeClock
from adsync.errors import Stopped
from adsync.gate import LEASE_NOT_RENEWED, LEASE_TAKEN, SIGNALLED, SendGate, may_send
from adsync.ratelimit import RateBudget
from adsync.retry import RetryPolicy


class ManualClock(FakeClock):
    """A FakeClock whose sleeps last until the test moves time past their end."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def sleeping(self) -> int:
        """How many sleeps are under way."""
        return len(self._sleepers)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.monotonic() + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for end, woken in self._sleepers:
            if end <= self.monotonic() and not woken.done():
                woken.set_result(None)


async def turns(n: int = 50) -> None:
    """Let the event loop run ``n`` rounds (no time passes on any clock)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


class Platform:
    """Tokens, then ``api`` for every /api call; records what reached it."""

    def __init__(self, api: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> None:
        self.api = api
        self.token_answers: list[int] = []  # statuses to answer before a token, in order
        self.token_requests = 0
        self.api_calls: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            self.token_requests += 1
            if self.token_answers:
                return httpx.Response(self.token_answers.pop(0), json={"error": "down"})
            body = {"access_token": "tok", "expires_in": 3600, "issued_at": None}
            return httpx.Response(200, json=body)
        self.api_calls.append(request.url.path)
        return await self.api(request)


async def synced(request: httpx.Request) -> httpx.Response:
    campaign_id = request.url.path.split("/")[-2]
    return httpx.Response(200, json={"success": True, "campaign_id": campaign_id})


def make_client(
    platform: Platform, clock: FakeClock, gate: SendGate, *, limit: int = 1000
) -> PlatformClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(platform), base_url="http://platform")
    auth = TokenProvider(
        http,
        email="me@x.io",
        password=SecretStr("pw"),
        clock=clock,
        policy=RetryPolicy(max_attempts=3, backoff_initial=10, backoff_max=10),
        rng=random.Random(0),
    )
    client = PlatformClient(
        http,
        auth=auth,
        budget=RateBudget(limit, 60.0, clock),
        clock=clock,
        client_id="c",
        policy=RetryPolicy(max_attempts=4, backoff_initial=30, backoff_max=30),
        rng=random.Random(1),
    )
    client.gate = gate
    return client


def test_a_request_may_leave_only_before_the_lease_runs_short() -> None:
    assert may_send(10.0, 10.5)
    assert not may_send(10.5, 10.5)
    assert not may_send(11.0, 10.5)


def test_the_gate_closes_for_good_with_its_first_reason() -> None:
    clock = FakeClock()
    gate = SendGate(clock)
    assert not gate.closed
    gate.send_until(clock.monotonic() + 5)
    clock.advance(4.9)
    assert not gate.closed
    clock.advance(0.1)
    assert gate.closed
    assert gate.reason == LEASE_NOT_RENEWED
    gate.send_until(clock.monotonic() + 100)  # a renewal after the fact opens nothing
    gate.close(SIGNALLED)
    assert gate.closed
    assert gate.reason == LEASE_NOT_RENEWED
    with pytest.raises(Stopped, match="could not renew"):
        gate.check()


async def close_and_see_it_abandoned(
    waiting: asyncio.Task[object], clock: ManualClock, gate: SendGate, reason: str, what: str
) -> None:
    """Close ``gate``: ``waiting`` ends in Stopped at once; then let the window pass."""
    started = clock.monotonic()
    gate.close(reason)
    await turns()
    assert waiting.done(), f"{what} outlived the stop"
    with pytest.raises(Stopped, match=re.escape(reason)):
        await waiting
    assert clock.monotonic() == started
    clock.advance(120)
    await turns()


@pytest.mark.parametrize("reason", [SIGNALLED, LEASE_TAKEN])
async def test_a_request_waiting_for_a_slot_is_abandoned_at_once(reason: str) -> None:
    clock = ManualClock()
    gate = SendGate(clock)
    platform = Platform(synced)
    client = make_client(platform, clock, gate, limit=1)
    await client.sync_campaign("c1")  # the window's one slot
    waiting = asyncio.create_task(client.sync_campaign("c2"))
    await until(lambda: clock.sleeping == 1, "the second request waits for the window")

    await close_and_see_it_abandoned(waiting, clock, gate, reason, "the wait for a slot")
    assert platform.api_calls == ["/api/campaigns/c1/sync"]
    # The slot it never used is free: the budget counts only what was sent.
    assert client.budget.in_window(clock.monotonic() - 60) == 1
    assert client.stats.requests == 1


async def test_a_request_waiting_on_a_retry_backoff_is_abandoned_at_once() -> None:
    clock = ManualClock()
    gate = SendGate(clock)
    answers = [503]

    async def flaky(request: httpx.Request) -> httpx.Response:
        if answers:
            return httpx.Response(answers.pop(0), json={"error": "down"})
        return await synced(request)

    platform = Platform(flaky)
    client = make_client(platform, clock, gate)
    waiting = asyncio.create_task(client.sync_campaign("c1"))
    await until(lambda: clock.sleeping == 1, "the backoff after a 503")

    await close_and_see_it_abandoned(waiting, clock, gate, SIGNALLED, "the backoff")
    assert platform.api_calls == ["/api/campaigns/c1/sync"]


async def test_a_request_waiting_on_a_token_refresh_is_abandoned_at_once() -> None:
    clock = ManualClock()
    gate = SendGate(clock)
    platform = Platform(synced)
    platform.token_answers = [503]
    client = make_client(platform, clock, gate)
    waiting = asyncio.create_task(client.sync_campaign("c1"))
    await until(lambda: clock.sleeping == 1, "the token endpoint's backoff")

    await close_and_see_it_abandoned(waiting, clock, gate, SIGNALLED, "the token refresh")
    assert platform.token_requests == 1
    assert platform.api_calls == []


async def test_a_lease_that_ran_short_during_the_wait_sends_nothing() -> None:
    # A process paused past its lease wakes with its waits all over at once: no
    # heartbeat has run to tell it, and the gate refuses by the clock alone.
    clock = ManualClock()
    gate = SendGate(clock)
    platform = Platform(synced)
    client = make_client(platform, clock, gate, limit=1)
    gate.send_until(clock.monotonic() + 30)
    await client.sync_campaign("c1")
    waiting = asyncio.create_task(client.sync_campaign("c2"))
    await until(lambda: clock.sleeping == 1, "the second request waits for the window")

    clock.advance(61)
    await turns()
    with pytest.raises(Stopped, match="could not renew"):
        await waiting
    assert platform.api_calls == ["/api/campaigns/c1/sync"]
    assert client.budget.in_window(clock.monotonic()) == 0
    assert client.stats.requests == 1


async def test_a_request_already_sent_is_answered_after_the_gate_closes() -> None:
    clock = ManualClock()
    gate = SendGate(clock)
    answer = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await answer.wait()
        return await synced(request)

    platform = Platform(slow)
    client = make_client(platform, clock, gate)
    in_flight = asyncio.create_task(client.sync_campaign("c1"))
    await until(lambda: platform.api_calls == ["/api/campaigns/c1/sync"], "the call is sent")

    gate.close(SIGNALLED)
    await turns()
    assert not in_flight.done()
    answer.set()
    receipt = await in_flight
    assert receipt.campaign_id == "c1"
