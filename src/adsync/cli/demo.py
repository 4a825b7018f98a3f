"""``adsync demo``: the simulator on a free loopback port, synced into SQLite.

Registered on the main app by :func:`register`. The simulator (Starlette,
uvicorn) and the pipeline are imported when the command runs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from adsync.cli.common import LogFormatOpt, LogLevelOpt, VerboseOpt, err, errors, open_store
from adsync.cli.sync import run_sync, setup_logging

__all__ = ["demo", "register"]


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
    from adsync.config import load_settings
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
        setup_logging(log_level, log_format, settings)
        err.print(f"simulator on {sim.url}: 10 requests per 1 s window, faults on; syncing ...")
        store = open_store(settings.database_url.get_secret_value())
        try:
            code = run_sync([settings], store, show_progress=True, verbose=verbose)
            rows = store.count_campaigns("demo")
        finally:
            store.dispose()
        stats = sim.stats()["clients"].get("demo", {})
    out = Console(highlight=False, soft_wrap=True)
    out.print(
        f"\n{rows} campaigns in {database.resolve()} "
        f"(simulator: {stats.get('requests', '?')} requests counted, "
        f"{stats.get('rate_limited', '?')} refused with 429, "
        f"window maximum {stats.get('max_in_window', '?')} of 10)"
    )
    where = database.resolve()
    # Ids are campaign_1 ... campaign_100: shorter ids first puts 2 before 10.
    query = (
        "SELECT id, name, status, impressions, last_synced_at "
        "FROM campaigns ORDER BY length(id), id LIMIT 5"
    )
    out.print(f"query it:  sqlite3 {shlex.quote(str(where))} {shlex.quote(query)}")
    history = shlex.quote(f"DATABASE_URL=sqlite:///{where}")
    out.print(f"run history:  {history} {this_command()} status")
    raise typer.Exit(code)


def this_command() -> str:
    """How to run this adsync again from a shell, whatever is on PATH.

    ``make demo`` runs ``.venv/bin/adsync``, whose directory is seldom on PATH:
    the running script's absolute path, or ``python -m adsync.cli`` when not
    started as a script.
    """
    script = Path(sys.argv[0])
    if script.name == "adsync" and script.is_file():
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(sys.executable)} -m adsync.cli"


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the main app."""
    app.command("demo")(demo)
