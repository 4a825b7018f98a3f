"""Wiring one account's sync: builds the HTTP client, token provider, budget and job.

The CLI (and later the worker) call :func:`sync_account`; everything it builds is
closed when it returns.
"""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from adsync.auth import TokenProvider
from adsync.client import PlatformClient
from adsync.clock import Clock, SystemClock
from adsync.config import Settings
from adsync.errors import AdsyncError, AuthError, ConfigError
from adsync.events import RequestEvent
from adsync.exit_codes import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
)
from adsync.metrics import Metrics
from adsync.models import RunStatus
from adsync.observability import REDACTOR
from adsync.owner import make_owner
from adsync.progress import RunProgress
from adsync.ratelimit import Margin, RateBudget, SendLogBatcher
from adsync.retry import RetryPolicy
from adsync.runtime import ProcessRuntime
from adsync.store import Store
from adsync.sync import PipelineOptions, SyncJob, SyncOutcome


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~20 ms of CPU); one per process
    # instead of one per account matters when a process syncs 100 accounts.
    return httpx.create_ssl_context()


def tls_verify(api_url: str) -> ssl.SSLContext | bool:
    """How the HTTP client of ``api_url`` verifies TLS: the process's one context for
    https; for plain http no context at all (redirects are not followed, so a
    plain-http client never speaks TLS and need not load the CA bundle)."""
    if httpx.URL(api_url).scheme == "https":
        return _tls_context()
    return False


def build_http(settings: Settings) -> httpx.AsyncClient:
    """The one HTTP client of an account, with a timeout on every phase."""
    timeout = httpx.Timeout(
        settings.request_timeout, connect=settings.connect_timeout, pool=settings.request_deadline
    )
    slots = settings.concurrency() + 4
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
    return httpx.AsyncClient(
        base_url=settings.api_url,
        timeout=timeout,
        limits=limits,
        headers={"User-Agent": "adsync"},
        follow_redirects=False,
        verify=tls_verify(settings.api_url),
    )


def build_client(
    settings: Settings,
    http: httpx.AsyncClient,
    clock: Clock,
    *,
    rng: random.Random | None = None,
    observe: Callable[[RequestEvent], None] | None = None,
    shared: SendLogBatcher | None = None,
    owner: str | None = None,
    margin: Margin | None = None,
) -> PlatformClient:
    """A PlatformClient for the account of ``settings`` over ``http``.

    With ``shared``, its rate budget also counts (and logs, as ``owner``) the sends
    of every other process using that log for the same client id.
    """
    rng = rng or random.Random()
    policy = RetryPolicy(
        max_attempts=settings.max_attempts,
        max_seconds=settings.retry_budget_seconds,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
    )
    auth = TokenProvider(
        http,
        email=settings.email,
        password=settings.password,
        clock=clock,
        margin=settings.token_refresh_margin,
        rng=rng,
        timeout=settings.request_deadline,
        # Every token of every account, current and previous, is redacted wherever
        # the process prints, logs or stores text.
        on_secret=REDACTOR.register_recent,
    )
    budget = RateBudget(
        settings.rate_limit,
        settings.rate_window,
        clock,
        margin_fraction=settings.rate_margin,
        margin=margin,
        shared=shared,
        client_id=settings.client_id,
        owner=owner or make_owner(),
    )
    return PlatformClient(
        http,
        auth=auth,
        budget=budget,
        clock=clock,
        client_id=settings.client_id,
        policy=policy,
        deadline=settings.request_deadline,
        rng=rng,
        observe=observe,
    )


def pipeline_options(settings: Settings, *, accounts: int = 1) -> PipelineOptions:
    """Pipeline knobs derived from settings.

    ``accounts`` is how many accounts the process syncs side by side. Each one's
    writer hands in a batch every ``batch_interval``; with many accounts the
    interval stretches (up to 1 s) so that writing does not eat the CPU the
    requests need. What a crash can cost grows with it: campaigns synced in the
    last interval and not yet written are synced again by the resumed run.
    """
    return PipelineOptions(
        page_size=settings.page_size,
        max_pages=settings.max_pages,
        concurrency=settings.concurrency(),
        lease_seconds=max(30.0, settings.request_deadline * 4),
        request_seconds=settings.request_deadline,
        batch_interval=min(1.0, 0.25 * max(1.0, accounts / 25)),
        resume_within=settings.resume_within_seconds,
    )


async def sync_account(
    settings: Settings,
    store: Store,
    *,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[RunProgress], None] | None = None,
    metrics: Metrics | None = None,
    owner: str | None = None,
    runtime: ProcessRuntime | None = None,
    accounts: int = 1,
) -> SyncOutcome:
    """Sync every campaign of the account described by ``settings``.

    With ``AD_PLATFORM_SHARED_BUDGET`` on (the default) the rate budget is shared,
    through the store's ``rate_sends`` table, with every process syncing the same
    client id. Pass the process's ``runtime`` to every account it syncs so that
    their reservations and their writes share transactions and what one account
    learns about arrival jitter protects them all; without it, the sync builds
    one of its own.
    """
    clock = clock or SystemClock()
    observe: Callable[[RequestEvent], None] | None = None
    if metrics is not None:
        client_id = settings.client_id

        def observe(event: RequestEvent) -> None:
            metrics.observe_request(client_id, event)

    owner = owner or make_owner()
    own: ProcessRuntime | None = None
    if runtime is None:
        runtime = own = ProcessRuntime(store, rate_margin=settings.rate_margin)
    shared = runtime.send_log if settings.shared_budget else None
    async with build_http(settings) as http:
        client = build_client(
            settings,
            http,
            clock,
            observe=observe,
            shared=shared,
            owner=owner,
            margin=runtime.margin,
        )
        job = SyncJob(
            client,
            store,
            client_id=settings.client_id,
            owner=owner,
            clock=clock,
            options=pipeline_options(settings, accounts=accounts),
            stop=stop,
            on_progress=on_progress,
            observer=None if metrics is None else metrics.run_observer(settings.client_id),
            writer=runtime.writer,
        )
        try:
            return await job.run()
        finally:
            # Refused sends leave the shared log before we go, or others wait for them.
            await client.budget.flush()
            if own is not None:
                await own.aclose()


@dataclass(frozen=True, slots=True)
class AccountResult:
    """How one account's sync ended: its run's outcome, or why it never ran."""

    client_id: str
    outcome: SyncOutcome | None
    error: str | None
    exit_code: int


def exit_code_for_signal(signum: int) -> int:
    """130 after SIGINT, 143 after SIGTERM (128 + the signal's number, as shells say)."""
    return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


def exit_code_for(outcome: SyncOutcome, *, signalled: int | None = None) -> int:
    """The exit code a scheduler should see for one run; ``signalled``: the signal that stopped it.

    A run interrupted without a signal lost its lease: it did not finish here
    (another process, or the next run, finishes it), so 1.
    """
    if signalled is not None:
        return exit_code_for_signal(signalled)
    if isinstance(outcome.fatal, AuthError):
        return EXIT_AUTH
    if outcome.status is RunStatus.SUCCEEDED:
        return EXIT_OK
    return EXIT_FAILURES


def combined_exit_code(results: list[AccountResult]) -> int:
    """One code for many accounts: theirs when they agree, else 1 if any failed."""
    codes = {r.exit_code for r in results}
    if len(codes) == 1:
        return codes.pop()
    for interrupted in (EXIT_SIGTERM, EXIT_SIGINT):
        if interrupted in codes:
            return interrupted
    return EXIT_FAILURES if codes - {EXIT_OK} else EXIT_OK


async def sync_many(
    settings_list: list[Settings],
    store: Store,
    *,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[RunProgress], None] | None = None,
    metrics: Metrics | None = None,
    signalled: Callable[[], int | None] = lambda: None,
    runtime: ProcessRuntime | None = None,
) -> list[AccountResult]:
    """Sync several accounts side by side, each with its own token, budget and run.

    One account failing (credentials refused, platform down for it, its run held
    by another process) neither stops nor slows the others. They all share the
    process's ``runtime``; without one, it is built here and closed at the end.
    """
    own: ProcessRuntime | None = None
    if runtime is None:
        runtime = own = ProcessRuntime(store, rate_margin=process_rate_margin(settings_list))

    async def one(settings: Settings) -> AccountResult:
        try:
            outcome = await sync_account(
                settings,
                store,
                clock=clock,
                stop=stop,
                on_progress=on_progress,
                metrics=metrics,
                runtime=runtime,
                accounts=len(settings_list),
            )
        except ConfigError as exc:
            return AccountResult(settings.client_id, None, str(exc), EXIT_CONFIG)
        except AuthError as exc:
            return AccountResult(settings.client_id, None, str(exc), EXIT_AUTH)
        except AdsyncError as exc:
            return AccountResult(settings.client_id, None, str(exc), EXIT_FAILURES)
        return AccountResult(
            settings.client_id,
            outcome,
            outcome.error,
            exit_code_for(outcome, signalled=signalled()),
        )

    # A task each, so each run's log context (run id, client id) stays its own.
    tasks = [asyncio.create_task(one(s), name=f"account:{s.client_id}") for s in settings_list]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        if own is not None:
            await own.aclose()


def process_rate_margin(settings_list: list[Settings]) -> float:
    """The jitter margin a process starts from: the widest its accounts' settings ask for.

    ``AD_PLATFORM_RATE_MARGIN`` is a process setting (the accounts file cannot set
    it), so the accounts agree; the widest is the safe choice if they do not.
    """
    return max((s.rate_margin for s in settings_list), default=Margin().fraction)
