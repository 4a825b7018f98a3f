"""Backoff, Retry-After parsing and the retry controller, without sleeping."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adsync.clock import FakeClock
from adsync.errors import PermanentError, RateLimited, TransientError
from adsync.retry import (
    RetryPolicy,
    RetryStats,
    full_jitter_backoff,
    is_retryable_platform_error,
    next_wait,
    parse_retry_after,
    retrying,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),
        ("-3", None),
        ("inf", None),
        ("nan", None),
        ("1e400", None),
        ("soon", None),
        (format_datetime(datetime.fromtimestamp(NOW + 30, tz=UTC), usegmt=True), 30.0),
        (format_datetime(datetime.fromtimestamp(NOW - 30, tz=UTC), usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, NOW) == expected


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (TransientError("HTTP 503"), True),
        (RateLimited("HTTP 429"), True),
        (PermanentError("HTTP 403"), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_platform_errors_are_retried(error: Exception, retryable: bool) -> None:
    assert is_retryable_platform_error(error) is retryable


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises(header: str) -> None:
    result = parse_retry_after(header, NOW)
    assert result is None or result >= 0


@given(st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_full_jitter_stays_within_the_exponential_ceiling(attempt: int, seed: int) -> None:
    wait = full_jitter_backoff(attempt, initial=0.5, maximum=20.0, rng=random.Random(seed))
    assert 0.0 <= wait <= min(20.0, 0.5 * 2 ** (attempt - 1))


@pytest.mark.parametrize("attempt", [1_025, 5_000, 10**9])
def test_full_jitter_of_an_outage_of_hours_stays_under_the_cap(attempt: int) -> None:
    # Reconnect loops count attempts for as long as an outage lasts: the thousandth
    # attempt must wait the cap, not overflow a float.
    wait = full_jitter_backoff(attempt, initial=0.5, maximum=30.0, rng=random.Random(1))
    assert 0.0 <= wait <= 30.0


def test_full_jitter_spreads_waits() -> None:
    rng = random.Random(1)
    waits = {round(full_jitter_backoff(4, initial=1, maximum=30, rng=rng), 3) for _ in range(50)}
    assert len(waits) > 40
    assert max(waits) <= 8


def test_rate_limited_waits_nothing_here_because_the_budget_waits() -> None:
    policy = RetryPolicy()
    assert next_wait(RateLimited("429"), 3, policy, random.Random(0)) == 0.0


def test_retry_after_on_a_5xx_is_honoured_up_to_backoff_max() -> None:
    policy = RetryPolicy(backoff_initial=0.001, backoff_max=10)
    assert next_wait(TransientError("503", retry_after=4), 1, policy, random.Random(0)) >= 4
    assert next_wait(TransientError("503", retry_after=400), 1, policy, random.Random(0)) <= 10


async def test_retries_transient_errors_then_gives_up() -> None:
    clock = FakeClock()
    stats = RetryStats()
    calls = 0
    with pytest.raises(TransientError, match="boom"):
        async for attempt in retrying(RetryPolicy(max_attempts=4), clock, random.Random(0), stats):
            with attempt:
                calls += 1
                raise TransientError("boom")
    assert calls == 4
    assert stats.retries == 3
    assert len(clock.sleeps) == 3
    # Full jitter under an exponential ceiling: 1, 2, 4.
    for i, slept in enumerate(clock.sleeps):
        assert 0 <= slept <= 2**i


async def test_never_retries_permanent_errors() -> None:
    calls = 0
    with pytest.raises(PermanentError):
        async for attempt in retrying(RetryPolicy(), FakeClock(), random.Random(0), RetryStats()):
            with attempt:
                calls += 1
                raise PermanentError("404")
    assert calls == 1


async def test_rate_limits_do_not_use_up_attempts() -> None:
    outcomes = [RateLimited("429")] * 5 + [TransientError("503")] * 2
    stats = RetryStats()
    calls = 0
    async for attempt in retrying(
        RetryPolicy(max_attempts=3), FakeClock(), random.Random(0), stats
    ):
        with attempt:
            calls += 1
            if outcomes:
                raise outcomes.pop(0)
    assert calls == 8
    assert stats.rate_limited == 5


async def test_time_bound_uses_the_injected_clock() -> None:
    clock = FakeClock()
    calls = 0
    with pytest.raises(TransientError):
        async for attempt in retrying(
            RetryPolicy(max_attempts=100, max_seconds=10, backoff_initial=4, backoff_max=4),
            clock,
            random.Random(3),
            RetryStats(),
        ):
            with attempt:
                calls += 1
                clock.advance(3)
                raise TransientError("slow")
    assert calls <= 4
