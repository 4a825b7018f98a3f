"""Riding out database outages: Procrastinate's worker loops, kept alive and restarted.

Procrastinate's worker stops itself at the first database error of its side tasks;
:class:`OutageTolerantJobManager` waits such outages out instead, and
:func:`supervise` starts a worker loop again if it ends by itself all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any, Final

import procrastinate
import structlog
from procrastinate import exceptions as pexc
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager

from adsync.errors import StoreError
from adsync.observability import REDACTOR
from adsync.worker.policy import JobRetryPolicy
from adsync.worker.queue import db_error_name, lost_connection

__all__ = [
    "RECONNECT_BACKOFF",
    "OutageTolerantJobManager",
    "supervise",
    "tolerate_outages",
]

log = structlog.get_logger("adsync.worker")

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
            log.debug(f"{what}: database not answering", error=db_error_name(exc), **extra)
            return
        self._down.add(what)
        log.warning(
            f"{what}: database not answering; waiting for it", error=db_error_name(exc), **extra
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
                error=db_error_name(exc),
            )


def tolerate_outages(
    app: procrastinate.App, *, stopping: asyncio.Event, grace_seconds: float
) -> None:
    """Give ``app`` the job manager of a worker that waits database outages out."""
    app.job_manager = OutageTolerantJobManager(
        app.connector, stopping=stopping, grace_seconds=grace_seconds
    )


async def supervise(
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
            error = db_error_name(exc) if lost_connection(exc) else REDACTOR.scrub(repr(exc))
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
