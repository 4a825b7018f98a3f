"""``adsync db upgrade``: apply the migrations.

Registered on the main app by :func:`register`.
"""

from __future__ import annotations

import typer

from adsync.cli.common import VerboseOpt, database_url, err, errors, open_store

__all__ = ["db_app", "db_upgrade", "register"]

db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(verbose: VerboseOpt = False) -> None:
    """Apply the database migrations (also done automatically before a sync)."""
    with errors(verbose):
        store = open_store(database_url())
        store.dispose()
        err.print("database schema is up to date")


def register(app: typer.Typer) -> None:
    """Add the ``db`` group to the main app."""
    app.add_typer(db_app, name="db")
