"""What every ``adsync`` command shares: options, error handling, the store, the database URL.

Kept apart from the app (``adsync.cli``) so that the command modules can use it
without importing the app that registers them. Light on purpose: ``adsync
--help`` imports it, so what only a command needs (pydantic-settings, the store
and SQLAlchemy) is imported inside the function that uses it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from adsync.errors import AdsyncError, AuthError, ConfigError, StoreError
from adsync.exit_codes import EXIT_AUTH, EXIT_CONFIG, EXIT_FAILURES
from adsync.printable import visible
from adsync.redact import REDACTOR

if TYPE_CHECKING:
    from adsync.store import SqlStore

# soft_wrap: a summary line stays one line in pipes and log collectors.
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_ACCOUNTS_FILE = "accounts.toml"

VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="auto (JSON unless on a terminal), json or console.")
]
AccountsOpt = Annotated[
    Path,
    typer.Option("--accounts", envvar="ADSYNC_ACCOUNTS_FILE", help="The accounts file (TOML)."),
]


def shown(text: str) -> str:
    """Text from outside, ready for rich markup: no secret, no control character, no markup."""
    return escape(visible(REDACTOR.scrub(text)))


def print_traceback(exc: BaseException) -> None:
    """The traceback of ``exc`` on stderr, scrubbed, its control characters escaped."""
    text = "".join(traceback.format_exception(exc)).rstrip("\n")
    err.print(Text(visible(REDACTOR.scrub(text), newlines=True, limit=None)), soft_wrap=True)


@contextlib.contextmanager
def errors(verbose: bool) -> Iterator[None]:
    """Turn errors into one scrubbed line and a distinct exit code.

    2 bad configuration, 3 credentials refused, 1 anything else (a bug
    included); a traceback only with ``--verbose``.
    """
    try:
        yield
    except AdsyncError as exc:
        if verbose:
            print_traceback(exc)
        # soft_wrap: the message stays one line for grep and log collectors.
        err.print(f"[bold red]error:[/] {shown(str(exc))}", soft_wrap=True)
        if isinstance(exc, ConfigError):
            code = EXIT_CONFIG
        elif isinstance(exc, AuthError):
            code = EXIT_AUTH
        else:
            code = EXIT_FAILURES
        raise typer.Exit(code) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: said in one line like any error, exit 1
        if verbose:
            print_traceback(exc)
        hint = "" if verbose else " (--verbose shows the traceback)"
        err.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {shown(str(exc))}{hint}",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FAILURES) from None


def database_url() -> str:
    """DATABASE_URL from the environment, else ``.env``, else the SQLite default.

    Only DATABASE_URL (and ADSYNC_DB_SCHEMA, folded into it): database commands
    must not require the platform credentials.
    """
    from pydantic import Field, SecretStr, ValidationError
    from pydantic_settings import BaseSettings, SettingsConfigDict

    from adsync.config import (
        DB_SCHEMA_PATTERN,
        DEFAULT_DATABASE_URL,
        describe_validation_error,
        with_db_schema,
    )

    class DatabaseSettings(BaseSettings):
        model_config = SettingsConfigDict(
            env_file=".env", env_file_encoding="utf-8", extra="ignore"
        )

        database_url: SecretStr = Field(
            default=SecretStr(DEFAULT_DATABASE_URL), validation_alias="DATABASE_URL"
        )
        db_schema: str | None = Field(
            default=None, validation_alias="ADSYNC_DB_SCHEMA", pattern=DB_SCHEMA_PATTERN
        )

    try:
        found = DatabaseSettings()
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    return with_db_schema(found.database_url.get_secret_value(), found.db_schema)


def open_store(url: str, **store_options: Any) -> SqlStore:
    """A store on ``url`` with the schema migrated; the caller disposes of it."""
    from adsync.store import SqlStore

    store = SqlStore.from_url(url, **store_options)
    try:
        store.upgrade()
    except StoreError:
        store.dispose()
        raise
    return store


def open_reader(url: str) -> SqlStore:
    """A read-only store on ``url`` for the commands that only look; the caller disposes of it.

    Never creates, migrates or writes: a missing database or a schema that is not
    this adsync's is a :class:`ConfigError` saying what to do. One attempt, no
    retries: whoever asked is waiting at a terminal and can ask again.
    """
    from adsync.store import SqlStore

    store = SqlStore.from_url(url, read_only=True, retry_attempts=1)
    try:
        store.require_schema()
    except AdsyncError:
        store.dispose()
        raise
    return store
