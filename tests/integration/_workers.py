"""Helpers for tests that run ``adsync worker`` processes against the simulator.

The accounts file and the environment every adsync process of a test shares,
background worker processes whose output goes to files, and looks at
Procrastinate's tables and the simulator's counters.
"""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _proc import Db, adsync, adsync_argv, calm_simulator, child_env, track

from adsync.simulator.testing import SimulatorHandle

LIMIT = 20
WINDOW = 0.5
SYNC_TASK = "adsync.sync_account"


@dataclass
class Proc:
    """A background ``adsync`` process whose output goes to files."""

    proc: subprocess.Popen[bytes]
    err_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout}s:\n{self.stderr[-3000:]}"
            ) from None


def client_id(i: int) -> str:
    return f"client-{i:02d}"


def sim_accounts(campaigns: int, count: int) -> list[dict[str, Any]]:
    return [
        {"email": f"ads{i}@client{i}.example", "password": f"pw-{i}-s3cret", "campaigns": campaigns}
        for i in range(count)
    ]


def accounts_simulator(
    seed: int,
    accounts: list[dict[str, Any]],
    *,
    process: bool = False,
    rate_limit: int = LIMIT,
    sync_delay: float = 0.02,
) -> AbstractContextManager[SimulatorHandle]:
    """A simulator without random faults serving ``accounts``, on the workers' window."""
    return calm_simulator(
        process=process,
        rate_limit=rate_limit,
        rate_window=WINDOW,
        sync_delay=sync_delay,
        seed=seed,
        accounts=accounts,
    )


def setup(
    tmp_path: Path,
    sim: SimulatorHandle,
    url: str,
    count: int,
    *,
    limit: int = LIMIT,
    window: float = WINDOW,
) -> dict[str, str]:
    """The accounts file (passwords by env var) and the environment of every adsync process."""
    lines = []
    env = {
        "DATABASE_URL": url,
        "ADSYNC_ACCOUNTS_FILE": str(tmp_path / "accounts.toml"),
        "AD_PLATFORM_API_URL": sim.url,
        "AD_PLATFORM_RATE_LIMIT": str(limit),
        "AD_PLATFORM_RATE_WINDOW": str(window),
        # The simulator shares this process's GIL with the pollers: allow for jitter.
        "AD_PLATFORM_RATE_MARGIN": "0.04",
        "AD_PLATFORM_REQUEST_TIMEOUT": "0.5",
        "AD_PLATFORM_REQUEST_DEADLINE": "2",
        "AD_PLATFORM_BACKOFF_INITIAL": "0.01",
        "AD_PLATFORM_BACKOFF_MAX": "0.1",
        # Off: a tick of the hourly schedule up to 10 minutes old would queue every
        # account a second time.
        "ADSYNC_SCHEDULE_MINUTES": "0",
        "ADSYNC_WORKER_HEARTBEAT_SECONDS": "0.2",
        "ADSYNC_STALLED_AFTER_SECONDS": "1",
        "ADSYNC_RECOVERY_EVERY_SECONDS": "1",
        "ADSYNC_WORKER_POLL_SECONDS": "0.2",
        "ADSYNC_WORKER_GRACE_SECONDS": "10",
        "ADSYNC_RETRY_INITIAL_SECONDS": "0.2",
        "ADSYNC_RETRY_MAX_SECONDS": "1",
    }
    for i, account in enumerate(sim.config.effective_accounts[:count]):
        var = f"ADSYNC_TEST_PASSWORD_{i}"
        env[var] = account.password
        lines += [
            "[[accounts]]",
            f'client_id = "{client_id(i)}"',
            f'email = "{account.email}"',
            f'password_env = "{var}"',
            "",
        ]
    (tmp_path / "accounts.toml").write_text("\n".join(lines), encoding="utf-8")
    return env


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an ``adsync`` command to its end."""
    return adsync(*args, env=env, cwd=cwd, timeout=60)


def start_worker(env: dict[str, str], cwd: Path, name: str, *args: str) -> Proc:
    """Start ``adsync worker --log-format json`` (plus ``args``) in the background."""
    err_path = cwd / f"{name}.err"
    with (cwd / f"{name}.out").open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            adsync_argv("worker", "--log-format", "json", *args),
            env=child_env(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return Proc(track(proc), err_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET ``url``: (status, body), error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sync_jobs(db: Db, status: str) -> list[Any]:
    return db.rows(
        "SELECT id, lock, queueing_lock, args FROM procrastinate_jobs "
        "WHERE task_name = :t AND status = CAST(:s AS procrastinate_job_status)",
        t=SYNC_TASK,
        s=status,
    )


def succeeded_runs(db: Db) -> int:
    return int(db.scalar("SELECT count(*) FROM sync_runs WHERE status = 'succeeded'") or 0)
