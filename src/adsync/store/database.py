"""The database a store works on: its engine, its transactions, and its clock.

One :class:`~sqlalchemy.engine.Engine` per process is built at the edge
(:func:`engine_for`) and passed in. Every transaction of a store goes through
:meth:`Database.transaction`: retried as a whole on transient faults (server
restarted, connection refused, SQLite busy), so that a retry after a lost
connection can never leave half a write behind, and whatever still fails comes
out as :class:`~adsync.errors.StoreError`, whose message never carries the
DSN password.

Decisions that depend on time (leases, the shared rate log) and the stamps a
store writes read one clock, the database's (:meth:`Database.now`), inside the
transaction that acts on it, never the calling process's.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from adsync.errors import AdsyncError, ConfigError, StoreError, StoreUnavailable
from adsync.store.faults import (
    describe_db_error,
    is_busy,
    is_transient_db_error,
    retry_transient_db_errors,
)
from adsync.store.schema import UTCDateTime
from adsync.store.urls import location, parse_database_url, read_only_sqlite_url

__all__ = ["Database", "engine_for"]

log = logging.getLogger("adsync.store")

T = TypeVar("T")

# How long a read-only command waits for a lock another process holds (a writer
# outside WAL mode, a migration) before it says the database is busy.
_READ_LOCK_WAIT_MS: Final = 2000

# The database's clock as it is now (not the transaction's start).
_PG_CLOCK: Final = sa.select(sa.func.clock_timestamp(type_=sa.DateTime(timezone=True)))


def engine_for(database_url: str, *, read_only: bool = False) -> Engine:
    """The engine (one pool for the process) of a DATABASE_URL.

    A URL that cannot be used is a :class:`ConfigError` (exit 2), never a
    database outage to retry. ``read_only`` opens SQLite with ``mode=ro`` (a
    missing file is a :class:`ConfigError`: nothing is created).
    """
    url = parse_database_url(database_url)
    engine_kw: dict[str, Any] = {"pool_pre_ping": True}
    if read_only and url.get_backend_name() == "sqlite":
        url = read_only_sqlite_url(url)
    if url.get_backend_name() == "sqlite":
        # The pipeline calls in from worker threads; the pool hands each call
        # its own connection, so sqlite3's same-thread check only gets in the way.
        engine_kw["connect_args"] = {"check_same_thread": False}
        if url.database in (None, "", ":memory:"):
            # Every pooled connection to :memory: would be a different database.
            engine_kw["poolclass"] = sa.StaticPool
    elif url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        # libpq waits forever for an unreachable host by default.
        engine_kw["connect_args"] = {"connect_timeout": 10}
    try:
        return sa.create_engine(url, **engine_kw)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(
            f"cannot use DATABASE_URL: {type(exc).__name__} (adsync supports "
            "sqlite:///PATH and postgresql://USER@HOST/DB)"
        ) from None


class Database:
    """An engine with adsync's transactions over it: retried, translated, and clocked.

    Thread-safe. A transaction that fails transiently is tried again, up to
    ``retry_attempts`` times (and, with ``retry_for``, for at least that many
    seconds of waiting), after waits of full jitter under a backoff doubling from
    ``retry_wait`` to ``retry_wait_max`` (``rng`` draws them). ``now`` stands in
    for the database's clock (tests); ``read_only`` makes every SQLite connection
    ``query_only`` and every PostgreSQL transaction ``READ ONLY``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        retry_attempts: int = 5,
        retry_wait: float = 0.5,
        retry_wait_max: float = 10.0,
        retry_for: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        now: Callable[[], datetime] | None = None,
        read_only: bool = False,
    ) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise StoreError(
                f"unsupported database {engine.dialect.name!r}: use SQLite or PostgreSQL"
            )
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.read_only = read_only
        self.attempts = max(1, retry_attempts)
        self._wait = retry_wait
        self._wait_max = retry_wait_max
        self._retry_for = retry_for
        self._sleep = sleep
        # Threads share it: each draw is one call into C, whole under the GIL.
        self._rng = rng or random.Random()
        self._clock = now
        if self.sqlite:
            _prepare_sqlite(engine, read_only=read_only)
        elif read_only and not event.contains(engine, "begin", _pg_read_only_on_begin):
            event.listen(engine, "begin", _pg_read_only_on_begin)

    @property
    def where(self) -> str:
        """Where the database is, for messages: its URL without any password."""
        return location(self.engine.url, read_only=self.read_only)

    def describe(self, exc: BaseException) -> str:
        """A database error in one line, for messages: no statement, no password."""
        return describe_db_error(exc, self.engine.url)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def now(self, conn: Connection) -> datetime:
        """The database's clock, read in the transaction that acts on it.

        PostgreSQL's ``clock_timestamp()`` (the time now, not the transaction's
        start: a claim may have waited for a lock); on SQLite the host's clock, the
        one clock of every process that can open the file.
        """
        if self._clock is not None:
            return self._clock()
        if self.sqlite:
            return datetime.now(UTC)
        value: datetime = conn.execute(_PG_CLOCK).scalar_one()
        return value.astimezone(UTC)

    def seconds_since(self, now: datetime, column: sa.ColumnElement[Any]) -> Any:
        """SQL for the seconds from ``column`` to ``now`` (never negative)."""
        bound = sa.bindparam(None, now, type_=UTCDateTime())
        if self.sqlite:
            # julianday() keeps whole milliseconds: round the difference to them.
            days = sa.func.julianday(bound) - sa.func.julianday(column)
            return sa.func.max(0.0, sa.func.round(days * 86_400_000.0) / 1000.0)
        return sa.func.greatest(0.0, sa.extract("epoch", bound - column))

    def insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_update`` / ``_do_nothing``."""
        # The two dialects' Insert classes share on_conflict_do_* but no common type.
        return sqlite.insert(table) if self.sqlite else postgresql.insert(table)

    def transaction(self, op: str, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        """Run ``fn`` in one transaction, retrying the whole of it on transient faults.

        ``op`` names it in messages. ``write`` takes SQLite's write lock up front
        (``BEGIN IMMEDIATE``). Raises :class:`StoreUnavailable` when the database
        stayed unreachable or busy through every attempt, :class:`StoreError` for
        anything else the database refused; errors of adsync's own pass as they are.
        """

        def once() -> T:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(adsync_write=True)
                with conn.begin():
                    return fn(conn)

        tries = 1

        def log_retry(tried: int, exc: BaseException, _wait: float) -> None:
            nonlocal tries
            tries = tried + 1
            log.warning(
                "database call %s failed (attempt %d of %d), retrying: %s",
                op,
                tried,
                max(self.attempts, tries),
                self.describe(exc),
            )

        try:
            return retry_transient_db_errors(
                once,
                attempts=self.attempts,
                wait=self._wait,
                wait_max=self._wait_max,
                rng=self._rng,
                sleep=self._sleep,
                on_retry=log_retry,
                at_least=self._retry_for,
            )
        except AdsyncError:
            raise
        except (SQLAlchemyError, OverflowError) as exc:
            # OverflowError: sqlite3 refuses an int beyond 64 bits before SQLAlchemy sees it.
            if is_transient_db_error(exc):
                busy = (
                    " (busy: another process holds a lock on it; try again)" if is_busy(exc) else ""
                )
                raise StoreUnavailable(
                    f"database unavailable after {tries} attempt{'s' if tries != 1 else ''} "
                    f"({self.where}): {self.describe(exc)}{busy}"
                ) from exc
            raise StoreError(
                f"database error in {op} ({self.where}): {self.describe(exc)}"
            ) from exc


def _prepare_sqlite(engine: Engine, *, read_only: bool = False) -> None:
    """Install the SQLite connection setup once per engine."""
    on_connect = _sqlite_read_only_on_connect if read_only else _sqlite_on_connect
    if not event.contains(engine, "connect", on_connect):
        event.listen(engine, "connect", on_connect)
    if not event.contains(engine, "begin", _sqlite_on_begin):
        event.listen(engine, "begin", _sqlite_on_begin)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # sqlite3's own transaction handling skips BEGIN before SELECT and DDL; we emit
    # BEGIN ourselves (see _sqlite_on_begin) so every call is one real transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers never block the writer. NORMAL is crash-safe in WAL mode (a
        # power cut may lose the last commits, which only means re-syncing them).
        cursor.execute("PRAGMA busy_timeout=15000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_read_only_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # No journal_mode or synchronous pragma: both are the writers' to set. A reader
    # in WAL mode never waits; outside it, it waits this long for a writer's lock.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={_READ_LOCK_WAIT_MS}")
        cursor.execute("PRAGMA query_only=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the write lock up front: a deferred transaction that reads and then
    # writes can fail with SQLITE_BUSY at once, whatever the busy timeout.
    immediate = conn.get_execution_options().get("adsync_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _pg_read_only_on_begin(conn: Connection) -> None:
    # The first statements of the transaction psycopg opens: a write is refused by
    # the server, and a lock held by a migration is waited for only briefly.
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {_READ_LOCK_WAIT_MS}")
