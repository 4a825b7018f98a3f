"""Helpers for tests that run ``adsync sync`` as a real process and poke at it.

The process gets its settings from the environment, as a user's would; the test
watches it through the database it writes to and the simulator's stats, and
interrupts it with real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from adsync.config import sqlalchemy_url
from adsync.simulator.testing import SimulatorHandle, running_simulator

EMAIL = "admin@mixoads.com"
PASSWORD = "SuperSecret123!"

T = TypeVar("T")

# Fast and hostile: a run of 100 campaigns takes a few seconds, with the
# production fault rates (20% of list calls 503, 10% of calls hang).
SIM_FAST: dict[str, Any] = {
    "rate_limit": 30,
    "rate_window": 0.5,
    "sync_delay": 0.03,
    "seed": 20240611,
}


def calm_simulator(**knobs: Any) -> AbstractContextManager[SimulatorHandle]:
    """``running_simulator(**knobs)`` without random 503s or hangs, unless ``knobs`` ask."""
    return running_simulator(**{"error_rate": 0, "hang_rate": 0, **knobs})


def platform_env(sim: SimulatorHandle, database_url: str, **over: str) -> dict[str, str]:
    """The environment of an ``adsync sync`` against ``sim`` writing to ``database_url``."""
    env = {
        "AD_PLATFORM_API_URL": sim.url,
        "AD_PLATFORM_EMAIL": EMAIL,
        "AD_PLATFORM_PASSWORD": PASSWORD,
        "AD_PLATFORM_CLIENT_ID": "ops",
        "AD_PLATFORM_RATE_LIMIT": str(sim.config.rate_limit),
        "AD_PLATFORM_RATE_WINDOW": str(sim.config.rate_window),
        # The simulator shares the test process's GIL with the pollers: allow for jitter.
        "AD_PLATFORM_RATE_MARGIN": "0.04",
        "AD_PLATFORM_REQUEST_TIMEOUT": "0.3",
        "AD_PLATFORM_REQUEST_DEADLINE": "1",
        "AD_PLATFORM_BACKOFF_INITIAL": "0.01",
        "AD_PLATFORM_BACKOFF_MAX": "0.1",
        "DATABASE_URL": database_url,
    }
    env.update(over)
    return env


def child_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without adsync settings, plus ``env``."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("AD_PLATFORM_", "DATABASE_URL"))
    }
    clean.update(env)
    return clean


def adsync_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "adsync.cli", *args]


def adsync(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120, python: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``adsync ARGS`` to its end, as a user would: ``env`` over a clean environment.

    With ``python``, that code runs first in the same interpreter (to break something).
    """
    argv = adsync_argv(*args)
    if python is not None:
        main = "import sys\nfrom adsync.cli import main\nsys.argv[0] = 'adsync'\nmain()"
        argv = [sys.executable, "-c", f"{python}\n{main}", *args]
    return subprocess.run(
        argv,
        env=child_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# Every background process a test starts, so that the integration conftest can kill
# whatever a test left running (a failed assertion skips the test's own cleanup).
_started: list[subprocess.Popen[bytes]] = []


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Have ``proc`` killed after the test, if the test has not ended it."""
    _started.append(proc)
    return proc


def reap_all() -> None:
    """Kill and wait for every process :func:`track` was given."""
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@dataclass
class Sync:
    """A running ``adsync sync`` whose output goes to files (no pipe can fill up)."""

    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, signum: int) -> float:
        """Send ``signum``; return when (monotonic) it was sent."""
        sent = time.monotonic()
        self.proc.send_signal(signum)
        return sent

    def kill(self) -> None:
        """SIGKILL, then reap: a zombie would still look alive to ``kill(pid, 0)``."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"adsync sync still running after {timeout}s:\n{self.stderr}"
            ) from None

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")


def start_sync(env: dict[str, str], cwd: Path, *args: str, name: str = "sync") -> Sync:
    """Start ``adsync sync`` (plus ``args``) in the background."""
    n = len(list(cwd.glob(f"{name}-*.err")))
    out_path, err_path = cwd / f"{name}-{n}.out", cwd / f"{name}-{n}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            adsync_argv("sync", *args),
            env=child_env(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return Sync(track(proc), out_path, err_path)


def flat(text: str) -> str:
    """``text`` with runs of whitespace as one space: rich wraps lines at the width."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def said(self) -> str:
        """stderr, unwrapped."""
        return flat(self.stderr)


def run_sync(env: dict[str, str], cwd: Path, *args: str, timeout: float = 60) -> Finished:
    """Run ``adsync sync`` to its end."""
    started = time.monotonic()
    result = adsync("sync", *args, env=env, cwd=cwd, timeout=timeout)
    return Finished(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float = 30,
    interval: float = 0.01,
    what: str = "condition",
    alive: Sync | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if alive is not None and alive.proc.poll() is not None:
            raise AssertionError(
                f"adsync exited ({alive.proc.returncode}) before {what}:\n{alive.stderr[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Db:
    """Read-only looks at adsync's tables from the test, on SQLite or PostgreSQL."""

    def __init__(self, database_url: str) -> None:
        self.engine = sa.create_engine(sqlalchemy_url(database_url), poolclass=sa.NullPool)

    def close(self) -> None:
        self.engine.dispose()

    def scalar(self, query: str, **params: Any) -> Any:
        try:
            with self.engine.connect() as conn:
                return conn.execute(sa.text(query), params).scalar()
        except sa.exc.DBAPIError:
            return None  # no tables yet, or locked for a moment

    def rows(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))

    def runs(self) -> list[Any]:
        return self.rows("SELECT * FROM sync_runs ORDER BY started_at")

    def only_run(self) -> Any:
        runs = self.runs()
        assert len(runs) == 1, runs
        return runs[0]

    def synced_items(self, run_id: str) -> set[str]:
        return {
            r.campaign_id
            for r in self.rows(
                "SELECT campaign_id FROM run_items WHERE run_id = :r AND state = 'synced'",
                r=run_id,
            )
        }

    def synced_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM run_items WHERE state = 'synced'") or 0)

    def assert_every_campaign_once(self, client_id: str, total: int = 100) -> None:
        """``total`` distinct campaigns, each once, each with its history row."""
        ids = [
            r.id for r in self.rows("SELECT id FROM campaigns WHERE client_id = :c", c=client_id)
        ]
        assert len(ids) == total
        assert set(ids) == {f"campaign_{i}" for i in range(1, total + 1)}
        snapshots = self.rows(
            "SELECT run_id, campaign_id, count(*) AS n FROM campaign_snapshots "
            "WHERE client_id = :c GROUP BY run_id, campaign_id",
            c=client_id,
        )
        assert all(s.n == 1 for s in snapshots)
        assert {s.campaign_id for s in snapshots} == set(ids)

    def assert_consistent(self, client_id: str) -> None:
        """No half-written batch: each stored campaign has its snapshot and its synced item."""
        stored = {
            r.id for r in self.rows("SELECT id FROM campaigns WHERE client_id = :c", c=client_id)
        }
        snapshots = {
            r.campaign_id
            for r in self.rows(
                "SELECT campaign_id FROM campaign_snapshots WHERE client_id = :c", c=client_id
            )
        }
        items = {
            r.campaign_id
            for r in self.rows(
                "SELECT campaign_id FROM run_items WHERE client_id = :c AND state = 'synced'",
                c=client_id,
            )
        }
        assert stored == snapshots == items


@contextmanager
def database(database_url: str) -> Iterator[Db]:
    db = Db(database_url)
    try:
        yield db
    finally:
        db.close()


def sync_ok(sim: SimulatorHandle, client_id: str = "ops") -> dict[str, int]:
    """Successful sync calls per campaign id, as the platform counted them."""
    return dict(sim.stats()["clients"].get(client_id, {}).get("sync_ok", {}))


def settle(sim: SimulatorHandle) -> dict[str, int]:
    """``sync_ok`` once calls still running at the platform after a kill have ended."""
    time.sleep(max(0.3, sim.config.sync_delay + 0.2))
    return sync_ok(sim)
