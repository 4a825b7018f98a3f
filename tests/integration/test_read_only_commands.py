"""``adsync status`` and ``adsync runs show`` only read: no file created, no migration, no wait.

They open the database read-only (SQLite ``mode=ro``, a PostgreSQL read-only
transaction). A missing database or a schema older than the code is bad
configuration (exit 2) with what to do; a database another process is writing
answers at once, or after a short wait with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from _proc import adsync
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from click.testing import Result
from typer.testing import CliRunner

from adsync.cli import app
from adsync.errors import StoreError
from adsync.models import RunCounters, RunStatus
from adsync.store import MIGRATIONS_DIR, SqlStore

OWNER = "host-a:100:aaaa"


def invoke(url: str, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"DATABASE_URL": url})


def with_one_run(url: str) -> str:
    store = SqlStore.from_url(url, sleep=lambda _s: None)
    store.upgrade()
    try:
        run = store.claim_run("acme", OWNER, 30.0)
        store.finish_run(run.id, OWNER, RunStatus.SUCCEEDED, RunCounters(seen=3, synced=3))
    finally:
        store.dispose()
    return run.id


def migrate_to(url: str, revision: str) -> None:
    store = SqlStore.from_url(url)
    try:
        with store.engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        store.dispose()


def revision_and_tables(url: str) -> tuple[set[str], set[str]]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            heads = set(MigrationContext.configure(conn).get_current_heads())
            tables = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    return heads, tables


def one_line(result: Result) -> str:
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# --- no database ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["runs", "show", "abc"]])
def test_no_sqlite_file_is_exit_2_naming_database_url_and_creates_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    result = invoke(f"sqlite:///{tmp_path / 'adsync.db'}", *args)
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert "DATABASE_URL" in line
    assert str(tmp_path / "adsync.db") in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_default_database_is_not_created_in_the_working_directory(tmp_path: Path) -> None:
    result = adsync("status", env={}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "DATABASE_URL" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.postgres
def test_no_postgres_database_is_exit_2_naming_database_url(postgres_url: str) -> None:
    base, _, _ = postgres_url.rpartition("/")
    result = invoke(f"{base}/adsync_no_such_database_here", "status")
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert "DATABASE_URL" in line
    assert "does not exist" in line


# --- a schema that is not this adsync's ----------------------------------------------------


@pytest.fixture
def unmigrated_url(fresh_database_url: str) -> str:
    """A database that exists and holds nothing (an empty SQLite file, a new PostgreSQL db)."""
    if fresh_database_url.startswith("sqlite"):
        sqlite3.connect(fresh_database_url.removeprefix("sqlite:///")).close()
    return fresh_database_url


@pytest.mark.parametrize("args", [["status"], ["runs", "show", "abc"]])
def test_no_schema_says_to_run_db_upgrade_and_creates_none(
    unmigrated_url: str, args: list[str]
) -> None:
    result = invoke(unmigrated_url, *args)
    assert result.exit_code == 2, result.output
    assert "adsync db upgrade" in one_line(result)
    assert revision_and_tables(unmigrated_url) == (set(), set())


def test_an_older_schema_says_to_run_db_upgrade_and_is_left_alone(unmigrated_url: str) -> None:
    migrate_to(unmigrated_url, "0001")
    result = invoke(unmigrated_url, "status")
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert "adsync db upgrade" in line
    assert "0001" in line
    assert revision_and_tables(unmigrated_url)[0] == {"0001"}
    assert invoke(unmigrated_url, "runs", "show", "abc").exit_code == 2


def test_a_read_only_store_refuses_to_write(database_url: str) -> None:
    with_one_run(database_url)
    store = SqlStore.from_url(database_url, read_only=True, sleep=lambda _s: None)
    try:
        assert [r.client_id for r in store.recent_runs()] == ["acme"]
        with pytest.raises(StoreError, match=r"(?i)read.?only"):
            store.claim_run("globex", OWNER, 30.0)
    finally:
        store.dispose()


# --- another process writing ------------------------------------------------------------------


@pytest.fixture
def sqlite_with_a_run(tmp_path: Path) -> tuple[str, Path, str]:
    path = tmp_path / "adsync.db"
    url = f"sqlite:///{path}"
    return url, path, with_one_run(url)


@pytest.mark.slow
def test_status_answers_at_once_while_another_process_holds_the_write_lock(
    sqlite_with_a_run: tuple[str, Path, str], tmp_path: Path
) -> None:
    url, path, run_id = sqlite_with_a_run
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM rate_sends")
        started = time.monotonic()
        result = adsync("status", "--json", env={"DATABASE_URL": url}, cwd=tmp_path, timeout=20)
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in json.loads(result.stdout)["runs"]] == [run_id]
    assert elapsed < 8  # the interpreter's start-up; the read itself does not wait


@pytest.mark.slow
def test_a_database_locked_for_reading_is_a_clear_message_after_a_short_wait(
    sqlite_with_a_run: tuple[str, Path, str], tmp_path: Path
) -> None:
    url, path, _ = sqlite_with_a_run
    # Outside WAL mode a writer's exclusive lock keeps readers out too.
    plain = sqlite3.connect(path, isolation_level=None)
    assert plain.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    try:
        plain.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        result = adsync("status", env={"DATABASE_URL": url}, cwd=tmp_path, timeout=20)
        elapsed = time.monotonic() - started
    finally:
        plain.execute("ROLLBACK")
        plain.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "busy" in lines[0]
    assert elapsed < 10


# --- a database this user may not write ----------------------------------------------------------


@pytest.fixture
def read_only_file(sqlite_with_a_run: tuple[str, Path, str]) -> Iterator[tuple[str, Path, str]]:
    """The database file made unwritable, even for root (who ignores file modes)."""
    _, path, _ = sqlite_with_a_run
    path.chmod(0o444)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield sqlite_with_a_run
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o644)


@pytest.mark.slow
def test_a_read_only_database_file_is_shown_and_left_unchanged(
    read_only_file: tuple[str, Path, str],
) -> None:
    url, path, run_id = read_only_file
    with pytest.raises(PermissionError):
        path.open("ab").close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    status = invoke(url, "status", "--json")
    assert status.exit_code == 0, status.output
    assert [r["id"] for r in json.loads(status.stdout)["runs"]] == [run_id]
    shown = invoke(url, "runs", "show", run_id[:8], "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["run"]["id"] == run_id
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
