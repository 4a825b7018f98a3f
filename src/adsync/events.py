"""What the pipeline tells its observers: plain values and the observer's protocol.

The client and the pipeline report here; metrics (or anything else) listen. Both
sides import this module and nothing of each other, so the pipeline does not load
Prometheus and metrics do not load the HTTP client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One attempt, as reported to observers (metrics): no secrets, bounded labels."""

    endpoint: str  # "list" | "sync"
    outcome: str  # HTTP status code, or "timeout" / "connection" / "invalid_json"
    seconds: float


@dataclass(frozen=True, slots=True)
class ClientCounters:
    """What one platform client sent, heard and waited so far (totals, never reset)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    timeouts: int = 0
    # Bearer tokens obtained.
    refreshes: int = 0
    # Time requests waited on the client-side rate budget.
    waited_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class RunTotals:
    """A run's growing totals in this process, as observers see them."""

    retries: int = 0
    refreshes: int = 0
    waited_seconds: float = 0.0
    synced: int = 0
    failed: int = 0


class RunObserver(Protocol):
    """Follows one run of one account: its start, its growing totals, its end."""

    def run_started(self) -> None:
        """The run was claimed and its pipeline starts."""

    def run_progressed(self, totals: RunTotals) -> None:
        """The run's totals so far (they only grow)."""

    def run_finished(self, status: str, seconds: float, finished_at: float) -> None:
        """The run ended with ``status`` after ``seconds``; ``finished_at``: wall time."""
