"""What the jobs of one worker process share: store, process runtime, stop signals, accounts.

Built once per process at the edge (``adsync worker``) and handed to every job
through Procrastinate's job context.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import procrastinate
import structlog

from adsync.accounts import load_accounts, select
from adsync.errors import ConfigError
from adsync.metrics import Metrics, WorkerMetrics
from adsync.observability import REDACTOR
from adsync.ratelimit import Margin
from adsync.runner import sync_account
from adsync.runtime import ProcessRuntime
from adsync.store import SqlStore
from adsync.sync import SyncOutcome
from adsync.worker.policy import JobRetryPolicy

__all__ = [
    "RUNTIME_KEY",
    "PatientStore",
    "SyncAccount",
    "WorkerRuntime",
    "runtime_of",
    "unservable_accounts",
]

log = structlog.get_logger("adsync.worker")

# Where the runtime rides in Procrastinate's job context.
RUNTIME_KEY: Final = "adsync"

# What syncs one account: :func:`adsync.runner.sync_account`'s signature.
SyncAccount = Callable[..., Awaitable[SyncOutcome]]


_PATIENT_WAIT: Final = 0.5
_PATIENT_WAIT_MAX: Final = 10.0


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
            # Bounded by time, not attempts: the waits are jittered.
            retry_attempts=1,
            retry_for=patience,
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
    # The process's jitter margin to start from (AD_PLATFORM_RATE_MARGIN); what
    # one job learns about arrival jitter then protects the others.
    rate_margin: float = Margin().fraction
    # How often a job whose run another process holds looks whether it has ended.
    poll_seconds: float = 5.0
    # Enabled accounts this worker cannot serve (a secret it cannot read), with why.
    # Replaced, never changed in place: the health thread reads it.
    unservable: dict[str, str] = field(default_factory=dict)
    # Seconds the runs' writes wait for a database that does not answer (0: the
    # store's own retries only).
    db_patience: float = 0.0
    # What syncs one account: the pipeline, or a stand-in in tests.
    sync: SyncAccount = sync_account
    # The store the runs use: ``store``, or one that waits out outages (db_patience).
    runs_store: SqlStore = field(init=False)
    # The rate log's batcher, the margin and the run writer every job shares.
    process: ProcessRuntime = field(init=False)
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
        self.process = ProcessRuntime(
            self.store, rate_margin=self.rate_margin, runs_store=self.runs_store
        )

    def _wait_for_database(self, seconds: float) -> None:
        self._waits_over.wait(seconds)

    def check_accounts(self) -> None:
        """Check every enabled account's secret now; report those this worker cannot serve.

        At start and at each reload of the accounts file. A file that cannot be read
        changes nothing (its jobs are handed back meanwhile, see
        :func:`adsync.worker.tasks.run_sync_job`).
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
        await self.process.aclose()

    def stop_gracefully(self) -> None:
        """No new platform requests in any running job; those in flight finish; runs resumable."""
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


def runtime_of(context: procrastinate.JobContext) -> WorkerRuntime:
    """The runtime of the worker running the job of ``context``."""
    runtime = context.additional_context.get(RUNTIME_KEY)
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
