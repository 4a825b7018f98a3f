"""SIGKILL ``adsync sync`` at several points, run it again: nothing lost, nothing redone.

The killed process gets no chance to clean up, so everything the rerun knows comes
from what was durably committed: ``run_items`` says which campaigns the run has
stored. The simulator's ``sync_ok`` counters say which campaigns the platform
synced, so the test can tell exactly which sync calls the rerun repeated.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from _proc import (
    SIM_FAST,
    Db,
    Sync,
    database,
    platform_env,
    run_sync,
    settle,
    start_sync,
    sync_ok,
    wait_for,
)

from adsync.simulator.testing import SimulatorHandle, running_simulator
from adsync.sync import PipelineOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CLIENT = "ops"
TOTAL = 100
BATCH = PipelineOptions().batch_size


def _listing_under_way(db: Db) -> bool:
    listed = db.scalar(
        "SELECT count(*) FROM run_items i JOIN sync_runs r ON r.id = i.run_id "
        "WHERE NOT r.listing_complete"
    )
    return (listed or 0) >= 10


def _kill_during_listing(sync: Sync, db: Db, sim: SimulatorHandle) -> None:
    wait_for(lambda: _listing_under_way(db), what="the first pages to be recorded", alive=sync)
    sync.kill()
    assert not db.only_run().listing_complete, "killed too late: the listing had finished"


def _kill_mid_sync(sync: Sync, db: Db, sim: SimulatorHandle) -> None:
    wait_for(lambda: db.synced_count() >= 40, what="40 campaigns stored", alive=sync)
    sync.kill()


def _kill_right_after_a_commit(sync: Sync, db: Db, sim: SimulatorHandle) -> None:
    before = wait_for(
        lambda: (n := db.synced_count()) >= 30 and n, what="30 campaigns stored", alive=sync
    )
    wait_for(lambda: db.synced_count() != before, interval=0.001, what="the next commit")
    sync.kill()


def _kill_during_a_write(sync: Sync, db: Db, sim: SimulatorHandle) -> None:
    """Hold SQLite's write lock so that the writer's next batch blocks, then kill it.

    Campaigns synced at the platform meanwhile are in the writer's batch or queue,
    never committed: the rerun must sync exactly those again, and nothing else.
    The lock holds up every write, so here the listing is one page (recording
    listed pages waits for the lock) and the rate budget is this process's own
    (a shared one logs each send in the database): the workers keep syncing.
    """
    wait_for(lambda: db.synced_count() >= 20, what="20 campaigns stored", alive=sync)
    path = str(db.engine.url.database)
    lock = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN IMMEDIATE")
        committed = db.synced_count()
        wait_for(
            lambda: sum(sync_ok(sim).values()) >= committed + 5,
            what="campaigns synced at the platform while the writer is blocked",
            alive=sync,
        )
        # Longer than the writer's batch interval: it is inside its write now.
        time.sleep(PipelineOptions().batch_interval + 0.25)
        sync.kill()
        assert db.synced_count() == committed
    finally:
        lock.execute("ROLLBACK")
        lock.close()


# Settings for some kill points (see there why).
ENV_FOR = {"during-a-write": {"AD_PLATFORM_PAGE_SIZE": "100", "AD_PLATFORM_SHARED_BUDGET": "false"}}

KILL_POINTS = {
    "during-listing": _kill_during_listing,
    "mid-sync": _kill_mid_sync,
    "right-after-a-commit": _kill_right_after_a_commit,
    "during-a-write": _kill_during_a_write,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_resumes_without_losing_or_redoing_work(
    point: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    with running_simulator(**SIM_FAST) as sim, database(url) as db:
        env = platform_env(sim, url, **ENV_FOR.get(point, {}))
        killed = start_sync(env, tmp_path)
        KILL_POINTS[point](killed, db, sim)

        # What the dead run left behind: a running run, owned by a pid that is gone.
        run = db.only_run()
        assert run.status == "running"
        assert f":{killed.pid}:" in run.owner
        committed = db.synced_items(run.id)
        at_kill = settle(sim)
        unwritten = {c for c in at_kill if c not in committed}
        if point == "during-a-write":
            assert unwritten, "the blocked batch should have been synced at the platform"

        rerun = run_sync(env, tmp_path)
        final = sync_ok(sim)

    assert rerun.code == 0, rerun.stderr[-3000:]
    assert "(resumed)" in rerun.stderr
    assert f"{TOTAL} synced, 0 failed of {TOTAL} seen" in rerun.said
    with database(url) as db:
        after = db.only_run()
        assert (after.id, after.status, after.resumes) == (run.id, "succeeded", 1)
        assert after.synced == TOTAL
        db.assert_every_campaign_once(CLIENT, TOTAL)
        assert db.synced_items(run.id) == {f"campaign_{i}" for i in range(1, TOTAL + 1)}
        assert db.scalar("SELECT count(*) FROM campaign_snapshots") == TOTAL

    # Stored before the kill: never sent to the sync endpoint again.
    resent = {c: final[c] - at_kill[c] for c in committed if final.get(c) != at_kill.get(c)}
    assert resent == {}
    # Everything else: synced exactly once by the rerun.
    rerun_syncs = {c: final.get(c, 0) - at_kill.get(c, 0) for c in final}
    assert {c for c, n in rerun_syncs.items() if n} == set(final) - committed
    assert all(n in (0, 1) for n in rerun_syncs.values())
    # The only repeated work: what was synced but not yet written when the process died.
    extra = sum(final.values()) - TOTAL
    assert extra == len(unwritten)
    if point != "during-a-write":  # there the test itself held the batch back
        assert extra <= BATCH


def test_a_run_killed_twice_is_resumed_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    with running_simulator(**SIM_FAST) as sim, database(url) as db:
        env = platform_env(sim, url)
        first = start_sync(env, tmp_path)
        _kill_mid_sync(first, db, sim)
        committed = db.synced_items(db.only_run().id)

        second = start_sync(env, tmp_path)
        wait_for(
            lambda: db.synced_count() >= len(committed) + 20,
            what="20 more campaigns stored",
            alive=second,
        )
        second.kill()
        run = db.only_run()
        assert run.resumes == 1
        committed = db.synced_items(run.id)
        at_kill = settle(sim)

        third = run_sync(env, tmp_path)
        final = sync_ok(sim)
        after = db.only_run()
        db.assert_every_campaign_once(CLIENT, TOTAL)

    assert third.code == 0, third.stderr[-3000:]
    assert "(resumed)" in third.stderr
    assert (after.id, after.status, after.resumes) == (run.id, "succeeded", 2)
    assert all(final[c] == at_kill[c] for c in committed)
    assert sum(final.values()) - TOTAL <= 2 * BATCH


def test_a_live_owner_keeps_its_run(tmp_path: Path) -> None:
    """A second ``adsync sync`` for the same client while the first is alive: refused."""
    url = f"sqlite:///{tmp_path / 'adsync.db'}"
    with running_simulator(**SIM_FAST) as sim, database(url) as db:
        env = platform_env(sim, url)
        first = start_sync(env, tmp_path)
        run_id: Any = wait_for(
            lambda: db.scalar("SELECT id FROM sync_runs WHERE status = 'running'"),
            what="the first run to be claimed",
            alive=first,
        )
        second = run_sync(env, tmp_path, timeout=30)
        still_running = first.proc.poll() is None
        code = first.wait(60)
        run = db.only_run()

    assert second.code == 1, second.stderr[-3000:]
    assert "already has a run in progress" in second.said
    assert run_id in second.said
    assert "Traceback" not in second.stderr
    assert second.seconds < 10
    assert still_running, "the first process should have been unaffected"
    assert code == 0, first.stderr[-3000:]
    assert (run.id, run.status, run.resumes) == (run_id, "succeeded", 0)
    with database(url) as check:
        check.assert_every_campaign_once(CLIENT, TOTAL)
