"""The rate budget shared across processes, on the in-memory send log and a fake clock.

Each RateBudget stands for one process; they share a FakeClock (one machine's time)
and an InMemorySendLog (the database, whose clock is the FakeClock's wall time). The
platform is modelled as in test_ratelimit.py: at most ``limit`` counted requests in
any window, stamped in ms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
from platform_window import PlatformWindow, nothing

from adsync.clock import FakeClock
from adsync.errors import StoreError
from adsync.ratelimit import RateBudget, Send, SendLogBatcher
from adsync.sendlog import (
    InMemorySendLog,
    Reservation,
    SendChange,
    SendRequest,
    decide_reservation,
)

CLIENT = "acme"


def budget(
    log: InMemorySendLog | SendLogBatcher | None,
    owner: str,
    clock: FakeClock,
    limit: int = 10,
    **kw: float,
) -> RateBudget:
    """A budget as one process has it: through its own batcher, unless given one."""
    if isinstance(log, InMemorySendLog):
        log = SendLogBatcher(log)
    return RateBudget(limit, 60.0, clock, shared=log, client_id=CLIENT, owner=owner, **kw)


async def drive(budget: RateBudget, platform: PlatformWindow, sends: int) -> list[Send]:
    """Send until ``sends`` were accepted; the platform sees each at its send stamp."""
    accepted: list[Send] = []
    while len(accepted) < sends:
        send, _ = await budget.acquire(nothing)
        if platform.arrive(send.stamp):
            accepted.append(send)
        else:
            budget.refused(send)
    return accepted


# --- the decision -----------------------------------------------------------------------


def test_a_reservation_counts_every_owners_sends() -> None:
    sends = [(100.0, "a"), (101.0, "b"), (102.0, "a")]
    ok = decide_reservation(sends, "b", 103.0, span=10.0, limit=4, spacing=0.5)
    assert ok == Reservation(ok=True, at=103.0, retry_at=103.0, foreign=(100.0, 102.0))
    full = decide_reservation(sends, "b", 103.0, span=10.0, limit=3, spacing=0.5)
    # Free again when the oldest of all (a's, at 100) leaves the window.
    assert (full.ok, full.retry_at) == (False, 110.0)
    close = decide_reservation(sends, "b", 102.2, span=10.0, limit=4, spacing=0.5)
    assert (close.ok, close.retry_at) == (False, 102.5)


def test_a_send_stamped_ahead_of_our_clock_counts_too() -> None:
    # Another host's clock runs 0.3 s ahead: its send is "in the future" for us.
    result = decide_reservation([(100.3, "a")], "b", 100.0, span=10.0, limit=5, spacing=0.1)
    assert not result.ok
    assert result.retry_at == pytest.approx(100.4)
    assert result.foreign == (100.3,)


# --- budgets sharing one log ------------------------------------------------------------


async def test_two_budgets_on_one_log_stay_within_the_limit_together() -> None:
    clock = FakeClock()
    log = InMemorySendLog(clock.wall)
    platform = PlatformWindow(10, 60.0)
    a, b = budget(log, "a", clock), budget(log, "b", clock)
    sent = await asyncio.gather(drive(a, platform, 25), drive(b, platform, 25))
    assert platform.refused == 0
    assert platform.max_in_window() == 10
    assert len(log.sends(CLIENT)) >= 10
    # Both got their share of the windows, neither starved.
    assert [len(s) for s in sent] == [25, 25]


async def test_without_the_shared_log_the_same_two_budgets_collide() -> None:
    # The control for the test above: each budget alone fills every window.
    clock = FakeClock()
    platform = PlatformWindow(10, 60.0)
    a, b = budget(None, "a", clock), budget(None, "b", clock)
    await asyncio.gather(drive(a, platform, 25), drive(b, platform, 25))
    assert platform.refused > 0


async def test_a_budget_started_after_another_sees_its_sends_and_is_not_refused() -> None:
    clock = FakeClock(start=0.0)
    log = InMemorySendLog(clock.wall)
    platform = PlatformWindow(10, 60.0)
    first = await drive(budget(log, "a", clock), platform, 10)
    # A restarted (or second) process: a new budget with nothing in its own memory.
    late = budget(log, "b", clock)
    sent = await drive(late, platform, 5)
    assert platform.refused == 0
    assert late.refusals == 0
    assert late.limit == 10
    # It waited for the first process's oldest send to leave the kept window.
    assert sent[0].stamp >= first[0].stamp + late.span - 1e-6
    # Its last send filled the window with the first process's newest five (a
    # millisecond later, so that float rounding at the window's edge does not count).
    last = sent[-1].stamp + 0.001
    assert (late.in_window(last), late.foreign_in_window(last)) == (5, 5)


async def test_forget_removes_the_send_from_the_shared_log() -> None:
    clock = FakeClock()
    log = InMemorySendLog(clock.wall)
    b = budget(log, "b", clock)
    kept, _ = await b.acquire(nothing)
    dropped, _ = await b.acquire(nothing)
    assert [owner for _, owner in log.sends(CLIENT)] == ["b", "b"]
    b.forget(dropped)
    await b.flush()
    assert log.sends(CLIENT) == [(kept.logged_at, "b")]
    assert b.in_window(clock.monotonic()) == 1


async def test_a_refused_send_leaves_the_shared_log() -> None:
    clock = FakeClock()
    log = InMemorySendLog(clock.wall)
    b = budget(log, "b", clock)
    send, _ = await b.acquire(nothing)
    b.refused(send)
    await b.flush()
    assert log.sends(CLIENT) == []


async def test_a_send_that_left_late_is_moved_in_the_shared_log() -> None:
    clock = FakeClock()
    log = InMemorySendLog(clock.wall)
    b = budget(log, "b", clock)  # margin 0.6 s: moves of more than 0.15 s are written
    send, _ = await b.acquire(nothing)
    logged = send.logged_at
    assert logged is not None
    b.restamp(send, send.stamp + 0.01)  # the usual few milliseconds: our own log only
    await b.flush()
    assert log.sends(CLIENT) == [(logged, "b")]
    b.restamp(send, send.stamp + 0.5)  # a slow new connection: others must know
    await b.flush()
    assert send.logged_at == pytest.approx(logged + 0.5)
    assert log.sends(CLIENT) == [(send.logged_at, "b")]
    # Moved and then refused: the changes reach the log in order, so it is gone.
    again, _ = await b.acquire(nothing)
    b.restamp(again, again.stamp + 1.0)
    b.refused(again)
    await b.flush()
    assert log.sends(CLIENT) == [(send.logged_at, "b")]


async def test_a_full_window_of_everyone_is_not_learned_as_a_lower_limit() -> None:
    clock = FakeClock(start=0.0)
    log = InMemorySendLog(clock.wall)
    platform = PlatformWindow(10, 60.0)
    a = budget(log, "a", clock, margin_fraction=0.0)
    b = budget(log, "b", clock, margin_fraction=0.0)
    first = await drive(a, platform, 7)
    await drive(b, platform, 3)
    # The platform stamped a's first send 20 ms late (network jitter) ...
    platform.counted[0] = round(first[0].stamp + 0.02, 3)
    # ... so b's send, right when that send leaves b's kept window, is refused.
    send, _ = await b.acquire(nothing)
    assert send.stamp == pytest.approx(first[0].stamp + b.span)
    assert not platform.arrive(send.stamp)
    span_before = b.span
    # Counting only its own 3 sends, b would learn a limit of 3.
    assert b.refused(send) is None
    assert b.limit == 10
    assert b.changes == []
    assert b.span > span_before
    # The next send waits until the window has room, and the platform takes it.
    again, _ = await b.acquire(nothing)
    assert platform.arrive(again.stamp)


async def test_a_lower_limit_is_learned_from_everyones_sends_together() -> None:
    clock = FakeClock(start=0.0)
    log = InMemorySendLog(clock.wall)
    platform = PlatformWindow(10, 60.0)  # the platform's real limit
    a, b = budget(log, "a", clock, limit=20), budget(log, "b", clock, limit=20)
    await drive(a, platform, 6)
    await drive(b, platform, 4)
    send, _ = await b.acquire(nothing)
    assert not platform.arrive(send.stamp)
    change = b.refused(send)
    # 4 of b's and 6 of a's filled the platform's window: the limit is 10, not 4.
    assert change is not None
    assert change.new == 10
    assert b.limit == 10


class DownLog(InMemorySendLog):
    """A shared log whose database is unreachable for the first ``failures`` calls."""

    def __init__(self, now: Callable[[], float], failures: int) -> None:
        super().__init__(now)
        self.failures = failures
        self.calls = 0

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreError("database unavailable after 5 attempts")
        return super().reserve_many(requests, changes)


async def test_an_unreachable_log_falls_back_to_own_pacing_and_is_tried_again_later() -> None:
    clock = FakeClock(start=0.0)
    log = DownLog(clock.wall, failures=1)
    platform = PlatformWindow(10, 60.0)
    b = budget(log, "b", clock)
    await drive(b, platform, 12)
    assert platform.refused == 0
    assert b.shared_failures == 1
    # The first window's sends went on unlogged, without asking the log again;
    # once a window has passed, the next two were logged.
    assert log.calls == 3
    assert [owner for _, owner in log.sends(CLIENT)] == ["b", "b"]


async def test_reservations_of_many_budgets_share_transactions() -> None:
    clock = FakeClock(start=0.0)
    log = InMemorySendLog(clock.wall)
    batcher = SendLogBatcher(log)  # one per process, for all its accounts
    budgets = [
        RateBudget(10, 60.0, clock, shared=batcher, client_id=f"acct-{i}", owner="p")
        for i in range(20)
    ]
    sends = await asyncio.gather(*(b.acquire(nothing) for b in budgets))
    # Every account got its send, each logged under its own client id ...
    assert all(s.logged_at is not None for s, _ in sends)
    assert all(len(log.sends(f"acct-{i}")) == 1 for i in range(20))
    # ... in far fewer transactions than sends (the first goes alone).
    assert log.reservations == 20
    assert log.batches == batcher.batches <= 3


async def test_two_budgets_of_one_client_in_one_batch_do_not_both_take_the_last_slot() -> None:
    clock = FakeClock(start=0.0)
    log = InMemorySendLog(clock.wall)
    batcher = SendLogBatcher(log)
    a = budget(batcher, "a", clock, limit=1)
    b = budget(batcher, "b", clock, limit=1)
    (first, _), (second, _) = await asyncio.gather(a.acquire(nothing), b.acquire(nothing))
    # One went at once; the other waited for the whole window.
    assert abs(second.stamp - first.stamp) == pytest.approx(a.span, abs=1e-6)


async def test_a_failed_batch_reaches_every_budget_in_it_and_each_goes_on_alone() -> None:
    clock = FakeClock(start=0.0)
    batcher = SendLogBatcher(DownLog(clock.wall, failures=1))
    budgets = [
        RateBudget(10, 60.0, clock, shared=batcher, client_id=f"acct-{i}", owner="p")
        for i in range(3)
    ]
    sends = await asyncio.gather(*(b.acquire(nothing) for b in budgets))
    # One transaction failed for all three; each sent anyway, paced by its own log.
    assert batcher.batches == 1
    assert [b.shared_failures for b in budgets] == [1, 1, 1]
    assert all(s.logged_at is None for s, _ in sends)
    await batcher.aclose()


class SkewedClock:
    """Another process on the machine: the same monotonic time, a wall clock ``skew`` off."""

    def __init__(self, clock: FakeClock, skew: float) -> None:
        self._clock = clock
        self._skew = skew

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def wall(self) -> float:
        return self._clock.wall() + self._skew

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)


@pytest.mark.parametrize("skew", [120.0, -30.0])
async def test_a_process_whose_wall_clock_is_off_shares_the_window_like_any_other(
    skew: float,
) -> None:
    clock = FakeClock(start=0.0)
    log = InMemorySendLog(clock.wall)  # the database's clock
    platform = PlatformWindow(10, 60.0)
    a = budget(log, "a", clock)
    b = budget(log, "b", SkewedClock(clock, skew))  # type: ignore[arg-type]
    sent = await asyncio.gather(drive(a, platform, 25), drive(b, platform, 25))
    assert platform.refused == 0
    assert [len(s) for s in sent] == [25, 25]
    # Every send is logged at the log's time of it, whoever sent it: none of b's
    # looks like a send in the future (or the past) to a.
    database_offset = clock.wall() - clock.monotonic()
    offsets = {round(s.logged_at - s.stamp, 6) for s in [*sent[0], *sent[1]] if s.logged_at}
    assert offsets == {round(database_offset, 6)}


class SlowAnswers(InMemorySendLog):
    """A log whose answers come back ``lag`` seconds after it read its clock."""

    def __init__(self, clock: FakeClock, lag: list[float]) -> None:
        super().__init__(clock.wall)
        self._clock = clock
        self._lags = lag

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        answers = super().reserve_many(requests, changes)
        self._clock.advance(self._lags.pop(0) if self._lags else 0.0)
        return answers


async def test_the_logs_clock_is_mapped_by_the_quickest_recent_answer() -> None:
    clock = FakeClock(start=0.0)
    # The database's clock is 1.7e9 s ahead of our monotonic one; answers take
    # 0 s, then 80 ms and 30 ms (a loaded machine).
    log = SlowAnswers(clock, [0.0, 0.08, 0.03])
    b = budget(log, "b", clock, limit=100)
    database_offset = clock.wall() - clock.monotonic()
    sends = [(await b.acquire(nothing))[0] for _ in range(3)]
    # Each send is on our clock when the log took it, not when its slow answer came.
    for send in sends:
        assert send.logged_at is not None
        assert send.logged_at - send.stamp == pytest.approx(database_offset, abs=1e-6)
