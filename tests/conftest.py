"""Database fixtures shared by every test: SQLite files and throwaway PostgreSQL databases.

PostgreSQL comes from ``ADSYNC_TEST_POSTGRES_URL`` (default: the local server with
trust auth). When it is unreachable the postgres tests skip, except in CI
(``CI=true``), where they fail: CI must exercise both backends.

Tests that restart or stop PostgreSQL get a cluster of their own (``pg_cluster``,
see ``pgcluster.py``), never the shared server; they are marked ``slow``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from adsync.store import SqlStore, metadata
from pgcluster import ClusterUnavailable, PgCluster, throwaway_cluster
from pgdatabase import ADMIN_URL, admin_connection, throwaway_database

# Children before parents, so TRUNCATE order never matters to the foreign keys.
_TABLES = [t.name for t in reversed(metadata.sorted_tables)]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """Skip (or, in CI, fail) when PostgreSQL is not reachable."""
    try:
        with admin_connection() as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL is not reachable at {ADMIN_URL} ({type(exc).__name__})"
        if _in_ci():
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
        pytest.skip(f"{reason}; set ADSYNC_TEST_POSTGRES_URL or start the server")


@pytest.fixture(scope="session")
def postgres_url(postgres_server: None) -> Iterator[str]:
    """A throwaway database for the whole session, dropped at the end."""
    with throwaway_database() as url:
        yield url


@pytest.fixture
def pg_url(postgres_server: None) -> Iterator[str]:
    """A PostgreSQL database of this test's own (Procrastinate's queue starts empty)."""
    with throwaway_database() as url:
        yield url


def _truncate(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        # A connection leaked by an earlier test would block TRUNCATE forever.
        conn.execute("SET lock_timeout = '10s'")
        present = {
            row[0]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        tables = [t for t in _TABLES if t in present]
        if tables:
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                    sql.SQL(", ").join(sql.Identifier(t) for t in tables)
                )
            )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file of its own for this test."""
    return f"sqlite:///{tmp_path / 'adsync.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; the tables (if migrated already) are empty."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    url = str(request.getfixturevalue("postgres_url"))
    _truncate(url)
    return url


@pytest.fixture
def fresh_database_url(database_url: str) -> Iterator[str]:
    """Like ``database_url``, but an entirely new database (no schema at all)."""
    if database_url.startswith("sqlite"):
        yield database_url
        return
    with throwaway_database() as url:
        yield url


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """A migrated store on each backend that never really sleeps between retries."""
    sql_store = SqlStore.from_url(database_url, sleep=lambda _seconds: None)
    sql_store.upgrade()
    try:
        yield sql_store
    finally:
        sql_store.dispose()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own, to restart or stop; removed afterwards.

    Skips (fails in CI) when the PostgreSQL server binaries are not installed.
    """
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as exc:
        if _in_ci():
            pytest.fail(f"{exc}; CI must run the PostgreSQL restart tests")
        pytest.skip(str(exc))


# --- tiers ------------------------------------------------------------------------------
# `pytest -m "not slow"` is the fast inner loop, so a test that starts a process (an
# `adsync` subprocess, a pty, a simulator of its own, a PostgreSQL cluster to stop) must
# be marked slow. Audit events see every start, whichever library makes it.

_SPAWNS = frozenset(
    {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system"}
)
_spawned: list[str] = []


def _audit(event: str, _args: tuple[object, ...]) -> None:
    if event in _SPAWNS:
        _spawned.append(event)


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _slow_if_it_starts_a_process(request: pytest.FixtureRequest) -> Iterator[None]:
    _spawned.clear()
    yield
    if _spawned and request.node.get_closest_marker("slow") is None:
        pytest.fail(
            f"this test starts a process ({_spawned[0]}): mark it slow, or -m 'not slow' "
            "stops being the fast tier",
            pytrace=False,
        )
