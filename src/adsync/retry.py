"""Which platform failures are worth retrying, and how long to wait before the next try.

:func:`full_jitter_backoff` is adsync's one backoff: the platform client's, the
store's and the worker's. The decisions are pure functions; :func:`retrying`
wires them into tenacity so that every wait goes through the injected clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import tenacity

from adsync.clock import Clock
from adsync.errors import RateLimited, TransientError


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    Returns ``None`` when the header is absent or unreadable: the caller then
    relies on what it knows itself, never on a blind constant.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # "inf" and "nan" parse as floats; neither is a time to wait.
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_wall)


def full_jitter_backoff(
    attempt: int, *, initial: float, maximum: float, rng: random.Random
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2**(n-1))].

    Full jitter spreads the retries of many callers that failed together, so they
    do not come back together.
    """
    # The exponent is capped: loops that count the attempts of an outage of hours
    # would overflow a float long after the ceiling stopped growing anyway.
    ceiling = min(maximum, initial * (2.0 ** min(max(0, attempt - 1), 64)))
    return rng.uniform(0.0, ceiling)


def is_retryable_platform_error(exc: BaseException) -> bool:
    """Whether a failed platform request is worth another try (5xx, timeout, 429, ...).

    The platform's kind of transient; the database's is
    :func:`adsync.store.faults.is_transient_db_error`.
    """
    return isinstance(exc, TransientError)


@dataclass(slots=True)
class RetryPolicy:
    """Bounds on retrying one logical request."""

    max_attempts: int = 8
    max_seconds: float = 600.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0


def next_wait(
    exc: BaseException | None, failures: int, policy: RetryPolicy, rng: random.Random
) -> float:
    """How long to wait after a failed attempt.

    A 429 waits nothing here: the rate budget holds the next send until the
    window allows it, for every caller at once. A Retry-After on a 5xx is
    honoured when it is longer than the backoff.
    """
    if isinstance(exc, RateLimited):
        return 0.0
    wait = full_jitter_backoff(
        max(1, failures), initial=policy.backoff_initial, maximum=policy.backoff_max, rng=rng
    )
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        wait = max(wait, min(exc.retry_after, policy.backoff_max))
    return wait


@dataclass(slots=True)
class RetryStats:
    """What the retries of one logical request cost."""

    retries: int = 0
    rate_limited: int = 0


def retrying(
    policy: RetryPolicy,
    clock: Clock,
    rng: random.Random,
    stats: RetryStats,
    on_retry: Callable[[BaseException, float], None] | None = None,
    *,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> tenacity.AsyncRetrying:
    """A tenacity controller for one logical request.

    429s do not use up attempts (the budget makes them rare and pauses for them);
    every other transient failure does. The time bound uses the injected clock;
    backoff waits go through ``sleep`` (the clock's by default).
    """
    started = clock.monotonic()
    failures = 0

    def _exc(state: tenacity.RetryCallState) -> BaseException | None:
        return state.outcome.exception() if state.outcome is not None else None

    def after(state: tenacity.RetryCallState) -> None:
        # Runs before `wait` and `stop`: count the attempt once, here.
        nonlocal failures
        if isinstance(_exc(state), RateLimited):
            stats.rate_limited += 1
        else:
            failures += 1

    def stop(state: tenacity.RetryCallState) -> bool:
        if clock.monotonic() - started >= policy.max_seconds:
            return True
        if isinstance(_exc(state), RateLimited):
            # Bounded all the same, so a platform that only ever says 429 ends.
            return stats.rate_limited >= policy.max_attempts * 4
        return failures >= policy.max_attempts

    def wait(state: tenacity.RetryCallState) -> float:
        return next_wait(_exc(state), failures, policy, rng)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        stats.retries += 1
        exc = _exc(state)
        if on_retry is not None and exc is not None:
            on_retry(exc, state.upcoming_sleep)

    return tenacity.AsyncRetrying(
        stop=stop,
        wait=wait,
        retry=tenacity.retry_if_exception(is_retryable_platform_error),
        after=after,
        sleep=sleep or clock.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def utcnow(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime."""
    return datetime.fromtimestamp(clock.wall(), tz=UTC)
