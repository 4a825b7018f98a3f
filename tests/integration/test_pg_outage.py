"""PostgreSQL lost mid-run: writes are retried; a database that stays down fails the run cleanly.

The outage is made on the shared test server without stopping it: the run's
backend connections are terminated (as on a server restart), and for the long
outage its database stops accepting the run's role (``CONNECTION LIMIT 0``
binds every role but superusers, so the run logs in as a role of its own).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from _proc import (
    SIM_FAST,
    database,
    flat,
    platform_env,
    run_sync,
    settle,
    start_sync,
    sync_ok,
    wait_for,
)
from psycopg import sql

from adsync.simulator.testing import running_simulator
from pgdatabase import (
    ADMIN_URL,
    admin_connection,
    create_postgres_database,
    drop_postgres_database,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(180)]


CLIENT = "ops"
TOTAL = 100


@dataclass(frozen=True)
class PgDatabase:
    name: str
    admin_url: str  # as the superuser: the test's own looks, unaffected by the outage
    run_url: str  # as a role of its own: what adsync is given
    role: str


@pytest.fixture
def pg(postgres_server: None) -> Iterator[PgDatabase]:
    """A new database owned by a new non-superuser role; both dropped afterwards."""
    admin_url = create_postgres_database()
    name = admin_url.rpartition("/")[2]
    role = f"adsync_role_{uuid.uuid4().hex[:12]}"
    try:
        with admin_connection() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(name), sql.Identifier(role)
                )
            )
        base = ADMIN_URL.rpartition("/")[0]
        scheme, _, rest = base.partition("://")
        host = rest.rpartition("@")[2]
        yield PgDatabase(name, admin_url, f"{scheme}://{role}@{host}/{name}", role)
    finally:
        drop_postgres_database(admin_url)
        with admin_connection() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


class Storm:
    """Terminate the run's connections over and over, in a thread, until stopped."""

    def __init__(self, pg: PgDatabase, every: float = 0.005) -> None:
        self.killed = 0
        self._pg = pg
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-storm", daemon=True)

    def _run(self) -> None:
        with admin_connection() as conn:
            while not self._done.is_set():
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND usename = %s",
                    (self._pg.name, self._pg.role),
                ).fetchall()
                self.killed += sum(1 for (ok,) in rows if ok)
                time.sleep(self._every)

    def __enter__(self) -> Storm:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)


def _retries_logged(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "retrying" in line and "database call" in line]


def test_connections_cut_mid_run_are_retried_and_nothing_is_lost(
    pg: PgDatabase, tmp_path: Path
) -> None:
    with running_simulator(**SIM_FAST) as sim, database(pg.admin_url) as db:
        env = platform_env(sim, pg.run_url)
        sync = start_sync(env, tmp_path)
        wait_for(lambda: db.synced_count() >= 20, what="20 campaigns stored", alive=sync)
        stored_before = db.synced_count()
        with Storm(pg) as storm:
            time.sleep(2.0)
        stored_during = db.synced_count()
        code = sync.wait(60)
        final = sync_ok(sim)
        run = db.only_run()
        db.assert_every_campaign_once(CLIENT, TOTAL)
        snapshots = db.scalar("SELECT count(*) FROM campaign_snapshots")

    assert code == 0, sync.stderr[-3000:]
    assert storm.killed >= 1
    # The storm hit the run's transactions, not just idle pooled connections.
    assert _retries_logged(sync.stderr), sync.stderr[-3000:]
    assert stored_before < TOTAL
    assert stored_during < TOTAL, "the run should still have been going during the outage"
    assert f"{TOTAL} synced, 0 failed of {TOTAL} seen" in flat(sync.stderr)
    assert (run.status, run.synced, run.resumes) == ("succeeded", TOTAL, 0)
    assert snapshots == TOTAL
    assert final == {f"campaign_{i}": 1 for i in range(1, TOTAL + 1)}


def test_a_database_that_stays_down_fails_the_run_cleanly_and_a_rerun_finishes(
    pg: PgDatabase, tmp_path: Path
) -> None:
    with running_simulator(**SIM_FAST) as sim, database(pg.admin_url) as db:
        env = platform_env(sim, pg.run_url)
        # A short retry budget keeps the test quick; the default is 5 attempts.
        env.update(ADSYNC_DB_RETRY_ATTEMPTS="3", ADSYNC_DB_RETRY_WAIT="0.2")
        sync = start_sync(env, tmp_path)
        wait_for(lambda: db.synced_count() >= 20, what="20 campaigns stored", alive=sync)
        with admin_connection() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(pg.name))
            )
        # Sessions that were logging in while the limit went on may still get through.
        with Storm(pg) as storm:
            time.sleep(0.5)
        down_at = time.monotonic()
        code = sync.wait(90)
        failed_after = time.monotonic() - down_at

        run = db.only_run()
        committed = db.synced_items(run.id)
        db.assert_consistent(CLIENT)
        stored = db.scalar("SELECT count(*) FROM campaigns")
        at_fail = settle(sim)

        with admin_connection() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} CONNECTION LIMIT -1").format(sql.Identifier(pg.name))
            )
        rerun = run_sync(env, tmp_path)
        final = sync_ok(sim)
        after = db.only_run()
        db.assert_every_campaign_once(CLIENT, TOTAL)
        snapshots = db.scalar("SELECT count(*) FROM campaign_snapshots")

    said = flat(sync.stderr)
    assert storm.killed >= 1
    assert code == 1, sync.stderr[-3000:]
    assert "database unavailable after 3 attempts" in said
    at = sync.stderr.find("Traceback")
    assert at < 0, sync.stderr[max(0, at - 1500) : at + 1500]
    # Bounded by the store's retry budget (3 attempts, 0.2 s then 0.4 s apart,
    # twice: the write that failed, then recording the run's end).
    assert failed_after < 15
    # Nothing half-written: each stored campaign has its history row and its
    # checkpoint item, and the run is left for the next one to resume.
    assert 20 <= stored == len(committed) < TOTAL
    assert run.status in ("running", "failed")
    assert run.status == "running" or run.resumable

    assert rerun.code == 0, rerun.stderr[-3000:]
    assert "(resumed)" in rerun.said
    assert (after.id, after.status, after.resumes) == (run.id, "succeeded", 1)
    assert snapshots == TOTAL
    assert all(final[c] == at_fail[c] for c in committed), "stored campaigns synced again"
    assert sum(final.values()) - TOTAL == len(set(at_fail) - committed)


def test_the_outage_shuts_out_the_run_role_but_not_the_test(pg: PgDatabase) -> None:
    """The premise of the test above: CONNECTION LIMIT 0 binds the run's role only."""
    with psycopg.connect(pg.run_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
    with admin_connection() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(pg.name))
        )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.run_url, connect_timeout=3).close()
    with database(pg.admin_url) as db:
        assert db.scalar("SELECT count(*) FROM t") == 0
