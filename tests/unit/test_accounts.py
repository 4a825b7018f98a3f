"""The accounts file: valid entries, and a clear error naming each broken one."""

from __future__ import annotations

from pathlib import Path

import pytest

from adsync.accounts import load_accounts, parse_accounts, select
from adsync.errors import ConfigError


def entry(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "client_id": "acme",
        "email": "a@acme.example",
        "password_env": "ACME_PW",
    }
    base.update(over)
    return base


def test_reads_accounts_and_never_holds_the_password_in_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "globex.pw"
    secret.write_text("file-secret\n")
    path = tmp_path / "accounts.toml"
    path.write_text(
        f"""
[[accounts]]
client_id = "acme"
email = "a@acme.example"
password_env = "ACME_PW"
rate_limit = 20

[[accounts]]
client_id = "globex"
email = "g@globex.example"
password_file = "{secret}"
enabled = false
"""
    )
    monkeypatch.setenv("ACME_PW", "env-secret")
    acme, globex = load_accounts(path)
    assert (acme.client_id, acme.password_source, acme.rate_limit) == ("acme", "env:ACME_PW", 20)
    assert globex.password_source == f"file:{secret}"
    assert "secret" not in repr(acme) + repr(globex)
    settings = acme.settings(AD_PLATFORM_API_URL="http://platform.example")
    assert settings.password.get_secret_value() == "env-secret"
    assert (settings.client_id, settings.rate_limit) == ("acme", 20)
    assert globex.settings().password.get_secret_value() == "file-secret"
    assert [a.client_id for a in select([acme, globex], [])] == ["acme"]
    assert [a.client_id for a in select([acme, globex], ["globex"])] == ["globex"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "no [[accounts]] entries"),
        ({"accounts": [entry()], "extra": 1}, "unknown top-level key"),
        (
            {"accounts": [entry(password_env=None)]},
            "account #1 ('acme'): entry: Value error, give exactly one",
        ),
        (
            {"accounts": [entry(password_file="/x")]},
            "give exactly one of password_env or password_file",
        ),
        ({"accounts": [entry(), entry()]}, "account #2 ('acme'): client_id 'acme' appears twice"),
        ({"accounts": [entry(client_id="has space")]}, "client_id"),
        ({"accounts": [entry(password="inline!")]}, "password: Extra inputs are not permitted"),
        ({"accounts": [entry(rate_limit=0)]}, "rate_limit"),
    ],
)
def test_broken_entries_are_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_accounts(data, "accounts.toml")
    assert message in str(info.value)
    assert "inline!" not in str(info.value)


def test_a_missing_password_variable_names_the_account_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ACME_PW", raising=False)
    (acme,) = parse_accounts({"accounts": [entry()]})
    with pytest.raises(ConfigError, match="account 'acme': environment variable ACME_PW"):
        acme.settings()


def test_an_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    (acme,) = parse_accounts(
        {"accounts": [entry(password_env=None, password_file=str(tmp_path / "nope"))]}
    )
    with pytest.raises(ConfigError, match="cannot read its password_file"):
        acme.settings()


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_accounts(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[accounts]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_accounts(bad)


def test_selecting_an_unknown_client_id_is_an_error() -> None:
    accounts = parse_accounts({"accounts": [entry()]})
    with pytest.raises(ConfigError, match="no account with client_id 'other'"):
        select(accounts, ["other"])
