"""SIGINT / SIGTERM to a running ``adsync sync``: a graceful, bounded, resumable stop.

The first signal stops new platform requests and gives the ones in flight a grace period
(the request deadline); the run is recorded ``interrupted`` and the next sync
resumes it. A second signal stops at once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from _proc import (
    SIM_FAST,
    Sync,
    database,
    flat,
    platform_env,
    run_sync,
    settle,
    start_sync,
    sync_ok,
    wait_for,
)

from adsync.simulator.testing import running_simulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


CLIENT = "ops"
TOTAL = 100
# Exit of the Python process after the run ended: finishing the run row,
# closing the HTTP client and the engine, interpreter shutdown.
SHUTDOWN = 2.0


def _calls_in_flight(sim_stats: dict[str, Any]) -> int:
    """Sync calls the platform has started (none ends soon with these delays)."""
    client = sim_stats["clients"].get(CLIENT, {})
    return int(sum(client.get("sync_calls", {}).values()))


def _stopped(sync: Sync, signum: int) -> tuple[int, float]:
    """Send ``signum``; return the exit code and the seconds from signal to exit."""
    sent = sync.signal(signum)
    code = sync.wait(30)
    return code, time.monotonic() - sent


def test_sigterm_mid_run_is_exit_143_interrupted_and_resumed_exactly_once(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    grace = 2.0
    with running_simulator(**SIM_FAST) as sim, database(url) as db:
        env = platform_env(sim, url, AD_PLATFORM_REQUEST_DEADLINE=str(grace))
        sync = start_sync(env, tmp_path)
        wait_for(lambda: db.synced_count() >= 30, what="30 campaigns stored", alive=sync)
        code, seconds = _stopped(sync, signal.SIGTERM)

        run = db.only_run()
        stored = db.synced_items(run.id)
        at_stop = settle(sim)

        rerun = run_sync(env, tmp_path)
        final = sync_ok(sim)
        after = db.only_run()
        db.assert_every_campaign_once(CLIENT, TOTAL)

    assert code == 143, sync.stderr[-3000:]
    assert seconds < grace + SHUTDOWN
    said = flat(sync.stderr)
    assert "stopping: no new platform requests; those in flight may finish" in said
    assert "interrupted client ops" in said
    assert (run.status, bool(run.resumable)) == ("interrupted", True)
    assert "stopped by a signal" in run.error
    assert 30 <= run.synced < TOTAL
    # The calls in flight were allowed to finish and were written: nothing the
    # platform synced is missing from the database.
    assert set(at_stop) == stored
    assert run.synced == len(stored)

    assert rerun.code == 0, rerun.stderr[-3000:]
    assert "(resumed)" in rerun.said
    assert (after.id, after.status, after.resumes) == (run.id, "succeeded", 1)
    assert after.synced == TOTAL
    # Each campaign synced at the platform exactly once over both processes.
    assert final == {f"campaign_{i}": 1 for i in range(1, TOTAL + 1)}


def test_sigint_is_exit_130_and_interrupted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    with running_simulator(**SIM_FAST) as sim, database(url) as db:
        env = platform_env(sim, url)
        sync = start_sync(env, tmp_path)
        wait_for(lambda: db.synced_count() >= 10, what="10 campaigns stored", alive=sync)
        code, seconds = _stopped(sync, signal.SIGINT)
        run = db.only_run()

    assert code == 130, sync.stderr[-3000:]
    assert seconds < 1.0 + SHUTDOWN
    assert "Traceback" not in sync.stderr
    assert (run.status, bool(run.resumable)) == ("interrupted", True)


def test_in_flight_calls_finish_within_the_grace_period_and_are_written(tmp_path: Path) -> None:
    """Slow sync calls (1.5 s) in flight at the signal: waited for, then stored."""
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    delay, grace = 1.5, 4.0
    knobs = {**SIM_FAST, "sync_delay": delay, "error_rate": 0, "hang_rate": 0}
    with running_simulator(**knobs) as sim, database(url) as db:
        env = platform_env(
            sim,
            url,
            AD_PLATFORM_REQUEST_TIMEOUT="3",
            AD_PLATFORM_REQUEST_DEADLINE=str(grace),
        )
        sync = start_sync(env, tmp_path)
        wait_for(
            lambda: _calls_in_flight(sim.stats()) >= 10, what="sync calls in flight", alive=sync
        )
        code, seconds = _stopped(sync, signal.SIGTERM)
        run = db.only_run()
        stored = db.synced_items(run.id)
        at_stop = settle(sim)

    assert code == 143, sync.stderr[-3000:]
    # Waited for the calls in flight (they had up to `delay` to go), not for the grace.
    assert seconds < delay + SHUTDOWN
    assert run.status == "interrupted"
    assert len(stored) >= 10
    assert set(at_stop) == stored


def test_the_grace_period_bounds_a_stop(tmp_path: Path) -> None:
    """Calls that cannot finish: abandoned at their deadline (the grace), and not tried again."""
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    grace = 1.0
    knobs = {**SIM_FAST, "sync_delay": 30.0, "error_rate": 0, "hang_rate": 0}
    with running_simulator(**knobs) as sim, database(url) as db:
        env = platform_env(
            sim,
            url,
            AD_PLATFORM_REQUEST_TIMEOUT=str(grace),
            AD_PLATFORM_REQUEST_DEADLINE=str(grace),
        )
        sync = start_sync(env, tmp_path)
        wait_for(
            lambda: _calls_in_flight(sim.stats()) >= 10, what="sync calls in flight", alive=sync
        )
        signalled = time.time()
        code, seconds = _stopped(sync, signal.SIGTERM)
        run = db.only_run()
        arrivals = sim.stats()["clients"][CLIENT]["sync_arrivals"]

    assert code == 143, sync.stderr[-3000:]
    # The calls in flight were given their time (they ran out of it), no more.
    assert grace * 0.5 <= seconds < grace + SHUTDOWN
    assert (run.status, bool(run.resumable)) == ("interrupted", True)
    assert "Traceback" not in sync.stderr
    # None was tried again after it timed out: no call arrived after the signal.
    assert [t for times in arrivals.values() for t in times if t > signalled + 0.3] == []


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_stops_at_once(signum: int, expected: int, tmp_path: Path) -> None:
    """Sync calls take 5 s and the grace is 10 s: the second signal does not wait for either."""
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    knobs = {**SIM_FAST, "sync_delay": 5.0, "error_rate": 0, "hang_rate": 0}
    with running_simulator(**knobs) as sim, database(url) as db:
        env = platform_env(
            sim, url, AD_PLATFORM_REQUEST_TIMEOUT="8", AD_PLATFORM_REQUEST_DEADLINE="10"
        )
        sync = start_sync(env, tmp_path)
        wait_for(
            lambda: _calls_in_flight(sim.stats()) >= 10, what="sync calls in flight", alive=sync
        )
        sync.signal(signum)
        time.sleep(0.3)
        assert sync.proc.poll() is None, "the first signal alone should wait for the calls"
        code, seconds = _stopped(sync, signum)
        run = db.only_run()

    assert code == expected, sync.stderr[-3000:]
    assert seconds < SHUTDOWN
    assert "stopped at once" in flat(sync.stderr)
    assert "Traceback" not in sync.stderr
    # Even stopped at once, the run is left resumable, not running.
    assert (run.status, bool(run.resumable)) == ("interrupted", True)
