"""The ``adsync`` command line: wiring, output and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from adsync.accounts import DEFAULT_ACCOUNTS_FILE, load_accounts, select
from adsync.cli_common import (
    VerboseOpt,
    database_url,
    err,
    errors,
    open_store,
    print_traceback,
    shown,
)
from adsync.cli_history import register as register_history
from adsync.cli_worker import register as register_worker
from adsync.config import Settings, load_settings
from adsync.errors import AdsyncError, ConfigError
from adsync.metrics import Metrics, MetricsServer
from adsync.observability import configure_logging
from adsync.runner import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    AccountResult,
    combined_exit_code,
    exit_code_for_signal,
    sync_many,
)
from adsync.simulator.cli import simulate
from adsync.store import SqlStore, database_secrets
from adsync.sync import RunProgress
from adsync.sync import SyncOutcome

app = typer.Typer(
    name="adsync",
    help="Keep the agency's database in step with the ad platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
accounts_app = typer.Typer(help="The accounts file.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")

log = structlog.get_logger("adsync.cli")
out = Console(highlight=False, soft_wrap=True)

LogFormat = Literal["auto", "json", "console"]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="auto (JSON unless on a terminal), json or console.")
]


def _setup(level: str, fmt: str, *all_settings: Settings) -> None:
    secrets: list[str] = []
    for settings in all_settings:
        secrets.append(settings.password.get_secret_value())
        secrets.extend(database_secrets(settings.database_url.get_secret_value()))
    if fmt not in ("auto", "json", "console"):
        raise ConfigError(f"--log-format must be auto, json or console, not {fmt!r}")
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    configure_logging(level, fmt, extra_secrets=secrets)  # type: ignore[arg-type]


class _Bar:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.fields[client]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("failed {task.fields[failed]}"),
            TextColumn("requests {task.fields[requests]}"),
            TextColumn("429s {task.fields[rl]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, p: RunProgress) -> None:
        if p.client_id not in self._tasks:
            self._tasks[p.client_id] = self._progress.add_task(
                "sync", total=None, client=p.client_id, failed=0, requests=0, rl=0, eta="?"
            )
        eta = "?" if p.eta_seconds is None else _duration(p.eta_seconds)
        if p.done:
            eta = "done"
        self._progress.update(
            self._tasks[p.client_id],
            total=p.total,
            completed=p.synced + p.failed,
            failed=p.failed,
            requests=p.requests,
            rl=p.rate_limited,
            eta=eta,
        )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _summary(outcome: SyncOutcome, *, verbose: bool = False) -> None:
    c = outcome.counters
    colour = {"succeeded": "green", "partial": "yellow"}.get(outcome.status.value, "red")
    err.print(
        f"[bold {colour}]{outcome.status.value}[/] client {outcome.client_id} "
        f"run {outcome.run_id[:12]}"
        f"{' (resumed)' if outcome.resumed else ''}: "
        f"{c.synced} synced, {c.failed} failed of {c.seen} seen; "
        f"{c.requests} requests, {c.retries} retries, {c.rate_limited} rate-limited; "
        f"{outcome.seconds:.1f}s"
    )
    for failure in outcome.failures[:20]:
        name = failure.campaign_id or "(no id)"
        err.print(shown(f"  failed {name} [{failure.kind}]: {failure.reason}"))
    if len(outcome.failures) > 20:
        err.print(f"  ... and {len(outcome.failures) - 20} more: adsync runs show {outcome.run_id}")
    for problem in outcome.problems:
        err.print(shown(f"  listing: {problem}"))
    if outcome.error:
        unexpected = outcome.fatal is not None and not isinstance(outcome.fatal, AdsyncError)
        hint = " (--verbose shows the traceback)" if unexpected and not verbose else ""
        err.print(shown(f"  error: {outcome.error}") + hint)
    if verbose and outcome.fatal is not None:
        print_traceback(outcome.fatal)


def run_with_signals(
    make: Callable[[asyncio.Event], Any],
    grace_seconds: float,
    received: list[int] | None = None,
) -> tuple[Any, int | None]:
    """Run a coroutine; the first SIGINT/SIGTERM asks it to stop, a second one cancels it.

    Returns the coroutine's result and the signal that stopped it, if any;
    ``received`` (when given) collects the signals as they arrive.
    """
    received = [] if received is None else received

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.ensure_future(make(stop))

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                err.print("[yellow]stopping: no new sync calls; a second signal stops at once[/]")
                stop.set()
                loop.call_later(grace_seconds, task.cancel)
            else:
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await task
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    result = asyncio.run(main())
    return result, (received[0] if received else None)


def _summary_of(result: AccountResult, *, verbose: bool = False) -> None:
    if result.outcome is not None:
        _summary(result.outcome, verbose=verbose)
    else:
        err.print(
            f"[bold red]failed[/] client {shown(result.client_id)}: {shown(result.error or '')}"
        )


def _run_sync(
    settings_list: list[Settings],
    store: SqlStore,
    *,
    show_progress: bool,
    metrics: Metrics | None = None,
    verbose: bool = False,
) -> int:
    bar = _Bar(err) if show_progress and err.is_terminal else None
    received: list[int] = []

    async def make(stop: asyncio.Event) -> list[AccountResult]:
        return await sync_many(
            settings_list,
            store,
            stop=stop,
            on_progress=bar.update if bar else None,
            metrics=metrics,
            signalled=lambda: received[0] if received else None,
        )

    grace = max(s.request_deadline for s in settings_list)
    with bar if bar is not None else contextlib.nullcontext():
        try:
            results, _ = run_with_signals(make, grace_seconds=grace, received=received)
        except asyncio.CancelledError:
            # Cancelled by a second signal, or by the grace period of the first.
            why = (
                "at once by a second signal"
                if len(received) > 1
                else "when the grace period ran out"
            )
            err.print(f"[red]stopped {why}; the run is resumable[/]")
            return EXIT_SIGTERM if received and received[0] == signal.SIGTERM else EXIT_SIGINT
    for result in results:
        _summary_of(result, verbose=verbose)
    # Stopped by a signal: its code, whatever state each run was in.
    code = exit_code_for_signal(received[0]) if received else combined_exit_code(results)
    if len(results) > 1:
        ok = sum(1 for r in results if r.exit_code == 0)
        err.print(f"{ok} of {len(results)} accounts fully synced (exit code {code})")
    return code


@app.command()
def sync(
    all_accounts: Annotated[
        bool, typer.Option("--all", help="Sync every enabled account of the accounts file.")
    ] = False,
    client: Annotated[
        list[str] | None,
        typer.Option("--client", help="Sync this account of the accounts file (repeatable)."),
    ] = None,
    accounts_file: Annotated[
        Path,
        typer.Option("--accounts", envvar="ADSYNC_ACCOUNTS_FILE", help="The accounts file (TOML)."),
    ] = Path(DEFAULT_ACCOUNTS_FILE),
    verbose: VerboseOpt = False,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar on a terminal.")] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics on this port during the run."),
    ] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address for --metrics-port.")] = "127.0.0.1",
) -> None:
    """Sync every campaign of the configured account(s) into the database.

    Without --all or --client: the one account of AD_PLATFORM_EMAIL /
    AD_PLATFORM_PASSWORD / AD_PLATFORM_CLIENT_ID. With them: accounts of the
    accounts file, side by side. Exit codes: 0 all synced, 1 some campaigns (or
    a run) failed, 2 bad configuration, 3 credentials refused, 130/143 stopped
    by SIGINT/SIGTERM.
    """
    with errors(verbose):
        if all_accounts or client:
            accounts = select(load_accounts(accounts_file), list(client or []))
            if not accounts:
                raise ConfigError("no enabled account in the accounts file")
            settings_list = [account.settings() for account in accounts]
        else:
            settings_list = [load_settings()]
        _setup(log_level, log_format, *settings_list)
        first = settings_list[0]
        metrics = Metrics()
        # Before the database: a port held by another run is bad configuration,
        # found before anything is migrated or claimed.
        server = MetricsServer(metrics, metrics_port, metrics_addr) if metrics_port else None
        try:
            store = open_store(
                first.database_url.get_secret_value(),
                retry_attempts=first.db_retry_attempts,
                retry_wait=first.db_retry_wait,
            )
            try:
                code = _run_sync(
                    settings_list, store, show_progress=progress, metrics=metrics, verbose=verbose
                )
            finally:
                store.dispose()
        finally:
            if server is not None:
                server.close()
    raise typer.Exit(code)


@accounts_app.command("list")
def accounts_list(
    accounts_file: Annotated[
        Path,
        typer.Option("--accounts", envvar="ADSYNC_ACCOUNTS_FILE", help="The accounts file (TOML)."),
    ] = Path(DEFAULT_ACCOUNTS_FILE),
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """List the accounts of the accounts file: where each password comes from, never what it is."""
    with errors(verbose):
        accounts = load_accounts(accounts_file)
    rows = [
        {
            "client_id": a.client_id,
            "email": a.email,
            "password_from": a.password_source,
            "rate_limit": a.rate_limit,
            "rate_window": a.rate_window,
            "api_url": a.api_url,
            "enabled": a.enabled,
        }
        for a in accounts
    ]
    if as_json:
        out.print_json(json.dumps({"accounts": rows}))
        return
    table = Table("client id", "email", "password from", "rate limit", "enabled")
    for row in rows:
        limit = "default" if row["rate_limit"] is None else f"{row['rate_limit']}"
        if row["rate_window"] is not None:
            limit += f" per {row['rate_window']}s"
        table.add_row(
            shown(str(row["client_id"])),
            shown(str(row["email"])),
            shown(str(row["password_from"])),
            limit,
            "yes" if row["enabled"] else "no",
        )
    out.print(table)


@db_app.command("upgrade")
def db_upgrade(verbose: VerboseOpt = False) -> None:
    """Apply the database migrations (also done automatically before a sync)."""
    with errors(verbose):
        store = open_store(database_url())
        store.dispose()
        err.print("database schema is up to date")


@app.command()
def demo(
    database: Annotated[Path, typer.Option("--db", help="SQLite file to sync into.")] = Path(
        "adsync-demo.db"
    ),
    campaigns: Annotated[int, typer.Option(help="Campaigns on the simulated platform.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the simulator's faults and data.")] = 7,
    verbose: VerboseOpt = False,
    log_level: LogLevelOpt = "WARNING",
    log_format: LogFormatOpt = "auto",
) -> None:
    """Start the simulator on a free loopback port and sync it into SQLite.

    A fast profile: 10 requests per 1 s window and 0.1 s sync calls instead of
    per 60 s and 2 s, with production fault rates (20% 503s on listing, 10% hangs).
    """
    from adsync.simulator.testing import running_simulator

    with (
        errors(verbose),
        running_simulator(
            rate_limit=10, rate_window=1.0, sync_delay=0.1, campaigns=campaigns, seed=seed
        ) as sim,
    ):
        settings = load_settings(
            AD_PLATFORM_API_URL=sim.url,
            AD_PLATFORM_EMAIL="admin@mixoads.com",
            AD_PLATFORM_PASSWORD="SuperSecret123!",
            AD_PLATFORM_CLIENT_ID="demo",
            AD_PLATFORM_RATE_LIMIT=10,
            AD_PLATFORM_RATE_WINDOW=1.0,
            # The simulator runs in this process and shares its GIL: its arrival
            # stamps jitter more than a remote platform's would.
            AD_PLATFORM_RATE_MARGIN=0.03,
            AD_PLATFORM_REQUEST_TIMEOUT=1.0,
            AD_PLATFORM_REQUEST_DEADLINE=2.0,
            AD_PLATFORM_BACKOFF_INITIAL=0.1,
            AD_PLATFORM_BACKOFF_MAX=1.0,
            DATABASE_URL=f"sqlite:///{database}",
        )
        _setup(log_level, log_format, settings)
        err.print(f"simulator on {sim.url}: 10 requests per 1 s window, faults on; syncing ...")
        store = open_store(settings.database_url.get_secret_value())
        try:
            code = _run_sync([settings], store, show_progress=True, verbose=verbose)
            rows = store.count_campaigns("demo")
        finally:
            store.dispose()
        stats = sim.stats()["clients"].get("demo", {})
    out.print(
        f"\n{rows} campaigns in {database.resolve()} "
        f"(simulator: {stats.get('requests', '?')} requests counted, "
        f"{stats.get('rate_limited', '?')} refused with 429, "
        f"window maximum {stats.get('max_in_window', '?')} of 10)"
    )
    out.print(
        f'query it:  sqlite3 {database} "SELECT id, name, status, impressions, last_synced_at '
        f'FROM campaigns ORDER BY id LIMIT 5"'
    )
    out.print(f"run history:  DATABASE_URL=sqlite:///{database} adsync status")
    raise typer.Exit(code)


app.command("simulate")(simulate)
register_history(app)
register_worker(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - signals are handled inside commands
        sys.exit(EXIT_SIGINT)


if __name__ == "__main__":  # pragma: no cover
    main()
