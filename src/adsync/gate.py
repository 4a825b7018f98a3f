"""The gate every request passes just before it leaves: may it still be sent?

A request can wait a long time before it is sent: for a slot in the rate
budget (most of a window at the platform's limit), on a retry's backoff, or for
a token refresh. Whatever was true when it started waiting, it is asked again
after the wait: a run that was told to stop, or that no longer holds its run's
lease, sends nothing more. Waits race against the gate, so a closed gate ends
them at once instead of when they would have ended.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

from adsync.clock import Clock
from adsync.errors import Stopped

T = TypeVar("T")

# Why a gate closed; the run records the reason.
SIGNALLED = "stopped by a signal; resumable"
LEASE_TAKEN = "another process took the run over"
LEASE_NOT_RENEWED = "could not renew the run's lease; resumable"


def may_send(now: float, send_until: float) -> bool:
    """Whether a request may leave at ``now`` when the lease allows sends until ``send_until``."""
    return now < send_until


class SendGate:
    """Open until the run is told to stop or its lease stops being ours; then closed for good.

    The lease part is a deadline on the injected clock: the moment after which a
    request sent now might outlive the lease (its holder renews it by
    :meth:`send_until`). It matters when the process could not tell by itself:
    paused (SIGSTOP, a VM frozen) or with its heartbeat stuck on a hung database,
    its waits end all together when it wakes, before any heartbeat can run.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._send_until = math.inf
        self._reason: str | None = None
        self._closed: asyncio.Future[None] | None = None

    @property
    def reason(self) -> str | None:
        """Why the gate closed (the first reason given), or None while it is open."""
        return self._reason

    @property
    def closed(self) -> bool:
        """Whether nothing more may be sent (closes the gate if the lease ran too short)."""
        if self._reason is None and not may_send(self._clock.monotonic(), self._send_until):
            self.close(LEASE_NOT_RENEWED)
        return self._reason is not None

    def send_until(self, moment: float) -> None:
        """The lease was renewed: requests may leave until ``moment`` (monotonic)."""
        self._send_until = moment

    def close(self, reason: str) -> None:
        """Send nothing more, and end every wait raced against the gate now."""
        if self._reason is not None:
            return
        self._reason = reason
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def check(self) -> None:
        """Raise :class:`Stopped` when nothing more may be sent."""
        if self.closed:
            raise Stopped(self._reason or "stopped")

    async def race(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, unless the gate closes first: then cancel it and raise Stopped.

        A result that arrives as the gate closes is returned all the same; the
        caller checks the gate again before it sends anything.
        """
        self.check()
        work = asyncio.ensure_future(awaitable)
        either: list[asyncio.Future[Any]] = [work, self._closing()]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                # Let it unwind (a lock it holds is given back) before going on.
                await asyncio.wait({work})
        if work.cancelled():
            raise Stopped(self._reason or "stopped")
        return work.result()

    async def sleep(self, seconds: float) -> None:
        """The clock's sleep, ended at once (with Stopped) when the gate closes."""
        await self.race(self._clock.sleep(seconds))

    def _closing(self) -> asyncio.Future[None]:
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
            if self._reason is not None:
                self._closed.set_result(None)
        return self._closed
