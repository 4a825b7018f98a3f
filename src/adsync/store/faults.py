"""Database failures: which ones a retry can fix, how they are told, and the retry loop.

"Transient" here means the database's kind (server restarting, connection lost,
SQLite busy, resources running out), not the platform's
(:func:`adsync.retry.is_retryable_platform_error`). The waits between attempts
are the one backoff of adsync (:func:`adsync.retry.full_jitter_backoff`): many
processes that lost the database together do not all come back together.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from adsync.retry import full_jitter_backoff
from adsync.store.urls import scrub

__all__ = [
    "describe_db_error",
    "is_busy",
    "is_missing_database",
    "is_transient_db_error",
    "retry_transient_db_errors",
]

T = TypeVar("T")

# PostgreSQL SQLSTATE classes worth a retry: connection exceptions, serialization
# failures and deadlocks, insufficient resources, server shutting down or starting up.
_PG_TRANSIENT_SQLSTATES: Final = ("08", "40", "53", "57P", "55P03")
# SQLite's busy and locked, and its resources running out (disk full, I/O error,
# out of memory): an outage as PostgreSQL's class 53 is, never a campaign's fault.
_SQLITE_TRANSIENT: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_NOMEM",
)


def is_transient_db_error(exc: BaseException) -> bool:
    """True for database failures that a retry a moment later can fix."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlite_name, str):
        return sqlite_name.startswith(_SQLITE_TRANSIENT)
    sqlstate = getattr(orig, "sqlstate", None)
    if not isinstance(sqlstate, str):
        # No SQLSTATE: the server never answered (refused, reset, timed out), or a
        # driver that does not report one (sqlite3 before 3.11): "locked" is the
        # only transient SQLite operational error.
        return "sqlite" not in type(orig).__module__ or "locked" in str(orig)
    return sqlstate.startswith(_PG_TRANSIENT_SQLSTATES)


def is_busy(exc: BaseException) -> bool:
    """Whether a transient failure is another process's lock rather than an outage."""
    orig = getattr(exc, "orig", None) or exc
    name = getattr(orig, "sqlite_errorname", None) or ""
    sqlstate = getattr(orig, "sqlstate", None) or ""
    return (
        name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
        or sqlstate == "55P03"
        or ("sqlite" in type(orig).__module__ and "locked" in str(orig))
    )


def is_missing_database(exc: BaseException) -> bool:
    """Whether the server said the database (or role) does not exist."""
    # libpq reports it at connect time, with no SQLSTATE.
    return isinstance(exc, DBAPIError) and "does not exist" in str(exc.orig)


def describe_db_error(exc: BaseException, url: sa.URL) -> str:
    """Class, SQLSTATE and first line of the driver's message, the secrets of ``url`` scrubbed.

    Not ``str(exc)``: SQLAlchemy's text carries the statement and its parameters.
    """
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    lines = str(orig).strip().splitlines()
    text = f"{type(orig).__name__}{f' [{code}]' if code else ''}: {lines[0] if lines else ''}"
    return scrub(text, url)


def retry_transient_db_errors(
    attempt: Callable[[], T],
    *,
    attempts: int,
    wait: float,
    wait_max: float,
    rng: random.Random,
    sleep: Callable[[float], None],
    on_retry: Callable[[int, BaseException, float], None],
    at_least: float = 0.0,
) -> T:
    """Call ``attempt`` again after each transient failure; re-raise any other, or the last.

    Tries at most ``attempts`` times, or for as long as the waits add up to less
    than ``at_least`` seconds if that is more. The wait before try ``n + 1`` is
    uniform in ``[0, min(wait_max, wait * 2**(n-1))]``. ``on_retry(n, error,
    wait)`` hears of each failed try ``n`` that is tried again.
    """
    tried, waited = 1, 0.0
    while True:
        try:
            return attempt()
        except Exception as exc:
            if not is_transient_db_error(exc) or (tried >= attempts and waited >= at_least):
                raise
            pause = full_jitter_backoff(tried, initial=wait, maximum=wait_max, rng=rng)
            on_retry(tried, exc, pause)
            sleep(pause)
            tried, waited = tried + 1, waited + pause
