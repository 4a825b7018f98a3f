"""What pydantic refused, said the same way everywhere: where it is, never the value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from adsync.accounts import parse_accounts
from adsync.config import load_settings
from adsync.errors import ConfigError, PayloadError
from adsync.models import Campaign
from adsync.validation import describe_problems
from adsync.worker.settings import load_worker_settings


@pytest.fixture(autouse=True)
def _no_settings_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in os.environ:
        if name.startswith(("AD_PLATFORM_", "ADSYNC_", "DATABASE_URL")):
            monkeypatch.delenv(name)


class _Inner(BaseModel):
    port: int


class _Outer(BaseModel):
    inner: _Inner
    token: int


def _problem(**data: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Outer.model_validate(data)
    return caught.value


def test_each_problem_is_named_by_where_it_is_never_by_its_value() -> None:
    exc = _problem(inner={"port": "s3cret-port"}, token="s3cret-token")
    text = describe_problems(exc)
    assert text == (
        "inner.port: Input should be a valid integer, unable to parse string as an integer; "
        "token: Input should be a valid integer, unable to parse string as an integer"
    )
    assert "s3cret" not in text


def test_settings_name_the_variable_to_set() -> None:
    exc = _problem(inner={"port": 1})
    names = {"token": "APP_TOKEN"}
    assert describe_problems(exc, env_names=names) == "APP_TOKEN is not set"


def test_the_settings_say_which_variable_is_wrong() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            AD_PLATFORM_PASSWORD="pw", AD_PLATFORM_RATE_LIMIT="0", AD_PLATFORM_API_URL="ftp://x"
        )
    assert str(caught.value) == (
        "invalid configuration: AD_PLATFORM_API_URL value error, must start with http:// or "
        "https://; AD_PLATFORM_EMAIL is not set; AD_PLATFORM_RATE_LIMIT input should be "
        "greater than or equal to 1"
    )


def test_a_database_url_refused_is_not_printed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            AD_PLATFORM_PASSWORD="pw",
            AD_PLATFORM_EMAIL="a@b.c",
            DATABASE_URL="mysql://u:secretpw@h/db",
        )
    assert str(caught.value) == (
        "invalid configuration: DATABASE_URL value error, must be sqlite:///path or "
        "postgresql://user@host/db"
    )


def test_an_accounts_entry_names_its_fields_and_itself_as_a_whole() -> None:
    with pytest.raises(ConfigError) as whole:
        parse_accounts({"accounts": [{"client_id": "a", "email": "a@x.io"}]})
    assert str(whole.value) == (
        "accounts file: account #1 ('a'): entry: Value error, give exactly one of "
        "password_env or password_file"
    )
    entry = {"client_id": "a", "email": "a@x.io", "password_env": "P", "rate_limit": True}
    with pytest.raises(ConfigError) as fields:
        parse_accounts({"accounts": [{**entry, "nope": 1}]})
    assert str(fields.value) == (
        "accounts file: account #1 ('a'): rate_limit: Input should be a valid integer; "
        "nope: Extra inputs are not permitted"
    )


def test_a_campaign_payload_names_its_fields_not_their_values() -> None:
    raw = {"name": "n", "status": "s", "budget": "hunter2", "impressions": -1}
    with pytest.raises(PayloadError) as caught:
        Campaign.from_payload({**raw, "clicks": 1, "conversions": 1})
    assert str(caught.value) == (
        "invalid campaign payload: id: Field required; budget: Input should be a valid "
        "number, unable to parse string as a number; impressions: Input should be greater "
        "than or equal to 0"
    )
    with pytest.raises(PayloadError, match=r"payload: item: Input should be a valid dict"):
        Campaign.from_payload("just text")


def test_the_worker_settings_name_the_variable_or_the_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADSYNC_STALLED_AFTER_SECONDS", "10")
    with pytest.raises(ConfigError) as whole:
        load_worker_settings()
    assert str(whole.value) == (
        "invalid worker settings: worker settings: Value error, ADSYNC_STALLED_AFTER_SECONDS "
        "must be at least 3 x ADSYNC_WORKER_HEARTBEAT_SECONDS"
    )
    monkeypatch.setenv("ADSYNC_STALLED_AFTER_SECONDS", "60")
    monkeypatch.setenv("ADSYNC_RETRY_ATTEMPTS", "0")
    with pytest.raises(ConfigError) as field:
        load_worker_settings()
    assert str(field.value) == (
        "invalid worker settings: ADSYNC_RETRY_ATTEMPTS: Input should be greater than or equal to 1"
    )
