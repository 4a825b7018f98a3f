"""A platform stand-in for the pipeline, and what tests need around it.

:class:`StandIn` takes the place of the PlatformClient: it lists the campaigns it
is given and answers every sync call with the ``synced_at`` it is told, counting
the calls. Tests change its campaigns (or build another) between runs, as the
platform would change between two ``adsync sync``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from adsync.client import ClientStats
from adsync.clock import Clock, SystemClock
from adsync.config import sqlalchemy_url
from adsync.events import ClientCounters
from adsync.gate import SendGate
from adsync.models import Campaign, ListedItem, Page, SyncReceipt
from adsync.store import metadata
from adsync.sync import PipelineOptions, RunProgress, SyncJob


def campaign(number: int, **changes: Any) -> Campaign:
    values: dict[str, Any] = {
        "id": f"campaign_{number}",
        "name": f"Campaign {number}",
        "status": "active",
        "budget": 100.0,
        "impressions": 1_000,
        "clicks": 10,
        "conversions": 1,
        "created_at": None,
    }
    values.update(changes)
    return Campaign(**values)


class StandIn:
    """Lists ``campaigns`` page by page; each sync call answers with ``synced_at`` (or now)."""

    def __init__(
        self,
        campaigns: list[Campaign],
        *,
        synced_at: datetime | None = None,
        delay: float = 0.002,
    ) -> None:
        self.campaigns = campaigns
        self.synced_at = synced_at
        self.delay = delay
        self.stats = ClientStats()
        self.gate = SendGate(SystemClock())
        self.sync_calls: Counter[str] = Counter()
        # Set once this many sync calls have been answered (see stop_after).
        self.stop: tuple[asyncio.Event, int] | None = None

    def counters(self) -> ClientCounters:
        return ClientCounters(requests=self.stats.requests)

    def seconds_for(self, requests: int) -> float:
        return 0.0

    async def list_page(self, number: int, limit: int) -> Page:
        self.stats.requests += 1
        await asyncio.sleep(0)
        start = (number - 1) * limit
        items = tuple(ListedItem(c.id, c) for c in self.campaigns[start : start + limit])
        return Page(number, limit, len(self.campaigns), start + limit < len(self.campaigns), items)

    async def sync_campaign(self, campaign_id: str) -> SyncReceipt:
        self.stats.requests += 1
        await asyncio.sleep(self.delay)
        self.sync_calls[campaign_id] += 1
        if self.stop is not None and self.stop[1] <= sum(self.sync_calls.values()):
            self.stop[0].set()
        return SyncReceipt(campaign_id, self.synced_at or datetime.now(UTC))


def job(
    platform: StandIn,
    store: Any,
    *,
    client_id: str = "acme",
    owner: str = "host-a:100:aaaa",
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[RunProgress], None] | None = None,
    **options: Any,
) -> SyncJob:
    """A SyncJob over the stand-in, as ``adsync sync`` would build it."""
    return SyncJob(
        platform,
        store,
        client_id=client_id,
        owner=owner,
        clock=clock or SystemClock(),
        options=PipelineOptions(**{"concurrency": 4, "lease_seconds": 30.0, **options}),
        stop=stop,
        on_progress=on_progress,
    )


def stop_after(platform: StandIn, calls: int) -> asyncio.Event:
    """A stop event (a signal) that ``platform`` sets once it has answered ``calls`` sync calls.

    The calls still in flight then are answered and stored: the run stops a few
    campaigns later.
    """
    stop = asyncio.Event()
    platform.stop = (stop, calls)
    return stop


def move_run_back(database_url: str, run_id: str, seconds: float) -> None:
    """Make a run look as if it had run ``seconds`` earlier: the gap before the next process."""
    engine = sa.create_engine(sqlalchemy_url(database_url), poolclass=sa.NullPool)
    runs = metadata.tables["sync_runs"]
    shift = timedelta(seconds=seconds)
    try:
        with engine.begin() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()
            conn.execute(
                sa.update(runs)
                .where(runs.c.id == run_id)
                .values(
                    started_at=row.started_at - shift,
                    finished_at=None if row.finished_at is None else row.finished_at - shift,
                    heartbeat_at=row.heartbeat_at - shift,
                    lease_until=row.lease_until - shift,
                )
            )
    finally:
        engine.dispose()


class SkewedClock:
    """The system clock with a wall clock ``skew`` seconds off, as on a badly set host.

    Monotonic time and sleeping are the real ones: only ``wall()`` is wrong, as with
    ``faketime`` and a monotonic clock left alone.
    """

    def __init__(self, skew: float) -> None:
        self._real = SystemClock()
        self.skew = skew

    def monotonic(self) -> float:
        return self._real.monotonic()

    def wall(self) -> float:
        return time.time() + self.skew

    async def sleep(self, seconds: float) -> None:
        await self._real.sleep(seconds)
