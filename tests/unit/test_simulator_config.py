"""Simulator knobs, accounts files and the ``simulate`` command's flags and env vars."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from adsync.simulator import cli as simulator_cli
from adsync.simulator.config import (
    DEFAULT_EMAIL,
    AccountSpec,
    SimulatorConfig,
    SimulatorConfigError,
    build_config,
    load_accounts,
    parse_ids,
)


def test_defaults_equal_production() -> None:
    config = SimulatorConfig()
    assert (config.host, config.port) == ("127.0.0.1", 3001)
    assert (config.rate_limit, config.rate_window) == (10, 60.0)
    assert (config.error_rate, config.hang_rate) == (0.2, 0.1)
    assert (config.sync_delay, config.token_ttl, config.campaigns) == (2.0, 3600.0, 100)
    assert config.retry_after_header == "none"
    assert config.seed is None
    assert (config.sync_error_rate, config.reset_rate, config.bad_json_rate) == (0.0, 0.0, 0.0)
    assert config.invalidate_old_tokens is False
    [account] = config.effective_accounts
    assert (account.email, account.campaigns) == (DEFAULT_EMAIL, 100)


def test_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(AccountSpec("a@x", "s3cret", 1))


@pytest.mark.parametrize(
    ("knobs", "complaint"),
    [
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_window": 0}, "rate_window"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"hang_rate": -0.1}, "hang_rate"),
        ({"retry_after_header": "sometimes"}, "retry_after_header"),
        ({"campaigns": -1}, "campaigns"),
        ({"max_page_size": 0}, "max_page_size"),
        ({"rate_limt": 5}, "unknown simulator knob"),
        ({"accounts": [{"email": "a@x"}]}, "missing password"),
        ({"accounts": [{"email": "a@x", "password": "p", "colour": 1}]}, "unknown key"),
        (
            {"accounts": [{"email": "a@x", "password": "p"}, {"email": "a@x", "password": "q"}]},
            "duplicate",
        ),
    ],
)
def test_bad_knobs_say_what_is_wrong(knobs: dict[str, Any], complaint: str) -> None:
    with pytest.raises(SimulatorConfigError, match=complaint):
        build_config(**knobs)


def test_build_config_normalises_loose_values() -> None:
    config = build_config(
        fail_sync_ids="campaign_1, campaign_2,,",
        malformed_ids=["campaign_3"],
        accounts=[{"email": "a@x", "password": "p"}],
        campaigns=7,
    )
    assert config.fail_sync_ids == frozenset({"campaign_1", "campaign_2"})
    assert config.malformed_ids == frozenset({"campaign_3"})
    assert config.accounts == (AccountSpec("a@x", "p", 7),)  # campaigns knob as the default


def test_parse_ids() -> None:
    assert parse_ids(None) == frozenset()
    assert parse_ids("") == frozenset()
    assert parse_ids(" a ,b") == frozenset({"a", "b"})


def test_accounts_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "accounts.toml"
    toml.write_text(
        '[[accounts]]\nemail = "a@x"\npassword = "p"\ncampaigns = 3\nerror_rate = 0.5\n'
        '[[accounts]]\nemail = "b@x"\npassword = "q"\nalways_503 = true\n',
        encoding="utf-8",
    )
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"email": "a@x", "password": "p", "campaigns": 3}]))
    as_table = tmp_path / "table.json"
    as_table.write_text(json.dumps({"accounts": [{"email": "b@x", "password": "q"}]}))

    assert load_accounts(toml, default_campaigns=9) == (
        AccountSpec("a@x", "p", 3, error_rate=0.5),
        AccountSpec("b@x", "q", 9, always_503=True),
    )
    assert load_accounts(as_list) == (AccountSpec("a@x", "p", 3),)
    assert load_accounts(as_table) == (AccountSpec("b@x", "q", 100),)


@pytest.mark.parametrize(
    ("name", "text", "complaint"),
    [
        ("a.yaml", "accounts: []", "must end in .toml or .json"),
        ("a.json", "{not json", "not valid"),
        ("a.toml", "[[accounts]\n", "not valid"),
        ("a.json", "[]", "non-empty list"),
        ("a.json", '[{"email": "a@x", "password": "p", "campaigns": "many"}]', "campaigns"),
        ("a.json", '[{"email": "a@x", "password": "p", "error_rate": 2}]', "error_rate"),
        ("a.json", '["a@x"]', "email and password"),
    ],
)
def test_bad_accounts_files_say_what_is_wrong(
    tmp_path: Path, name: str, text: str, complaint: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SimulatorConfigError, match=complaint):
        load_accounts(path)


def test_missing_accounts_file() -> None:
    with pytest.raises(SimulatorConfigError, match="cannot read"):
        load_accounts(Path("/nonexistent/accounts.toml"))


# -- the command ----------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("simulate")(simulator_cli.simulate)

    @app.callback()
    def main() -> None:
        """Keeps ``simulate`` a subcommand, as in the real CLI."""

    return app


class _FakeServer:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.simulator = type("FakeSimulator", (), {"seed": 1234})()
        self.ran = False

    def run(self) -> None:
        self.ran = True


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[_FakeServer]:
    servers: list[_FakeServer] = []

    def fake_build_server(config: SimulatorConfig) -> _FakeServer:
        servers.append(_FakeServer(config))
        return servers[-1]

    monkeypatch.setattr(simulator_cli, "build_server", fake_build_server)
    return servers


def test_every_knob_is_a_flag_with_an_env_var_and_help() -> None:
    # Typer ships its own click: inspect the parameters by their attributes.
    group: Any = typer.main.get_command(_app())
    command = group.commands["simulate"]
    options = {param.name: param for param in command.params}
    for knob in dataclasses.fields(SimulatorConfig):
        option = options[knob.name]
        assert "--" + knob.name.replace("_", "-") in option.opts
        assert option.envvar == f"ADSYNC_SIM_{knob.name.upper()}"
        assert option.help
    assert "--no-invalidate-old-tokens" in options["invalidate_old_tokens"].secondary_opts
    result = CliRunner().invoke(_app(), ["simulate", "--help"])
    assert result.exit_code == 0
    assert "Run the simulated ad platform" in result.output


def test_flags_and_env_vars_reach_the_config(built: list[_FakeServer], tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text(json.dumps([{"email": "a@x", "password": "hunter2", "campaigns": 4}]))
    env = {"ADSYNC_SIM_RATE_LIMIT": "3", "ADSYNC_SIM_RATE_WINDOW": "0.5"}
    args = [
        "simulate",
        "--port", "4000",
        "--seed", "9",
        "--retry-after-header", "http-date",
        "--accounts", str(accounts),
        "--invalidate-old-tokens",
        "--fail-sync-ids", "campaign_1,campaign_2",
        "--sync-delay", "0.01",
    ]  # fmt: skip
    result = CliRunner().invoke(_app(), args, env=env)
    assert result.exit_code == 0, result.output
    [server] = built
    config = server.config
    assert server.ran
    assert (config.port, config.seed, config.rate_limit, config.rate_window) == (4000, 9, 3, 0.5)
    assert config.retry_after_header == "http-date"
    assert config.invalidate_old_tokens is True
    assert config.fail_sync_ids == frozenset({"campaign_1", "campaign_2"})
    assert config.sync_delay == 0.01
    assert config.accounts == (AccountSpec("a@x", "hunter2", 4),)
    # One startup line, with the seed to replay the run and no credentials.
    assert "seed 1234" in result.output
    assert "hunter2" not in result.output
    assert "a@x" not in result.output


def test_a_bad_accounts_file_is_one_clear_error(built: list[_FakeServer], tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text('[{"email": "a@x"}]')
    result = CliRunner().invoke(_app(), ["simulate", "--accounts", str(accounts)])
    assert result.exit_code == 2
    assert "missing password" in result.output
    assert "Traceback" not in result.output
    assert built == []


def test_out_of_range_rate_is_refused(built: list[_FakeServer]) -> None:
    result = CliRunner().invoke(_app(), ["simulate", "--error-rate", "1.5"])
    assert result.exit_code == 2
    assert built == []
