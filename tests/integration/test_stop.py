"""What may still leave once a run is told to stop, or learns its lease is no longer its own.

A request that waited (for a slot in the window, on a retry's backoff) asks again,
right before it is sent, whether it may be. These tests read the answer off the
simulator's own record of when each sync call arrived: ``adsync sync`` (and
``adsync worker``) run as real processes on SQLite and PostgreSQL, and are stopped
with real signals or have their run taken over in the database.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _proc import (
    EMAIL,
    PASSWORD,
    Db,
    Sync,
    adsync,
    calm_simulator,
    database,
    platform_env,
    run_sync,
    start_sync,
    sync_ok,
    wait_for,
)
from _workers import start_worker

from adsync.config import sqlalchemy_url
from adsync.errors import RunLocked
from adsync.simulator.testing import SimulatorHandle, running_simulator
from adsync.store import SqlStore, host_identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CLIENT = "ops"
# How late a sync call may arrive after the signal and still have been sent
# before it: the time for bytes to cross the loopback and the simulator to see them.
ON_THE_WIRE = 0.3
# From the end of a run to the end of the process: closing the HTTP client and
# the engine, interpreter shutdown.
SHUTDOWN = 2.0


def arrivals(sim: SimulatorHandle, client_id: str = CLIENT) -> list[tuple[float, str]]:
    """Every sync call the platform saw, as (wall-clock arrival, campaign id), oldest first."""
    client = sim.stats()["clients"].get(client_id, {})
    return sorted(
        (at, campaign_id)
        for campaign_id, times in client.get("sync_arrivals", {}).items()
        for at in times
    )


def late(sim: SimulatorHandle, after: float) -> list[tuple[float, str]]:
    """Sync calls that arrived more than ON_THE_WIRE after ``after`` (wall clock)."""
    return [(round(at - after, 3), cid) for at, cid in arrivals(sim) if at > after + ON_THE_WIRE]


def requests_counted(sim: SimulatorHandle, client_id: str = CLIENT) -> int:
    return int(sim.stats()["clients"].get(client_id, {}).get("requests", 0))


@dataclass(frozen=True)
class Stopped:
    """How a run stopped by SIGTERM ended, as the process, the platform and the database saw it."""

    code: int
    seconds: float  # from the signal to the process's exit
    sent_late: list[tuple[float, str]]
    run: Any
    stored: set[str]
    at_stop: dict[str, int]


def sigterm(sync: Sync, sim: SimulatorHandle, db: Db) -> Stopped:
    """SIGTERM ``sync``, wait for it to exit, and read what the others saw."""
    signalled = time.time()
    sync.signal(signal.SIGTERM)
    code = sync.wait(30)
    seconds = time.time() - signalled
    sent_late = late(sim, signalled)
    run = db.only_run()
    return Stopped(code, seconds, sent_late, run, db.synced_items(run.id), sync_ok(sim))


def test_a_busy_run_sends_nothing_after_sigterm_and_the_resumed_run_nothing_twice(
    tmp_path: Path, database_url: str
) -> None:
    # Sends go out a window's worth at a time, then wait for the next window: a
    # signal finds calls in flight and more waiting for their slot.
    knobs = {"rate_limit": 10, "rate_window": 2.0, "sync_delay": 0.3, "campaigns": 40}
    with (
        calm_simulator(process=True, seed=3, **knobs) as sim,
        database(database_url) as db,
    ):
        env = platform_env(
            sim,
            database_url,
            AD_PLATFORM_REQUEST_TIMEOUT="2",
            AD_PLATFORM_REQUEST_DEADLINE="3",
        )
        sync = start_sync(env, tmp_path)
        wait_for(lambda: db.synced_count() >= 12, what="12 campaigns stored", alive=sync)
        stop = sigterm(sync, sim, db)

        rerun = run_sync(env, tmp_path)
        final = sync_ok(sim)
        db.assert_every_campaign_once(CLIENT, 40)

    assert stop.sent_late == [], sync.stderr[-3000:]
    assert stop.code == 143, sync.stderr[-3000:]
    # The calls in flight took at most 0.3 s; nothing waited for the window.
    assert stop.seconds < 0.3 + SHUTDOWN
    assert (stop.run.status, bool(stop.run.resumable)) == ("interrupted", True)
    assert set(stop.at_stop) == stop.stored
    assert rerun.code == 0, rerun.stderr[-3000:]
    assert "(resumed)" in rerun.said
    assert final == {f"campaign_{i}": 1 for i in range(1, 41)}


def test_a_run_waiting_on_a_60s_window_exits_143_at_once(tmp_path: Path, database_url: str) -> None:
    knobs = {"rate_limit": 10, "rate_window": 60.0, "sync_delay": 0.05, "campaigns": 30}
    with (
        calm_simulator(process=True, seed=4, **knobs) as sim,
        database(database_url) as db,
    ):
        env = platform_env(
            sim,
            database_url,
            # One page for all: the first window is the page and nine sync calls.
            AD_PLATFORM_PAGE_SIZE="100",
            AD_PLATFORM_REQUEST_TIMEOUT="2",
            # Production's order of grace: a stop that waited for it would show.
            AD_PLATFORM_REQUEST_DEADLINE="10",
        )
        sync = start_sync(env, tmp_path)
        wait_for(lambda: db.synced_count() >= 9, what="the first window's calls", alive=sync)
        stop = sigterm(sync, sim, db)

    assert stop.code == 143, sync.stderr[-3000:]
    assert stop.seconds < 3.0, sync.stderr[-3000:]
    assert stop.sent_late == []
    assert (stop.run.status, bool(stop.run.resumable), stop.run.error) == (
        "interrupted",
        True,
        "stopped by a signal; resumable",
    )
    assert len(stop.stored) == 9
    assert set(stop.at_stop) == stop.stored
    assert stop.run.requests == 10


def test_a_run_waiting_on_a_retry_backoff_exits_143_at_once(
    tmp_path: Path, database_url: str
) -> None:
    account = {"email": EMAIL, "password": PASSWORD, "campaigns": 10, "always_503": True}
    with (
        running_simulator(process=True, hang_rate=0, seed=5, accounts=[account]) as sim,
        database(database_url) as db,
    ):
        env = platform_env(
            sim,
            database_url,
            AD_PLATFORM_BACKOFF_INITIAL="20",
            AD_PLATFORM_BACKOFF_MAX="20",
            AD_PLATFORM_REQUEST_DEADLINE="10",
        )
        sync = start_sync(env, tmp_path)
        wait_for(lambda: requests_counted(sim) >= 1, what="a 503 to back off from", alive=sync)
        before = requests_counted(sim)
        stop = sigterm(sync, sim, db)
        after = requests_counted(sim)

    assert stop.code == 143, sync.stderr[-3000:]
    assert stop.seconds < 3.0, sync.stderr[-3000:]
    assert after == before
    assert (stop.run.status, bool(stop.run.resumable)) == ("interrupted", True)


def test_a_run_its_last_calls_complete_after_the_signal_is_interrupted_and_exits_143(
    tmp_path: Path, database_url: str
) -> None:
    knobs = {"rate_limit": 30, "rate_window": 0.5, "sync_delay": 1.0, "campaigns": 10}
    with (
        calm_simulator(process=True, seed=6, **knobs) as sim,
        database(database_url) as db,
    ):
        env = platform_env(
            sim,
            database_url,
            AD_PLATFORM_PAGE_SIZE="100",
            AD_PLATFORM_REQUEST_TIMEOUT="3",
            AD_PLATFORM_REQUEST_DEADLINE="5",
        )
        sync = start_sync(env, tmp_path)
        wait_for(lambda: len(arrivals(sim)) == 10, what="every sync call sent", alive=sync)
        stop = sigterm(sync, sim, db)
        assert stop.code == 143, sync.stderr[-3000:]
        assert (stop.run.status, bool(stop.run.resumable), stop.run.synced) == (
            "interrupted",
            True,
            10,
        )
        assert len(stop.at_stop) == 10

        rerun = run_sync(env, tmp_path)
        final = sync_ok(sim)
        after = db.only_run()

    assert rerun.code == 0, rerun.stderr[-3000:]
    assert (after.status, after.resumes) == ("succeeded", 1)
    # The resumed run had nothing left to send.
    assert final == stop.at_stop


def _lost_lease_at(stderr: str) -> float:
    """When (wall clock) the process logged that its run was taken over."""
    for line in stderr.splitlines():
        if line.startswith("{") and "lost the run's lease" in line:
            stamp = json.loads(line)["timestamp"]
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"no lease loss logged:\n{stderr[-3000:]}")


def _a_dead_owner() -> str:
    """An owner of this host whose process is gone: the next claim takes over at once."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{host_identity()}:{child.pid}:elsewhere"


def _take_over(database_url: str, run_id: str, owner: str) -> float:
    """Expire the run's lease and claim it as ``owner``, as a process would; when (wall clock)."""
    store = SqlStore.from_url(database_url)
    engine = sa.create_engine(sqlalchemy_url(database_url), poolclass=sa.NullPool)
    try:
        for _ in range(20):
            past = datetime.now(UTC) - timedelta(seconds=1)
            with engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE sync_runs SET lease_until = :past WHERE id = :id"),
                    {"past": past, "id": run_id},
                )
            try:
                taken = store.claim_run(CLIENT, owner, 30.0)
            except RunLocked:
                continue  # its heartbeat renewed the lease just then
            assert (taken.id, taken.owner) == (run_id, owner)
            return time.time()
    finally:
        engine.dispose()
        store.dispose()
    raise AssertionError("could not take the run over")


def test_a_run_whose_lease_is_taken_over_sends_nothing_more_and_exits_1(
    tmp_path: Path, database_url: str
) -> None:
    # The window (6 s) is shorter than a heartbeat (10 s): after its second window
    # the run waits for its third, and learns on the way that the run is no longer its.
    knobs = {"rate_limit": 10, "rate_window": 6.0, "sync_delay": 0.1, "campaigns": 25}
    with (
        calm_simulator(process=True, seed=8, **knobs) as sim,
        database(database_url) as db,
    ):
        env = platform_env(
            sim,
            database_url,
            AD_PLATFORM_PAGE_SIZE="100",
            AD_PLATFORM_REQUEST_TIMEOUT="1",
            AD_PLATFORM_REQUEST_DEADLINE="2",
        )
        first = start_sync(env, tmp_path, "--log-format", "json")
        wait_for(lambda: db.synced_count() >= 19, what="two windows synced", alive=first)
        run_id = db.only_run().id
        _take_over(database_url, run_id, _a_dead_owner())
        code = first.wait(30)
        exited = time.time()
        learned = _lost_lease_at(first.stderr)
        sent_late = late(sim, learned)
        at_stop = sync_ok(sim)

        resumed = run_sync(env, tmp_path)
        final = sync_ok(sim)
        run = db.only_run()
        counted = requests_counted(sim)
        db.assert_every_campaign_once(CLIENT, 25)

    assert sent_late == [], first.stderr[-3000:]
    assert code == 1, first.stderr[-3000:]
    assert exited - learned < SHUTDOWN + 1.0
    assert "interrupted" in first.stderr
    assert len(at_stop) == 19
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert (run.id, run.status, run.resumes) == (run_id, "succeeded", 2)
    # Each campaign synced once over both processes, and every request the
    # platform counted is in the run's record.
    assert final == {f"campaign_{i}": 1 for i in range(1, 26)}
    assert run.requests == counted


@pytest.mark.postgres
def test_a_worker_job_waiting_on_its_window_stops_at_once_and_is_queued_again(
    tmp_path: Path, pg_url: str
) -> None:
    knobs = {"rate_limit": 10, "rate_window": 60.0, "sync_delay": 0.05, "campaigns": 30}
    with (
        calm_simulator(process=True, seed=9, **knobs) as sim,
        database(pg_url) as db,
    ):
        env = _worker_env(tmp_path, sim, pg_url)
        enqueue = adsync("enqueue", "--all", env=env, cwd=tmp_path, timeout=60)
        assert enqueue.returncode == 0, enqueue.stderr
        worker = start_worker(env, tmp_path, "worker")
        wait_for(lambda: db.synced_count() >= 9, what="the first window's calls")
        signalled = time.time()
        worker.proc.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        stopped_in = time.time() - signalled
        stderr = worker.stderr
        sent_late = late(sim, signalled)
        run = db.only_run()
        jobs = _sync_jobs(db)

    assert code == 0, stderr[-3000:]
    # Not the grace period (10 s): nothing was in flight, and the wait ended at once.
    assert stopped_in < 3.0, stderr[-3000:]
    assert sent_late == []
    assert (run.status, bool(run.resumable), run.synced) == ("interrupted", True, 9)
    assert sorted(jobs) == ["aborted", "todo"]


def _worker_env(tmp_path: Path, sim: SimulatorHandle, url: str) -> dict[str, str]:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        f'[[accounts]]\nclient_id = "{CLIENT}"\nemail = "{EMAIL}"\n'
        'password_env = "ADSYNC_TEST_PASSWORD"\n',
        encoding="utf-8",
    )
    return platform_env(
        sim,
        url,
        ADSYNC_TEST_PASSWORD=PASSWORD,
        ADSYNC_ACCOUNTS_FILE=str(accounts),
        AD_PLATFORM_PAGE_SIZE="100",
        AD_PLATFORM_REQUEST_TIMEOUT="2",
        AD_PLATFORM_REQUEST_DEADLINE="10",
        ADSYNC_SCHEDULE_MINUTES="0",
        ADSYNC_WORKER_POLL_SECONDS="0.2",
        ADSYNC_WORKER_GRACE_SECONDS="10",
    )


def _sync_jobs(db: Db) -> list[Any]:
    return [
        r.status
        for r in db.rows(
            "SELECT status::text AS status FROM procrastinate_jobs "
            "WHERE task_name = 'adsync.sync_account'"
        )
    ]
