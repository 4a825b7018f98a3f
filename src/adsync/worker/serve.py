"""Running a worker: its two Procrastinate worker loops, its watches, its stop on signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import procrastinate
import psycopg
import structlog
from procrastinate import exceptions as pexc

from adsync.errors import StoreError
from adsync.observability import REDACTOR
from adsync.worker.health import Health, watch_accounts, watch_health
from adsync.worker.queue import QUEUE_MAINTENANCE, QUEUE_SYNC
from adsync.worker.runtime import RUNTIME_KEY, WorkerRuntime
from adsync.worker.settings import WorkerSettings
from adsync.worker.supervisor import supervise, tolerate_outages

__all__ = ["serve"]

log = structlog.get_logger("adsync.worker")


async def serve(
    app: procrastinate.App,
    runtime: WorkerRuntime,
    settings: WorkerSettings,
    *,
    concurrency: int,
    health: Health,
) -> int:
    """Run the sync and maintenance workers until SIGTERM/SIGINT; the exit code.

    The first signal stops fetching jobs and tells running syncs to make no new
    calls; their in-flight calls finish, each run is recorded interrupted (resumable)
    and a new job is queued for it, so another worker carries on at once. Jobs still
    running after ``ADSYNC_WORKER_GRACE_SECONDS`` are aborted the same way; a second
    signal aborts them at once. A database that goes away is waited for (see
    :class:`OutageTolerantJobManager`): 0 after a stop by signal, 1 only when a worker
    loop failed for another reason.
    """
    loop = asyncio.get_running_loop()
    requested = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("stopping: no new jobs; running syncs finish their calls, left resumable")
            health.stopping = True
            runtime.stop_gracefully()
            requested.set()
        else:
            log.warning("second signal: aborting running syncs now (resumable)")
            runtime.stop_now()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    # Store calls run in threads. While the database is away, each running sync can
    # hold a few of them waiting (its writes, its listing); the default pool (a few
    # threads on a small machine) would then leave the leases' heartbeats queued
    # behind them, unable to tell their runs to stop in time.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=4 * concurrency + 8, thread_name_prefix="adsync-store")
    )
    common: dict[str, Any] = {
        # Ours, above: the syncs' own stop events must be set before Procrastinate
        # stops fetching.
        "install_signal_handlers": False,
        "update_heartbeat_interval": settings.heartbeat_seconds,
        "stalled_worker_timeout": settings.stalled_after_seconds,
        "fetch_job_polling_interval": settings.poll_seconds,
        "abort_job_polling_interval": settings.poll_seconds,
        "shutdown_graceful_timeout": settings.grace_seconds,
        "additional_context": {RUNTIME_KEY: runtime},
    }
    tolerate_outages(app, stopping=runtime.stopping, grace_seconds=settings.grace_seconds)
    died = False
    try:
        async with _opened(app), contextlib.aclosing(runtime):
            died = await _run_workers(
                app,
                runtime,
                settings,
                concurrency=concurrency,
                health=health,
                requested=requested,
                common=common,
            )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("worker stopped")
    return 1 if died else 0


async def _run_workers(
    app: procrastinate.App,
    runtime: WorkerRuntime,
    settings: WorkerSettings,
    *,
    concurrency: int,
    health: Health,
    requested: asyncio.Event,
    common: dict[str, Any],
) -> bool:
    """Run both Procrastinate workers until a stop is requested; True if one died first.

    Each is supervised: when one ends by itself (the database went away and came
    back in a state it could not handle), it is started again with backoff, and the
    syncs keep running meanwhile.
    """
    workers = [
        asyncio.create_task(
            supervise(
                app,
                requested,
                runtime.rng,
                queues=[QUEUE_SYNC],
                concurrency=concurrency,
                name="adsync-sync",
                **common,
            ),
            name="adsync-sync-worker",
        ),
        asyncio.create_task(
            supervise(
                app,
                requested,
                runtime.rng,
                queues=[QUEUE_MAINTENANCE],
                concurrency=1,
                name="adsync-maintenance",
                **common,
            ),
            name="adsync-maintenance-worker",
        ),
    ]
    stop_requested: asyncio.Task[Any] = asyncio.create_task(requested.wait())
    extras: list[asyncio.Task[Any]] = [
        stop_requested,
        asyncio.create_task(watch_accounts(runtime, health, every=settings.heartbeat_seconds)),
        asyncio.create_task(
            watch_health(app, health, runtime.worker_metrics, settings.heartbeat_seconds)
        ),
    ]
    log.info("worker started", concurrency=concurrency)
    await asyncio.wait([*workers, stop_requested], return_when=asyncio.FIRST_COMPLETED)
    died = not requested.is_set()
    if died:
        # Not the database (that is waited out): a fault of our own.
        log.error("a worker loop failed unexpectedly: stopping")
        runtime.stop_gracefully()
    for task in workers:
        # Procrastinate's documented way to stop a worker it does not signal itself:
        # it stops fetching, waits for running jobs up to the grace period, then aborts them.
        task.cancel()
    results = await asyncio.gather(*workers, return_exceptions=True)
    for task in extras:
        task.cancel()
    await asyncio.gather(*extras, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.error("worker ended with an error", error=REDACTOR.scrub(repr(result)))
            died = True
    return died


@contextlib.asynccontextmanager
async def _opened(app: procrastinate.App) -> AsyncIterator[procrastinate.App]:
    """``app.open_async()`` with the connector's failures as :class:`StoreError`."""
    try:
        opened = await app.open_async()
    except (pexc.ConnectorException, psycopg.Error) as exc:
        raise StoreError(f"cannot open the job queue's connection pool: {exc}") from exc
    try:
        yield opened
    finally:
        await app.close_async()
