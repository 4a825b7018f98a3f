"""The pipeline of one account: pages -> sync calls -> store, with run bookkeeping.

Campaigns start syncing as soon as their page arrives; a campaign is written
only after its sync call succeeded; one campaign's failure never stops the
others. The run's progress is durable as it happens (``run_items``), so a run
that died is resumed by the next one without syncing anything twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import structlog

from adsync.clock import Clock
from adsync.errors import (
    AdsyncError,
    AuthError,
    PaginationError,
    PlatformError,
    RunLocked,
    Stopped,
    StoreError,
    StoreUnavailable,
    UnusableToken,
)
from adsync.events import ClientCounters, RunObserver, RunTotals
from adsync.gate import LEASE_NOT_RENEWED, LEASE_TAKEN, SIGNALLED, SendGate
from adsync.models import (
    Campaign,
    CampaignFailure,
    ListedItem,
    Page,
    RunCounters,
    RunStatus,
    RunWrite,
    SyncedCampaign,
    SyncReceipt,
)
from adsync.owner import local_owner_is_dead
from adsync.pagination import Accepted, Listing
from adsync.progress import RunProgress, requests_left
from adsync.runwriter import RunWriter

if TYPE_CHECKING:
    from adsync.store.protocol import Store

__all__ = [
    "PipelineOptions",
    "Platform",
    "RunProgress",
    "RunWriter",
    "SyncJob",
    "SyncOutcome",
]

log = structlog.get_logger("adsync.sync")


class Platform(Protocol):
    """What the pipeline needs of the platform's client (:class:`~adsync.client.PlatformClient`)."""

    # Asked right before each request leaves; the pipeline puts its own here.
    gate: SendGate

    async def list_page(self, page: int, limit: int) -> Page:
        """One page of the campaign listing."""
        ...

    async def sync_campaign(self, campaign_id: str) -> SyncReceipt:
        """Sync one campaign; raises when the platform did not."""
        ...

    def counters(self) -> ClientCounters:
        """What the client sent, heard and waited so far."""
        ...

    def seconds_for(self, requests: int) -> float:
        """How long ``requests`` more requests take at the rate enforced now."""
        ...


class Nudge:
    """Tells the writer that failures wait to be written."""


NUDGE = Nudge()


@dataclass(slots=True)
class SyncOutcome:
    """How a run ended."""

    run_id: str
    client_id: str
    status: RunStatus
    counters: RunCounters
    failures: list[CampaignFailure]
    problems: list[str]
    seconds: float
    resumed: bool
    error: str | None = None
    fatal: BaseException | None = field(default=None, repr=False)
    # Another process took the run over (our lease ran out): it finishes the run.
    taken_over: bool = False


@dataclass(slots=True)
class PipelineOptions:
    """Knobs of the pipeline; defaults suit production."""

    page_size: int = 10
    max_pages: int = 10_000
    concurrency: int = 12
    lease_seconds: float = 120.0
    batch_size: int = 50
    batch_interval: float = 0.25
    # The longest one request may take (the request deadline): no request leaves
    # when less than this is left of the run's lease.
    request_seconds: float = 30.0
    # An unfinished run that last ran longer ago than this is not resumed.
    resume_within: float = 3600.0


class SyncJob:
    """Syncs every campaign of one account, exactly once per run."""

    def __init__(
        self,
        client: Platform,
        store: Store,
        *,
        client_id: str,
        owner: str,
        clock: Clock,
        options: PipelineOptions,
        stop: asyncio.Event | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
        observer: RunObserver | None = None,
        writer: RunWriter | None = None,
    ) -> None:
        self._client = client
        self._observer = observer
        self._writer_for_runs = writer or RunWriter(store)
        self._store = store
        self._client_id = client_id
        self._owner = owner
        self._clock = clock
        self._opt = options
        # Set from outside (a signal, a worker stopping): the run ends interrupted.
        self._stop = stop or asyncio.Event()
        # Asked by the client right before each request leaves: closed by the stop
        # above or when the run's lease stops being ours.
        self._gate = SendGate(clock)
        client.gate = self._gate
        # A lease always leaves room to send: in production it is four requests long.
        self._send_margin = min(options.request_seconds, options.lease_seconds / 4)
        self._on_progress = on_progress
        self._queue: asyncio.Queue[Campaign | None] = asyncio.Queue()
        self._writes: asyncio.Queue[SyncedCampaign | Nudge | None] = asyncio.Queue()
        self._failures: list[CampaignFailure] = []
        self._pending_failures: list[CampaignFailure] = []
        self._listing = Listing(max_pages=options.max_pages)
        self._already_synced: frozenset[str] = frozenset()
        self._already_failed: frozenset[str] = frozenset()
        # What the run's earlier processes listed (a resumed run only).
        self._listed_before: frozenset[str] = frozenset()
        self._base = RunCounters()
        self._counters = RunCounters()
        self._listing_done = False
        self._run_id = ""
        # Whether another process holds the run now.
        self._taken_over = False

    # -- the run -------------------------------------------------------------

    async def run(self) -> SyncOutcome:
        """Claim (or resume) the account's run and carry it to an end."""
        store = self._store
        started = self._clock.monotonic()
        run = await asyncio.to_thread(
            store.claim_run,
            self._client_id,
            self._owner,
            self._opt.lease_seconds,
            owner_is_dead=local_owner_is_dead,
            resume_within=self._opt.resume_within,
        )
        self._hold_lease_from(started)
        self._run_id = run.id
        # Every log line of this run, from any module, carries its ids; tasks
        # started below inherit the context.
        structlog.contextvars.bind_contextvars(run_id=run.id, client_id=self._client_id)
        if run.resumed:
            checkpoint = await asyncio.to_thread(store.checkpoint, run.id)
            self._already_synced = checkpoint.synced
            self._already_failed = checkpoint.failed
            self._listed_before = checkpoint.listed
            # The counters are saved in a transaction of their own after each batch,
            # so a process killed in between leaves them behind the checkpoint,
            # which is what is really stored.
            self._base = replace(
                run.counters(),
                synced=len(checkpoint.synced),
                failed=max(run.failed, len(checkpoint.failed)),
            )
            log.info(
                "resuming an unfinished run",
                already_synced=len(checkpoint.synced),
                already_failed=len(checkpoint.failed),
            )
        else:
            log.info("run started")

        status = RunStatus.SUCCEEDED
        error: str | None = None
        fatal: BaseException | None = None
        if self._observer is not None:
            self._observer.run_started()
        try:
            await self._pipeline()
        except (AuthError, StoreError, PlatformError) as exc:
            status, error, fatal = RunStatus.FAILED, str(exc), exc
        except Exception as exc:
            # A bug must not leave the run "running": it fails, resumable, saying what.
            log.error(  # noqa: TRY400 - one line; the traceback is for DEBUG
                "run failed on an unexpected error", error=f"{type(exc).__name__}: {exc}"
            )
            log.debug("traceback of the unexpected error", exc_info=exc)
            status, error, fatal = RunStatus.FAILED, f"unexpected {type(exc).__name__}: {exc}", exc
        except asyncio.CancelledError:
            status, error = RunStatus.INTERRUPTED, "stopped before finishing"
            await self._finish(status, error)
            self._tell_finished(status, self._clock.monotonic() - started)
            raise
        if fatal is None:
            if self._stop.is_set():
                # Told to stop: the run ends interrupted whatever it reached, even
                # when calls that were in flight completed it, as the caller says.
                status, error = RunStatus.INTERRUPTED, SIGNALLED
            elif self._gate.closed and not self._complete():
                status, error = RunStatus.INTERRUPTED, self._gate.reason
            elif self._counters_total().failed or self._listing.problems:
                status = RunStatus.PARTIAL
        counters = await self._finish(status, error)
        if self._taken_over:
            status, error, fatal = RunStatus.INTERRUPTED, "another process took the run over", None
        outcome = SyncOutcome(
            run_id=run.id,
            client_id=self._client_id,
            status=status,
            counters=counters,
            failures=list(self._failures),
            problems=list(self._listing.problems),
            seconds=self._clock.monotonic() - started,
            resumed=run.resumed,
            error=error,
            fatal=fatal,
            taken_over=self._taken_over,
        )
        self._emit(done=True)
        self._tell_finished(status, outcome.seconds)
        log.info(
            "run finished",
            status=status.value,
            synced=counters.synced,
            failed=counters.failed,
            requests=counters.requests,
            rate_limited=counters.rate_limited,
            seconds=round(outcome.seconds, 2),
        )
        return outcome

    async def _pipeline(self) -> None:
        if self._stop.is_set():
            self._gate.close(SIGNALLED)
        follow_stop = asyncio.create_task(self._close_gate_on_stop(), name="follow-stop")
        workers = [
            asyncio.create_task(self._worker(), name=f"sync-worker-{i}")
            for i in range(self._opt.concurrency)
        ]
        writer = asyncio.create_task(self._writer(), name="writer")
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        lister = asyncio.create_task(self._list_all(), name="lister")
        others = [follow_stop, heartbeat, lister, *workers]
        flush = True
        try:
            await self._supervise(lister, workers, writer)
        except StoreError:
            flush = False  # the database failed: writing again would only wait on it
            raise
        finally:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            try:
                if flush and not writer.done():
                    # Also when cancelled (a second signal, the grace period over):
                    # every campaign whose sync call succeeded is written, so the
                    # resumed run does not send it again.
                    self._writes.put_nowait(None)
                    await asyncio.wait({writer})
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    async def _close_gate_on_stop(self) -> None:
        await self._stop.wait()
        self._gate.close(SIGNALLED)

    async def _supervise(
        self,
        lister: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        writer: asyncio.Task[None],
    ) -> None:
        # Any task failing fatally (auth, store) ends the run at once.
        await _first_error(lister, *workers, writer, until=lister)
        for _ in workers:
            self._queue.put_nowait(None)
        await _first_error(*workers, writer, until_all=workers)
        self._writes.put_nowait(None)
        await writer

    # -- listing -------------------------------------------------------------

    async def _list_all(self) -> None:
        try:
            await self._list_pages()
        except Stopped:
            return  # the listing stays incomplete; the resumed run lists again

    async def _list_pages(self) -> None:
        if self._gate.closed:
            return
        first, accepted = await self._fetch_page(1)
        last_number, last_page = 1, first
        planned = self._listing.planned_pages(first)
        if planned:
            # Pages known from `total` go out side by side, ahead of the sync
            # calls in the budget's queue, so the queue of campaigns never runs dry.
            fetches = {asyncio.create_task(self._get_page(n)): n for n in planned}
            results: dict[int, tuple[Page, Accepted]] = {}
            try:
                pending = set(fetches)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for fetch in sorted(done, key=fetches.__getitem__):
                        results[fetches[fetch]] = await self._take_page(
                            fetches[fetch], fetch.result()
                        )
                    # A short or empty page ends the listing, whatever `total` said:
                    # the planned pages after it that still wait for the budget are
                    # never sent (a `total` of 500 over 5 campaigns is 1 page, not 50).
                    beyond = set(self._listing.beyond_end(planned))
                    for fetch in [f for f in pending if fetches[f] in beyond]:
                        fetch.cancel()
                        pending.discard(fetch)
            finally:
                # One page failing ends the listing: the others must not go on
                # spending quota for a run that is over.
                for fetch in fetches:
                    fetch.cancel()
                await asyncio.gather(*fetches, return_exceptions=True)
            last_number = planned[-1] if self._listing.end is None else self._listing.end
            last_page, accepted = results[last_number]
        nxt = self._listing.next_page(last_number, last_page, accepted)
        while nxt is not None and not self._gate.closed:
            page, accepted = await self._fetch_page(nxt)
            nxt = self._listing.next_page(nxt, page, accepted)
        if self._gate.closed:
            return
        self._listing.finish()
        for problem in self._listing.problems:
            log.warning("listing problem", problem=problem)
        self._listing_done = True
        # A resumed run's result is about the listing it finished with: what the
        # platform no longer lists leaves it, synced or not.
        gone = self._listed_before - self._listing.seen_ids
        await asyncio.to_thread(self._store.mark_listing_complete, self._run_id, gone)
        if gone:
            log.info("campaigns no longer listed since the run began", count=len(gone))
            self._base.synced -= len(gone & self._already_synced)
            self._base.failed = max(0, self._base.failed - len(gone & self._already_failed))

    async def _fetch_page(self, number: int) -> tuple[Page, Accepted]:
        return await self._take_page(number, await self._get_page(number))

    async def _get_page(self, number: int) -> Page:
        try:
            return await self._client.list_page(number, self._opt.page_size)
        except PlatformError as exc:
            raise PaginationError(f"could not list page {number}: {exc}") from exc

    async def _take_page(self, number: int, page: Page) -> tuple[Page, Accepted]:
        self._counters.pages += 1
        accepted = self._listing.accept(number, page)
        ids = [i.campaign_id for i in accepted.items if i.campaign_id is not None]
        if ids:
            await asyncio.to_thread(self._store.record_listed, self._run_id, self._client_id, ids)
        for item in accepted.items:
            if item.campaign_id is None or item.campaign_id not in self._already_synced:
                self._dispatch(item)
        self._emit()
        return page, accepted

    def _dispatch(self, item: ListedItem) -> None:
        if item.campaign_id is not None and item.campaign_id in self._already_failed:
            return
        if item.campaign is None:
            self._fail(
                CampaignFailure(
                    campaign_id=item.campaign_id or "",
                    reason=item.error or "invalid campaign payload",
                    kind="payload",
                )
            )
            return
        self._queue.put_nowait(item.campaign)

    # -- syncing -------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            campaign = await self._queue.get()
            if campaign is None or self._gate.closed:
                return
            try:
                receipt = await self._client.sync_campaign(campaign.id)
            except Stopped:
                return  # not sent: the campaign stays pending for the resumed run
            except (AuthError, UnusableToken):
                # The account's problem, not this campaign's: it ends the run.
                raise
            except AdsyncError as exc:
                self._fail(CampaignFailure(campaign.id, str(exc), "sync"))
                continue
            log.debug("campaign synced", campaign_id=campaign.id)
            self._writes.put_nowait(SyncedCampaign(campaign, receipt.synced_at))

    def _fail(self, failure: CampaignFailure) -> None:
        self._failures.append(failure)
        self._counters.failed += 1
        log.warning(
            "campaign failed",
            campaign_id=failure.campaign_id,
            kind=failure.kind,
            reason=failure.reason,
        )
        self._pending_failures.append(failure)
        self._writes.put_nowait(NUDGE)

    # -- writing -------------------------------------------------------------

    async def _writer(self) -> None:
        # A batch is written when it is full or its oldest campaign has waited
        # `batch_interval`: few transactions, and little synced-but-unwritten
        # work to lose if the process dies.
        batch: list[SyncedCampaign] = []
        flush_at: float | None = None
        while True:
            timeout = None if flush_at is None else max(0.0, flush_at - self._clock.monotonic())
            try:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation
                # that arrives as the item does, and a cancelled writer would then
                # wait on an empty queue for ever.
                async with asyncio.timeout(timeout):
                    item = await self._writes.get()
            except TimeoutError:
                await self._flush(batch)
                batch, flush_at = [], None
                continue
            if item is None:
                await self._flush(batch)
                return
            if not isinstance(item, Nudge):
                batch.append(item)
            if flush_at is None:
                flush_at = self._clock.monotonic() + self._opt.batch_interval
            if len(batch) >= self._opt.batch_size:
                await self._flush(batch)
                batch, flush_at = [], None

    async def _flush(self, batch: list[SyncedCampaign]) -> None:
        failures, self._pending_failures = self._pending_failures, []
        try:
            await self._write(batch, failures)
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable | RunLocked) or not batch:
                raise
            # The database refused something in the batch, and it is not down:
            # write the campaigns one by one and record the one it refuses as
            # failed, so that one bad value costs one campaign, not the run.
            await self._write([], failures)
            for synced in batch:
                try:
                    await self._write([synced], [])
                except StoreUnavailable:
                    raise
                except StoreError as refused:
                    self._fail(
                        CampaignFailure(
                            synced.campaign.id, f"the database refused it: {refused}", "store"
                        )
                    )
            # Recorded now: this may be the writer's last flush.
            refusals, self._pending_failures = self._pending_failures, []
            await self._write([], refusals)

    async def _write(self, batch: list[SyncedCampaign], failures: list[CampaignFailure]) -> None:
        counters = self._counters_total()
        counters.synced += len(batch)
        # Failures, campaigns and the counters that include them: one transaction,
        # so the run's record never lags behind what is stored.
        await self._writer_for_runs.write(
            RunWrite(self._run_id, self._client_id, tuple(batch), tuple(failures), counters)
        )
        if batch:
            self._counters.synced += len(batch)
            self._emit()

    # -- bookkeeping ---------------------------------------------------------

    async def _heartbeat(self) -> None:
        every = max(0.05, self._opt.lease_seconds / 3)
        renewed = self._clock.monotonic()
        while True:
            await self._clock.sleep(every)
            asked = self._clock.monotonic()
            try:
                ok = await asyncio.to_thread(
                    self._store.heartbeat, self._run_id, self._owner, self._opt.lease_seconds
                )
            except StoreError as exc:
                if self._clock.monotonic() + every < renewed + self._opt.lease_seconds:
                    # The lease still holds; the next beat tries again.
                    log.warning("could not renew the run's lease; retrying", error=str(exc))
                    continue
                # Another process may take the run over from now on: make no more
                # calls for it. Finishing tells whether it is still ours.
                log.error(  # noqa: TRY400 - a known outage: its text, no traceback
                    "could not renew the run's lease before it ran out: stopping",
                    error=str(exc),
                )
                self._gate.close(LEASE_NOT_RENEWED)
                return
            if not ok:
                log.error("lost the run's lease to another process: stopping")
                self._gate.close(LEASE_TAKEN)
                return
            renewed = self._clock.monotonic()
            self._hold_lease_from(asked)

    def _hold_lease_from(self, asked: float) -> None:
        # The database extended the lease from a moment after we asked: counting
        # from when we asked, a request sent before this deadline ends before the
        # lease does, however late the answer came.
        self._gate.send_until(asked + self._opt.lease_seconds - self._send_margin)

    def _complete(self) -> bool:
        return self._listing_done and self._queue.empty()

    def _counters_total(self) -> RunCounters:
        s = self._client.counters()
        b = self._base
        return RunCounters(
            seen=len(self._listing.seen_ids) + self._listing.items_without_id,
            synced=b.synced + self._counters.synced,
            failed=b.failed + self._counters.failed,
            requests=b.requests + s.requests,
            retries=b.retries + s.retries,
            rate_limited=b.rate_limited + s.rate_limited,
            pages=b.pages + self._counters.pages,
        )

    async def _finish(self, status: RunStatus, error: str | None) -> RunCounters:
        counters = self._counters_total()
        try:
            await asyncio.to_thread(
                self._store.finish_run,
                self._run_id,
                self._owner,
                status,
                counters,
                error,
                # A failed run keeps its checkpoint: the next run for the client resumes
                # it and spends no quota again on the campaigns it already synced.
                resumable=status in (RunStatus.INTERRUPTED, RunStatus.FAILED),
            )
        except RunLocked as exc:
            # Our lease ran out and another process holds the run: it finishes it,
            # from the checkpoint we leave.
            log.warning("another process took the run over; leaving it to it", error=str(exc))
            self._taken_over = True
        return counters

    def _tell_finished(self, status: RunStatus, seconds: float) -> None:
        if self._observer is not None:
            self._observer.run_finished(status.value, seconds, self._clock.wall())

    def _emit(self, *, done: bool = False) -> None:
        if self._observer is not None:
            client = self._client.counters()
            self._observer.run_progressed(
                RunTotals(
                    retries=client.retries,
                    refreshes=client.refreshes,
                    waited_seconds=client.waited_seconds,
                    synced=self._counters.synced,
                    failed=self._counters.failed,
                )
            )
        if self._on_progress is None:
            return
        c = self._counters_total()
        total = self._listing.total
        left = requests_left(
            total,
            synced=c.synced,
            failed=c.failed,
            page_size=self._opt.page_size,
            pages_fetched=len(self._listing.pages_fetched),
            listing_done=self._listing_done,
        )
        eta = None if left is None else self._client.seconds_for(left)
        self._on_progress(
            RunProgress(
                client_id=self._client_id,
                run_id=self._run_id,
                total=total,
                synced=c.synced,
                failed=c.failed,
                requests=c.requests,
                rate_limited=c.rate_limited,
                eta_seconds=eta,
                done=done,
            )
        )


async def _first_error(
    *tasks: asyncio.Task[None],
    until: asyncio.Task[None] | None = None,
    until_all: list[asyncio.Task[None]] | None = None,
) -> None:
    """Wait for ``until`` (or all of ``until_all``); raise at once if any task fails."""
    pending = set(tasks)
    targets = {until} if until is not None else set(until_all or [])
    while targets & pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
