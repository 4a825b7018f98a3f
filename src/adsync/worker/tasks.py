"""The worker's Procrastinate tasks, and one sync job's attempt and what follows it.

Four tasks live on the PostgreSQL adsync already uses:

``adsync.sync_account`` (queue ``adsync-sync``)
    One account's sync, at most one running and one waiting per account (see
    :mod:`adsync.worker.queue`).
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
:class:`adsync.worker.supervisor.OutageTolerantJobManager` and
:class:`adsync.worker.runtime.PatientStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import procrastinate
import structlog
from procrastinate import exceptions as pexc
from structlog.typing import FilteringBoundLogger

from adsync.accounts import load_accounts, select
from adsync.config import Settings
from adsync.errors import ConfigError, JobFailed, RunLocked, StoreUnavailable
from adsync.models import RunStatus
from adsync.observability import REDACTOR
from adsync.store import SqlStore, local_owner_is_dead, make_owner
from adsync.sync import SyncOutcome
from adsync.worker.policy import Action, Decision, decide_next
from adsync.worker.queue import (
    PRUNE_TASK,
    QUEUE_MAINTENANCE,
    QUEUE_SYNC,
    RECOVER_TASK,
    SCHEDULE_TASK,
    SYNC_TASK,
    defer_sync,
    enqueue_accounts,
    recover_stalled,
    remove_finished_jobs,
)
from adsync.worker.runtime import WorkerRuntime, runtime_of
from adsync.worker.schedule import PRUNE_CRON, recovery_cron, schedule_cron
from adsync.worker.settings import WorkerSettings
from adsync.worker.supervisor import RECONNECT_BACKOFF, OutageTolerantJobManager

__all__ = ["build_app", "job_owner", "run_sync_job"]

log = structlog.get_logger("adsync.worker")


def build_app(conninfo: str, settings: WorkerSettings, *, pool_size: int = 10) -> procrastinate.App:
    """The Procrastinate app: its four tasks and their schedules, over ``conninfo``.

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
    schedule = _maintenance_task(app, SCHEDULE_TASK, _schedule_task)
    cron = schedule_cron(settings.schedule_minutes)
    if cron is not None:
        app.periodic(cron=cron, periodic_id="accounts")(schedule)
    recover = _maintenance_task(app, RECOVER_TASK, _recover_task)
    app.periodic(cron=recovery_cron(settings.recovery_every_seconds), periodic_id="stalled")(
        recover
    )
    prune = _maintenance_task(app, PRUNE_TASK, _prune_task)
    app.periodic(
        cron=PRUNE_CRON,
        periodic_id="retention",
        task_kwargs={"max_hours": settings.job_retention_hours},
    )(prune)
    return app


def _maintenance_task(
    app: procrastinate.App, name: str, body: Callable[..., Awaitable[dict[str, Any]]]
) -> procrastinate.tasks.Task[Any, Any, Any]:
    """``body`` as a task of the maintenance queue, with at most one job of it waiting."""
    return app.task(name=name, queue=QUEUE_MAINTENANCE, pass_context=True, queueing_lock=name)(body)


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
        context.app, runtime_of(context), client_id, attempt, context.job.id, run_id=run_id
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
    """One attempt at an account's sync, and what follows it (see :func:`decide_next`).

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
            decision = await attempt_.run()
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

    async def run(self) -> Decision:
        """Sync (or skip, hand back, wait); what follows."""
        settings = self._settings()
        if isinstance(settings, Decision):
            return settings
        rt = self.runtime
        error: BaseException | None = None
        try:
            ended = await self._ended_already()
            if ended is not None:
                return ended
            while True:
                try:
                    self.outcome = await rt.sync(
                        settings,
                        rt.runs_store,
                        stop=self.stop,
                        metrics=rt.metrics,
                        owner=job_owner(self.job_id),
                        runtime=rt.process,
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
        except Exception as exc:  # noqa: BLE001 - every failure is classified by decide_next()
            error = exc
        decision = decide_next(
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
            return decide_next(self.attempt, rt.policy, rt.rng, error=exc)
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
    runtime = runtime_of(context)
    accounts = select(load_accounts(runtime.accounts_file), [])
    result = await enqueue_accounts(context.app, [a.client_id for a in accounts])
    log.info("scheduled syncs", queued=len(result.queued), already_waiting=len(result.waiting))
    return {"queued": len(result.queued), "already_waiting": len(result.waiting)}


async def _recover_task(context: procrastinate.JobContext, timestamp: int) -> dict[str, Any]:
    runtime = runtime_of(context)
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
    await remove_finished_jobs(context, max_hours=max_hours)
    return {"max_hours": max_hours}
