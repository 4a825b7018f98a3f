"""Each ``adsync`` command loads the libraries it uses and no others.

How long a command takes to start is ``bench/startup.py``'s business (figures on
a loaded machine are no verdict). What decides it is which libraries a command
imports, and that is exact: each test runs a command in a fresh interpreter and
reads ``sys.modules`` at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adsync.simulator.testing import running_simulator

pytestmark = pytest.mark.slow

# Runs one command as the console script would, then reports what was imported.
_PROBE = """
import json, sys
from adsync.cli import app
try:
    app(sys.argv[1:], prog_name="adsync")
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

WORKER = {"procrastinate"}
SIMULATOR = {"uvicorn", "starlette"}
DATABASE = {"sqlalchemy", "alembic", "psycopg"}
PLATFORM = {"httpx", "prometheus_client"}
# Settings and models, and the logging stack.
SETTINGS = {"pydantic", "pydantic_settings", "structlog"}


def loaded_by(*args: str, env: dict[str, str], cwd: Path) -> set[str]:
    """The top-level packages ``adsync ARGS`` has imported when it ends."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AD_PLATFORM_", "ADSYNC_")) and k != "DATABASE_URL"
    }
    clean.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env=clean,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    modules: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return {name.partition(".")[0] for name in modules}


def test_help_loads_none_of_the_commands_libraries(tmp_path: Path) -> None:
    loaded = loaded_by("--help", env={}, cwd=tmp_path)
    assert "typer" in loaded  # the probe did run the app
    assert loaded & (WORKER | SIMULATOR | DATABASE | PLATFORM | SETTINGS) == set()


def test_status_loads_the_store_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    subprocess.run(
        [sys.executable, "-m", "adsync.cli", "db", "upgrade"],
        env={**os.environ, "DATABASE_URL": url},
        cwd=tmp_path,
        capture_output=True,
        check=True,
        timeout=60,
    )
    loaded = loaded_by("status", env={"DATABASE_URL": url}, cwd=tmp_path)
    assert "sqlalchemy" in loaded  # the probe did read the database
    # Reading checks the schema's revision without Alembic, which only migrates.
    assert loaded & (WORKER | SIMULATOR | PLATFORM | {"alembic"}) == set()


def test_sync_loads_neither_the_worker_nor_the_simulator(tmp_path: Path) -> None:
    with running_simulator(campaigns=3, error_rate=0, hang_rate=0, sync_delay=0.01) as sim:
        env = {
            "AD_PLATFORM_API_URL": sim.url,
            "AD_PLATFORM_EMAIL": "admin@mixoads.com",
            "AD_PLATFORM_PASSWORD": "SuperSecret123!",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'sync.db'}",
        }
        loaded = loaded_by("sync", "--log-level", "ERROR", env=env, cwd=tmp_path)
        assert sim.stats()["clients"]["default"]["requests"] == 4  # the probe did sync
    assert loaded & (WORKER | SIMULATOR) == set()


def test_check_loads_neither_the_worker_nor_the_simulator_nor_alembic(tmp_path: Path) -> None:
    with running_simulator(campaigns=3, error_rate=0, hang_rate=0) as sim:
        env = {
            "AD_PLATFORM_API_URL": sim.url,
            "AD_PLATFORM_EMAIL": "admin@mixoads.com",
            "AD_PLATFORM_PASSWORD": "SuperSecret123!",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'none-yet.db'}",
        }
        loaded = loaded_by("check", env=env, cwd=tmp_path)
        assert sim.stats()["tokens_issued"] == 1  # the probe did check the credentials
    assert "httpx" in loaded
    assert loaded & (WORKER | SIMULATOR | {"alembic", "prometheus_client"}) == set()


@pytest.mark.postgres
def test_jobs_reads_the_queue_without_procrastinate(tmp_path: Path, pg_url: str) -> None:
    loaded = loaded_by("jobs", env={"DATABASE_URL": pg_url}, cwd=tmp_path)
    assert "psycopg" in loaded  # the probe did read the queue
    assert loaded & (WORKER | SIMULATOR | PLATFORM | {"alembic"}) == set()
