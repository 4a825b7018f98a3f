"""A model of the platform's sliding window, for the rate-budget tests."""

from __future__ import annotations


class PlatformWindow:
    """At most ``limit`` counted requests in any window ``(t - window, t]`` (ms stamps)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.counted: list[float] = []
        self.refused = 0

    def arrive(self, t: float) -> bool:
        """Count a request arriving at ``t``, or refuse it (429: not counted)."""
        t = round(t, 3)
        if sum(1 for s in self.counted if t - self.window < s <= t) >= self.limit:
            self.refused += 1
            return False
        self.counted.append(t)
        return True

    def max_in_window(self) -> int:
        """The most counted requests seen in any window."""
        return max(
            (sum(1 for s in self.counted if t - self.window < s <= t) for t in self.counted),
            default=0,
        )


async def nothing() -> None:
    """A ``prepare`` step that does nothing."""
