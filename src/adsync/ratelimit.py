"""A client-side mirror of the platform's sliding-window rate limit, per client id.

Hand-written on purpose: limiter libraries (aiolimiter, pyrate-limiter) pace a
fixed rate but cannot be told "the platform refused this send, pause everyone
until T and learn the real limit from what we sent", and that is the part that
decides whether a run wastes quota. The state is a log of our own send times.

Rules, in order of how often they matter:

* Never more than ``limit`` sends in any trailing window. The window we keep is
  the platform's plus a small margin, because our send stamp and the platform's
  arrival stamp differ by network jitter.
* Consecutive sends are a little apart: twice the platform's round trip (as
  measured on quick answers), never more than ``window / limit``. A window's
  sends still go out nearly together, which is what reaching the floor needs,
  but if the configured limit is too high the first refusal comes back before
  more than one further send has left, instead of a whole burst of 429s.
* On a 429, the refused send is forgotten (the platform does not count it) and
  every caller pauses until it is safe. If our own log covers a whole window
  before the refusal, the number of our sends in it *is* the platform's limit and
  it is adopted. If it does not (a process that starts right after another one
  finds the window holding that process's sends), the count is adopted only
  tentatively and the configured limit is probed again one window later.

Several processes may send for the same client id (a mistaken second run, a
crashed process whose calls still count, a restart right after another run). With
a :class:`~adsync.sendlog.SharedSendLog` (the ``rate_sends`` table of the database adsync already
uses), every send is first *reserved* in the log, in a transaction serialized per
client id, against the sends of every owner together. The log stamps sends with
its own clock (the database's, read under its lock), never a process's wall
clock, which may be minutes off on some host; each reservation tells the budget
where the log's clock stands against its own monotonic clock, and the log's
times are moved onto ours by that offset. Other owners' sends come back with
each reservation and are kept beside ours (on our monotonic clock): they count
towards the limit and the spacing. A refusal while the window
held ours and theirs, as many as the limit give or take jitter, means a full
window, not a lower limit; fewer than the limit means a lower limit, and it is
ours and theirs together, not ours alone. A send that left much later than its
stamp is moved in the log too, and a refused one removed, since other processes
judge the window by it. A :class:`SendLogBatcher` carries the reservations of all
the budgets of a process to the log, many per transaction under load. Without a
shared log (or while it cannot be reached) the budget is the in-memory one above.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import TypeVar

import structlog

from adsync.clock import Clock
from adsync.errors import StoreError
from adsync.groupcommit import GroupCommit
from adsync.sendlog import (
    Reservation,
    SendChange,
    SendRequest,
    SharedSendLog,
    earliest_send,
)

log = structlog.get_logger("adsync.ratelimit")

T = TypeVar("T")

# A margin that absorbs the difference between our send stamps and the
# platform's millisecond arrival stamps: a fraction of the window, never less
# than this many seconds. Refusals that jitter explains widen it up to the cap:
# a platform that stamps requests when it gets round to them (a queue in front
# of its limiter) lags by more under bursts. With 100 accounts' windows starting
# together on two workers, a 5% cap on a 2 s window left 63-88 refusals in
# 12,500 requests; this one 14-39, and the runs were a little faster. Past the
# jitter tolerance below, a refusal reads as a lower limit: learned tentatively,
# probed again a window later.
MIN_MARGIN_SECONDS = 0.01
MAX_MARGIN_FRACTION = 0.15
# A guess of the platform's round trip before the first quick answer is timed.
INITIAL_RTT_SECONDS = 0.05
MIN_SPACING_SECONDS = 0.002
JITTER_FRACTION = 0.05
# The longest a Retry-After header may pause a budget: this many windows, and at
# least ten minutes. Longer (a header of "86400", a far-off date, a skewed clock)
# would hold the run for good; after the cap one request asks again, and a
# platform that still refuses says how long to wait once more.
MAX_PAUSE_WINDOWS = 10
MIN_MAX_PAUSE_SECONDS = 600.0
# How many recent reservations the offset between the shared log's clock and
# ours is taken from (the one answered quickest of them): the round trip to the
# database was 2 ms at the median on a loaded 2-core machine, but 8 ms at p90
# and 57 ms at p99, against a margin of a few tens of ms. Few enough that a
# database whose clock jumps (a failover) is followed within a window or two.
OFFSET_SAMPLES = 32


@dataclass(slots=True)
class Margin:
    """The safety margin added to the window, as a fraction of it.

    Arrival jitter belongs to the process and the path to the platform, not to
    one account: the budgets of a process share one ``Margin``, so the first
    refusal that shows it too small widens it for all of them.
    """

    fraction: float = 0.01

    def widen(self) -> None:
        """Grow the margin after a refusal that jitter explains (bounded).

        The bound caps the growth, never what was configured: a margin set wider
        than the bound stays as it was.
        """
        grown = min(MAX_MARGIN_FRACTION, self.fraction * 1.5 + 0.0025)
        self.fraction = max(self.fraction, grown)


@dataclass(slots=True)
class Send:
    """A reserved slot: when it was sent, for :meth:`RateBudget.refused`."""

    stamp: float
    # Its stamp in the shared log (the log's clock), when it was logged there.
    logged_at: float | None = None


@dataclass(frozen=True, slots=True)
class LimitChange:
    """A change of the limit the budget enforces, for logs and tests."""

    at: float
    old: int
    new: int
    confirmed: bool


# -- the way to the log shared across processes --------------------------------


class SendLogBatcher:
    """The way from the budgets of one process (one event loop) to a shared log.

    Group commit (:class:`~adsync.groupcommit.GroupCommit`): one batch is in the
    log at a time, in a worker thread; the reservations (and the changes to our
    sends: moves, removals) that arrive meanwhile wait and go together in the next
    batch, in the order they were made. At low rates each reservation goes alone;
    under the load of many accounts they share one transaction, so the cost per
    send falls as load rises. A batch the log refuses is refused to each of its
    callers: the log is shared, so its failure is nobody's own.

    The batches go through a thread of the batcher's own, not the event loop's
    default executor: there, a sync's store writes queue up (100 accounts fill it)
    and every send would wait behind them. :meth:`aclose` stops the thread.
    """

    def __init__(self, log: SharedSendLog) -> None:
        self.log = log
        self._group: GroupCommit[SendRequest | SendChange, Reservation | None] = GroupCommit(
            self._commit, name="rate-log"
        )
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adsync-rate-log")

    @property
    def batches(self) -> int:
        """Batches sent to the log so far."""
        return self._group.batches

    async def reserve(self, request: SendRequest) -> Reservation:
        """The log's answer to ``request``; raises StoreError when it cannot be reached."""
        answer = await self._group.submit(request)
        assert answer is not None  # noqa: S101 - a request is always answered
        return answer

    def change(self, change: SendChange) -> None:
        """Queue a change to one of our sends; it goes with the next batch."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._apply([], [change])  # no loop to wait on: apply it here and now
            return
        self._group.post(change)

    async def flush(self) -> None:
        """Wait until everything queued so far has reached the log (or failed to)."""
        await self._group.flush()

    async def aclose(self) -> None:
        """Flush, then stop the batcher's thread."""
        await self.flush()
        self._thread.shutdown(wait=False)

    async def _commit(self, items: Sequence[SendRequest | SendChange]) -> list[Reservation | None]:
        requests = [i for i in items if isinstance(i, SendRequest)]
        changes = [i for i in items if not isinstance(i, SendRequest)]
        answers = iter(
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._apply, requests, changes
            )
        )
        return [next(answers) if isinstance(i, SendRequest) else None for i in items]

    def _apply(self, requests: list[SendRequest], changes: list[SendChange]) -> list[Reservation]:
        try:
            return self.log.reserve_many(requests, changes)
        except StoreError as exc:
            if changes:
                # A refused send left in the log only makes others wait longer than
                # they need; a send left where it was stamped counts from a little
                # early, which the margin covers unless it left very late.
                log.warning(
                    "could not update our sends in the shared rate log",
                    changes=len(changes),
                    error=str(exc),
                )
            raise


# -- the budget --------------------------------------------------------------------


class RateBudget:
    """The sliding-window budget of one client id, shared by all its requests.

    With ``shared`` (and the ``client_id`` and ``owner`` to log sends under), the
    budget is also shared with every other process that logs there.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Clock,
        *,
        margin_fraction: float = 0.01,
        margin: Margin | None = None,
        shared: SendLogBatcher | None = None,
        client_id: str | None = None,
        owner: str | None = None,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        if shared is not None and (client_id is None or owner is None):
            raise ValueError("a shared send log needs the client_id and owner to log under")
        self.configured_limit = limit
        self.window = window
        self._clock = clock
        self._margin = margin if margin is not None else Margin(margin_fraction)
        self._limit = limit
        self._confirmed = False
        self._probe_at: float | None = None
        self._sends: deque[float] = deque()
        self._paused_until = float("-inf")
        self._history_start: float | None = None
        self._lock = asyncio.Lock()
        self._rtt = INITIAL_RTT_SECONDS
        self._last_change_at = float("-inf")
        self.changes: list[LimitChange] = []
        self.waited_seconds = 0.0
        self.refusals = 0
        self._shared = shared
        self._client_id = client_id or ""
        self._owner = owner or ""
        # Other owners' sends, on our monotonic clock, ascending.
        self._foreign: deque[float] = deque()
        # The shared log refused a send until then (monotonic).
        self._log_busy_until = float("-inf")
        # The shared log failed: use only our own log until then (monotonic).
        self._log_down_until = float("-inf")
        # The shared log's clock minus our monotonic clock, one per recent
        # reservation, and the estimate taken from them (see _reserve).
        self._offsets: deque[float] = deque(maxlen=OFFSET_SAMPLES)
        self._log_offset = 0.0
        self.shared_failures = 0

    # -- what the budget knows -------------------------------------------------

    @property
    def limit(self) -> int:
        """The limit enforced now (learned, or configured)."""
        return self._limit

    @property
    def span(self) -> float:
        """The window we keep: the platform's plus the safety margin."""
        return self.window + max(self.window * self._margin.fraction, MIN_MARGIN_SECONDS)

    @property
    def spacing(self) -> float:
        """The least time between two consecutive sends."""
        return min(self.span / self._limit, max(MIN_SPACING_SECONDS, 2 * self._rtt))

    def observe_rtt(self, seconds: float) -> None:
        """Learn the round trip from a quick answer (a listing, a refusal)."""
        if seconds > 0:
            self._rtt = 0.7 * self._rtt + 0.3 * seconds

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def in_window(self, now: float) -> int:
        """How many of our sends are still inside the kept window at ``now``."""
        return sum(1 for s in self._sends if s > now - self.span)

    def foreign_in_window(self, now: float) -> int:
        """How many other owners' sends (from the shared log) are inside the kept window."""
        return sum(1 for s in self._foreign if s > now - self.span)

    def next_free_at(self, now: float) -> float:
        """The earliest time a send is allowed (ends a due probe, changes nothing else).

        Counts our sends and the other owners' sends the shared log told us about.
        """
        self._maybe_end_probe(now)
        stamps: Sequence[float] = self._sends
        if self._foreign:
            stamps = sorted(chain(self._sends, self._foreign))
        return earliest_send(
            stamps,
            max(now, self._paused_until),
            span=self.span,
            limit=self._limit,
            spacing=self.spacing,
        )

    def seconds_for(self, requests: int, now: float | None = None) -> float:
        """How long ``requests`` more sends take at the enforced limit (for an ETA)."""
        if requests <= 0:
            return 0.0
        now = self._clock.monotonic() if now is None else now
        start = self.next_free_at(now)
        return (start - now) + ((requests - 1) // self._limit) * self.span

    # -- taking a slot ---------------------------------------------------------

    async def acquire(self, prepare: Callable[[], Awaitable[T]]) -> tuple[Send, T]:
        """Wait for a free slot, run ``prepare`` inside it, and record the send.

        ``prepare`` runs while the slot is held (it fetches the token), so a
        request that queued for a long time never leaves with a stale token.
        Waiters are served in arrival order (``asyncio.Lock`` is fair).
        """
        async with self._lock:
            while True:
                await self._wait_turn()
                value = await prepare()
                reservation = await self._reserve()
                if reservation is None:
                    stamp, logged_at = self._clock.monotonic(), None
                    break
                if reservation.ok:
                    # The log's stamp, moved to our clock: one moment in both logs.
                    stamp, logged_at = reservation.at - self._log_offset, reservation.at
                    break
                # Another process took the slot first: wait for the next one.
            self._prune(stamp)
            self._sends.append(stamp)
            if self._history_start is None:
                self._history_start = stamp
            return Send(stamp, logged_at), value

    async def flush(self) -> None:
        """Wait until the shared log has every :meth:`forget` and :meth:`restamp` so far."""
        if self._shared is not None:
            await self._shared.flush()

    def restamp(self, send: Send, stamp: float) -> None:
        """Move a send's stamp to when its bytes actually left (never earlier).

        The platform stamps arrival; the closer our stamp is to it, the less
        margin the window needs. Waiters re-read the log when they wake.

        The shared log's stamp moves too (in the background) when it was late by
        more than a quarter of the margin, as the first send on a new connection
        is: other processes judge the window by it, and have only the margin to
        absorb the difference. Smaller moves are left alone, to save a write.
        """
        if stamp <= send.stamp:
            return
        try:
            self._sends.remove(send.stamp)
        except ValueError:
            return
        late = stamp - send.stamp
        send.stamp = stamp
        self._sends.append(stamp)
        if len(self._sends) > 1 and self._sends[-2] > stamp:
            self._sends = deque(sorted(self._sends))
        if (
            self._shared is not None
            and send.logged_at is not None
            and late > (self.span - self.window) / 4
        ):
            logged_at, send.logged_at = send.logged_at, send.logged_at + late
            self._shared.change(SendChange(self._client_id, self._owner, logged_at, send.logged_at))

    def forget(self, send: Send) -> None:
        """Give back a slot the platform did not count (e.g. a 401 before counting).

        The send leaves the shared log in the background (:meth:`flush` waits for
        it); until then other processes count it, which errs on the safe side.
        """
        with contextlib.suppress(ValueError):
            self._sends.remove(send.stamp)
        if send.logged_at is None or self._shared is None:
            return
        logged_at, send.logged_at = send.logged_at, None
        self._shared.change(SendChange(self._client_id, self._owner, logged_at))

    # -- hearing a refusal -----------------------------------------------------

    def refused(self, send: Send, retry_after: float | None = None) -> LimitChange | None:
        """Record a 429 for ``send``: pause every caller and maybe learn the limit.

        ``retry_after`` is the platform's Retry-After header in seconds from now,
        when it sent one; the body's fixed ``retry_after: 60`` must not be passed.
        """
        now = self._clock.monotonic()
        self.refusals += 1
        self.forget(send)
        stamp = send.stamp
        if stamp <= self._last_change_at:
            # Sent before the last change of limit: it tells us nothing new.
            return None
        count = sum(1 for s in self._sends if stamp - self.window < s < stamp)
        # Our sends just outside the window may have arrived inside it on the
        # platform's clock: within this tolerance, a refusal is jitter, not a limit.
        tolerance = max(self.window * JITTER_FRACTION, MIN_MARGIN_SECONDS * 10)
        near = sum(1 for s in self._sends if stamp - self.window - tolerance < s < stamp)
        # Other processes' sends are counted requests too; one logged just after
        # ours may have arrived before it.
        foreign = sum(1 for s in self._foreign if stamp - self.window < s < stamp)
        foreign_near = sum(
            1 for s in self._foreign if stamp - self.window - tolerance < s < stamp + tolerance
        )
        whole_window_known = (
            self._history_start is not None and self._history_start <= stamp - self.span
        )
        change: LimitChange | None = None
        if foreign_near:
            change = self._refused_beside_others(
                stamp, count, foreign, near + foreign_near, whole_window_known, now
            )
        elif count == 0:
            # Nothing of ours explains the refusal: someone else's sends fill the
            # window. They have all left it one window after the refusal.
            self._pause(stamp + self.span)
            self._history_start = stamp + self.span
        elif near >= self._limit:
            # We were at our own limit, give or take jitter: our stamps run ahead
            # of the platform's. Widen the margin (bounded), keep the limit.
            self._margin.widen()
        else:
            change = self._set_limit(count, confirmed=whole_window_known, at=now)
            self._probe_at = None if whole_window_known else stamp + self.span
        if retry_after is not None:
            longest = max(MIN_MAX_PAUSE_SECONDS, MAX_PAUSE_WINDOWS * self.window)
            if retry_after > longest:
                log.warning(
                    "Retry-After longer than adsync waits; asking again sooner",
                    retry_after=retry_after,
                    wait=longest,
                )
            self._pause(now + min(longest, max(0.0, retry_after)))
        return change

    # -- internals -------------------------------------------------------------

    def _refused_beside_others(  # noqa: PLR0917 - private, called from one place
        self,
        stamp: float,
        own: int,
        foreign: int,
        near: int,
        whole_window_known: bool,
        now: float,
    ) -> LimitChange | None:
        """A refusal while other processes' sends were in the window."""
        if near >= self._limit:
            # All of us together filled the window, give or take jitter: the window
            # was full, not the limit lower. Widen the margin (bounded); the next
            # send waits until the oldest of all leaves the wider window.
            self._margin.widen()
            return None
        if own == 0:
            # Only others' sends, fewer than the limit: a sender outside the log, or
            # a lower limit that none of ours measured. Wait a window, learn nothing.
            self._pause(stamp + self.span)
            self._history_start = stamp + self.span
            return None
        # The platform counted all of them: the limit is ours and theirs together,
        # not ours alone (that would leave the rest of the window unused).
        change = self._set_limit(own + foreign, confirmed=whole_window_known, at=now)
        self._probe_at = None if whole_window_known else stamp + self.span
        return change

    async def _wait_turn(self) -> None:
        while True:
            now = self._clock.monotonic()
            at = max(self.next_free_at(now), self._log_busy_until)
            if at <= now:
                return
            self.waited_seconds += at - now
            await self._clock.sleep(at - now)

    async def _reserve(self) -> Reservation | None:
        """Log the send in the shared log; ``None`` when there is none to use."""
        if self._shared is None or self._clock.monotonic() < self._log_down_until:
            return None
        request = SendRequest(self._client_id, self._owner, self.span, self._limit, self.spacing)
        try:
            reservation = await self._shared.reserve(request)
        except StoreError as exc:
            # A rate log we cannot reach must not stop the sync: our own log still
            # keeps this process within the limit. Try the shared log again later.
            self.shared_failures += 1
            self._log_down_until = self._clock.monotonic() + self.span
            log.warning(
                "shared rate log unavailable; pacing on this process's sends only",
                client_id=self._client_id,
                error=str(exc),
                retry_in=round(self.span, 3),
            )
            return None
        # The log's clock is its own (the database's, maybe another host's), not
        # ours: where it stands against our monotonic clock is measured at each
        # reservation, as the answer arrives. The log read its clock a round trip
        # earlier, so each sample is too small by that trip; the largest of the
        # recent ones is the closest. Any sample errs the safe way: others' sends
        # land a little late on our clock and count a little longer, never shorter.
        self._offsets.append(reservation.at - self._clock.monotonic())
        offset = self._log_offset = max(self._offsets)
        # All the other owners' sends that still matter, as the log has them now
        # (a send they gave back is gone from it).
        self._foreign = deque(f - offset for f in reservation.foreign)
        if not reservation.ok:
            self._log_busy_until = reservation.retry_at - offset
        return reservation

    def _pause(self, until: float) -> None:
        self._paused_until = max(self._paused_until, until)

    def _set_limit(self, new: int, *, confirmed: bool, at: float) -> LimitChange:
        change = LimitChange(at=at, old=self._limit, new=new, confirmed=confirmed)
        self._limit = new
        self._confirmed = confirmed
        self._last_change_at = self._clock.monotonic()
        self.changes.append(change)
        return change

    def _maybe_end_probe(self, now: float) -> None:
        # A tentative limit came from a window we could not see whole; once a
        # full window has passed, try the configured limit again. If it really
        # is too high, the next refusal is measured over a whole window.
        if self._probe_at is not None and now >= self._probe_at and not self._confirmed:
            self._probe_at = None
            self.changes.append(
                LimitChange(at=now, old=self._limit, new=self.configured_limit, confirmed=False)
            )
            self._limit = self.configured_limit
            self._last_change_at = now

    def _prune(self, now: float) -> None:
        horizon = now - self.span * 2
        while self._sends and self._sends[0] <= horizon:
            self._sends.popleft()
        while self._foreign and self._foreign[0] <= horizon:
            self._foreign.popleft()
