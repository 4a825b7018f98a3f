"""``adsync accounts list`` and ``accounts check``: the accounts file, without secrets.

Registered on the main app by :func:`register`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from adsync.cli.common import DEFAULT_ACCOUNTS_FILE, AccountsOpt, VerboseOpt, errors, shown

__all__ = ["accounts_app", "accounts_check", "accounts_list", "register"]

accounts_app = typer.Typer(help="The accounts file.", no_args_is_help=True, rich_markup_mode=None)


@accounts_app.command("list")
def accounts_list(
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """List the accounts of the accounts file: where each password comes from, never what it is."""
    from rich.table import Table

    from adsync.accounts import load_accounts

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
    out = Console(highlight=False, soft_wrap=True)
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


@accounts_app.command("check")
def accounts_check(
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check that each account's password source exists here: its variable set, its file readable.

    One line per account, never the password. A disabled account's missing
    source is a warning, not a failure. Exit codes: 0 every enabled account's
    password found, 2 one is not (or the file is bad).
    """
    from adsync.accounts import load_accounts
    from adsync.exit_codes import EXIT_CONFIG

    with errors(verbose):
        accounts = load_accounts(accounts_file)
    rows = [
        {
            "client_id": a.client_id,
            "enabled": a.enabled,
            "password_from": a.password_source,
            "problem": a.password_problem(),
        }
        for a in accounts
    ]
    failed = any(row["problem"] is not None and row["enabled"] for row in rows)
    out = Console(highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps({"accounts": rows}))
    else:
        for row in rows:
            problem = row["problem"]
            if problem is None:
                mark, detail = "[green]ok  [/]", f"password from {row['password_from']} found"
            else:
                mark = "[bold red]FAIL[/]" if row["enabled"] else "[yellow]warn[/]"
                detail = str(problem).removeprefix(f"account {row['client_id']!r}: ")
            if not row["enabled"]:
                detail += " (disabled)"
            out.print(f"{mark}  {shown(str(row['client_id']))}: {shown(detail)}")
    if failed:
        raise typer.Exit(EXIT_CONFIG)


def register(app: typer.Typer) -> None:
    """Add the ``accounts`` group to the main app."""
    app.add_typer(accounts_app, name="accounts")
