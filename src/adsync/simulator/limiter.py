"""The platform's rate limit: a sliding window of counted requests per client id.

Stamps are whole milliseconds of a monotonic clock, as a server would keep them.
A request at ``now`` is allowed while fewer than ``limit`` stamps lie in
``(now - window, now]``; a stamp exactly one window old no longer counts.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


def monotonic_ms() -> int:
    """Milliseconds of the monotonic clock."""
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Admission:
    """The limiter's answer for one request."""

    allowed: bool
    # Counted requests in the window, this one included when allowed.
    in_window: int
    # When refused: milliseconds until the oldest stamp leaves the window.
    wait_ms: int = 0


class SlidingWindowLimiter:
    """At most ``limit`` counted requests per ``window_ms`` for each key."""

    def __init__(self, limit: int, window_ms: int) -> None:
        if limit < 1 or window_ms < 1:
            raise ValueError("limit and window_ms must be at least 1")
        self.limit = limit
        self.window_ms = window_ms
        self._stamps: dict[str, deque[int]] = {}

    def acquire(self, key: str, now_ms: int) -> Admission:
        """Count a request for ``key`` at ``now_ms`` if the window has room."""
        stamps = self._stamps.get(key)
        if stamps is None:
            stamps = self._stamps[key] = deque()
        horizon = now_ms - self.window_ms
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        if len(stamps) >= self.limit:
            return Admission(False, len(stamps), stamps[0] - horizon)
        stamps.append(now_ms)
        return Admission(True, len(stamps))

    def reset(self) -> None:
        """Forget every window."""
        self._stamps.clear()
