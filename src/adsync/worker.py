"""Scale-out on Procrastinate: one sync job per account, the schedule, stalled-job recovery.

Four tasks live on the PostgreSQL adsync already uses:

``adsync.sync_account`` (queue ``adsync-sync``)
    One account's sync. Deferred with ``lock`` and ``queueing_lock`` both set to
    ``adsync:account:<client id>``: the lock lets at most one job of an account run
    at a time (PostgreSQL enforces it with a unique index over ``doing`` jobs), the
    queueing lock keeps at most one waiting.
``adsync.schedule`` (queue ``adsync-maintenance``, periodic)
    Defers one sync job per enabled account every ``ADSYNC_SCHEDULE_MINUTES``.
``adsync.recover_stalled`` (queue ``adsync-maintenance``, periodic)
    Puts the jobs of dead workers (no heartbeat for ``ADSYNC_STALLED_AFTER_SECONDS``)
    back in the queue: Procrastinate never retries them by itself. A job whose run
    still renews its lease is not dead, only paused or cut off: it is left alone.
``adsync.remove_old_jobs`` (queue ``adsync-maintenance``, periodic, hourly)
    Procrastinate's own clean-up of finished jobs older than
    ``ADSYNC_JOB_RETENTION_HOURS``: nothing else ever deletes them.

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

A job may run more than once: recovery cannot tell a dead worker from one that was
paused or cut off, and a job's end may not be recorded when the database is away.
So a job is idempotent: it knows its run (the run's lease owner carries the job id,
a follow-up job carries the run id), and a run that already ended well is not
started again; a run held by another live process is waited for; and a worker
records a job's end only while the job is still its own.

Database restarts and outages are waited out, not fatal: see
:class:`OutageTolerantJobManager` and :class:`PatientStore`.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import procrastinate
import psycopg
import structlog
from procrastinate import builtin_tasks
from procrastinate import exceptions as pexc
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager
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
    RunLocked,
    StoreError,
    StoreUnavailable,
)
from adsync.metrics import NAMESPACE, Metrics, check_port, listen_error
from adsync.models import RunStatus
from adsync.observability import REDACTOR
from adsync.ratelimit import Margin, SendLogBatcher
from adsync.runner import sync_account
from adsync.store import SqlStore, local_owner_is_dead, make_owner
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
PRUNE_TASK: Final = "adsync.remove_old_jobs"
# Hourly, off the hour: the retention is counted in hours.
PRUNE_CRON: Final = "17 * * * *"
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
    # How long a sync's writes wait for a database that does not answer before its
    # attempt fails (it is then resumed): campaigns synced meanwhile are not lost.
    db_patience_seconds: float = Field(
        default=300.0, validation_alias="ADSYNC_WORKER_DB_PATIENCE_SECONDS", ge=0, le=MAX_SECONDS
    )
    # Finished jobs (and their events) older than this are deleted, hourly.
    job_retention_hours: int = Field(
        default=72, validation_alias="ADSYNC_JOB_RETENTION_HOURS", ge=1, le=87_600
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
    # This worker cannot serve the account (its secret is missing here): another
    # worker takes the job, the attempt is not counted.
    HAND_BACK = "hand_back"


@dataclass(frozen=True, slots=True)
class Decision:
    """The worker's verdict on one attempt."""

    action: Action
    reason: str
    delay: float = 0.0
    next_attempt: int | None = None
    # The run the next attempt is about, when one was reached: the next attempt ends
    # as done if that run has ended well meanwhile, instead of starting another.
    run_id: str | None = None


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
    prune = app.task(
        name=PRUNE_TASK, queue=QUEUE_MAINTENANCE, pass_context=True, queueing_lock=PRUNE_TASK
    )(_prune_task)
    app.periodic(
        cron=PRUNE_CRON,
        periodic_id="retention",
        task_kwargs={"max_hours": settings.job_retention_hours},
    )(prune)
    return app


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
        raise error(f"cannot queue a sync of {client_id!r}: {_db_error_name(exc)}") from exc
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
        self.unservable = Gauge(
            "worker_unservable_accounts",
            "Enabled accounts this worker cannot serve (a secret it cannot read).",
            namespace=NAMESPACE,
            registry=registry,
        )


_PATIENT_WAIT: Final = 0.5
_PATIENT_WAIT_MAX: Final = 10.0


def retries_within(patience: float, *, wait: float, wait_max: float) -> int:
    """Attempts that a backoff from ``wait`` seconds, doubling up to ``wait_max``, spreads
    over at least ``patience`` seconds (the store's retry schedule)."""
    attempts, waited, step = 1, 0.0, wait
    while waited < patience:
        waited += min(step, wait_max)
        step *= 2
        attempts += 1
    return attempts


class PatientStore(SqlStore):
    """The store of a worker's runs: waits out a database outage of minutes.

    A run's writes, checkpoints and its end wait for the database to come back
    (restart, failover) instead of failing the run: the campaigns it synced
    meanwhile are written then, where a failed run would leave them to be synced a
    second time. The lease's heartbeat alone keeps ``prompt``'s short retries: a run
    that cannot renew its lease must learn it in time to stop its calls.
    """

    def __init__(
        self, prompt: SqlStore, *, patience: float, sleep: Callable[[float], None]
    ) -> None:
        super().__init__(
            prompt.engine,
            retry_attempts=retries_within(patience, wait=_PATIENT_WAIT, wait_max=_PATIENT_WAIT_MAX),
            retry_wait=_PATIENT_WAIT,
            retry_wait_max=_PATIENT_WAIT_MAX,
            sleep=sleep,
        )
        self._prompt = prompt

    def heartbeat(self, *args: Any, **kwargs: Any) -> bool:
        """The lease's heartbeat, with the prompt store's short retries."""
        return self._prompt.heartbeat(*args, **kwargs)


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
    # How often a job whose run another process holds looks whether it has ended.
    poll_seconds: float = 5.0
    # Enabled accounts this worker cannot serve (a secret it cannot read), with why.
    # Replaced, never changed in place: the health thread reads it.
    unservable: dict[str, str] = field(default_factory=dict)
    # Seconds the runs' writes wait for a database that does not answer (0: the
    # store's own retries only).
    db_patience: float = 0.0
    # The store the runs use: ``store``, or one that waits out outages (db_patience).
    runs_store: SqlStore = field(init=False)
    writer: RunWriter = field(init=False)
    send_log: SendLogBatcher = field(init=False)
    # Each running sync has its own stop event: a run that loses its lease sets its
    # own, which must not stop the other accounts' runs.
    _running: dict[asyncio.Task[Any], asyncio.Event] = field(default_factory=dict)
    # Set when the worker goes away: calls still waiting for the database give up.
    _waits_over: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.runs_store = self.store
        if self.db_patience > 0:
            self.runs_store = PatientStore(
                self.store,
                patience=self.db_patience,
                sleep=self._wait_for_database,
            )
        self.writer = RunWriter(self.runs_store)
        # Not patient: a shared rate log that does not answer is replaced at once by
        # this process's own pacing.
        self.send_log = SendLogBatcher(self.store.send_log())

    def _wait_for_database(self, seconds: float) -> None:
        self._waits_over.wait(seconds)

    def check_accounts(self) -> None:
        """Check every enabled account's secret now; report those this worker cannot serve.

        At start and at each reload of the accounts file. A file that cannot be read
        changes nothing (its jobs are handed back meanwhile, see :func:`run_sync_job`).
        """
        try:
            problems = unservable_accounts(self.accounts_file)
        except ConfigError as exc:
            log.error(  # noqa: TRY400 - a configuration problem: its text, no traceback
                "cannot read the accounts file; its accounts' jobs are handed back until "
                "it can be read",
                error=REDACTOR.scrub(str(exc)),
            )
            return
        for client_id in set(self.unservable) - set(problems):
            self.note_account(client_id, None)
        for client_id, problem in problems.items():
            self.note_account(client_id, problem)

    def note_account(self, client_id: str, problem: str | None) -> None:
        """Record whether this worker can serve ``client_id`` (None) or why not; log changes."""
        if self.unservable.get(client_id) == problem:
            return
        unservable = dict(self.unservable)
        if problem is None:
            unservable.pop(client_id, None)
            log.info("account no longer unservable by this worker", client_id=client_id)
        else:
            unservable[client_id] = problem
            log.error(
                "account cannot be served by this worker: its jobs go back to the queue "
                "for another worker",
                client_id=client_id,
                reason=problem,
            )
        self.unservable = unservable
        self.worker_metrics.unservable.set(len(unservable))

    async def aclose(self) -> None:
        """Stop the rate log's thread (after the last job); waits for the database end."""
        self._waits_over.set()
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


def unservable_accounts(accounts_file: Path) -> dict[str, str]:
    """The enabled accounts whose settings (their secret) this process cannot build, with why.

    Raises :class:`ConfigError` when the file itself cannot be read.
    """
    problems: dict[str, str] = {}
    for account in select(load_accounts(accounts_file), []):
        try:
            account.settings()
        except ConfigError as exc:
            problems[account.client_id] = str(exc)
    return problems


def job_owner(job_id: int | None) -> str | None:
    """The lease owner of a job's runs: this process, tagged with the job's id.

    The tag lets a job run again (recovery queued it while its first worker was
    silent) find the run it already did.
    """
    return None if job_id is None else f"{make_owner()}/job{job_id}"


def _run_of_job(store: SqlStore, client_id: str, job_id: int) -> str | None:
    tag = f"/job{job_id}"
    return next(
        (r.id for r in store.recent_runs(client_id, limit=5) if r.owner.endswith(tag)), None
    )


async def _sync_task(
    context: procrastinate.JobContext,
    client_id: str,
    attempt: int = 1,
    run_id: str | None = None,
) -> dict[str, Any]:
    return await run_sync_job(
        context.app, _runtime(context), client_id, attempt, context.job.id, run_id=run_id
    )


async def run_sync_job(
    app: procrastinate.App,
    runtime: WorkerRuntime,
    client_id: str,
    attempt: int,
    job_id: int | None = None,
    *,
    run_id: str | None = None,
) -> dict[str, Any]:
    """One attempt at an account's sync, and what follows it (see :func:`decide`).

    Before syncing: a disabled account is skipped (done); an account whose secret
    this worker cannot read goes back to the queue for another worker; a run this
    job (or the one before it, ``run_id``) already brought to an end is not started
    again. A run held by another live process is waited for, and the job ends done
    when that run ends well.

    Returns a summary when the account is done; raises :class:`JobFailed` (job
    ``failed``) or Procrastinate's ``JobAborted`` (job ``aborted``, when the worker
    stops or hands the job back) otherwise, after queueing the follow-up job if
    there is one.
    """
    bound: FilteringBoundLogger = log.bind(client_id=client_id, job_id=job_id, attempt=attempt)
    with runtime.job_stop() as stop:
        attempt_ = _Attempt(runtime, client_id, attempt, job_id, run_id, stop, bound)
        try:
            decision = await attempt_.decide()
        except asyncio.CancelledError:
            # Aborted: a second signal, or the grace period ran out. The run is
            # already recorded interrupted; when the worker is going away, someone
            # else must carry on.
            if runtime.stopping.is_set():
                runtime.worker_metrics.jobs.labels(Action.CONTINUE.value).inc()
                try:
                    await asyncio.shield(
                        defer_sync(app, client_id, attempt=attempt, run_id=attempt_.run_id)
                    )
                except Exception as exc:  # noqa: BLE001 - best effort while going down
                    # The run stays resumable; the next schedule tick picks it up.
                    bound.warning("could not queue the run for another worker", error=str(exc))
            raise
    runtime.worker_metrics.jobs.labels(decision.action.value).inc()
    return await _follow_up(
        app, runtime, client_id, decision, outcome=attempt_.outcome, bound=bound
    )


class _Attempt:
    """One job's attempt at an account: the checks before the run, the run, the waits."""

    def __init__(  # noqa: PLR0917 - private, built in one place
        self,
        runtime: WorkerRuntime,
        client_id: str,
        attempt: int,
        job_id: int | None,
        run_id: str | None,
        stop: asyncio.Event,
        bound: FilteringBoundLogger,
    ) -> None:
        self.runtime = runtime
        self.client_id = client_id
        self.attempt = attempt
        self.job_id = job_id
        # The run this job is about, once known (given, found, claimed or waited for).
        self.run_id = run_id
        self.stop = stop
        self.log = bound
        self.outcome: SyncOutcome | None = None

    async def decide(self) -> Decision:
        """Sync (or skip, hand back, wait); what follows."""
        settings = self._settings()
        if isinstance(settings, Decision):
            return settings
        rt = self.runtime
        if rt.margin is None:
            rt.margin = Margin(settings.rate_margin)
        error: BaseException | None = None
        try:
            ended = await self._ended_already()
            if ended is not None:
                return ended
            while True:
                try:
                    self.outcome = await sync_account(
                        settings,
                        rt.runs_store,
                        stop=self.stop,
                        metrics=rt.metrics,
                        owner=job_owner(self.job_id),
                        send_log=rt.send_log,
                        margin=rt.margin,
                        writer=rt.writer,
                        accounts=rt.concurrency,
                    )
                except RunLocked:
                    # Another live process holds the account's run: neither a failure
                    # nor an attempt; wait for it.
                    waited = await self._wait_for_held_run()
                    if waited is None:
                        continue
                    return waited
                self.run_id = self.outcome.run_id
                break
        except Exception as exc:  # noqa: BLE001 - every failure is classified by decide()
            error = exc
        decision = decide(
            self.attempt,
            rt.policy,
            rt.rng,
            outcome=self.outcome,
            error=error,
            stopping=rt.stopping.is_set(),
        )
        return replace(decision, run_id=self.run_id)

    def _settings(self) -> Settings | Decision:
        rt = self.runtime
        try:
            accounts = load_accounts(rt.accounts_file)
        except ConfigError as exc:
            return self._hand_back(f"cannot read the accounts file: {exc}")
        try:
            (account,) = select(accounts, [self.client_id])
        except ConfigError as exc:  # removed from the file: nothing to sync
            return decide(self.attempt, rt.policy, rt.rng, error=exc)
        if not account.enabled:
            self.log.info("sync job skipped: account disabled in the accounts file")
            return Decision(Action.DONE, "account disabled in the accounts file; not synced")
        try:
            settings = account.settings()
        except ConfigError as exc:
            rt.note_account(self.client_id, str(exc))
            return self._hand_back(str(exc))
        rt.note_account(self.client_id, None)
        REDACTOR.register(settings.password.get_secret_value())
        return settings

    def _hand_back(self, why: str) -> Decision:
        # Not an attempt: the same attempt number, after a short while so that a
        # worker that can serve the account gets its turn.
        delay = self.runtime.policy.delay(1, self.runtime.rng)
        return Decision(
            Action.HAND_BACK,
            f"this worker cannot serve the account ({why})",
            delay,
            self.attempt,
            self.run_id,
        )

    async def _ended_already(self) -> Decision | None:
        store = self.runtime.store
        if self.run_id is None and self.job_id is not None:
            self.run_id = await asyncio.to_thread(_run_of_job, store, self.client_id, self.job_id)
        if self.run_id is None:
            return None
        run = await asyncio.to_thread(store.get_run, self.run_id)
        if run is None or run.status not in (RunStatus.SUCCEEDED, RunStatus.PARTIAL):
            return None  # still to do: the run is resumed
        self.log.info("sync job done: its run already ended", run_id=run.id, status=run.status)
        return Decision(
            Action.DONE, f"run {run.id} already ended {run.status.value}", run_id=run.id
        )

    async def _wait_for_held_run(self) -> Decision | None:
        """Wait while another live process holds the run; None when it is free to claim.

        Ends the job as done when the run it waited for ended well; hands the job
        over (same attempt) when this worker stops meanwhile.
        """
        store = self.runtime.store
        held_id: str | None = None
        while True:
            held = await asyncio.to_thread(store.live_run, self.client_id)
            if held is None or local_owner_is_dead(held.owner):
                if held_id is None:
                    # Released between the claim and this look: claim again shortly.
                    return await self._pause() or None
                ended = await asyncio.to_thread(store.get_run, held_id)
                self.run_id = held_id
                if ended is not None and ended.status in (RunStatus.SUCCEEDED, RunStatus.PARTIAL):
                    self.log.info(
                        "sync job done: the run it waited for was finished by another process",
                        run_id=held_id,
                        status=ended.status,
                    )
                    return Decision(
                        Action.DONE,
                        f"run {held_id} was finished by another process ({ended.status.value})",
                        run_id=held_id,
                    )
                return None  # left resumable, or its lease ran out: resume it
            if held.id != held_id:
                held_id = held.id
                self.log.info(
                    "the account's run is held by another live process; waiting for it",
                    run_id=held.id,
                    owner=held.owner,
                )
            stopped = await self._pause()
            if stopped is not None:
                return replace(stopped, run_id=held_id)

    async def _pause(self) -> Decision | None:
        """Sleep one poll interval; a hand-over decision if this worker stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.runtime.poll_seconds):
                await self.stop.wait()
        if not self.stop.is_set():
            return None
        return Decision(
            Action.CONTINUE,
            "worker stopping while another process held the run",
            0.0,
            self.attempt,
            self.run_id,
        )


async def _follow_up(
    app: procrastinate.App,
    runtime: WorkerRuntime,
    client_id: str,
    decision: Decision,
    *,
    outcome: SyncOutcome | None,
    bound: FilteringBoundLogger,
) -> dict[str, Any]:
    reason = REDACTOR.scrub(decision.reason)
    if decision.action is Action.DONE:
        summary: dict[str, Any] = {"client_id": client_id, "decision": reason}
        if decision.run_id is not None:
            summary["run_id"] = decision.run_id
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
    assert decision.next_attempt is not None  # noqa: S101 - set for RETRY, CONTINUE, HAND_BACK
    next_id = await _defer_patiently(app, runtime, client_id, decision)
    then = (
        f"job {next_id} (attempt {decision.next_attempt}) in {decision.delay:.0f}s"
        if next_id is not None
        else "the job already waiting for this account"
    )
    if decision.action is Action.CONTINUE:
        bound.info("sync job handed over", reason=reason, next=then)
        raise pexc.JobAborted(f"{client_id}: {reason}; resumed by {then}")
    if decision.action is Action.HAND_BACK:
        bound.warning("sync job handed back to the queue", reason=reason, next=then)
        raise pexc.JobAborted(f"{client_id}: {reason}; queued again as {then}")
    bound.warning("sync attempt failed; retrying", reason=reason, next=then)
    raise JobFailed(f"{client_id}: {reason}; resumed by {then}")


async def _defer_patiently(
    app: procrastinate.App, runtime: WorkerRuntime, client_id: str, decision: Decision
) -> int | None:
    """Queue the follow-up job, waiting for the database if it does not answer.

    Without the follow-up the run would wait for the next schedule tick.
    """
    manager = app.job_manager
    failures = 0
    while True:
        try:
            return await defer_sync(
                app,
                client_id,
                attempt=decision.next_attempt or 1,
                delay=decision.delay,
                run_id=decision.run_id,
            )
        except StoreUnavailable:
            failures += 1
            if not (isinstance(manager, OutageTolerantJobManager) and manager.keep_trying()):
                raise
            await asyncio.sleep(RECONNECT_BACKOFF.delay(failures, runtime.rng))


async def _schedule_task(context: procrastinate.JobContext, timestamp: int) -> dict[str, Any]:
    runtime = _runtime(context)
    accounts = select(load_accounts(runtime.accounts_file), [])
    result = await enqueue_accounts(context.app, [a.client_id for a in accounts])
    log.info("scheduled syncs", queued=len(result.queued), already_waiting=len(result.waiting))
    return {"queued": len(result.queued), "already_waiting": len(result.waiting)}


async def _recover_task(context: procrastinate.JobContext, timestamp: int) -> dict[str, Any]:
    runtime = _runtime(context)
    result = await recover_stalled(
        context.app, stalled_after=runtime.stalled_after, store=runtime.store
    )
    runtime.worker_metrics.recovered.labels("retried").inc(len(result.retried))
    runtime.worker_metrics.recovered.labels("closed").inc(len(result.closed))
    return {
        "retried": result.retried,
        "closed": result.closed,
        "skipped": result.skipped,
        "alive": result.alive,
    }


async def _prune_task(
    context: procrastinate.JobContext, timestamp: int, max_hours: int
) -> dict[str, Any]:
    # Procrastinate's own clean-up, of every finished job: nothing else deletes them,
    # and every recovery tick and sync leaves a job and its events behind.
    await builtin_tasks.remove_old_jobs(
        context,
        max_hours=max_hours,
        remove_failed=True,
        remove_cancelled=True,
        remove_aborted=True,
    )
    log.info("removed finished jobs older than the retention", max_hours=max_hours)
    return {"max_hours": max_hours}


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


# --- outliving the database -----------------------------------------------------------

# Reconnecting after an outage: half to all of 0.5 s doubling, at most 30 s apart.
RECONNECT_BACKOFF: Final = JobRetryPolicy(initial=0.5, maximum=30.0)
# A connection that held this long was healthy: the next failure starts the backoff over.
_HEALTHY_FOR: Final = 60.0

# Touch this worker's row, or write it again when another worker pruned it while we
# could not send heartbeats (a long outage, a paused process): without the row, every
# job we fetch would break its foreign key, and our running jobs would look orphaned.
_HEARTBEAT_SQL: Final = """
INSERT INTO procrastinate_workers (id, last_heartbeat) OVERRIDING SYSTEM VALUE
VALUES (%(worker_id)s, now())
ON CONFLICT (id) DO UPDATE SET last_heartbeat = now()
RETURNING (xmax = 0) AS registered_again
"""

# Procrastinate's own end of a job, only while the job is still ours: ``doing``, and
# fetched by this worker (or orphaned by a pruned worker row). Recovery may have
# queued it again while we were silent, and another worker may be running it now;
# ending it here would end their attempt.
_FINISH_IF_OURS_SQL: Final = """
SELECT procrastinate_finish_job_v1(j.id, %(status)s, %(delete_job)s) AS finished
FROM (
    SELECT id FROM procrastinate_jobs
    WHERE id = %(job_id)s AND status = 'doing'
      AND (worker_id = %(worker_id)s OR worker_id IS NULL)
    FOR UPDATE
) AS j
"""


def lost_connection(exc: BaseException) -> bool:
    """Whether a job-queue error means the database is not answering (worth waiting out)."""
    cause = exc.__cause__ if isinstance(exc, pexc.ConnectorException) else exc
    return isinstance(cause, psycopg.OperationalError)


class OutageTolerantJobManager(JobManager):
    """Procrastinate's job manager, for a worker that must outlive database outages.

    Procrastinate's worker stops itself as soon as one of its side tasks (the
    LISTEN connection, the heartbeat, the periodic deferrer) or a fetch meets a
    database error, and its running jobs are then waited for and aborted. Here those
    calls wait the outage out instead: the listener reconnects with backoff, a missed
    heartbeat or periodic tick is logged and tried again next time, a failed fetch
    finds no job until the database answers. A job's end is recorded once the
    database is back, and only while the job is still this worker's.
    """

    def __init__(
        self,
        connector: Any,
        *,
        stopping: asyncio.Event,
        grace_seconds: float,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(connector)
        self._stopping = stopping
        self._grace = grace_seconds
        self._stop_seen: float | None = None
        self._rng = rng or random.Random()
        self._down: set[str] = set()

    def keep_trying(self) -> bool:
        """Whether to wait for the database again: always, until a stop's grace runs out."""
        if not self._stopping.is_set():
            return True
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return time.monotonic() - self._stop_seen < self._grace

    def _failed(self, what: str, exc: BaseException, **extra: Any) -> None:
        # One line when an operation starts failing, one when it works again.
        if what in self._down:
            log.debug(f"{what}: database not answering", error=_db_error_name(exc), **extra)
            return
        self._down.add(what)
        log.warning(
            f"{what}: database not answering; waiting for it", error=_db_error_name(exc), **extra
        )

    def _answered(self, what: str) -> None:
        if what in self._down:
            self._down.discard(what)
            log.info(f"{what}: database answering again")

    async def listen_for_jobs(self, *, on_notification: Any, queues: Any = None) -> None:
        """Listen for new jobs for ever, reconnecting with backoff when the connection drops."""
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await super().listen_for_jobs(on_notification=on_notification, queues=queues)
            except pexc.ConnectorException as exc:
                error: BaseException = exc
            else:
                error = StoreError("listener connection ended")
            if time.monotonic() - started > _HEALTHY_FOR:
                failures = 0
                self._answered("job queue listener")
            failures += 1
            self._failed("job queue listener", error, attempt=failures)
            # Polling (ADSYNC_WORKER_POLL_SECONDS) finds new jobs meanwhile.
            await asyncio.sleep(RECONNECT_BACKOFF.delay(failures, self._rng))

    async def update_heartbeat(self, worker_id: int) -> None:
        """Beat, registering this worker again if its row was pruned; a miss waits for the next."""
        try:
            row = await self.connector.execute_query_one_async(
                query=_HEARTBEAT_SQL, worker_id=worker_id
            )
        except pexc.ConnectorException as exc:
            if not lost_connection(exc):
                raise
            self._failed("worker heartbeat", exc)
            return
        self._answered("worker heartbeat")
        if row["registered_again"]:
            log.warning(
                "this worker had been taken for dead (no heartbeat for a while) and "
                "removed; registered again",
                worker_id=worker_id,
            )

    async def fetch_job(self, queues: Any, worker_id: int) -> Job | None:
        """The next job, or None while the database does not answer."""
        try:
            job: Job | None = await super().fetch_job(queues=queues, worker_id=worker_id)
        except pexc.ConnectorException as exc:
            if not lost_connection(exc):
                raise
            self._failed("fetching jobs", exc)
            return None
        self._answered("fetching jobs")
        return job

    async def defer_periodic_job(
        self, job: Job, periodic_id: str, defer_timestamp: int
    ) -> int | None:
        """Defer a periodic tick; a tick the database missed is logged and skipped."""
        try:
            job_id: int | None = await super().defer_periodic_job(
                job=job, periodic_id=periodic_id, defer_timestamp=defer_timestamp
            )
        except pexc.ConnectorException as exc:
            if not lost_connection(exc):
                raise
            self._failed("periodic tasks", exc, task=job.task_name)
            return None
        self._answered("periodic tasks")
        return job_id

    async def finish_job(self, job: Job, status: Status, delete_job: bool) -> None:
        """Record the job's end once the database answers, if the job is still ours.

        Gives up only when the worker is stopping and its grace period is over: the
        job then stays ``doing``, and the recovery of a live worker queues it again;
        that attempt finds its run ended (see :func:`run_sync_job`).
        """
        failures = 0
        while True:
            try:
                rows = await self.connector.execute_query_all_async(
                    query=_FINISH_IF_OURS_SQL,
                    job_id=job.id,
                    worker_id=job.worker_id,
                    status=status.value,
                    delete_job=delete_job,
                )
            except pexc.ConnectorException as exc:
                if not lost_connection(exc):
                    raise
                failures += 1
                if not self.keep_trying():
                    log.error(  # noqa: TRY400 - a known outage: its text, no traceback
                        "could not record the end of a job: the database is not answering; "
                        "recovery queues it again",
                        job_id=job.id,
                        status=status.value,
                    )
                    return
                self._failed("recording job ends", exc, job_id=job.id)
                await asyncio.sleep(RECONNECT_BACKOFF.delay(failures, self._rng))
                continue
            self._answered("recording job ends")
            if not rows:
                log.warning(
                    "job was queued again while this worker was silent; its end is left "
                    "to the worker that has it now",
                    job_id=job.id,
                    status=status.value,
                )
            return

    async def unregister_worker(self, worker_id: int) -> None:
        """Remove this worker's row; when the database is away, pruning removes it later."""
        try:
            await super().unregister_worker(worker_id)
        except pexc.ConnectorException as exc:
            if not lost_connection(exc):
                raise
            log.warning(
                "could not unregister the worker: database not answering",
                error=_db_error_name(exc),
            )


def tolerate_outages(
    app: procrastinate.App, *, stopping: asyncio.Event, grace_seconds: float
) -> None:
    """Give ``app`` the job manager of a worker that waits database outages out."""
    app.job_manager = OutageTolerantJobManager(
        app.connector, stopping=stopping, grace_seconds=grace_seconds
    )


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
            if health is not None:
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
        "additional_context": {_RUNTIME_KEY: runtime},
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
    health: Health | None,
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
            _supervised(
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
            _supervised(
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
    accounts = watch_accounts(runtime, health, every=settings.heartbeat_seconds)
    extras: list[asyncio.Task[Any]] = [stop_requested, asyncio.create_task(accounts)]
    if health is not None:
        watch = watch_health(app, health, runtime.worker_metrics, settings.heartbeat_seconds)
        extras.append(asyncio.create_task(watch))
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


# A password file can become readable (or not) without the accounts file changing.
_ACCOUNTS_RECHECK: Final = 60.0


async def watch_accounts(runtime: WorkerRuntime, health: Health | None, *, every: float) -> None:
    """Check the accounts' secrets again whenever the accounts file changes, forever.

    Also once a minute, and ``/healthz`` gets what the checks and the jobs found.
    """
    seen: tuple[int, int, int] | None = None
    checked = time.monotonic()
    while True:
        await asyncio.sleep(every)
        signature = _file_signature(runtime.accounts_file)
        if signature != seen or time.monotonic() - checked >= _ACCOUNTS_RECHECK:
            if seen is not None and signature != seen:
                log.info("accounts file changed; checking its accounts' secrets")
            seen, checked = signature, time.monotonic()
            # Reads every secret (files, the environment): off the event loop.
            await asyncio.to_thread(runtime.check_accounts)
        if health is not None:
            health.unservable = runtime.unservable


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


async def _supervised(
    app: procrastinate.App,
    requested: asyncio.Event,
    rng: random.Random,
    *,
    backoff: JobRetryPolicy = RECONNECT_BACKOFF,
    **options: Any,
) -> None:
    """Run one Procrastinate worker until a stop is requested, restarting it if it ends.

    It ends by itself when it cannot start (database down: it registers itself first)
    or when an error it does not expect reaches its loop.
    """
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await app.run_worker_async(**options)
        except Exception as exc:  # noqa: BLE001 - whatever ended it, start it again
            error = _db_error_name(exc) if lost_connection(exc) else REDACTOR.scrub(repr(exc))
        else:
            error = "ended by itself"
        if requested.is_set():
            return
        if time.monotonic() - started > _HEALTHY_FOR:
            failures = 0
        failures += 1
        delay = backoff.delay(failures, rng)
        log.warning(
            "job queue worker stopped; starting it again",
            worker=options.get("name"),
            error=error,
            attempt=failures,
            retry_in=round(delay, 1),
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await requested.wait()
                return


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
