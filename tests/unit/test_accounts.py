"""The accounts file: valid entries, and a clear error naming each broken one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adsync.accounts import Account, load_accounts, parse_accounts, select
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


# --- password files, as ssh treats keys -----------------------------------------------


def file_account(tmp_path: Path, mode: int) -> tuple[Path, list[Account]]:
    secret = tmp_path / "acme.pw"
    secret.write_text("file-secret\n")
    secret.chmod(mode)
    path = tmp_path / "accounts.toml"
    path.write_text(
        f'[[accounts]]\nclient_id = "acme"\nemail = "a@acme.example"\npassword_file = "{secret}"\n'
    )
    return secret, load_accounts(path)


def test_a_private_password_file_is_read_without_a_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, (acme,) = file_account(tmp_path, 0o600)
    with caplog.at_level(logging.WARNING):
        assert acme.settings().password.get_secret_value() == "file-secret"
    assert caplog.records == []


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o620], ids=oct)
def test_a_password_file_others_can_read_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    secret, (acme,) = file_account(tmp_path, mode)
    with caplog.at_level(logging.WARNING):
        assert acme.settings().password.get_secret_value() == "file-secret"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert str(secret) in record.getMessage()
    assert f"{mode:04o}" in record.getMessage()
    assert "file-secret" not in record.getMessage()


@pytest.mark.parametrize("mode", [0o602, 0o666, 0o777], ids=oct)
def test_a_world_writable_password_file_is_refused(tmp_path: Path, mode: int) -> None:
    secret, (acme,) = file_account(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        acme.settings()
    assert str(secret) in str(info.value)
    assert "writable by anyone" in str(info.value)
    assert "file-secret" not in str(info.value)


def test_a_relative_password_file_is_found_beside_the_accounts_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "etc"
    (config / "secrets").mkdir(parents=True)
    (config / "secrets" / "acme.pw").write_text("beside-it\n")
    (config / "secrets" / "acme.pw").chmod(0o600)
    path = config / "accounts.toml"
    path.write_text(
        '[[accounts]]\nclient_id = "acme"\nemail = "a@acme.example"\n'
        'password_file = "secrets/acme.pw"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "secrets").mkdir(parents=True)
    (elsewhere / "secrets" / "acme.pw").write_text("wrong-one\n")
    monkeypatch.chdir(elsewhere)
    (acme,) = load_accounts(path)
    assert acme.password_source == f"file:{config / 'secrets' / 'acme.pw'}"
    assert acme.settings().password.get_secret_value() == "beside-it"


# --- numbers are numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rate_limit", True),
        ("rate_limit", 10.0),
        ("rate_limit", 10.5),
        ("rate_limit", "10"),
        ("rate_window", True),
        ("rate_window", "60"),
        ("enabled", 1),
        ("enabled", "yes"),
    ],
)
def test_numbers_and_switches_are_strict(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"account #1 \\('acme'\\): {field}"):
        parse_accounts({"accounts": [entry(**{field: value})]})


@pytest.mark.parametrize("window", [60, 2.5])
def test_a_window_may_be_whole_or_fractional(window: float) -> None:
    (acme,) = parse_accounts({"accounts": [entry(rate_window=window, rate_limit=5)]})
    assert (acme.rate_window, acme.rate_limit) == (window, 5)
