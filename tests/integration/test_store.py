"""What only the SQL store has: migrations, the database's own clock, faults, retries.

The promises every store keeps (claims, leases, checkpoints, writes, history) are
tested on every store, the in-memory one included, in tests/contract.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _dbclock import DbClock
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event

from adsync.errors import RunLocked, StoreError
from adsync.models import (
    CampaignFailure,
    RunRecord,
    RunStatus,
)
from adsync.store import SqlStore, metadata, sync_runs
from adsync.store.schema import MIGRATIONS_DIR, REVISIONS
from factories import T0, synced

LEASE = 30.0
OWNER = "host-a:100:aaaa"
OTHER = "host-b:200:bbbb"


class Ceiling(random.Random):
    """Draws the top of every range: each retry waits its backoff's ceiling, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


# The database's clock in these tests: each call below says what time it is.
DB_CLOCK = DbClock(T0)


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """The shared ``store`` fixture, on the clock the tests set."""
    DB_CLOCK.at = T0
    sql_store = SqlStore.from_url(database_url, sleep=lambda _seconds: None, now=DB_CLOCK)
    sql_store.upgrade()
    try:
        yield sql_store
    finally:
        sql_store.dispose()


def claim(store: SqlStore, client: str, owner: str, now: datetime) -> RunRecord:
    DB_CLOCK.at = now
    return store.claim_run(client, owner, LEASE)


def start(
    store: SqlStore, client: str = "acme", owner: str = OWNER, now: datetime = T0
) -> RunRecord:
    return claim(store, client, owner, now)


# --- migrations ------------------------------------------------------------------------


def test_migrations_apply_and_are_idempotent(fresh_database_url: str) -> None:
    store = SqlStore.from_url(fresh_database_url)
    try:
        store.upgrade()
        store.upgrade()
        with store.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            # The migration and store.metadata describe the same schema.
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata
            )
        assert {
            "sync_runs",
            "run_items",
            "campaigns",
            "campaign_snapshots",
            "sync_failures",
            "rate_sends",
        } <= tables
        assert versions == [("0004",)]
        assert diff == []
    finally:
        store.dispose()


def test_the_revisions_the_readers_know_are_the_migration_scripts() -> None:
    # Read-only commands check the schema against REVISIONS without loading Alembic.
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    scripts = [rev.revision for rev in reversed(list(script.walk_revisions()))]
    assert tuple(scripts) == REVISIONS
    assert script.get_heads() == [REVISIONS[-1]]


def test_concurrent_upgrades_do_not_collide(fresh_database_url: str) -> None:
    stores = [SqlStore.from_url(fresh_database_url) for _ in range(3)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def upgrade(s: SqlStore) -> None:
        barrier.wait()
        try:
            s.upgrade()
        except BaseException as exc:  # noqa: BLE001 - asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert errors == []
        assert stores[0].count_campaigns() == 0
    finally:
        for s in stores:
            s.dispose()


def test_one_running_run_per_client_is_enforced_by_the_database(store: SqlStore) -> None:
    run = start(store)
    row = {
        "client_id": "acme",
        "status": "running",
        "started_at": T0,
        "heartbeat_at": T0,
        "lease_until": T0,
        "owner": OTHER,
    }
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.insert(metadata.tables["sync_runs"]).values(id="x" * 32, **row))
    # A finished run for the same client is not constrained.
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(metadata.tables["sync_runs"]).values(
                id="y" * 32, **{**row, "status": "succeeded"}
            )
        )
    assert store.get_run(run.id) is not None


# --- leases ----------------------------------------------------------------------------


def test_a_live_run_is_a_running_one_whose_lease_holds(database_url: str) -> None:
    # The database's own clock (no stand-in): leases are measured from now.
    store = SqlStore.from_url(database_url, sleep=lambda _seconds: None)
    store.upgrade()

    def put(run_id: str, status: RunStatus, lease: timedelta) -> None:
        now = datetime.now(UTC)
        with store.engine.begin() as conn:
            conn.execute(sa.delete(sync_runs).where(sync_runs.c.id == run_id))
            conn.execute(
                sa.insert(sync_runs).values(
                    id=run_id,
                    client_id="acme",
                    status=status.value,
                    started_at=now,
                    heartbeat_at=now,
                    lease_until=now + lease,
                    owner=OWNER,
                    finished_at=None if status is RunStatus.RUNNING else now,
                )
            )

    try:
        assert store.live_run("acme") is None
        put("r1", RunStatus.RUNNING, timedelta(seconds=LEASE))
        live = store.live_run("acme")
        assert live is not None
        assert (live.id, live.owner) == ("r1", OWNER)
        assert store.live_run("other") is None

        # Its lease ran out (its process died or lost the database): not live.
        put("r1", RunStatus.RUNNING, timedelta(minutes=-5))
        assert store.live_run("acme") is None

        # Finished: not live either, whatever its lease says.
        put("r1", RunStatus.SUCCEEDED, timedelta(minutes=5))
        assert store.live_run("acme") is None
    finally:
        store.dispose()


# --- faults ------------------------------------------------------------------------------


def _fail_statements(store: SqlStore, table: str, times: int) -> list[int]:
    """Make the next ``times`` INSERTs into ``table`` fail like a dropped connection."""
    calls: list[int] = []
    error: type[Exception] = (
        psycopg.OperationalError
        if store.engine.dialect.name == "postgresql"
        else sqlite3.OperationalError
    )

    @event.listens_for(store.engine, "before_cursor_execute")
    def flaky(*args: Any) -> None:
        statement = args[2]
        if statement.startswith(f"INSERT INTO {table}") and len(calls) < times:
            calls.append(1)
            raise error("database is locked (simulated)")

    return calls


def test_a_failed_write_is_retried_whole(database_url: str, store: SqlStore) -> None:
    run = start(store)
    store.record_listed(run.id, "acme", ["c1", "c2"])
    sleeps: list[float] = []
    flaky_store = SqlStore.from_url(
        database_url, sleep=sleeps.append, retry_wait=0.25, rng=Ceiling()
    )
    try:
        # Fails after the campaigns upsert, inside the same transaction.
        calls = _fail_statements(flaky_store, "campaign_snapshots", times=2)
        flaky_store.write_synced(run.id, "acme", [synced("c1"), synced("c2")])
    finally:
        flaky_store.dispose()
    assert len(calls) == 2
    assert sleeps == [0.25, 0.5]
    assert store.count_campaigns() == 2
    assert store.count_snapshots() == 2
    assert store.checkpoint(run.id).synced == {"c1", "c2"}


def test_a_write_that_keeps_failing_leaves_nothing_half_written(
    database_url: str, store: SqlStore
) -> None:
    run = start(store)
    store.record_listed(run.id, "acme", ["c1", "c2"])
    sleeps: list[float] = []
    flaky_store = SqlStore.from_url(database_url, sleep=sleeps.append, retry_attempts=3)
    try:
        _fail_statements(flaky_store, "run_items", times=100)
        with pytest.raises(StoreError, match="database unavailable after 3 attempts") as info:
            flaky_store.write_synced(run.id, "acme", [synced("c1"), synced("c2")])
    finally:
        flaky_store.dispose()
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    assert len(sleeps) == 2
    assert store.count_campaigns() == 0
    assert store.count_snapshots() == 0
    assert store.checkpoint(run.id).pending == {"c1", "c2"}


def test_every_stamp_is_the_databases_time_in_the_transaction_that_writes(
    database_url: str, store: SqlStore
) -> None:
    # One clock, the database's, read where the write happens: a write retried
    # after a wait is stamped when it is made, not when it was asked for.
    run = start(store)

    def wait(_seconds: float) -> None:
        DB_CLOCK.at += timedelta(seconds=10)

    flaky = SqlStore.from_url(database_url, sleep=wait, now=DB_CLOCK)
    try:
        _fail_statements(flaky, "run_items", times=1)
        flaky.record_listed(run.id, "acme", ["c1", "c2"])
        listed_at = DB_CLOCK.at
        _fail_statements(flaky, "sync_failures", times=1)
        flaky.write_failures(run.id, "acme", [CampaignFailure("c1", "HTTP 500", "sync")])
        failed_at = DB_CLOCK.at
        _fail_statements(flaky, "campaign_snapshots", times=1)
        flaky.write_synced(run.id, "acme", [synced("c2")])
        synced_at = DB_CLOCK.at
    finally:
        flaky.dispose()
    assert (listed_at, failed_at, synced_at) == (
        T0 + timedelta(seconds=10),
        T0 + timedelta(seconds=20),
        T0 + timedelta(seconds=30),
    )
    items, failures = metadata.tables["run_items"], metadata.tables["sync_failures"]
    with store.engine.connect() as conn:
        stamps = dict(conn.execute(sa.select(items.c.campaign_id, items.c.updated_at)).all())
        [failure_stamp] = conn.execute(sa.select(failures.c.failed_at)).scalars().all()
    assert stamps == {"c1": failed_at, "c2": synced_at}
    assert failure_stamp == failed_at


def test_a_non_transient_error_is_not_retried(fresh_database_url: str) -> None:
    sleeps: list[float] = []
    unmigrated = SqlStore.from_url(fresh_database_url, sleep=sleeps.append)
    try:
        with pytest.raises(StoreError, match="database error in count") as info:
            unmigrated.count_campaigns()
    finally:
        unmigrated.dispose()
    assert sleeps == []
    assert "SELECT" not in str(info.value)  # the statement stays out of the message


# --- reading ---------------------------------------------------------------------------


def test_an_unreachable_server_fails_cleanly_without_the_password() -> None:
    sleeps: list[float] = []
    # Port 1 on loopback refuses at once: the server is "down".
    down = SqlStore.from_url(
        "postgresql://adsync:s3cr3t-pw@127.0.0.1:1/adsync",
        retry_attempts=3,
        sleep=sleeps.append,
        rng=Ceiling(),
    )
    try:
        with pytest.raises(StoreError) as info:
            down.count_campaigns()
    finally:
        down.dispose()
    message = str(info.value)
    assert message.startswith("database unavailable after 3 attempts")
    assert "s3cr3t-pw" not in message
    assert "s3cr3t-pw" not in repr(info.value)
    assert "127.0.0.1:1" in message
    assert sleeps == [0.5, 1.0]


@pytest.mark.postgres
def test_an_owner_that_comes_back_between_read_and_takeover_keeps_its_run(
    postgres_url: str,
) -> None:
    # SQLite serializes claims (BEGIN IMMEDIATE); on PostgreSQL the takeover's
    # compare-and-set is what stops a claimer acting on a stale read.
    client = "cas-client"
    claimer = SqlStore.from_url(postgres_url, now=DB_CLOCK)
    original = SqlStore.from_url(postgres_url, now=DB_CLOCK)
    try:
        claimer.upgrade()
        run = claim(original, client, OWNER, T0)
        DB_CLOCK.at = T0 + timedelta(seconds=LEASE + 1)
        revived: list[bool] = []

        @event.listens_for(claimer.engine, "before_cursor_execute")
        def revive(*args: Any) -> None:
            if args[2].startswith("UPDATE sync_runs") and not revived:
                revived.append(original.heartbeat(run.id, OWNER, LEASE))

        with pytest.raises(RunLocked, match=OWNER):
            claimer.claim_run(client, OTHER, LEASE)
        assert revived == [True]
        kept = original.get_run(run.id)
        assert kept is not None
        assert (kept.owner, kept.resumes) == (OWNER, 0)
    finally:
        claimer.dispose()
        original.dispose()
