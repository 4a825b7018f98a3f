"""A run's progress as displays and logs see it, and what is left of it for an ETA."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunProgress", "requests_left"]


@dataclass(frozen=True, slots=True)
class RunProgress:
    """A snapshot of a run for progress displays and logs."""

    client_id: str
    run_id: str
    total: int | None
    synced: int
    failed: int
    requests: int
    rate_limited: int
    eta_seconds: float | None
    done: bool = False


def requests_left(
    total: int | None,
    *,
    synced: int,
    failed: int,
    page_size: int,
    pages_fetched: int,
    listing_done: bool,
) -> int | None:
    """The requests a run still needs: a sync call per campaign not yet done, and the
    pages not yet listed. ``None`` while the platform has not said how many there are.

    Retries are not foreseen: the ETA is the floor the rate limit allows.
    """
    if total is None:
        return None
    syncs = max(0, total - synced - failed)
    pages = 0
    if not listing_done:
        pages = max(0, -(-total // page_size) - pages_fetched)
    return syncs + pages
