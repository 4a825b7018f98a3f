"""``adsync status`` and ``adsync runs show``: read the run history, print it.

Registered on the main app by :func:`register`. Exit codes follow the rest of the
CLI: 1 for a store error or an unknown or ambiguous run id, 2 for bad
configuration. The store (SQLAlchemy, Alembic) is imported when a command runs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from adsync.cli.common import VerboseOpt, database_url, errors, open_reader
from adsync.errors import AdsyncError
from adsync.redact import REDACTOR

if TYPE_CHECKING:
    from adsync.models import CampaignFailure, RunRecord
    from adsync.store import SqlStore, Store

__all__ = ["register", "runs_app", "runs_show", "status"]

# Wide enough for the status table in a pipe or a file; a terminal keeps its own width.
_PIPE_WIDTH = 200

runs_app = typer.Typer(
    help="Inspect recorded sync runs.", no_args_is_help=True, rich_markup_mode=None
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]


@contextlib.contextmanager
def _store() -> Iterator[SqlStore]:
    # Read-only: looking at the history never creates, migrates or locks the database.
    store = open_reader(database_url())
    try:
        yield store
    finally:
        store.dispose()


def _stdout() -> Console:
    # Built per call: CliRunner and redirections swap sys.stdout after import.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = _PIPE_WIDTH
    return console


def _print_json(document: dict[str, Any]) -> None:
    # Plain stdout, not rich: rich would wrap and colour what a machine parses.
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def status(
    client: Annotated[
        str | None, typer.Option("--client", help="Only this client id's runs.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many recent runs.")] = 20,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show recent sync runs per client: status, counts, duration, requests, failures.

    Reads DATABASE_URL (environment or .env), read-only. Exit codes: 0 shown
    (also when there are no runs yet), 1 database error or busy, 2 bad
    configuration, no database, or a schema that needs `adsync db upgrade`.
    """
    from adsync.history import render_status, status_document

    with errors(verbose), _store() as store:
        runs = store.recent_runs(client, limit)
        failures: dict[str, list[CampaignFailure]] = {r.id: store.run_failures(r.id) for r in runs}
    if as_json:
        _print_json(status_document(runs, failures, scrub=REDACTOR.scrub))
    else:
        render_status(
            _stdout(),
            runs,
            failures,
            scrub=REDACTOR.scrub,
            now=datetime.now(UTC),
            client_id=client,
        )


def runs_show(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show one run's details and every failed campaign with its reason.

    Exit codes: 0 shown, 1 no such run, an ambiguous prefix or a database error,
    2 bad configuration, no database, or a schema that needs `adsync db upgrade`.
    """
    from adsync.history import render_run, run_document

    with errors(verbose), _store() as store:
        run = _find(store, run_id)
        failures = store.run_failures(run.id)
    if as_json:
        _print_json(run_document(run, failures, scrub=REDACTOR.scrub))
    else:
        render_run(_stdout(), run, failures, scrub=REDACTOR.scrub, now=datetime.now(UTC))


def _find(store: Store, run_id: str) -> RunRecord:
    run = store.get_run(run_id)  # AmbiguousRunId (a StoreError) propagates as exit 1
    if run is None:
        raise AdsyncError(f"no run with id or id prefix {run_id!r}; see adsync status")
    return run


runs_app.command("show")(runs_show)


def register(app: typer.Typer) -> None:
    """Add ``status`` and the ``runs`` group to the main app."""
    app.command("status")(status)
    app.add_typer(runs_app, name="runs")
