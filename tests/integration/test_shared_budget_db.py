"""The rate budget shared across processes, in SQLite and PostgreSQL.

The table kept a few windows deep on a controlled clock (standing in for the
database's), threads racing for the last slot on the real one, and two real
processes sending for one client id at once against the simulator, with and
without a skewed clock. The log's rules, which every store's log keeps, are
tested on each in tests/contract.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _dbclock import DbClock
from _proc import child_env, platform_env

from adsync.simulator.testing import SimulatorHandle, running_simulator
from adsync.store import SqlSendLog, SqlStore, metadata, rate_lock_key

# A realistic wall-clock stamp: its microseconds must survive the round trip.
T0 = 1_700_000_000.123456
SPAN = 10.0


# The database's clock for the log's rules: each reservation says what time it is.
DB_CLOCK = DbClock(datetime.fromtimestamp(T0, UTC))


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """The shared ``store`` fixture, on the clock the tests set."""
    sql_store = SqlStore.from_url(database_url, sleep=lambda _seconds: None, now=DB_CLOCK)
    sql_store.upgrade()
    try:
        yield sql_store
    finally:
        sql_store.dispose()


def reserve_at(log: SqlSendLog, t: float, client_id: str, owner: str, **kw: Any) -> Any:
    """``log.reserve(...)`` with the database's clock at ``t``."""
    DB_CLOCK.at = datetime.fromtimestamp(t, UTC)
    return log.reserve(client_id, owner, **kw)


def in_any_window(stamps: list[float], span: float) -> int:
    """The most stamps in any window ``(t - span, t]``."""
    stamps = sorted(stamps)
    return max((sum(1 for s in stamps if t - span < s <= t) for t in stamps), default=0)


# --- the log's rules -----------------------------------------------------------------


def test_old_sends_are_swept_and_others_kept(store: SqlStore) -> None:
    log = store.send_log()
    for t in (T0, T0 + 1):
        assert reserve_at(log, t, "acme", "a", span=SPAN, limit=5, spacing=0.0).ok
    assert reserve_at(log, T0, "other", "a", span=SPAN, limit=5, spacing=0.0).ok
    # Much later, a fresh log (a new process) reserves: acme's old rows go.
    later = reserve_at(
        SqlSendLog(store.database), T0 + 100, "acme", "b", span=SPAN, limit=5, spacing=0.0
    )
    assert (later.ok, later.foreign) == (True, ())
    assert log.sends("acme") == [(T0 + 100, "b")]
    assert log.sends("other") == [(T0, "a")]


def test_racing_threads_never_exceed_the_limit_or_the_spacing(database_url: str) -> None:
    # On the database's real clock.
    real = SqlStore.from_url(database_url)
    real.upgrade()
    log = real.send_log()
    span, limit, spacing, seconds = 0.25, 5, 0.005, 1.0
    accepted: list[float] = []
    refused = 0
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def race(owner: str) -> None:
        nonlocal refused
        while time.time() < stop_at:
            r = log.reserve("race", owner, span=span, limit=limit, spacing=spacing)
            with lock:
                if r.ok:
                    accepted.append(r.at)
                else:
                    refused += 1

    threads = [threading.Thread(target=race, args=(f"owner-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    real.dispose()
    accepted.sort()
    assert refused > len(accepted)  # they really did race for the slots
    assert in_any_window(accepted, span) == limit
    assert min(b - a for a, b in itertools.pairwise(accepted)) >= spacing
    # Every window's slots were used: about limit per span, less start-up.
    assert len(accepted) >= limit * (seconds / span - 1)


def test_the_lock_key_is_a_stable_63_bit_number() -> None:
    key = rate_lock_key("acme")
    assert key == rate_lock_key("acme") != rate_lock_key("acme2")
    assert 0 <= key < 2**63
    # Not Python's hash(), which differs from process to process.
    assert key == 0x6CD2ED26593F7E4C


def test_the_table_is_in_the_schema(store: SqlStore) -> None:
    with store.engine.connect() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("rate_sends")}
    assert "ix_rate_sends_client_sent" in indexes
    assert "rate_sends" in metadata.tables


# --- two processes, one client id --------------------------------------------------------

LIMIT, WINDOW, SECONDS, WORKERS = 10, 0.5, 1.5, 12
HAMMER = Path(__file__).with_name("_hammer.py")


@pytest.fixture
def simulator() -> Iterator[SimulatorHandle]:
    with running_simulator(
        process=True,
        rate_limit=LIMIT,
        rate_window=WINDOW,
        sync_delay=0.01,
        error_rate=0,
        hang_rate=0,
        seed=5,
    ) as sim:
        yield sim


def two_processes_at_once(
    sim: SimulatorHandle,
    database_url: str,
    tmp_path: Path,
    skews: tuple[float, float] = (0.0, 0.0),
    **env: str,
) -> tuple[dict[str, Any], list[dict[str, int]]]:
    """Two hammers for one client id, let go at the same moment; the platform's and their stats.

    ``skews``: how far off each process's wall clock is, in seconds.
    """
    environment = child_env(platform_env(sim, database_url, **env))
    procs = []
    for i, skew in enumerate(skews):
        with (tmp_path / f"hammer-{i}.err").open("wb") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HAMMER), str(SECONDS), str(WORKERS), str(skew)],
                    env=environment,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                )
            )
    try:
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            assert ready == b"ready\n", (tmp_path / f"hammer-{i}.err").read_text()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = []
        for i, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, (tmp_path / f"hammer-{i}.err").read_text()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    stats: dict[str, Any] = sim.stats()["clients"]["ops"]
    return stats, results


@pytest.mark.slow
def test_two_processes_syncing_one_client_id_stay_within_the_window_together(
    simulator: SimulatorHandle, store: SqlStore, database_url: str, tmp_path: Path
) -> None:
    stats, results = two_processes_at_once(simulator, database_url, tmp_path)
    windows = SECONDS / WINDOW
    # Never over the limit, and not one request refused: the two processes took
    # turns through the database, not through 429s.
    assert stats["max_in_window"] <= LIMIT
    assert stats["rate_limited"] == 0
    assert sum(r["rate_limited"] for r in results) == 0
    assert all(r["shared_failures"] == 0 for r in results)
    # Together they kept the window busy (the margin and start-up cost a little) ...
    assert stats["requests"] >= LIMIT * windows * 0.8
    # ... and both of them sent, each a fair part of it.
    assert min(r["requests"] for r in results) >= stats["requests"] * 0.25


@pytest.mark.slow
@pytest.mark.parametrize("skew", [120.0, -30.0])
def test_a_process_with_a_skewed_clock_neither_stalls_the_other_nor_causes_a_429(
    simulator: SimulatorHandle, store: SqlStore, database_url: str, tmp_path: Path, skew: float
) -> None:
    # One host's clock is minutes ahead or half a minute behind: the shared log's
    # times are the database's, so the two still take turns as if it were not.
    stats, results = two_processes_at_once(simulator, database_url, tmp_path, skews=(0.0, skew))
    assert stats["max_in_window"] <= LIMIT
    assert stats["rate_limited"] == 0
    assert sum(r["rate_limited"] for r in results) == 0
    assert all(r["shared_failures"] == 0 for r in results)
    # Neither waited for sends it took to be in the future (or the past).
    assert stats["requests"] >= LIMIT * (SECONDS / WINDOW) * 0.8
    assert min(r["requests"] for r in results) >= stats["requests"] * 0.25, results


@pytest.mark.slow
def test_without_the_shared_budget_the_same_two_processes_are_refused(
    simulator: SimulatorHandle, sqlite_url: str, tmp_path: Path
) -> None:
    # The control for the test above: it would catch a budget that is not shared.
    store = SqlStore.from_url(sqlite_url)
    store.upgrade()
    store.dispose()
    stats, results = two_processes_at_once(
        simulator, sqlite_url, tmp_path, AD_PLATFORM_SHARED_BUDGET="false"
    )
    # Each filled what it took for its own window and was refused (then learned
    # half the limit: the spacing lets the first 429 return before a burst leaves).
    assert all(r["rate_limited"] >= 1 for r in results), results
    assert stats["rate_limited"] >= 2
