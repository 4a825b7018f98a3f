"""The rate budget against a model of the platform's sliding window, on a fake clock."""

from __future__ import annotations

import pytest
from platform_window import PlatformWindow, nothing

from adsync.clock import FakeClock
from adsync.ratelimit import MAX_MARGIN_FRACTION, Margin, RateBudget


async def drive(budget: RateBudget, platform: PlatformWindow, clock: FakeClock, sends: int) -> None:
    """Send until ``sends`` requests were accepted, reporting refusals to the budget."""
    accepted = 0
    while accepted < sends:
        send, _ = await budget.acquire(nothing)
        if platform.arrive(clock.monotonic()):
            accepted += 1
        else:
            budget.refused(send)


async def test_never_more_than_limit_in_any_window() -> None:
    clock = FakeClock()
    budget = RateBudget(10, 60.0, clock)
    platform = PlatformWindow(10, 60.0)
    start = clock.monotonic()
    await drive(budget, platform, clock, 41)
    assert platform.refused == 0
    assert platform.max_in_window() == 10
    # A window's sends go out together (a round trip apart): the 41st send
    # leaves four kept windows (60 s plus the 1% margin) after the first.
    assert clock.monotonic() - start == pytest.approx(4 * 60.6)


async def test_small_windows_and_fractional_seconds() -> None:
    clock = FakeClock()
    budget = RateBudget(10, 0.5, clock)
    platform = PlatformWindow(10, 0.5)
    await drive(budget, platform, clock, 200)
    assert platform.refused == 0
    assert platform.max_in_window() == 10


async def test_next_free_at_follows_the_oldest_send_in_the_window() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(3, 10.0, clock, margin_fraction=0.0)
    for _ in range(3):
        await budget.acquire(nothing)
    assert budget.in_window(clock.monotonic()) == 3
    # The fourth send waits until the first one (at 0) leaves the kept window.
    assert budget.next_free_at(clock.monotonic()) == pytest.approx(budget.span)


async def test_consecutive_sends_are_two_round_trips_apart() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(10, 60.0, clock)
    budget.observe_rtt(0.01)
    budget.observe_rtt(0.01)
    first, _ = await budget.acquire(nothing)
    second, _ = await budget.acquire(nothing)
    assert second.stamp - first.stamp == pytest.approx(budget.spacing)
    assert budget.spacing < 0.1
    # Never wider than an even spread of the window.
    slow = RateBudget(10, 1.0, clock)
    slow.observe_rtt(5.0)
    assert slow.spacing == pytest.approx(slow.span / 10)


async def test_a_retry_after_of_a_day_pauses_for_at_most_ten_minutes() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(10, 60.0, clock)
    send, _ = await budget.acquire(nothing)
    budget.refused(send, retry_after=86_400.0)
    assert budget.paused_until == pytest.approx(600.0)
    short = RateBudget(10, 0.5, clock)
    send, _ = await short.acquire(nothing)
    short.refused(send, retry_after=1e9)
    assert short.paused_until == pytest.approx(600.0)


async def test_retry_after_header_pauses_every_caller() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(10, 60.0, clock)
    send, _ = await budget.acquire(nothing)
    # One of our sends in the window and the configured limit is 10: it is not
    # our own doing, so nothing is learned, but the header is obeyed.
    budget.refused(send, retry_after=42.0)
    assert budget.paused_until >= 42.0
    nxt, _ = await budget.acquire(nothing)
    assert nxt.stamp == pytest.approx(max(42.0, budget.paused_until))


async def test_refusal_with_nothing_of_ours_in_the_window_pauses_one_window_and_learns_nothing() -> (
    None
):
    clock = FakeClock(start=100.0)
    budget = RateBudget(10, 60.0, clock)
    send, _ = await budget.acquire(nothing)
    assert budget.refused(send) is None
    assert budget.limit == 10
    assert budget.paused_until == pytest.approx(100.0 + budget.span)


async def test_learns_a_lower_limit_within_a_few_refusals() -> None:
    clock = FakeClock()
    budget = RateBudget(30, 60.0, clock)  # configured three times too high
    platform = PlatformWindow(10, 60.0)
    await drive(budget, platform, clock, 60)
    assert platform.refused <= 3
    assert budget.limit == 10
    assert budget.changes[-1].confirmed
    assert platform.max_in_window() == 10


async def test_a_refused_send_is_forgotten() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(5, 10.0, clock)
    send, _ = await budget.acquire(nothing)
    assert budget.in_window(clock.monotonic()) == 1
    budget.forget(send)
    assert budget.in_window(clock.monotonic()) == 0


async def test_window_held_by_a_previous_process_is_survived_not_learned() -> None:
    clock = FakeClock(start=1_000.0)
    platform = PlatformWindow(10, 60.0)
    # A previous process sent 6 requests in the last 30 seconds.
    for i in range(6):
        platform.counted.append(round(970.0 + i, 3))
    budget = RateBudget(10, 60.0, clock)
    await drive(budget, platform, clock, 40)
    assert platform.refused <= 2
    # The tentative limit learned from a partial window was probed away again.
    assert budget.limit == 10
    assert platform.max_in_window() == 10


async def test_refusal_at_our_own_limit_is_jitter_not_a_lower_limit() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(2, 10.0, clock, margin_fraction=0.0)
    a, _ = await budget.acquire(nothing)
    clock.advance(20)
    a, _ = await budget.acquire(nothing)
    b, _ = await budget.acquire(nothing)
    c, _ = await budget.acquire(nothing)
    # c left just after a left our window; the platform stamped a late, so it
    # still counted a and refused c. That is jitter: keep the limit, widen the margin.
    assert c.stamp - a.stamp == pytest.approx(budget.span)
    before = budget.span
    assert budget.refused(c) is None
    assert budget.limit == 2
    assert budget.span > before
    del b


async def test_seconds_for_estimates_from_the_enforced_limit() -> None:
    clock = FakeClock(start=0.0)
    budget = RateBudget(10, 60.0, clock, margin_fraction=0.0)
    assert budget.seconds_for(0) == 0
    assert budget.seconds_for(11) == pytest.approx(10 * 6.0005, rel=1e-3)


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="limit"):
        RateBudget(0, 60.0, FakeClock())


async def test_budgets_of_a_process_share_what_they_learn_about_jitter() -> None:
    clock = FakeClock(start=0.0)
    margin = Margin(0.0)
    a = RateBudget(2, 10.0, clock, margin=margin)
    b = RateBudget(2, 10.0, clock, margin=margin)
    before = b.span
    x, _ = await a.acquire(nothing)
    await a.acquire(nothing)
    clock.advance(20)
    x, _ = await a.acquire(nothing)
    await a.acquire(nothing)
    late, _ = await a.acquire(nothing)
    assert late.stamp - x.stamp == pytest.approx(a.span)
    a.refused(late)  # jitter at our own limit
    assert b.span > before
    assert a.span == b.span


def test_widening_the_margin_is_bounded_but_never_narrows_a_configured_one() -> None:
    small = Margin(0.01)
    for _ in range(50):
        small.widen()
    assert small.fraction == MAX_MARGIN_FRACTION
    wide = Margin(0.2)
    wide.widen()
    assert wide.fraction == 0.2
