"""``adsync db upgrade``: apply the migrations.

Registered on the main app by :func:`register`.
"""

from __future__ import annotations

import typer

from adsync.cli.common import VerboseOpt, database_url, err, errors

__all__ = ["db_app", "db_upgrade", "register"]

db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True, rich_markup_mode=None)


@db_app.command("upgrade")
def db_upgrade(verbose: VerboseOpt = False) -> None:
    """Apply the database migrations (also done automatically before a sync)."""
    from adsync.store import SqlStore

    with errors(verbose):
        store = SqlStore.from_url(database_url())
        try:
            before = store.schema_revisions()
            store.upgrade()
            after = store.schema_revisions()
        finally:
            store.dispose()
    err.print(upgrade_message(before, after))


def upgrade_message(before: frozenset[str], after: frozenset[str]) -> str:
    """What ``db upgrade`` did, from the revisions before and after it."""
    now = ", ".join(sorted(after))
    if not before:
        return f"created the database schema (revision {now})"
    if before != after:
        return f"upgraded the database schema from revision {', '.join(sorted(before))} to {now}"
    return f"the database schema is up to date (revision {now})"


def register(app: typer.Typer) -> None:
    """Add the ``db`` group to the main app."""
    app.add_typer(db_app, name="db")
