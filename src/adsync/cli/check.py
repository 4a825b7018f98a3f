"""``adsync check``: the configuration, the database and each account's credentials.

Registered on the main app by :func:`register`. One line per check on stdout,
``ok`` or ``FAIL``; the exit code is the failures' (2 configuration, 3
credentials refused, 1 the database or the platform unreachable), 1 when they
disagree. The credentials are tried with one token request each, which the
platform does not count against its rate limit: a check never spends a sync's
quota. httpx, SQLAlchemy and pydantic-settings are imported when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from adsync.cli.common import DEFAULT_ACCOUNTS_FILE, AccountsOpt, VerboseOpt, print_traceback, shown
from adsync.errors import AdsyncError, AuthError, ConfigError
from adsync.exit_codes import EXIT_AUTH, EXIT_CONFIG, EXIT_FAILURES, EXIT_OK

if TYPE_CHECKING:
    from adsync.config import Settings

__all__ = ["Check", "check", "exit_code_of", "register"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: what was checked, and the exit code it asks for (0: ok)."""

    name: str
    detail: str
    code: int = EXIT_OK


def exit_code_of(checks: list[Check]) -> int:
    """0 when every check passed; the failures' code when they agree, else 1."""
    codes = {c.code for c in checks if c.code != EXIT_OK}
    if not codes:
        return EXIT_OK
    return codes.pop() if len(codes) == 1 else EXIT_FAILURES


def _code_of(exc: BaseException) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, AuthError):
        return EXIT_AUTH
    return EXIT_FAILURES


def _configuration(
    all_accounts: bool, client: list[str], accounts_file: Path
) -> tuple[list[Check], list[Settings]]:
    """The settings of every account to check, and a line for each (or for what is wrong)."""
    from adsync.config import load_settings

    if not (all_accounts or client):
        try:
            settings = load_settings()
        except ConfigError as exc:
            return [Check("configuration", str(exc), EXIT_CONFIG)], []
        return [Check("configuration", _describe(settings))], [settings]
    from adsync.accounts import load_accounts, select

    try:
        accounts = select(load_accounts(accounts_file), client)
    except ConfigError as exc:
        return [Check("configuration", str(exc), EXIT_CONFIG)], []
    if not accounts:
        return [Check("configuration", "no enabled account in the accounts file", EXIT_CONFIG)], []
    checks: list[Check] = []
    found: list[Settings] = []
    for account in accounts:
        try:
            settings = account.settings()
        except ConfigError as exc:
            checks.append(Check(f"configuration {account.client_id}", str(exc), EXIT_CONFIG))
            continue
        found.append(settings)
        checks.append(
            Check(
                f"configuration {account.client_id}",
                f"{_describe(settings)}; password from {account.password_source}",
            )
        )
    return checks, found


def _describe(settings: Settings) -> str:
    return (
        f"client id {settings.client_id}, {settings.email} at {settings.api_url}, "
        f"{settings.rate_limit} requests per {settings.rate_window:g} s"
    )


def _database(url: str) -> Check:
    """Whether the database answers, and what its schema is to this adsync."""
    from adsync.store import SqlStore
    from adsync.store.schema import REVISIONS
    from adsync.store.urls import parse_database_url

    head = REVISIONS[-1]
    try:
        parsed = parse_database_url(url)
    except ConfigError as exc:
        return Check("database", str(exc), EXIT_CONFIG)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not path.exists():
            if not path.parent.is_dir():
                return Check(
                    "database",
                    f"{path}: its directory {path.parent} does not exist (DATABASE_URL)",
                    EXIT_CONFIG,
                )
            return Check("database", f"{path} does not exist yet: the first sync creates it")
    try:
        store = SqlStore.from_url(url, read_only=True, retry_attempts=1)
    except AdsyncError as exc:
        return Check("database", str(exc), _code_of(exc))
    where = store.database.where
    try:
        current = store.schema_revisions()
    except AdsyncError as exc:
        # The store's message names the database already.
        return Check("database", str(exc), _code_of(exc))
    finally:
        store.dispose()
    if not current:
        return Check(
            "database", f"{where} answers; no adsync schema yet: the first sync creates it"
        )
    at = ", ".join(sorted(current))
    if current == {head}:
        return Check("database", f"{where} answers; schema current (revision {head})")
    if current <= set(REVISIONS):
        return Check(
            "database",
            f"{where} answers; schema at revision {at}: the next sync (or "
            f"`adsync db upgrade`) upgrades it to {head}",
        )
    return Check(
        "database",
        f"{where} answers; schema at revision {at}, newer than this adsync ({head}): "
        "upgrade adsync",
        EXIT_CONFIG,
    )


async def _credentials(settings: Settings) -> Check:
    """One token request with the account's credentials, not retried."""
    import httpx

    from adsync.auth import TokenProvider
    from adsync.clock import SystemClock
    from adsync.redact import REDACTOR
    from adsync.retry import RetryPolicy

    name = f"credentials {settings.client_id}"
    timeout = httpx.Timeout(
        settings.request_timeout, connect=settings.connect_timeout, pool=settings.request_deadline
    )
    async with httpx.AsyncClient(
        base_url=settings.api_url, timeout=timeout, headers={"User-Agent": "adsync"}
    ) as http:
        provider = TokenProvider(
            http,
            email=settings.email,
            password=settings.password,
            clock=SystemClock(),
            policy=RetryPolicy(max_attempts=1, max_seconds=settings.request_deadline),
            timeout=settings.request_deadline,
            on_secret=REDACTOR.register_recent,
        )
        try:
            await provider.get()
        except AuthError as exc:
            return Check(name, str(exc), EXIT_AUTH)
        except AdsyncError as exc:
            return Check(
                name,
                f"the platform at {settings.api_url} did not answer the token request: {exc}",
                EXIT_FAILURES,
            )
    return Check(name, f"{settings.email} accepted by {settings.api_url} (one token request)")


def check(
    all_accounts: Annotated[
        bool, typer.Option("--all", help="Check every enabled account of the accounts file.")
    ] = False,
    client: Annotated[
        list[str] | None,
        typer.Option("--client", help="Check this account of the accounts file (repeatable)."),
    ] = None,
    accounts_file: AccountsOpt = Path(DEFAULT_ACCOUNTS_FILE),
    verbose: VerboseOpt = False,
) -> None:
    """Check the configuration, the database and each account's credentials, one line each.

    The database is opened read-only (nothing is created or migrated); each
    account's credentials are tried with one token request, which the platform
    does not count against its rate limit. Accounts as for `adsync sync`.
    Exit codes: 0 every check passed, 1 the database or the platform
    unreachable, 2 bad configuration (a setting, an accounts file, a password
    source, the database's schema newer than this adsync), 3 credentials
    refused; 1 when failures disagree.
    """
    import asyncio

    from adsync.cli.common import database_url
    from adsync.observability import configure_logging
    from adsync.redact import REDACTOR
    from adsync.store import database_secrets

    # The lines below say everything; the libraries' own logs only when asked for.
    configure_logging("DEBUG" if verbose else "WARNING", "console")
    out = Console(highlight=False, soft_wrap=True)
    checks: list[Check] = []

    def report(found: list[Check]) -> None:
        for c in found:
            mark = "[green]ok  [/]" if c.code == EXIT_OK else "[bold red]FAIL[/]"
            out.print(f"{mark}  {shown(c.name)}: {shown(c.detail)}")
        checks.extend(found)

    try:
        found, settings_list = _configuration(all_accounts, list(client or []), accounts_file)
        for settings in settings_list:
            REDACTOR.register(settings.password.get_secret_value())
        report(found)
        try:
            url = database_url()
        except ConfigError as exc:
            report([Check("database", str(exc), EXIT_CONFIG)])
        else:
            REDACTOR.register(*database_secrets(url))
            report([_database(url)])

        async def all_credentials() -> list[Check]:
            return list(await asyncio.gather(*(_credentials(s) for s in settings_list)))

        if settings_list:
            report(asyncio.run(all_credentials()))
    except Exception as exc:  # noqa: BLE001 - a bug: one line like any error, exit 1
        if verbose:
            print_traceback(exc)
        report([Check("check", f"unexpected {type(exc).__name__}: {exc}", EXIT_FAILURES)])
    raise typer.Exit(exit_code_of(checks))


def register(app: typer.Typer) -> None:
    """Add ``check`` to the main app."""
    app.command("check")(check)
