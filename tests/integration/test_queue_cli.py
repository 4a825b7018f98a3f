"""The queue and the accounts as a user sees them: ``enqueue``, ``jobs``, ``accounts check``."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from _proc import adsync

pytestmark = pytest.mark.slow

ACCOUNTS = """
[[accounts]]
client_id = "on"
email = "on@example.com"
password_env = "ON_PASSWORD"

[[accounts]]
client_id = "off"
email = "off@example.com"
password_env = "OFF_PASSWORD"
enabled = false

[[accounts]]
client_id = "filed"
email = "filed@example.com"
password_file = "secrets/filed"
"""


def write_accounts(tmp_path: Path) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS, encoding="utf-8")
    return path


def jobs_in(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone() == (None,):
            return []
        rows = conn.execute("SELECT lock, status::text FROM procrastinate_jobs ORDER BY id")
        return [(str(lock), str(status)) for lock, status in rows.fetchall()]


@pytest.mark.postgres
def test_enqueue_refuses_a_disabled_account_up_front(tmp_path: Path, pg_url: str) -> None:
    write_accounts(tmp_path)
    env = {"DATABASE_URL": pg_url, "ON_PASSWORD": "x", "OFF_PASSWORD": "x"}
    done = adsync("enqueue", "--client", "off", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "account 'off' is disabled" in done.stderr
    assert "queued" not in done.stdout
    assert jobs_in(pg_url) == []


@pytest.mark.postgres
def test_jobs_lists_waiting_jobs_as_text_and_json(tmp_path: Path, pg_url: str) -> None:
    write_accounts(tmp_path)
    env = {"DATABASE_URL": pg_url, "ON_PASSWORD": "x"}
    empty = adsync("jobs", env=env, cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    assert "no queued, running or failed jobs" in empty.stdout
    assert adsync("enqueue", "--client", "on", env=env, cwd=tmp_path).returncode == 0
    text = adsync("jobs", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert any(
        line.split()[:2] == ["on", "todo"] for line in text.stdout.splitlines() if line.strip()
    ), text.stdout
    as_json = adsync("jobs", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    jobs = json.loads(as_json.stdout)["jobs"]
    assert [(j["client_id"], j["status"], j["attempts"]) for j in jobs] == [("on", "todo", 0)]
    assert set(jobs[0]) >= {"id", "client_id", "status", "queued_at", "scheduled_at", "attempts"}
    # A job that failed is listed as such; one that succeeded is the run history's.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE procrastinate_jobs SET status = 'doing'")
        conn.execute("UPDATE procrastinate_jobs SET status = 'failed', attempts = 1")
    failed = json.loads(adsync("jobs", "--json", env=env, cwd=tmp_path).stdout)["jobs"]
    assert [(j["client_id"], j["status"], j["attempts"]) for j in failed] == [("on", "failed", 1)]
    assert adsync("enqueue", "--client", "on", env=env, cwd=tmp_path).returncode == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE status = 'todo'")
        conn.execute("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE status = 'doing'")
    assert "no queued, running or failed jobs" not in adsync("jobs", env=env, cwd=tmp_path).stdout
    statuses = [
        j["status"]
        for j in json.loads(adsync("jobs", "--json", env=env, cwd=tmp_path).stdout)["jobs"]
    ]
    assert statuses == ["failed"]


def test_jobs_on_sqlite_says_it_needs_postgresql(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}"}
    done = adsync("jobs", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "need PostgreSQL" in done.stderr
    assert "jobs" in done.stderr


def test_the_sqlite_message_is_true_of_schedule(tmp_path: Path) -> None:
    write_accounts(tmp_path)
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}", "ON_PASSWORD": "x"}
    refused = adsync("enqueue", "--all", env=env, cwd=tmp_path)
    assert refused.returncode == 2
    # What it names as needing PostgreSQL does need it: `schedule` alone only shows.
    assert "schedule --once" in refused.stderr
    shown = adsync("schedule", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "workers need PostgreSQL" in shown.stdout
    once = adsync("schedule", "--once", env=env, cwd=tmp_path)
    assert once.returncode == 2
    assert "need PostgreSQL" in once.stderr


def test_accounts_check_says_which_password_sources_exist(tmp_path: Path) -> None:
    write_accounts(tmp_path)
    env = {"ON_PASSWORD": "x"}  # OFF_PASSWORD unset, secrets/filed missing
    done = adsync("accounts", "check", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = {line.split()[1].rstrip(":"): line for line in done.stdout.splitlines() if line}
    assert lines["on"].startswith("ok ")
    assert lines["off"].startswith("warn ")  # disabled: told, not failed
    assert "OFF_PASSWORD" in lines["off"]
    assert "disabled" in lines["off"]
    assert lines["filed"].startswith("FAIL ")
    assert "secrets/filed" in lines["filed"]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "filed").write_text("pw\n", encoding="utf-8")
    (tmp_path / "secrets" / "filed").chmod(0o600)
    env["OFF_PASSWORD"] = "y"
    again = adsync("accounts", "check", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "x" not in again.stdout.replace("example", "")  # no password shown
