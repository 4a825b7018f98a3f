"""Store plumbing without a server: fault classification, retries, messages, types."""

from __future__ import annotations

import random
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect

from adsync.errors import ConfigError, StoreError
from adsync.models import Checkpoint, RunCounters, RunRecord, RunStatus
from adsync.store import SqlStore, UTCDateTime, is_transient_db_error

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Ceiling(random.Random):
    """Draws the top of every range: each retry waits its backoff's ceiling, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _wrapped(orig: Exception, cls: type[sa.exc.DBAPIError] = sa.exc.OperationalError) -> Any:
    return cls("SELECT 1", {}, orig)


def _real_sqlite_error(sql: str) -> sqlite3.Error:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(sql)
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("expected an error")


def _sqlite_disk_full() -> sqlite3.Error:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("PRAGMA max_page_count = 2")
        for _ in range(100):
            conn.execute("INSERT INTO t VALUES (?)", ("x" * 1000,))
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("expected the database to fill up")


def _sqlite_error(name: str, message: str) -> sqlite3.Error:
    # What the driver raises for errors a test cannot easily cause for real.
    error = sqlite3.OperationalError(message)
    error.sqlite_errorname = name  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        pytest.param(_wrapped(psycopg.OperationalError("connection refused")), True, id="refused"),
        pytest.param(_wrapped(psycopg.errors.AdminShutdown("bye")), True, id="pg-shutdown"),
        pytest.param(
            _wrapped(psycopg.errors.SerializationFailure("retry")), True, id="pg-serialization"
        ),
        pytest.param(_wrapped(psycopg.errors.DiskFull("full")), True, id="pg-insufficient"),
        pytest.param(
            _wrapped(psycopg.InterfaceError("closed"), sa.exc.InterfaceError), True, id="interface"
        ),
        pytest.param(_wrapped(sqlite3.OperationalError("database is locked")), True, id="locked"),
        # Resources running out is an outage, as PostgreSQL's class 53 is.
        pytest.param(_wrapped(_sqlite_disk_full()), True, id="sqlite-full"),
        pytest.param(
            _wrapped(_sqlite_error("SQLITE_IOERR_WRITE", "disk I/O error")), True, id="sqlite-ioerr"
        ),
        pytest.param(_wrapped(_sqlite_error("SQLITE_NOMEM", "out of memory")), True, id="nomem"),
        pytest.param(
            _wrapped(_sqlite_error("SQLITE_CORRUPT", "malformed")), False, id="sqlite-corrupt"
        ),
        pytest.param(
            _wrapped(_real_sqlite_error("SELECT * FROM nowhere")), False, id="no-such-table"
        ),
        pytest.param(
            _wrapped(psycopg.errors.UniqueViolation("dup"), sa.exc.IntegrityError),
            False,
            id="integrity",
        ),
        pytest.param(
            _wrapped(psycopg.errors.UndefinedTable("x"), sa.exc.ProgrammingError),
            False,
            id="programming",
        ),
        pytest.param(sa.exc.TimeoutError("pool exhausted"), True, id="pool-timeout"),
        pytest.param(ValueError("not a database error"), False, id="other"),
    ],
)
def test_is_transient_db_error(error: BaseException, transient: bool) -> None:
    assert is_transient_db_error(error) is transient


def test_invalidated_connection_is_transient() -> None:
    error = sa.exc.DBAPIError("SELECT 1", {}, psycopg.DatabaseError("gone"))
    error.connection_invalidated = True
    assert is_transient_db_error(error)


def test_connect_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    sleeps: list[float] = []
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'a.db'}", sleep=sleeps.append, rng=Ceiling())
    failures = [2]

    @event.listens_for(store.engine, "do_connect")
    def flaky(*_args: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")

    try:
        store.upgrade()
        assert store.count_campaigns() == 0
    finally:
        store.dispose()
    assert failures == [0]
    assert sleeps == [0.5, 1.0]


def test_backoff_is_capped_and_attempts_bounded(tmp_path: Path) -> None:
    sleeps: list[float] = []
    store = SqlStore.from_url(
        f"sqlite:///{tmp_path / 'a.db'}",
        sleep=sleeps.append,
        retry_attempts=6,
        retry_wait=1.0,
        retry_wait_max=5.0,
        rng=Ceiling(),
    )

    @event.listens_for(store.engine, "do_connect")
    def down(*_args: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    try:
        with pytest.raises(StoreError, match="database unavailable after 6 attempts") as info:
            store.count_snapshots()
    finally:
        store.dispose()
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)


def test_retry_waits_are_jittered_under_the_backoff(tmp_path: Path) -> None:
    # Processes that lost the database together must not all come back together.
    sleeps: list[float] = []
    store = SqlStore.from_url(
        f"sqlite:///{tmp_path / 'a.db'}",
        sleep=sleeps.append,
        retry_attempts=6,
        retry_wait=1.0,
        retry_wait_max=5.0,
    )

    @event.listens_for(store.engine, "do_connect")
    def down(*_args: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    try:
        with pytest.raises(StoreError, match="database unavailable after 6 attempts"):
            store.count_snapshots()
    finally:
        store.dispose()
    ceilings = [1.0, 2.0, 4.0, 5.0, 5.0]
    assert len(sleeps) == len(ceilings)
    assert all(0.0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    assert sleeps != ceilings


def test_retries_can_last_for_a_time_whatever_the_draws(tmp_path: Path) -> None:
    # retry_for: at least that long of waiting, past retry_attempts if need be.
    sleeps: list[float] = []
    store = SqlStore.from_url(
        f"sqlite:///{tmp_path / 'a.db'}",
        sleep=sleeps.append,
        retry_attempts=2,
        retry_wait=1.0,
        retry_wait_max=5.0,
        retry_for=60.0,
        rng=random.Random(3),
    )

    @event.listens_for(store.engine, "do_connect")
    def down(*_args: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    try:
        with pytest.raises(StoreError) as info:
            store.count_snapshots()
    finally:
        store.dispose()
    assert sum(sleeps[:-1]) < 60.0 <= sum(sleeps)
    assert all(s <= 5.0 for s in sleeps)
    assert str(info.value).startswith(f"database unavailable after {len(sleeps) + 1} attempts")


def test_password_never_appears_even_if_the_driver_echoes_it() -> None:
    password = "pa55-w0rd!"
    engine = sa.create_engine(f"postgresql+psycopg://adsync:{password}@db.invalid:5432/adsync")

    @event.listens_for(engine, "do_connect")
    def refuse(*_args: Any) -> None:
        raise psycopg.OperationalError(f"connection to 'adsync:{password}@db.invalid' refused")

    store = SqlStore(engine, retry_attempts=2, sleep=lambda _s: None)
    try:
        with pytest.raises(StoreError) as info:
            store.get_run("abc")
    finally:
        store.dispose()
    message = str(info.value)
    assert password not in message
    assert "adsync:***@db.invalid" in message
    assert "refused" in message


@pytest.mark.parametrize(
    "url",
    ["notadb://user:hunter2@host/db", "postgresql+nosuchdriver://user:hunter2@host/db", ":::"],
)
def test_bad_urls_are_reported_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL") as info:
        SqlStore.from_url(url)
    assert "hunter2" not in str(info.value)


def test_in_memory_sqlite_is_one_database_for_all_threads() -> None:
    store = SqlStore.from_url("sqlite://")
    try:
        store.upgrade()
        run = store.claim_run("acme", "o:1:x", 30)
        seen: list[Any] = []
        thread = threading.Thread(target=lambda: seen.append(store.get_run(run.id)))
        thread.start()
        thread.join()
        assert seen == [run]
    finally:
        store.dispose()


@pytest.mark.parametrize("dialect", [sqlite_dialect.dialect(), postgresql.dialect()])
def test_utc_datetime_round_trip(dialect: sa.Dialect) -> None:
    kind = UTCDateTime()
    plus_two = datetime(2025, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    bound = kind.process_bind_param(plus_two, dialect)
    assert bound is not None
    if dialect.name == "sqlite":
        assert bound == datetime(2025, 1, 1, 12, 0)  # naive UTC: SQLite keeps no offset
    else:
        assert bound == plus_two
        assert bound.utcoffset() == timedelta(0)
    back = kind.process_result_value(bound, dialect)
    assert back == plus_two
    assert back is not None
    assert back.tzinfo is UTC
    assert kind.process_bind_param(datetime(2025, 1, 1, 12, 0), dialect) in (
        datetime(2025, 1, 1, 12, 0),
        datetime(2025, 1, 1, 12, 0, tzinfo=UTC),
    )
    assert kind.process_bind_param(None, dialect) is None
    assert kind.process_result_value(None, dialect) is None


def _run(**changes: Any) -> RunRecord:
    values: dict[str, Any] = {
        "id": "a" * 32,
        "client_id": "acme",
        "status": RunStatus.SUCCEEDED,
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=90),
        "heartbeat_at": T0,
        "lease_until": T0,
        "owner": "o",
        "resumes": 0,
        "seen": 3,
        "synced": 2,
        "failed": 1,
        "requests": 9,
        "retries": 4,
        "rate_limited": 1,
        "pages": 1,
        "listing_complete": True,
        "resumable": False,
        "error": None,
    }
    values.update(changes)
    return RunRecord(**values)


def test_run_record_helpers() -> None:
    assert _run().duration == timedelta(seconds=90)
    assert _run(finished_at=None).duration is None
    assert _run().counters() == RunCounters(
        seen=3, synced=2, failed=1, requests=9, retries=4, rate_limited=1, pages=1
    )


def test_checkpoint_pending() -> None:
    cp = Checkpoint(
        synced=frozenset({"a"}),
        failed=frozenset({"b"}),
        listed=frozenset({"a", "b", "c"}),
        listing_complete=False,
    )
    assert cp.pending == {"c"}
