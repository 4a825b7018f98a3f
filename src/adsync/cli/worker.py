"""``adsync worker``, ``adsync enqueue`` and ``adsync schedule``: syncs as Procrastinate jobs.

Registered on the main app by :func:`register`. Like ``cli_history``, this module
must not import ``adsync.cli`` (which imports it). Exit codes follow the rest of
the CLI: 1 for a database error, 2 for bad configuration (SQLite included: the job
queue needs PostgreSQL). Procrastinate, SQLAlchemy and the worker are imported
when a command runs, so that the other commands never load them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from adsync.cli.common import (
    DEFAULT_ACCOUNTS_FILE,
    AccountsOpt,
    LogFormatOpt,
    LogLevelOpt,
    VerboseOpt,
    database_url,
    err,
    errors,
    open_store,
    shown,
)
from adsync.errors import ConfigError

if TYPE_CHECKING:
    from adsync.worker.queue import Enqueued
    from adsync.worker.settings import WorkerSettings

__all__ = ["enqueue", "register", "schedule", "worker"]


def _logging(level: str, fmt: str, url: str) -> None:
    import sqlalchemy as sa

    from adsync.config import sqlalchemy_url
    from adsync.observability import configure_logging

    if fmt not in ("auto", "json", "console"):
        raise ConfigError(f"--log-format must be auto, json or console, not {fmt!r}")
    password = sa.make_url(sqlalchemy_url(url)).password
    configure_logging(level, fmt, extra_secrets=[str(password)] if password else [])  # type: ignore[arg-type]


def worker(
    concurrency: Annotated[
        int, typer.Option(min=1, help="Sync jobs (accounts) this worker runs at once.")
    ] = 10,
    health_port: Annotated[
        int | None,
        typer.Option(help="Serve /healthz and /metrics on this port (0: any free port)."),
    ] = None,
    health_addr: Annotated[str, typer.Option(help="Address for --health-port.")] = "127.0.0.1",
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
    verbose: VerboseOpt = False,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = "auto",
) -> None:
    """Run a worker: sync the accounts queued on PostgreSQL, one job per account at a time.

    Run one or more per machine, on as many machines as needed, all with the
    same DATABASE_URL (PostgreSQL) and accounts file. Every worker also
    queues the schedule (every ADSYNC_SCHEDULE_MINUTES, default 60, 0 = off)
    and puts back the jobs of workers that died (silent for
    ADSYNC_STALLED_AFTER_SECONDS, default 60); their runs resume from the
    checkpoint. A database restart or outage is waited out (running syncs
    carry on); /healthz answers 503 meanwhile, and when the worker loop
    stops answering. Accounts whose secret this worker cannot read are
    listed there and their jobs left to other workers.

    SIGTERM/SIGINT: no new jobs; running syncs make no new calls, their
    in-flight calls finish (up to ADSYNC_WORKER_GRACE_SECONDS), the runs are
    left resumable and queued again for another worker. A second signal
    aborts them at once (still resumable). Exit codes: 0 stopped by a
    signal, 1 the database unreachable at start (or a worker fault), 2 bad
    configuration.
    """
    import asyncio

    from adsync.accounts import load_accounts
    from adsync.metrics import Metrics, MetricsServer, WorkerMetrics
    from adsync.worker.health import Health
    from adsync.worker.queue import ensure_queue_schema
    from adsync.worker.runtime import WorkerRuntime
    from adsync.worker.serve import serve
    from adsync.worker.settings import load_worker_settings, queue_conninfo
    from adsync.worker.tasks import build_app

    with errors(verbose):
        url = database_url()
        conninfo = queue_conninfo(url)
        settings = load_worker_settings()
        _logging(log_level, log_format, url)
        load_accounts(accounts_file)  # a broken file fails now, not in every job
        metrics = Metrics()
        health = Health(max_silence=max(5.0, 3 * settings.heartbeat_seconds))
        # Before the database: a port held by another worker is bad configuration.
        server = (
            None
            if health_port is None
            else MetricsServer(
                metrics,
                health_port,
                health_addr,
                options=("--health-port", "--health-addr"),
                health=health.report,
            )
        )
        try:
            store = open_store(url)
        except BaseException:
            if server is not None:
                server.close()
            raise
        try:
            asyncio.run(ensure_queue_schema(conninfo))
            runtime = WorkerRuntime(
                store=store,
                concurrency=concurrency,
                accounts_file=accounts_file,
                policy=settings.retry_policy(),
                stalled_after=settings.stalled_after_seconds,
                metrics=metrics,
                worker_metrics=WorkerMetrics(metrics.registry),
                poll_seconds=settings.poll_seconds,
                db_patience=settings.db_patience_seconds,
                rate_margin=settings.rate_margin,
            )
            # An account whose secret is missing here is reported now, not when its
            # job comes: its jobs go back to the queue for the other workers.
            runtime.check_accounts()
            health.unservable = runtime.unservable
            if server is not None:
                err.print(f"health and metrics on http://{health_addr}:{server.port}/healthz")
            # Two connections stay busy listening; the rest serve fetches and job ends.
            app = build_app(conninfo, settings, pool_size=4 + max(2, concurrency // 4))
            code = asyncio.run(
                serve(app, runtime, settings, concurrency=concurrency, health=health)
            )
        finally:
            store.dispose()
            if server is not None:
                server.close()
    raise typer.Exit(code)


async def _enqueue(conninfo: str, settings: WorkerSettings, client_ids: list[str]) -> Enqueued:
    import procrastinate

    from adsync.worker.queue import enqueue_accounts, ensure_queue_schema
    from adsync.worker.tasks import build_app

    await ensure_queue_schema(conninfo)
    app: procrastinate.App = build_app(conninfo, settings, pool_size=2)
    async with app.open_async():
        return await enqueue_accounts(app, client_ids)


def _queue(accounts_file: Path, client_ids: list[str]) -> Enqueued:
    import asyncio

    from adsync.accounts import load_accounts, select
    from adsync.worker.settings import load_worker_settings, queue_conninfo

    conninfo = queue_conninfo(database_url())
    settings = load_worker_settings()
    accounts = select(load_accounts(accounts_file), client_ids)
    disabled = [a.client_id for a in accounts if not a.enabled]
    if disabled:
        # A worker would only end its job "account disabled": refuse it here instead.
        raise ConfigError(
            f"account {', '.join(map(repr, disabled))} is disabled (enabled = false in "
            f"{accounts_file}): nothing queued"
        )
    return asyncio.run(_enqueue(conninfo, settings, [a.client_id for a in accounts]))


def _print_enqueued(result: Enqueued) -> None:
    for client_id in result.queued:
        typer.echo(f"queued          {client_id}")
    for client_id in result.waiting:
        typer.echo(f"already waiting {client_id}")
    err.print(
        f"{len(result.queued)} queued, {len(result.waiting)} already had a job waiting "
        "(never two: an account's waiting job is unique)"
    )


def enqueue(
    all_accounts: Annotated[
        bool, typer.Option("--all", help="Queue every enabled account of the accounts file.")
    ] = False,
    client: Annotated[
        list[str] | None,
        typer.Option("--client", help="Queue this account of the accounts file (repeatable)."),
    ] = None,
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
    verbose: VerboseOpt = False,
) -> None:
    """Queue one sync job per account for the workers (see adsync worker).

    An account that already has a job waiting keeps that one: enqueueing
    twice never makes two. Needs PostgreSQL in DATABASE_URL. Exit codes: 0
    queued (or already waiting), 1 database error, 2 bad configuration or
    unknown client id.
    """
    with errors(verbose):
        if all_accounts == bool(client):
            raise ConfigError("give either --all or one or more --client ID")
        result = _queue(accounts_file, list(client or []))
    _print_enqueued(result)


def schedule(
    once: Annotated[
        bool,
        typer.Option("--once", help="Queue every enabled account now, as one tick would."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
    verbose: VerboseOpt = False,
) -> None:
    """Show the schedule on which workers queue every account; --once queues them now.

    There is nothing else to run: every `adsync worker` carries the schedule
    (ADSYNC_SCHEDULE_MINUTES, default 60; 0 turns it off), and Procrastinate
    makes each tick queue its jobs once however many workers run. This
    command prints the interval, its cron string, the next times (UTC) and
    the accounts it covers. With --once it queues one job per enabled
    account now, like `adsync enqueue --all`: for an external scheduler
    (cron, a Kubernetes CronJob) when workers run with
    ADSYNC_SCHEDULE_MINUTES=0. Exit codes: 0 shown or queued, 1 database
    error, 2 bad configuration.
    """
    from adsync.accounts import load_accounts, select
    from adsync.worker.schedule import next_ticks, schedule_cron
    from adsync.worker.settings import load_worker_settings

    with errors(verbose):
        settings = load_worker_settings()
        on_sqlite = database_url().startswith("sqlite")
        accounts = select(load_accounts(accounts_file), [])
        if once:
            result = _queue(accounts_file, [a.client_id for a in accounts])
    if once:
        _print_enqueued(result)
        return
    minutes = settings.schedule_minutes
    ticks = [] if minutes == 0 else next_ticks(minutes, time.time())
    document: dict[str, Any] = {
        "every_minutes": minutes,
        "cron": schedule_cron(minutes),
        "next_utc": [datetime.fromtimestamp(t, UTC).isoformat() for t in ticks],
        "accounts": [a.client_id for a in accounts],
    }
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    out = Console(highlight=False)
    if minutes == 0:
        out.print("schedule off (ADSYNC_SCHEDULE_MINUTES=0): queue with `adsync schedule --once`")
    else:
        out.print(
            f"every {minutes} min (cron {escape(str(document['cron']))!s}, UTC), run by every "
            "`adsync worker`; next: " + ", ".join(document["next_utc"])
        )
    out.print(f"{len(accounts)} enabled account(s): {escape(', '.join(document['accounts']))}")
    if on_sqlite:
        out.print(
            "DATABASE_URL is SQLite: the workers need PostgreSQL, so nothing runs this "
            "schedule until DATABASE_URL is postgresql://USER@HOST/DB"
        )


def jobs(
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """List the sync jobs queued, running or failed in the job queue, oldest first.

    Needs PostgreSQL in DATABASE_URL; reads only (an empty queue, or one never
    created, lists nothing). Finished runs are in `adsync status`. Exit codes:
    0 listed, 1 database error, 2 bad configuration (SQLite included).
    """
    from adsync.worker.jobs import LISTED_STATUSES, list_jobs
    from adsync.worker.settings import queue_conninfo

    with errors(verbose):
        found = list_jobs(queue_conninfo(database_url()))

    def stamp(value: datetime | None) -> str | None:
        return None if value is None else value.astimezone(UTC).isoformat()

    if as_json:
        rows = [
            {
                "id": j.id,
                "client_id": j.client_id,
                "status": j.status,
                "attempts": j.attempts,
                "queued_at": stamp(j.queued_at),
                "scheduled_at": stamp(j.scheduled_at),
                "changed_at": stamp(j.changed_at),
            }
            for j in found
        ]
        typer.echo(json.dumps({"jobs": rows}, indent=2, ensure_ascii=False))
        return
    out = Console(highlight=False, soft_wrap=True)
    if not found:
        out.print("no queued, running or failed jobs")
        return
    for j in found:
        when = j.scheduled_at or j.queued_at
        out.print(
            f"{shown(j.client_id):<24} {j.status:<7} job {j.id:<8} attempts {j.attempts:<3} "
            f"queued {_short(j.queued_at)}"
            + (f"  runs at {_short(when)}" if j.scheduled_at is not None else "")
            + f"  last change {_short(j.changed_at)}"
        )
    by = {s: sum(1 for j in found if j.status == s) for s in LISTED_STATUSES}
    err.print(f"{by['todo']} queued, {by['doing']} running, {by['failed']} failed")


def _short(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register(app: typer.Typer) -> None:
    """Add ``worker``, ``enqueue``, ``schedule`` and ``jobs`` to the main app."""
    app.command("worker")(worker)
    app.command("enqueue")(enqueue)
    app.command("schedule")(schedule)
    app.command("jobs")(jobs)
