"""The job queue: deferring sync jobs, the stalled-job recovery, the clean-up of old jobs.

The sync jobs of an account are deferred with ``lock`` and ``queueing_lock`` both set
to ``adsync:account:<client id>``: the lock lets at most one job of an account run at
a time (PostgreSQL enforces it with a unique index over ``doing`` jobs), the queueing
lock keeps at most one waiting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Final

import procrastinate
import psycopg
import psycopg.sql
import structlog
from procrastinate import builtin_tasks
from procrastinate import exceptions as pexc
from procrastinate.jobs import Job, Status
from procrastinate.schema import SchemaManager

from adsync.errors import StoreError, StoreUnavailable
from adsync.store import SqlStore, local_owner_is_dead
from adsync.worker.names import (
    PRUNE_TASK,
    QUEUE_MAINTENANCE,
    QUEUE_SYNC,
    RECOVER_TASK,
    SCHEDULE_TASK,
    SYNC_TASK,
    account_lock,
)

__all__ = [
    "PRUNE_TASK",
    "QUEUE_MAINTENANCE",
    "QUEUE_SYNC",
    "RECOVER_TASK",
    "SCHEDULE_TASK",
    "SYNC_TASK",
    "Enqueued",
    "Recovery",
    "account_lock",
    "db_error_name",
    "defer_sync",
    "enqueue_accounts",
    "ensure_queue_schema",
    "lost_connection",
    "recover_stalled",
    "remove_finished_jobs",
]

log = structlog.get_logger("adsync.worker")

# Only has to be the same in every adsync process and differ from the store's
# migration lock (…01).
_QUEUE_SCHEMA_LOCK: Final = 0x61_64_73_79_6E_63_02


async def ensure_queue_schema(conninfo: str) -> bool:
    """Create Procrastinate's tables unless they exist; True when this call created them.

    Safe when several workers start at once: the check and the creation run in one
    transaction under an advisory lock, so the later ones wait, then find the tables.
    """
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=10)
        async with conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_SCHEMA_LOCK,))
            await _create_search_path_schema(conn)
            cursor = await conn.execute("SELECT to_regclass('procrastinate_jobs')")
            row = await cursor.fetchone()
            if row is not None and row[0] is not None:
                return False
            await conn.execute(SchemaManager.get_schema())
            return True
    except psycopg.Error as exc:
        raise StoreError(f"cannot prepare the job queue in PostgreSQL: {exc}") from exc


async def _create_search_path_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    # As the store's migrations do: ADSYNC_DB_SCHEMA's schema is made on first use.
    cursor = await conn.execute("SELECT current_schema()")
    row = await cursor.fetchone()
    if row is not None and row[0] is not None:
        return
    cursor = await conn.execute("SELECT current_setting('search_path')")
    row = await cursor.fetchone()
    first = str(row[0] if row else "").split(",")[0].strip().strip('"')
    if first and first != "$user":
        await conn.execute(
            psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(psycopg.sql.Identifier(first))
        )


async def defer_sync(
    app: procrastinate.App,
    client_id: str,
    *,
    attempt: int = 1,
    delay: float = 0.0,
    run_id: str | None = None,
) -> int | None:
    """Queue a sync of ``client_id``; its job id, or None when one is already waiting.

    ``run_id`` makes the job a further attempt at that run: it ends as done if the
    run has ended well by then, instead of starting a new one.
    """
    key = account_lock(client_id)
    deferrer = app.configure_task(
        SYNC_TASK,
        lock=key,
        queueing_lock=key,
        schedule_in={"seconds": delay} if delay > 0 else None,
    )
    kwargs: dict[str, Any] = {"client_id": client_id, "attempt": attempt}
    if run_id is not None:
        kwargs["run_id"] = run_id
    try:
        job_id: int = await deferrer.defer_async(**kwargs)
    except pexc.AlreadyEnqueued:
        return None
    except pexc.ConnectorException as exc:
        error = StoreUnavailable if lost_connection(exc) else StoreError
        raise error(f"cannot queue a sync of {client_id!r}: {db_error_name(exc)}") from exc
    return job_id


@dataclass(frozen=True, slots=True)
class Enqueued:
    """Which accounts got a new job, and which already had one waiting."""

    queued: list[str]
    waiting: list[str]


async def enqueue_accounts(app: procrastinate.App, client_ids: list[str]) -> Enqueued:
    """One sync job per account, never a second waiting one."""
    queued: list[str] = []
    waiting: list[str] = []
    for client_id in client_ids:
        job_id = await defer_sync(app, client_id)
        (queued if job_id is not None else waiting).append(client_id)
    return Enqueued(queued, waiting)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What one pass of the stalled-job recovery did, by job id."""

    retried: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    # Their worker is silent but their run still renews its lease: alive, only paused
    # or cut off for a while. Left alone until the lease runs out.
    alive: list[int] = field(default_factory=list)


async def recover_stalled(
    app: procrastinate.App, *, stalled_after: float, store: SqlStore | None = None
) -> Recovery:
    """Put back in the queue the jobs of workers silent for ``stalled_after`` seconds.

    With ``store``, a sync job whose account's run still holds its lease is left
    alone: a worker that is paused, or cut off from the job queue for a while, looks
    dead to Procrastinate but still runs the job, and a second attempt could only
    wait for it. Its lease (renewed by the run itself) says whether it is alive.

    A stalled job whose account already has a job waiting cannot go back to
    ``todo`` (the queueing lock's unique index, procrastinate #1446); it is closed
    as failed instead, which frees the account's lock for the waiting job, and that
    one resumes the run.
    """
    result = Recovery()
    jobs = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after)
    for job in jobs:
        assert job.id is not None  # noqa: S101 - jobs read from the database have ids
        if store is not None and await _run_is_alive(store, job):
            result.alive.append(job.id)
            continue
        try:
            await app.job_manager.retry_job(job)
        except pexc.UniqueViolation:
            await app.job_manager.finish_job(job, status=Status.FAILED, delete_job=False)
            result.closed.append(job.id)
        except pexc.ConnectorException:
            # Another worker's recovery got to it first (it is no longer "doing").
            result.skipped.append(job.id)
        else:
            result.retried.append(job.id)
    if result.retried or result.closed:
        log.warning(
            "recovered stalled jobs of dead workers",
            retried=result.retried,
            closed=result.closed,
        )
    if result.alive:
        log.info(
            "jobs of silent workers left alone: their runs still renew their leases",
            jobs=result.alive,
        )
    return result


async def _run_is_alive(store: SqlStore, job: Job) -> bool:
    client_id = job.task_kwargs.get("client_id")
    if job.task_name != SYNC_TASK or not isinstance(client_id, str):
        return False
    run = await asyncio.to_thread(store.live_run, client_id)
    return run is not None and not local_owner_is_dead(run.owner)


def lost_connection(exc: BaseException) -> bool:
    """Whether a job-queue error means the database is not answering (worth waiting out)."""
    cause = exc.__cause__ if isinstance(exc, pexc.ConnectorException) else exc
    return isinstance(cause, psycopg.OperationalError)


def db_error_name(exc: BaseException) -> str:
    """The name of what failed: the driver's error under Procrastinate's wrapper."""
    cause = exc.__cause__ if isinstance(exc, pexc.ConnectorException) else None
    return type(cause or exc).__name__


async def remove_finished_jobs(context: procrastinate.JobContext, *, max_hours: int) -> None:
    """Delete the jobs that ended over ``max_hours`` ago, and their events, whatever their end.

    Procrastinate's own clean-up, of every finished job: nothing else deletes them,
    and every recovery tick and sync leaves a job and its events behind. Jobs waiting
    or running are kept.
    """
    await builtin_tasks.remove_old_jobs(
        context,
        max_hours=max_hours,
        remove_failed=True,
        remove_cancelled=True,
        remove_aborted=True,
    )
    log.info("removed finished jobs older than the retention", max_hours=max_hours)
