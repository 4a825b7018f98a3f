"""Settings that cannot work are refused up front, naming the setting (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adsync.accounts import parse_accounts
from adsync.cli import app
from adsync.config import load_settings, with_db_schema
from adsync.errors import ConfigError
from adsync.runner import pipeline_options
from adsync.worker.settings import load_worker_settings

BASE = {"AD_PLATFORM_EMAIL": "me@x.io", "AD_PLATFORM_PASSWORD": "pw-123456"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AD_PLATFORM_REQUEST_TIMEOUT", "inf"),
        ("AD_PLATFORM_RATE_WINDOW", "inf"),
        ("AD_PLATFORM_RATE_WINDOW", "nan"),
        ("AD_PLATFORM_CLIENT_ID", "é"),
        ("AD_PLATFORM_CLIENT_ID", "bad\nid"),
        ("AD_PLATFORM_PASSWORD", ""),
    ],
)
def test_a_setting_that_cannot_work_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(**{**BASE, name: value})


def test_an_infinite_window_in_the_accounts_file_is_refused() -> None:
    entry = {"client_id": "a", "email": "a@x.io", "password_env": "PW", "rate_window": "inf"}
    with pytest.raises(ConfigError, match="rate_window"):
        parse_accounts({"accounts": [entry]})


def test_sync_all_with_no_enabled_account_is_bad_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        '[[accounts]]\nclient_id = "a"\nemail = "a@x.io"\npassword_env = "PW"\nenabled = false\n'
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sync", "--all", "--accounts", str(accounts)])
    assert result.exit_code == 2, result.output
    assert "no enabled account" in result.output


def test_an_unknown_log_level_is_bad_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["sync", "--log-level", "BOGUS"])
    assert result.exit_code == 2, result.output
    assert "--log-level" in result.output


# Every duration is bounded: a value no one means (1e12 s is 31,000 years) would
# otherwise overflow a date or a timer far from where it was set.
DURATIONS = [
    "AD_PLATFORM_RATE_WINDOW",
    "AD_PLATFORM_CONNECT_TIMEOUT",
    "AD_PLATFORM_REQUEST_TIMEOUT",
    "AD_PLATFORM_REQUEST_DEADLINE",
    "AD_PLATFORM_RETRY_BUDGET_SECONDS",
    "AD_PLATFORM_BACKOFF_INITIAL",
    "AD_PLATFORM_BACKOFF_MAX",
    "AD_PLATFORM_TOKEN_REFRESH_MARGIN",
    "ADSYNC_DB_RETRY_WAIT",
    "ADSYNC_RESUME_WITHIN_SECONDS",
]
WORKER_DURATIONS = [
    "ADSYNC_WORKER_HEARTBEAT_SECONDS",
    "ADSYNC_STALLED_AFTER_SECONDS",
    "ADSYNC_WORKER_POLL_SECONDS",
    "ADSYNC_WORKER_GRACE_SECONDS",
    "ADSYNC_RETRY_INITIAL_SECONDS",
    "ADSYNC_RETRY_MAX_SECONDS",
]


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_beyond_a_day_is_refused_by_name(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} input should be less than or equal to 86400"):
        load_settings(**{**BASE, name: "1e12"})
    assert load_settings(**{**BASE, name: "86400"}) is not None


@pytest.mark.parametrize("name", WORKER_DURATIONS)
def test_a_worker_duration_beyond_a_day_is_refused_by_name(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, "1e12")
    with pytest.raises(ConfigError, match=f"{name}: Input should be less than or equal to 86400"):
        load_worker_settings()


def test_a_window_beyond_a_day_in_the_accounts_file_is_refused() -> None:
    entry = {"client_id": "a", "email": "a@x.io", "password_env": "PW", "rate_window": 1e12}
    with pytest.raises(ConfigError, match="rate_window: Input should be less than or equal to"):
        parse_accounts({"accounts": [entry]})


def test_a_huge_deadline_is_exit_2_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AD_PLATFORM_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'a.db'}")
    monkeypatch.setenv("AD_PLATFORM_REQUEST_DEADLINE", "1e12")
    result = CliRunner().invoke(app, ["sync"])
    assert result.exit_code == 2, result.output
    assert "AD_PLATFORM_REQUEST_DEADLINE" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_resume_bound_is_an_hour_unless_set_and_is_bounded() -> None:
    assert pipeline_options(load_settings(**BASE)).resume_within == 3600.0
    ten_minutes = load_settings(**BASE, ADSYNC_RESUME_WITHIN_SECONDS="600")
    assert pipeline_options(ten_minutes).resume_within == 600.0
    for bad in ("0", "-5", "1e12", "inf"):
        with pytest.raises(ConfigError, match="ADSYNC_RESUME_WITHIN_SECONDS"):
            load_settings(**BASE, ADSYNC_RESUME_WITHIN_SECONDS=bad)


def test_the_db_schema_sets_every_connections_search_path() -> None:
    pg = "postgresql://adsync@db/adsync"
    assert with_db_schema(pg, None) == pg
    assert with_db_schema(pg, "ads") == f"{pg}?options=-csearch_path%3Dads"
    assert with_db_schema(f"{pg}?sslmode=require", "ads").endswith(
        "?sslmode=require&options=-csearch_path%3Dads"
    )
    settings = load_settings(
        AD_PLATFORM_EMAIL="a@b.c", AD_PLATFORM_PASSWORD="x", DATABASE_URL=pg, ADSYNC_DB_SCHEMA="ads"
    )
    assert settings.database_url.get_secret_value() == f"{pg}?options=-csearch_path%3Dads"


@pytest.mark.parametrize(
    ("url", "schema", "why"),
    [
        ("sqlite:///a.db", "ads", "PostgreSQL only"),
        ("postgresql://u@h/d?options=-cstatement_timeout%3D5", "ads", "options parameter"),
        ("postgresql://u@h/d", "Ads; DROP", "ADSYNC_DB_SCHEMA"),
    ],
)
def test_a_db_schema_that_cannot_work_is_refused_by_name(url: str, schema: str, why: str) -> None:
    with pytest.raises(ConfigError, match="ADSYNC_DB_SCHEMA") as caught:
        load_settings(
            AD_PLATFORM_EMAIL="a@b.c",
            AD_PLATFORM_PASSWORD="x",
            DATABASE_URL=url,
            ADSYNC_DB_SCHEMA=schema,
        )
    assert why.lower() in str(caught.value).lower()
