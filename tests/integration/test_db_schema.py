"""ADSYNC_DB_SCHEMA: adsync's tables and the job queue's in a PostgreSQL schema of their own."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from _proc import EMAIL, PASSWORD, adsync, calm_simulator

from adsync.store import metadata

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def tables_by_schema(url: str) -> dict[str, set[str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    found: dict[str, set[str]] = {}
    for schema, table in rows:
        found.setdefault(schema, set()).add(table)
    return found


def test_every_table_lands_in_the_configured_schema(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "accounts.toml").write_text(
        '[[accounts]]\nclient_id = "acme"\nemail = "admin@mixoads.com"\n'
        'password_env = "ACME_PASSWORD"\n',
        encoding="utf-8",
    )
    with calm_simulator(campaigns=5, rate_limit=50, rate_window=0.5, sync_delay=0.01) as sim:
        env = {
            "AD_PLATFORM_API_URL": sim.url,
            "AD_PLATFORM_EMAIL": EMAIL,
            "AD_PLATFORM_PASSWORD": PASSWORD,
            "AD_PLATFORM_RATE_LIMIT": "50",
            "AD_PLATFORM_RATE_WINDOW": "0.5",
            "ACME_PASSWORD": PASSWORD,
            "DATABASE_URL": pg_url,
            "ADSYNC_DB_SCHEMA": "adsync_data",
        }
        synced = adsync("sync", "--log-level", "ERROR", env=env, cwd=tmp_path)
        assert synced.returncode == 0, synced.stderr
        queued = adsync("enqueue", "--all", env=env, cwd=tmp_path)
        assert queued.returncode == 0, queued.stderr
        listed = adsync("jobs", "--json", env=env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert '"client_id": "acme"' in listed.stdout
        status = adsync("status", env=env, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "succeeded" in status.stdout
        checked = adsync("check", env=env, cwd=tmp_path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        upgraded = adsync("db", "upgrade", env=env, cwd=tmp_path)
        assert "up to date" in upgraded.stderr
    found = tables_by_schema(pg_url)
    ours = {t.name for t in metadata.sorted_tables} | {"alembic_version"}
    assert ours <= found["adsync_data"]
    assert "procrastinate_jobs" in found["adsync_data"]
    assert not found.get("public")  # nothing of adsync's or Procrastinate's left there


def test_a_schema_with_sqlite_is_refused_by_name(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}", "ADSYNC_DB_SCHEMA": "adsync_data"}
    done = adsync("db", "upgrade", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "ADSYNC_DB_SCHEMA is for PostgreSQL only" in done.stderr
