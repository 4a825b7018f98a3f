"""Settings that cannot work are refused up front, naming the setting (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adsync.accounts import parse_accounts
from adsync.cli import app
from adsync.config import load_settings
from adsync.errors import ConfigError

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
