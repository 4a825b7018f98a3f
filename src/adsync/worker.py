"""Scale-out on Procrastinate: one sync job per account, the schedule, stalled-job recovery.

Three tasks live on the PostgreSQL adsync already uses:

``adsync.sync_account`` (queue ``adsync-sync``)
    One account's sync. Deferred with ``lock`` and ``queueing_lock`` both set to
    ``adsync:account:<client id>``: the lock lets at most one job of an account run
    at a time (PostgreSQL enforces it with a unique index over ``doing`` jobs), the
    queueing lock keeps at most one waiting.
``adsync.schedule`` (queue ``adsync-maintenance``, periodic)
    Defers one sync job per enabled account every ``ADSYNC_SCHEDULE_MINUTES``.
``adsync.recover_stalled`` (queue ``adsync-maintenance``, periodic)
    Puts the jobs of dead workers (no heartbeat for ``ADSYNC_STALLED_AFTER_SECONDS``)
    back in the queue: Procrastinate never retries them by itself.

Why the sync task has no Procrastinate retry strategy: a retry moves the job from
``doing`` back to ``todo``; when a job of the same account was queued meanwhile (the
schedule does exactly that), the unique index of the queueing lock refuses the
update, the worker cannot record the job's end, and the job stays ``doing`` for
good, holding the account's lock (procrastinate issues #1446 and #1543). So a
failed attempt defers a *new* job instead, scheduled after the backoff; if one is
already waiting, that one carries on. Either way the next attempt resumes the
run's checkpoint (:meth:`adsync.store.SqlStore.claim_run`), it does not start over.

The recovery task has a queueing lock but no lock: a recovery job whose own worker
died would otherwise hold that lock and block every later recovery (#1408). And
each worker process runs a second Procrastinate worker on the maintenance queue,
so neither the schedule nor the recovery ever waits behind hours of syncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import procrastinate
import psycopg
import structlog
from procrastinate import exceptions as pexc
from procrastinate.jobs import Status
from procrastinate.schema import SchemaManager
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from structlog.typing import FilteringBoundLogger

from adsync.accounts import load_accounts, select
from adsync.config import MAX_SECONDS, Settings
from adsync.errors import (
    AdsyncError,
    AuthError,
    ConfigError,
    JobFailed,
    PermanentError,
    PlatformError,
    StoreError,
)
from adsync.metrics import NAMESPACE, Metrics, check_port, listen_error
from adsync.models import RunStatus
from adsync.observability import REDACTOR
from adsync.ratelimit import Margin, SendLogBatcher
from adsync.runner import sync_account
from adsync.store import SqlStore
from adsync.sync import RunWriter, SyncOutcome

__all__ = [
    "QUEUE_MAINTENANCE",
    "QUEUE_SYNC",
    "Action",
    "Decision",
    "Health",
    "HealthServer",
    "JobFailed",
    "JobRetryPolicy",
    "WorkerRuntime",
    "WorkerSettings",
    "account_lock",
    "build_app",
    "decide",
    "defer_sync",
    "enqueue_accounts",
    "ensure_queue_schema",
    "queue_conninfo",
    "recover_stalled",
    "recovery_cron",
    "schedule_cron",
    "serve",
]

log = structlog.get_logger("adsync.worker")

QUEUE_SYNC: Final = "adsync-sync"
QUEUE_MAINTENANCE: Final = "adsync-maintenance"
SYNC_TASK: Final = "adsync.sync_account"
SCHEDULE_TASK: Final = "adsync.schedule"
RECOVER_TASK: Final = "adsync.recover_stalled"
_RUNTIME_KEY: Final = "adsync"
# Only has to be the same in every adsync process and differ from the store's
# migration lock (…01).
_QUEUE_SCHEMA_LOCK: Final = 0x61_64_73_79_6E_63_02


# --- settings -----------------------------------------------------------------------


class WorkerSettings(BaseSettings):
    """The worker's knobs, from the environment and ``.env``."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    schedule_minutes: int = Field(default=60, validation_alias="ADSYNC_SCHEDULE_MINUTES", ge=0)
    heartbeat_seconds: float = Field(
        default=10.0, validation_alias="ADSYNC_WORKER_HEARTBEAT_SECONDS", gt=0, le=MAX_SECONDS
    )
    stalled_after_seconds: float = Field(
        default=60.0, validation_alias="ADSYNC_STALLED_AFTER_SECONDS", gt=0, le=MAX_SECONDS
    )
    recovery_every_seconds: int = Field(
        default=60, validation_alias="ADSYNC_RECOVERY_EVERY_SECONDS", ge=1
    )
    poll_seconds: float = Field(
        default=5.0, validation_alias="ADSYNC_WORKER_POLL_SECONDS", gt=0, le=MAX_SECONDS
    )
    grace_seconds: float = Field(
        default=60.0, validation_alias="ADSYNC_WORKER_GRACE_SECONDS", ge=0, le=MAX_SECONDS
    )
    retry_attempts: int = Field(default=6, validation_alias="ADSYNC_RETRY_ATTEMPTS", ge=1)
    retry_initial_seconds: float = Field(
        default=30.0, validation_alias="ADSYNC_RETRY_INITIAL_SECONDS", ge=0, le=MAX_SECONDS
    )
    retry_max_seconds: float = Field(
        default=900.0, validation_alias="ADSYNC_RETRY_MAX_SECONDS", ge=0, le=MAX_SECONDS
    )

    @model_validator(mode="after")
    def _coherent(self) -> WorkerSettings:
        # A live worker whose heartbeat is merely late must never look dead: its
        # jobs would be handed to another worker while still running.
        if self.stalled_after_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                "ADSYNC_STALLED_AFTER_SECONDS must be at least 3 x ADSYNC_WORKER_HEARTBEAT_SECONDS"
            )
        return self

    def retry_policy(self) -> JobRetryPolicy:
        """The backoff of failed sync attempts."""
        return JobRetryPolicy(
            max_attempts=self.retry_attempts,
            initial=self.retry_initial_seconds,
            maximum=self.retry_max_seconds,
        )


def load_worker_settings() -> WorkerSettings:
    """Read the worker settings; :class:`ConfigError` names each bad variable."""
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in e['loc']) or 'worker settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError("invalid worker settings: " + "; ".join(parts)) from None
    schedule_cron(settings.schedule_minutes)
    recovery_cron(settings.recovery_every_seconds)
    return settings


def queue_conninfo(database_url: str) -> str:
    """The libpq URL for Procrastinate; SQLite gets a :class:`ConfigError` saying why."""
    if database_url.startswith("sqlite"):
        raise ConfigError(
            "adsync worker, enqueue and schedule need PostgreSQL (Procrastinate's job "
            "queue does not run on SQLite): set DATABASE_URL=postgresql://USER@HOST/DB"
        )
    scheme, sep, rest = database_url.partition("://")
    if not sep or not scheme.startswith(("postgresql", "postgres")):
        raise ConfigError("DATABASE_URL must be postgresql://USER@HOST/DB for the job queue")
    # libpq knows postgresql:// and postgres://, not SQLAlchemy's +driver suffix.
    return f"{scheme.partition('+')[0]}://{rest}"


# --- cron ---------------------------------------------------------------------------

_MINUTE_STEPS = "1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60"


def schedule_cron(minutes: int) -> str | None:
    """A cron string for "every ``minutes`` minutes"; ``None`` when 0 (no schedule).

    Cron can only step evenly through an hour or a day, so other intervals are refused
    rather than drifting (``*/45`` would fire at :00 and :45, 15 minutes apart).
    """
    if minutes == 0:
        return None
    if minutes > 0 and 60 % minutes == 0:
        return "0 * * * *" if minutes == 60 else f"*/{minutes} * * * *"
    if minutes > 0 and minutes % 60 == 0 and 1440 % minutes == 0:
        hours = minutes // 60
        return "0 0 * * *" if hours == 24 else f"0 */{hours} * * *"
    raise ConfigError(
        f"ADSYNC_SCHEDULE_MINUTES={minutes} is not an even step of cron: use 0 (off), "
        f"{_MINUTE_STEPS}, or whole hours that divide a day (120, 180, 240, 360, 480, 720, 1440)"
    )


def recovery_cron(seconds: int) -> str:
    """A cron string for "every ``seconds`` seconds".

    Procrastinate's croniter reads a sixth field as seconds and expects it *last*:
    ``* * * * * */5`` is every 5 seconds, while ``*/5 * * * * *`` would be every
    second of every fifth minute.
    """
    if 0 < seconds < 60 and 60 % seconds == 0:
        return f"* * * * * */{seconds}"
    if seconds >= 60 and seconds % 60 == 0:
        cron = schedule_cron(seconds // 60)
        if cron is not None:
            return cron
    raise ConfigError(
        f"ADSYNC_RECOVERY_EVERY_SECONDS={seconds} is not an even step of cron: use a divisor "
        "of 60 or a whole number of minutes that divides an hour"
    )


# --- what to do after an attempt ----------------------------------------------------


class Action(StrEnum):
    """What the worker does once a sync attempt has ended."""

    DONE = "done"  # synced (or partly: failed campaigns are recorded); nothing to redo
    RETRY = "retry"  # transient failure: a new attempt after the backoff, resuming the run
    CONTINUE = "continue"  # the worker is stopping: another worker picks the run up now
    GIVE_UP = "give_up"  # retrying cannot help (credentials, config) or attempts exhausted


@dataclass(frozen=True, slots=True)
class Decision:
    """The worker's verdict on one attempt."""

    action: Action
    reason: str
    delay: float = 0.0
    next_attempt: int | None = None


@dataclass(frozen=True, slots=True)
class JobRetryPolicy:
    """Backoff of failed attempts: exponential, capped, jittered."""

    max_attempts: int = 6
    initial: float = 30.0
    maximum: float = 900.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds before the attempt after ``attempt``: half to all of the capped doubling.

        The random half keeps accounts that failed together (platform down for all)
        from coming back in lockstep.
        """
        base = min(self.maximum, self.initial * 2.0 ** max(0, attempt - 1))
        return base * (0.5 + rng.random() / 2)


def is_retryable(error: BaseException) -> bool:
    """Whether another attempt can succeed where this one failed."""
    if isinstance(error, ConfigError | AuthError | PermanentError):
        return False
    # Platform down or inconsistent listing, database down, run held by a live
    # process (its lease ends), network trouble: all pass.
    return isinstance(error, PlatformError | StoreError | OSError)


def decide(
    attempt: int,
    policy: JobRetryPolicy,
    rng: random.Random,
    *,
    outcome: SyncOutcome | None = None,
    error: BaseException | None = None,
    stopping: bool = False,
) -> Decision:
    """Decide what follows attempt number ``attempt`` of an account's sync.

    ``outcome`` is the run's end when the run was reached, ``error`` what stopped it
    before (bad account entry, run locked, database down); ``stopping`` says this
    worker is shutting down.
    """
    if outcome is not None:
        if outcome.status in (RunStatus.SUCCEEDED, RunStatus.PARTIAL):
            return Decision(Action.DONE, f"run {outcome.status.value}")
        if outcome.status is RunStatus.INTERRUPTED:
            if outcome.taken_over:
                # Another process holds the run now and finishes it.
                return Decision(Action.DONE, "another process took the run over")
            if stopping:
                return Decision(
                    Action.CONTINUE, "worker stopping; run left resumable", 0.0, attempt
                )
            # The lease could not be renewed (database trouble): resume it soon.
            error = error or StoreError(outcome.error or "run interrupted")
        else:
            error = outcome.fatal or error
            if error is None:
                error = AdsyncError(outcome.error or "run failed")
    if error is None:
        return Decision(Action.DONE, "nothing to do")
    reason = f"{type(error).__name__}: {error}"
    if not is_retryable(error):
        return Decision(Action.GIVE_UP, f"not retried ({reason})")
    if attempt >= policy.max_attempts:
        return Decision(
            Action.GIVE_UP,
            f"gave up after {attempt} attempts ({reason}); the run stays resumable and "
            "the next scheduled job resumes it",
        )
    return Decision(Action.RETRY, reason, policy.delay(attempt, rng), attempt + 1)


# --- the queue ----------------------------------------------------------------------


def account_lock(client_id: str) -> str:
    """The lock and queueing lock of an account's sync jobs."""
    return f"adsync:account:{client_id}"


async def ensure_queue_schema(conninfo: str) -> bool:
    """Create Procrastinate's tables unless they exist; True when this call created them.

    Safe when several workers start at once: the check and the creation run in one
    transaction under an advisory lock, so the later ones wait, then find the tables.
    """
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=10)
        async with conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_SCHEMA_LOCK,))
            cursor = await conn.execute("SELECT to_regclass('procrastinate_jobs')")
            row = await cursor.fetchone()
            if row is not None and row[0] is not None:
                return False
            await conn.execute(SchemaManager.get_schema())
            return True
    except psycopg.Error as exc:
        raise StoreError(f"cannot prepare the job queue in PostgreSQL: {exc}") from exc


def build_app(conninfo: str, settings: WorkerSettings, *, pool_size: int = 10) -> procrastinate.App:
    """The Procrastinate app: the three tasks and their schedules, over ``conninfo``.

    Build it at the edge (CLI, tests, bench) and open it with ``app.open_async()``.
    """
    connector = procrastinate.PsycopgConnector(
        conninfo=conninfo,
        # libpq waits forever for an unreachable host by default.
        kwargs={"connect_timeout": 10},
        min_size=1,
        max_size=pool_size,
    )
    app = procrastinate.App(connector=connector)
    app.task(name=SYNC_TASK, queue=QUEUE_SYNC, pass_context=True)(_sync_task)
    schedule = app.task(
        name=SCHEDULE_TASK,
        queue=QUEUE_MAINTENANCE,
        pass_context=True,
        queueing_lock=SCHEDULE_TASK,
    )(_schedule_task)
    cron = schedule_cron(settings.schedule_minutes)
    if cron is not None:
        app.periodic(cron=cron, periodic_id="accounts")(schedule)
    recover = app.task(
        name=RECOVER_TASK,
        queue=QUEUE_MAINTENANCE,
        pass_context=True,
        queueing_lock=RECOVER_TASK,
    )(_recover_task)
    app.periodic(cron=recovery_cron(settings.recovery_every_seconds), periodic_id="stalled")(
        recover
    )
    return app


async def defer_sync(
    app: procrastinate.App, client_id: str, *, attempt: int = 1, delay: float = 0.0
) -> int | None:
    """Queue a sync of ``client_id``; its job id, or None when one is already waiting."""
    key = account_lock(client_id)
    deferrer = app.configure_task(
        SYNC_TASK,
        lock=key,
        queueing_lock=key,
        schedule_in={"seconds": delay} if delay > 0 else None,
    )
    try:
        job_id: int = await deferrer.defer_async(client_id=client_id, attempt=attempt)
    except pexc.AlreadyEnqueued:
        return None
    except pexc.ConnectorException as exc:
        raise StoreError(f"cannot queue a sync of {client_id!r}: {exc}") from exc
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


async def recover_stalled(app: procrastinate.App, *, stalled_after: float) -> Recovery:
    """Put back in the queue the jobs of workers silent for ``stalled_after`` seconds.

    A stalled job whose account already has a job waiting cannot go back to
    ``todo`` (the queueing lock's unique index, procrastinate #1446); it is closed
    as failed instead, which frees the account's lock for the waiting job, and that
    one resumes the run.
    """
    result = Recovery()
    jobs = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after)
    for job in jobs:
        assert job.id is not None  # noqa: S101 - jobs read from the database have ids
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
    return result


# --- the worker's side: runtime, tasks ----------------------------------------------


class WorkerMetrics:
    """Metrics of the worker itself, on the same registry as the sync metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "worker_sync_jobs",
            "Sync jobs ended, by what the worker decided (done, retry, continue, give_up).",
            ["decision"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.recovered = Counter(
            "worker_stalled_jobs",
            "Jobs of dead workers put back in the queue (retried) or closed for a waiting one.",
            ["action"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.loop_time = Gauge(
            "worker_loop_timestamp_seconds",
            "Unix time the worker's event loop last ticked.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.database_up = Gauge(
            "worker_database_up",
            "1 when the worker's last database check succeeded, else 0.",
            namespace=NAMESPACE,
            registry=registry,
        )


@dataclass
class WorkerRuntime:
    """What the tasks of one worker process share: store, metrics, stop signals."""

    store: SqlStore
    accounts_file: Path
    policy: JobRetryPolicy
    stalled_after: float
    metrics: Metrics
    worker_metrics: WorkerMetrics
    rng: random.Random = field(default_factory=random.Random)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # How many syncs may run at once here; their writes and their reservations in
    # the shared rate log go together, many per transaction, as in `sync --all`.
    concurrency: int = 1
    # What one job learns about arrival jitter protects the others (made by the
    # first job, from its account's configured margin).
    margin: Margin | None = None
    writer: RunWriter = field(init=False)
    send_log: SendLogBatcher = field(init=False)
    # Each running sync has its own stop event: a run that loses its lease sets its
    # own, which must not stop the other accounts' runs.
    _running: dict[asyncio.Task[Any], asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.writer = RunWriter(self.store)
        self.send_log = SendLogBatcher(self.store.send_log())

    async def aclose(self) -> None:
        """Stop the rate log's thread (after the last job)."""
        await self.send_log.aclose()

    def stop_gracefully(self) -> None:
        """No new sync calls in any running job; in-flight calls finish, runs stay resumable."""
        self.stopping.set()
        for event in self._running.values():
            event.set()

    def stop_now(self) -> None:
        """Cancel the running syncs (their runs are recorded interrupted, resumable)."""
        for task in list(self._running):
            task.cancel()

    @contextlib.contextmanager
    def job_stop(self) -> Iterator[asyncio.Event]:
        """The stop event of the job running in the current task."""
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - only called from a running job
        event = asyncio.Event()
        if self.stopping.is_set():
            event.set()
        self._running[task] = event
        try:
            yield event
        finally:
            self._running.pop(task, None)


def _runtime(context: procrastinate.JobContext) -> WorkerRuntime:
    runtime = context.additional_context.get(_RUNTIME_KEY)
    if not isinstance(runtime, WorkerRuntime):
        raise TypeError("adsync tasks run only in `adsync worker` (no runtime in context)")
    return runtime


def account_settings(accounts_file: Path, client_id: str) -> Settings:
    """The settings of ``client_id``, read afresh so that edits apply without a restart."""
    (account,) = select(load_accounts(accounts_file), [client_id])
    settings = account.settings()
    REDACTOR.register(settings.password.get_secret_value())
    return settings


async def _sync_task(
    context: procrastinate.JobContext, client_id: str, attempt: int = 1
) -> dict[str, Any]:
    return await run_sync_job(context.app, _runtime(context), client_id, attempt, context.job.id)


async def run_sync_job(
    app: procrastinate.App,
    runtime: WorkerRuntime,
    client_id: str,
    attempt: int,
    job_id: int | None = None,
) -> dict[str, Any]:
    """One attempt at an account's sync, and what follows it (see :func:`decide`).

    Returns a summary when the account is done; raises :class:`JobFailed` (job
    ``failed``) or Procrastinate's ``JobAborted`` (job ``aborted``, when the worker
    stops) otherwise, after queueing the follow-up job if there is one.
    """
    bound: FilteringBoundLogger = log.bind(client_id=client_id, job_id=job_id, attempt=attempt)
    outcome: SyncOutcome | None = None
    error: BaseException | None = None
    with runtime.job_stop() as stop:
        try:
            settings = account_settings(runtime.accounts_file, client_id)
            if runtime.margin is None:
                runtime.margin = Margin(settings.rate_margin)
            outcome = await sync_account(
                settings,
                runtime.store,
                stop=stop,
                metrics=runtime.metrics,
                send_log=runtime.send_log,
                margin=runtime.margin,
                writer=runtime.writer,
                accounts=runtime.concurrency,
            )
        except asyncio.CancelledError:
            # Aborted: a second signal, or the grace period ran out. The run is
            # already recorded interrupted; when the worker is going away, someone
            # else must carry on.
            if runtime.stopping.is_set():
                runtime.worker_metrics.jobs.labels(Action.CONTINUE.value).inc()
                try:
                    await asyncio.shield(defer_sync(app, client_id, attempt=attempt))
                except Exception as exc:  # noqa: BLE001 - best effort while going down
                    # The run stays resumable; the next schedule tick picks it up.
                    bound.warning("could not queue the run for another worker", error=str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is classified by decide()
            error = exc
    decision = decide(
        attempt,
        runtime.policy,
        runtime.rng,
        outcome=outcome,
        error=error,
        stopping=runtime.stopping.is_set(),
    )
    runtime.worker_metrics.jobs.labels(decision.action.value).inc()
    return await _follow_up(app, client_id, decision, outcome, bound)


async def _follow_up(
    app: procrastinate.App,
    client_id: str,
    decision: Decision,
    outcome: SyncOutcome | None,
    bound: FilteringBoundLogger,
) -> dict[str, Any]:
    reason = REDACTOR.scrub(decision.reason)
    if decision.action is Action.DONE:
        summary: dict[str, Any] = {"client_id": client_id, "decision": reason}
        if outcome is not None:
            c = outcome.counters
            summary |= {
                "run_id": outcome.run_id,
                "status": outcome.status.value,
                "synced": c.synced,
                "failed": c.failed,
                "requests": c.requests,
                "rate_limited": c.rate_limited,
                "resumed": outcome.resumed,
            }
        bound.info("sync job done", **summary)
        return summary
    if decision.action is Action.GIVE_UP:
        bound.error("sync job failed", reason=reason)
        raise JobFailed(f"{client_id}: {reason}")
    assert decision.next_attempt is not None  # noqa: S101 - set for RETRY and CONTINUE
    next_id = await defer_sync(app, client_id, attempt=decision.next_attempt, delay=decision.delay)
    then = (
        f"job {next_id} (attempt {decision.next_attempt}) in {decision.delay:.0f}s"
        if next_id is not None
        else "the job already waiting for this account"
    )
    if decision.action is Action.CONTINUE:
        bound.info("sync job handed over", reason=reason, next=then)
        raise pexc.JobAborted(f"{client_id}: {reason}; resumed by {then}")
    bound.warning("sync attempt failed; retrying", reason=reason, next=then)
    raise JobFailed(f"{client_id}: {reason}; resumed by {then}")


async def _schedule_task(context: procrastinate.JobContext, timestamp: int) -> dict[str, Any]:
    runtime = _runtime(context)
    accounts = select(load_accounts(runtime.accounts_file), [])
    result = await enqueue_accounts(context.app, [a.client_id for a in accounts])
    log.info("scheduled syncs", queued=len(result.queued), already_waiting=len(result.waiting))
    return {"queued": len(result.queued), "already_waiting": len(result.waiting)}


async def _recover_task(context: procrastinate.JobContext, timestamp: int) -> dict[str, Any]:
    runtime = _runtime(context)
    result = await recover_stalled(context.app, stalled_after=runtime.stalled_after)
    runtime.worker_metrics.recovered.labels("retried").inc(len(result.retried))
    runtime.worker_metrics.recovered.labels("closed").inc(len(result.closed))
    return {"retried": result.retried, "closed": result.closed, "skipped": result.skipped}


# --- health ---------------------------------------------------------------------------


@dataclass(slots=True)
class Health:
    """What ``/healthz`` reports: is the event loop turning, is the database answering.

    Written on the event loop (:func:`watch_health`, the accounts check), read by the
    HTTP thread. The loop and the database are watched apart, so a database that
    hangs is reported as such, not as a silent loop.
    """

    max_silence: float
    clock: Callable[[], float] = time.monotonic
    loop_at: float | None = None
    db_ok_at: float | None = None
    db_error: str | None = None
    # When the database check now waiting for its answer was sent.
    db_asked_at: float | None = None
    stopping: bool = False
    # Enabled accounts this worker cannot serve, with why (their jobs go to other workers).
    unservable: dict[str, str] = field(default_factory=dict)

    def tick(self) -> None:
        """The event loop is turning."""
        self.loop_at = self.clock()

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): unhealthy when the loop or the database is silent too long.

        Accounts this worker cannot serve are listed but leave it healthy: it still
        serves the others, and restarting it would not bring their secrets.
        """
        now = self.clock()
        loop_age = None if self.loop_at is None else now - self.loop_at
        db_age = None if self.db_ok_at is None else now - self.db_ok_at
        problems: list[str] = []
        if loop_age is None:
            problems.append("worker loop not started")
        elif loop_age > self.max_silence:
            problems.append(f"worker loop silent for {loop_age:.0f}s")
        if db_age is None or db_age > self.max_silence:
            if self.db_asked_at is not None and now - self.db_asked_at > self.max_silence:
                why = f"no reply for {now - self.db_asked_at:.0f}s"
            else:
                why = self.db_error or "no answer yet"
            problems.append(f"database not answering ({why})")
        unservable = dict(self.unservable)
        status = "unhealthy" if problems else "degraded" if unservable else "ok"
        body: dict[str, Any] = {
            "status": status,
            "problems": problems,
            "loop_age_seconds": None if loop_age is None else round(loop_age, 3),
            "database_age_seconds": None if db_age is None else round(db_age, 3),
            "stopping": self.stopping,
            "unservable_accounts": unservable,
        }
        return not problems, body


async def watch_health(
    app: procrastinate.App, health: Health, metrics: WorkerMetrics, every: float
) -> None:
    """Tick the loop timestamp and check the database every ``every`` seconds, forever.

    Two tasks: a database check that hangs (a stopped proxy, a server that accepts
    and never answers) must not stop the loop's ticks, or ``/healthz`` would blame
    the loop for the database's silence.
    """

    async def ticks() -> None:
        while True:
            health.tick()
            metrics.loop_time.set(time.time())
            await asyncio.sleep(every)

    ticking = asyncio.create_task(ticks(), name="health-ticks")
    # Generous: a slow answer is still an answer. Past it, a check on a connection
    # that died silently is given up for a new one.
    patience = max(30.0, 3 * every)
    try:
        while True:
            if health.db_asked_at is None:
                health.db_asked_at = health.clock()
            try:
                async with asyncio.timeout(patience):
                    ok = await app.check_connection_async()
            except TimeoutError:
                # Still no reply: db_asked_at keeps the time of the first question.
                ok, health.db_error = False, "no reply"
            except Exception as exc:  # noqa: BLE001 - any failure means "not answering"; keep watching
                ok, health.db_error, health.db_asked_at = False, _db_error_name(exc), None
            else:
                health.db_error = None if ok else "procrastinate tables missing"
                health.db_asked_at = None
            if ok:
                health.db_ok_at = health.clock()
            metrics.database_up.set(1 if ok else 0)
            await asyncio.sleep(every)
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)


def _db_error_name(exc: BaseException) -> str:
    """The name of what failed: the driver's error under Procrastinate's wrapper."""
    cause = exc.__cause__ if isinstance(exc, pexc.ConnectorException) else None
    return type(cause or exc).__name__


class HealthServer:
    """``/healthz`` (JSON, 200 or 503) and ``/metrics`` over HTTP, in a background thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Health,
        port: int,
        addr: str = "127.0.0.1",
        *,
        options: tuple[str, str] = ("--health-port", "--health-addr"),
    ) -> None:
        handler = _handler(registry, health)
        check_port(port, options[0])
        try:
            self._server = ThreadingHTTPServer((addr, port), handler)
        except OSError as exc:
            raise listen_error(exc, port, addr, options) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="adsync-health", daemon=True
        )
        self._thread.start()
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, body = health.report()
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._send(
                    404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n"
                )

        def _send(self, code: int, content_type: str, payload: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes every few seconds would drown the worker's own log lines.
            return

    return Handler


# --- running a worker -----------------------------------------------------------------


async def serve(
    app: procrastinate.App,
    runtime: WorkerRuntime,
    settings: WorkerSettings,
    *,
    concurrency: int,
    health: Health | None = None,
) -> int:
    """Run the sync and maintenance workers until SIGTERM/SIGINT; the exit code.

    The first signal stops fetching jobs and tells running syncs to make no new
    calls; their in-flight calls finish, each run is recorded interrupted (resumable)
    and a new job is queued for it, so another worker carries on at once. Jobs still
    running after ``ADSYNC_WORKER_GRACE_SECONDS`` are aborted the same way; a second
    signal aborts them at once. 0 after a stop by signal, 1 when a worker died by
    itself (e.g. the database went away).
    """
    loop = asyncio.get_running_loop()
    requested = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("stopping: no new jobs; running syncs finish their calls, left resumable")
            if health is not None:
                health.stopping = True
            runtime.stop_gracefully()
            requested.set()
        else:
            log.warning("second signal: aborting running syncs now (resumable)")
            runtime.stop_now()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    common: dict[str, Any] = {
        # Ours, above: the syncs' own stop events must be set before Procrastinate
        # stops fetching.
        "install_signal_handlers": False,
        "update_heartbeat_interval": settings.heartbeat_seconds,
        "stalled_worker_timeout": settings.stalled_after_seconds,
        "fetch_job_polling_interval": settings.poll_seconds,
        "abort_job_polling_interval": settings.poll_seconds,
        "shutdown_graceful_timeout": settings.grace_seconds,
        "additional_context": {_RUNTIME_KEY: runtime},
    }
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
    health: Health | None,
    requested: asyncio.Event,
    common: dict[str, Any],
) -> bool:
    """Run both Procrastinate workers until a stop is requested; True if one died first."""
    workers = [
        asyncio.create_task(
            app.run_worker_async(
                queues=[QUEUE_SYNC], concurrency=concurrency, name="adsync-sync", **common
            ),
            name="adsync-sync-worker",
        ),
        asyncio.create_task(
            app.run_worker_async(
                queues=[QUEUE_MAINTENANCE], concurrency=1, name="adsync-maintenance", **common
            ),
            name="adsync-maintenance-worker",
        ),
    ]
    stop_requested: asyncio.Task[Any] = asyncio.create_task(requested.wait())
    extras: list[asyncio.Task[Any]] = [stop_requested]
    if health is not None:
        watch = watch_health(app, health, runtime.worker_metrics, settings.heartbeat_seconds)
        extras.append(asyncio.create_task(watch))
    log.info("worker started", concurrency=concurrency)
    await asyncio.wait([*workers, stop_requested], return_when=asyncio.FIRST_COMPLETED)
    died = not requested.is_set()
    if died:
        log.error("a worker loop ended by itself (database lost?): stopping")
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


def next_ticks(minutes: int, now: float, count: int = 3) -> list[float]:
    """The next ``count`` Unix times a schedule of ``minutes`` fires after ``now``.

    The cron steps of :func:`schedule_cron` divide an hour or a day evenly, and
    Procrastinate's croniter counts in UTC, so they fall on multiples of the step
    since the epoch.
    """
    step = minutes * 60
    first = (int(now // step) + 1) * step
    return [float(first + i * step) for i in range(count)]
