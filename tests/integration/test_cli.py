"""`adsync` as a user runs it: a subprocess, environment variables, exit codes, output."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import typer.main
from _proc import adsync, child_env

from adsync.cli import app
from adsync.simulator.testing import SimulatorHandle, running_simulator
from adsync.store.schema import REVISIONS

EMAIL = "admin@mixoads.com"
PASSWORD = "SuperSecret123!"
BASIC = base64.b64encode(f"{EMAIL}:{PASSWORD}".encode()).decode()


def simulator(seed: int, **knobs: Any) -> AbstractContextManager[SimulatorHandle]:
    """The platform ``platform_env`` is set for: 40 requests per 0.5 s, 10 ms sync calls."""
    return running_simulator(rate_limit=40, rate_window=0.5, sync_delay=0.01, seed=seed, **knobs)


def platform_env(url: str, tmp_path: Path, **over: str) -> dict[str, str]:
    env = {
        "AD_PLATFORM_API_URL": url,
        "AD_PLATFORM_EMAIL": EMAIL,
        "AD_PLATFORM_PASSWORD": PASSWORD,
        "AD_PLATFORM_CLIENT_ID": "cli",
        "AD_PLATFORM_RATE_LIMIT": "40",
        "AD_PLATFORM_RATE_WINDOW": "0.5",
        "AD_PLATFORM_REQUEST_TIMEOUT": "0.3",
        "AD_PLATFORM_REQUEST_DEADLINE": "1",
        "AD_PLATFORM_BACKOFF_INITIAL": "0.01",
        "AD_PLATFORM_BACKOFF_MAX": "0.1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
    }
    env.update(over)
    return env


@pytest.mark.slow
def test_missing_setting_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    result = adsync("sync", env={"AD_PLATFORM_EMAIL": "x@y.z"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "AD_PLATFORM_PASSWORD is not set" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_invalid_setting_names_the_variable_not_its_value(tmp_path: Path) -> None:
    env = {
        "AD_PLATFORM_EMAIL": "x@y.z",
        "AD_PLATFORM_PASSWORD": "hunter22",
        "AD_PLATFORM_RATE_LIMIT": "lots",
    }
    result = adsync("sync", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "AD_PLATFORM_RATE_LIMIT" in result.stderr
    assert "hunter22" not in result.stderr + result.stdout


@pytest.mark.slow
def test_settings_come_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("AD_PLATFORM_EMAIL=x@y.z\nAD_PLATFORM_RATE_WINDOW=-1\n")
    result = adsync("sync", env={"AD_PLATFORM_PASSWORD": "pw-from-env"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "AD_PLATFORM_RATE_WINDOW" in result.stderr


@pytest.mark.slow
def test_wrong_password_is_exit_3_quickly_without_a_retry_storm(tmp_path: Path) -> None:
    with simulator(3) as sim:
        started = time.monotonic()
        result = adsync(
            "sync", env=platform_env(sim.url, tmp_path, AD_PLATFORM_PASSWORD="not-it"), cwd=tmp_path
        )
        elapsed = time.monotonic() - started
        stats = sim.stats()
    assert result.returncode == 3, result.stderr
    assert "refused the credentials" in result.stderr
    assert "not-it" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert elapsed < 15
    assert stats["tokens_issued"] == 0
    assert sum(c["requests"] for c in stats["clients"].values()) == 0


@pytest.mark.slow
def test_some_campaigns_failing_is_exit_1_with_a_summary(tmp_path: Path) -> None:
    with simulator(3, error_rate=0, hang_rate=0, fail_sync_ids="campaign_2") as sim:
        result = adsync(
            "sync", env=platform_env(sim.url, tmp_path, AD_PLATFORM_MAX_ATTEMPTS="2"), cwd=tmp_path
        )
    assert result.returncode == 1, result.stderr
    assert "99 synced, 1 failed of 100 seen" in result.stderr
    assert "failed campaign_2 [sync]" in result.stderr


@pytest.mark.slow
def test_debug_logs_carry_no_secret(tmp_path: Path) -> None:
    with simulator(5, token_ttl=0.5, invalidate_old_tokens=True) as sim:
        result = adsync(
            "sync",
            "--log-level",
            "DEBUG",
            "--log-format",
            "json",
            env=platform_env(sim.url, tmp_path),
            cwd=tmp_path,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "campaign synced" for line in lines), "DEBUG lines expected"
    assert any(line.get("event") == "token refreshed" for line in lines)
    for secret in (PASSWORD, BASIC, "Basic ", "Bearer "):
        assert secret not in output
    # Nothing shaped like a simulator token (43 url-safe characters) either.
    import re

    assert not re.search(r"[A-Za-z0-9_-]{43}", output)


@pytest.mark.slow
def test_db_upgrade_is_idempotent(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    head = REVISIONS[-1]
    for said in (f"created the database schema (revision {head})", f"up to date (revision {head})"):
        result = adsync("db", "upgrade", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert said in result.stderr


def test_every_command_has_help_text() -> None:
    group = typer.main.get_group(app)

    def walk(command: object, path: str) -> list[tuple[str, str | None]]:
        found = [(path, getattr(command, "help", None))]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, f"{path} {name}")
        return found

    commands = walk(group, "adsync")
    assert len(commands) >= 5
    missing = [path for path, text in commands if not (text or "").strip()]
    assert missing == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_syncs_everything_into_sqlite(tmp_path: Path) -> None:
    result = adsync("demo", "--campaigns", "30", env={}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "30 campaigns in" in result.stdout
    assert "0 refused with 429" in result.stdout
    assert (tmp_path / "adsync-demo.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_next_steps_work_as_printed_without_the_venv_on_path(tmp_path: Path) -> None:
    # As `make demo` starts it: the venv's console script, its directory not on PATH.
    script = Path(sys.executable).parent / "adsync"
    path = "/usr/local/bin:/usr/bin:/bin"
    env = {**child_env({}), "PATH": path}
    done = subprocess.run(
        [str(script), "demo", "--campaigns", "12"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {
        label: line.partition(":  ")[2]
        for line in done.stdout.splitlines()
        for label in ("query it", "run history")
        if line.startswith(f"{label}:  ")
    }
    assert set(steps) == {"query it", "run history"}, done.stdout
    if shutil.which("sqlite3", path=path) is None:
        pytest.skip("the sqlite3 shell is not installed")
    # Each printed step, pasted into a shell from another directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    query = subprocess.run(
        ["bash", "-c", steps["query it"]],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert query.returncode == 0, query.stderr
    ids = [row.partition("|")[0] for row in query.stdout.splitlines()]
    assert ids == ["campaign_1", "campaign_2", "campaign_3", "campaign_4", "campaign_5"]
    history = subprocess.run(
        ["bash", "-c", steps["run history"]],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert history.returncode == 0, history.stderr
    assert "succeeded" in history.stdout
