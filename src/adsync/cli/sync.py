"""``adsync sync``: one account or many, a progress bar, a summary, an exit code.

Registered on the main app by :func:`register`. The pipeline (httpx, SQLAlchemy,
Prometheus) is imported when the command runs, not when the app is built.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adsync.cli.common import (
    DEFAULT_ACCOUNTS_FILE,
    AccountsOpt,
    LogFormatOpt,
    LogLevelOpt,
    VerboseOpt,
    err,
    errors,
    open_store,
    print_traceback,
    shown,
)
from adsync.errors import AdsyncError, ConfigError
from adsync.exit_codes import EXIT_SIGINT, EXIT_SIGTERM

if TYPE_CHECKING:
    import asyncio

    from rich.console import Console

    from adsync.config import Settings
    from adsync.metrics import Metrics
    from adsync.runner import AccountResult
    from adsync.store import SqlStore
    from adsync.sync import RunProgress, SyncOutcome

__all__ = ["register", "run_sync", "run_with_signals", "setup_logging", "sync"]


def setup_logging(level: str, fmt: str, *all_settings: Settings) -> None:
    """Check the logging options and route logs, with every settings' secrets redacted."""
    from adsync.observability import configure_logging
    from adsync.store import database_secrets

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
        # rich's progress machinery (live display, columns) only for a terminal.
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

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
    import asyncio

    received = [] if received is None else received

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.ensure_future(make(stop))

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                err.print(
                    "[yellow]stopping: no new platform requests; those in flight may finish; "
                    "a second signal stops at once[/]"
                )
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


def run_sync(
    settings_list: list[Settings],
    store: SqlStore,
    *,
    show_progress: bool,
    metrics: Metrics | None = None,
    verbose: bool = False,
) -> int:
    """Sync the accounts side by side under the signal handlers; print each summary.

    Returns the exit code.
    """
    import asyncio

    from adsync.runner import combined_exit_code, exit_code_for_signal, sync_many

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


def sync(
    all_accounts: Annotated[
        bool, typer.Option("--all", help="Sync every enabled account of the accounts file.")
    ] = False,
    client: Annotated[
        list[str] | None,
        typer.Option("--client", help="Sync this account of the accounts file (repeatable)."),
    ] = None,
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
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
    from adsync.config import load_settings
    from adsync.metrics import Metrics, MetricsServer

    with errors(verbose):
        if all_accounts or client:
            from adsync.accounts import load_accounts, select

            accounts = select(load_accounts(accounts_file), list(client or []))
            if not accounts:
                raise ConfigError("no enabled account in the accounts file")
            settings_list = [account.settings() for account in accounts]
        else:
            settings_list = [load_settings()]
        setup_logging(log_level, log_format, *settings_list)
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
                code = run_sync(
                    settings_list, store, show_progress=progress, metrics=metrics, verbose=verbose
                )
            finally:
                store.dispose()
        finally:
            if server is not None:
                server.close()
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``sync`` to the main app."""
    app.command("sync")(sync)
