"""A listener that cannot listen is bad configuration: exit 2, one line naming the option.

Overlapping cron runs with a fixed ``--metrics-port`` hit the first case; the
others are typos. Each must fail before the run touches the platform or the
database.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import Result
from typer.testing import CliRunner

from adsync.cli import app

PLATFORM = {
    "AD_PLATFORM_EMAIL": "me@x.io",
    "AD_PLATFORM_PASSWORD": "pw-123456",
    # Nothing listens on the discard port: a run that got that far would fail otherwise.
    "AD_PLATFORM_API_URL": "http://127.0.0.1:9",
}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`adsync sync` sets up logging on CliRunner's stream, which is closed afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other process is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def invoke(tmp_path: Path, args: list[str], **env: str) -> Result:
    return CliRunner().invoke(
        app, args, env={"DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}", **env}
    )


def assert_one_line(result: Result, *words: str) -> None:
    assert result.exit_code == 2, (result.exception, result.output)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0]


def test_sync_with_a_metrics_port_in_use(tmp_path: Path, busy_port: int) -> None:
    result = invoke(tmp_path, ["sync", "--metrics-port", str(busy_port)], **PLATFORM)
    assert_one_line(result, "--metrics-port", str(busy_port), "already in use")
    assert not (tmp_path / "a.db").exists()  # refused before the database was touched


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_sync_with_a_metrics_port_out_of_range(tmp_path: Path, port: str) -> None:
    result = invoke(tmp_path, ["sync", "--metrics-port", port], **PLATFORM)
    assert_one_line(result, "--metrics-port", port, "65535")


def test_sync_with_a_metrics_addr_that_is_no_address(tmp_path: Path) -> None:
    result = invoke(
        tmp_path, ["sync", "--metrics-port", "9108", "--metrics-addr", "x y"], **PLATFORM
    )
    assert_one_line(result, "--metrics-addr", "'x y'")


def accounts_file(tmp_path: Path) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text('[[accounts]]\nclient_id = "a"\nemail = "a@x.io"\npassword_env = "A_PW"\n')
    return path


def worker_args(tmp_path: Path, *more: str) -> list[str]:
    return ["worker", "--accounts", str(accounts_file(tmp_path)), *more]


# The worker fails on the listener before it connects: no server is needed at this URL.
NO_SERVER = "postgresql://adsync@127.0.0.1:9/adsync"


def test_worker_with_a_health_port_in_use(tmp_path: Path, busy_port: int) -> None:
    result = CliRunner().invoke(
        app,
        worker_args(tmp_path, "--health-port", str(busy_port)),
        env={"DATABASE_URL": NO_SERVER},
    )
    assert_one_line(result, "--health-port", str(busy_port), "already in use")


def test_worker_with_a_health_port_out_of_range(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, worker_args(tmp_path, "--health-port", "70000"), env={"DATABASE_URL": NO_SERVER}
    )
    assert_one_line(result, "--health-port", "70000", "65535")


def test_worker_with_a_health_addr_that_is_no_address(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        worker_args(tmp_path, "--health-port", "0", "--health-addr", "x y"),
        env={"DATABASE_URL": NO_SERVER},
    )
    assert_one_line(result, "--health-addr", "'x y'")
