"""Syncs as Procrastinate jobs: ``adsync enqueue`` and two ``adsync worker`` processes.

One throwaway PostgreSQL database per test (Procrastinate's tables included), the
simulator serving 20 accounts with their own passwords, real worker processes
stopped with real signals. What the tests read: adsync's tables (campaigns, runs,
checkpoints), Procrastinate's (jobs and their events) and the simulator's counters.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _proc import Db, adsync, database, sync_ok, wait_for
from _workers import (
    LIMIT,
    SYNC_TASK,
    accounts_simulator,
    client_id,
    free_port,
    get,
    setup,
    sim_accounts,
    start_worker,
    sync_jobs,
)
from procrastinate import exceptions as pexc
from procrastinate.jobs import Status

from adsync.worker.queue import QUEUE_SYNC, defer_sync, ensure_queue_schema, recover_stalled
from adsync.worker.settings import WorkerSettings, queue_conninfo
from adsync.worker.tasks import build_app

pytestmark = pytest.mark.timeout(120)

ACCOUNTS = 20
CAMPAIGNS = 40


def _succeeded_clients(db: Db) -> int:
    return int(
        db.scalar("SELECT count(DISTINCT client_id) FROM sync_runs WHERE status = 'succeeded'") or 0
    )


def _attempt_intervals(db: Db) -> dict[str, list[tuple[datetime, datetime | None]]]:
    """Per account lock, when each attempt of its sync jobs ran (start, end)."""
    events = db.rows(
        "SELECT j.lock, e.job_id, e.type::text AS type, e.at FROM procrastinate_events e "
        "JOIN procrastinate_jobs j ON j.id = e.job_id WHERE j.task_name = :t "
        "ORDER BY e.at, e.id",
        t=SYNC_TASK,
    )
    open_: dict[int, datetime] = {}
    spans: dict[str, list[tuple[datetime, datetime | None]]] = defaultdict(list)
    ends = {"succeeded", "failed", "aborted", "deferred_for_retry"}
    for e in events:
        if e.type == "started":
            open_[e.job_id] = e.at
        elif e.type in ends and e.job_id in open_:
            spans[e.lock].append((open_.pop(e.job_id), e.at))
    for job_id, start in open_.items():
        lock = next(e.lock for e in events if e.job_id == job_id)
        spans[lock].append((start, None))
    return spans


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_sync_each_account_once_and_recover_a_killed_workers_job(
    tmp_path: Path, pg_url: str
) -> None:
    with (
        accounts_simulator(11, sim_accounts(CAMPAIGNS, ACCOUNTS), process=True) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, ACCOUNTS)

        # Enqueueing twice never makes a second waiting job for an account.
        first = adsync("enqueue", "--all", env=env, cwd=tmp_path)
        second = adsync("enqueue", "--all", env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
        assert first.stdout.count("queued ") == ACCOUNTS
        assert second.stdout.count("already waiting") == ACCOUNTS
        waiting = sync_jobs(db, "todo")
        assert len(waiting) == ACCOUNTS
        assert len({j.queueing_lock for j in waiting}) == ACCOUNTS
        assert all(j.lock == j.queueing_lock for j in waiting)

        port = free_port()
        a = start_worker(env, tmp_path, "worker-a", "--concurrency", "3")
        b = start_worker(
            env, tmp_path, "worker-b", "--concurrency", "3", "--health-port", str(port)
        )

        # Kill worker A in the middle of a run: some campaigns stored, not all.
        def a_mid_run() -> Any:
            if db.scalar("SELECT to_regclass('run_items')") is None:
                return None  # the workers have not migrated the schema yet
            rows = db.rows(
                "SELECT r.id, r.client_id, count(i.campaign_id) AS n FROM sync_runs r "
                "JOIN run_items i ON i.run_id = r.id AND i.state = 'synced' "
                "WHERE r.status = 'running' AND r.owner LIKE :o GROUP BY r.id, r.client_id",
                o=f"%:{a.pid}:%",
            )
            return [r for r in rows if 5 <= r.n <= CAMPAIGNS - 10]

        wait_for(a_mid_run, timeout=30, what="worker A mid-run")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)  # reaped: a zombie would still look alive to kill(pid, 0)
        killed = db.rows(
            "SELECT id, client_id FROM sync_runs WHERE status = 'running' AND owner LIKE :o",
            o=f"%:{a.pid}:%",
        )
        assert killed
        stored_at_kill = {run.client_id: db.synced_items(run.id) for run in killed}

        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"

        wait_for(
            lambda: _succeeded_clients(db) == ACCOUNTS,
            timeout=60,
            interval=0.1,
            what="every account synced",
        )
        status, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "adsync_campaigns_synced_total" in metrics
        assert 'adsync_worker_sync_jobs_total{decision="done"}' in metrics
        assert "adsync_worker_database_up 1.0" in metrics

        b.proc.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0, b.stderr[-3000:]

        stats = sim.stats()["clients"]
        runs = db.runs()
        spans = _attempt_intervals(db)
        jobs_done = sync_jobs(db, "succeeded")
        left = sync_jobs(db, "todo") + sync_jobs(db, "doing")
        for i in range(ACCOUNTS):
            client = client_id(i)
            db.assert_every_campaign_once(client, CAMPAIGNS)
            mine = [r for r in runs if r.client_id == client]
            assert [r.status for r in mine] == ["succeeded"], mine
            assert stats[client]["rate_limited"] == 0
            assert stats[client]["max_in_window"] <= LIMIT
            ok = sync_ok(sim, client)
            assert set(ok) == {f"campaign_{n}" for n in range(1, CAMPAIGNS + 1)}
            if client in stored_at_kill:
                # The run resumed from its checkpoint: nothing stored before the kill
                # was sent to the sync endpoint again.
                assert mine[0].resumes >= 1
                assert all(ok[c] == 1 for c in stored_at_kill[client])
            else:
                assert set(ok.values()) == {1}, ok
            # One attempt at a time per account, per Procrastinate's own records.
            attempts = sorted(spans[f"adsync:account:{client}"], key=lambda s: s[0])
            for (_, end), (start, _) in itertools.pairwise(attempts):
                assert end is not None
                assert end <= start
        assert len(jobs_done) == ACCOUNTS
        assert left == []
        recovered = [s for s in spans.values() if len(s) > 1]
        assert len(recovered) == len(killed)
    assert "recovered stalled jobs of dead workers" in b.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_sigterm_stops_gracefully_and_another_worker_resumes_the_runs(
    tmp_path: Path, pg_url: str
) -> None:
    campaigns, count = 200, 2
    with (
        accounts_simulator(12, sim_accounts(campaigns, count)) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, count)
        assert adsync("enqueue", "--all", env=env, cwd=tmp_path).returncode == 0
        first = start_worker(env, tmp_path, "first", "--concurrency", "2")
        wait_for(
            lambda: (
                db.scalar(
                    "SELECT count(*) FROM sync_runs r WHERE (SELECT count(*) FROM run_items i "
                    "WHERE i.run_id = r.id AND i.state = 'synced') >= 20"
                )
                == count
            ),
            timeout=30,
            what="both runs under way",
        )
        first.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert first.wait(15) == 0, first.stderr[-3000:]
        stopped_in = time.monotonic() - sent

        runs = db.runs()
        assert [(r.status, r.resumable) for r in runs] == [("interrupted", True)] * count
        stored = {r.client_id: db.synced_items(r.id) for r in runs}
        assert all(0 < len(s) < campaigns for s in stored.values())
        assert len(sync_jobs(db, "aborted")) == count
        assert len(sync_jobs(db, "todo")) == count  # queued again for another worker

        second = start_worker(env, tmp_path, "second", "--concurrency", "2")
        wait_for(lambda: _succeeded_clients(db) == count, timeout=45, interval=0.1, what="resumed")
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0

        for i in range(count):
            client = client_id(i)
            db.assert_every_campaign_once(client, campaigns)
            (run,) = [r for r in db.runs() if r.client_id == client]
            assert (run.status, run.resumes) == ("succeeded", 1)
            # A graceful stop lets in-flight calls finish and stores them: not one
            # campaign went to the sync endpoint twice.
            assert set(sync_ok(sim, client).values()) == {1}
    # In-flight calls take ~20 ms here; the rest is the process winding down.
    assert stopped_in < 5, first.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.postgres
def test_a_second_sigterm_aborts_running_syncs_at_once_and_queues_them_again(
    tmp_path: Path, pg_url: str
) -> None:
    count = 2
    with (
        accounts_simulator(
            14,
            sim_accounts(200, count),
            # Slow sync calls: a graceful stop would wait a second for them.
            sync_delay=1.0,
        ) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, count)
        env |= {"AD_PLATFORM_REQUEST_TIMEOUT": "3", "AD_PLATFORM_REQUEST_DEADLINE": "5"}
        assert adsync("enqueue", "--all", env=env, cwd=tmp_path).returncode == 0
        worker = start_worker(env, tmp_path, "worker", "--concurrency", "2")
        wait_for(
            lambda: (
                db.scalar(
                    "SELECT count(*) FROM sync_runs r WHERE (SELECT count(*) FROM run_items i "
                    "WHERE i.run_id = r.id AND i.state = 'synced') >= 10"
                )
                == count
            ),
            timeout=30,
            what="both runs under way",
        )
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # two signals sent together could merge into one
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.stderr[-3000:]

        runs = db.runs()
        # Cancelled, not wound down: SyncJob records a cancellation this way.
        assert [(r.status, r.resumable, r.error) for r in runs] == [
            ("interrupted", True, "stopped before finishing")
        ] * count
        assert len(sync_jobs(db, "aborted")) == count
        waiting = sync_jobs(db, "todo")
        assert sorted(j.args["client_id"] for j in waiting) == [client_id(i) for i in range(count)]
    assert "second signal" in worker.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [["worker"], ["enqueue", "--all"]])
def test_sqlite_is_refused_with_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'adsync.db'}"}
    result = adsync(*command, env=env, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "need PostgreSQL" in lines[0]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "adsync.db")


@pytest.mark.postgres
async def test_recovery_frees_an_account_whose_stalled_job_cannot_go_back_to_the_queue(
    pg_url: str,
) -> None:
    conninfo = queue_conninfo(pg_url)
    # Idempotent, and safe when workers start together.
    created = await asyncio.gather(*(ensure_queue_schema(conninfo) for _ in range(3)))
    assert sorted(created) == [False, False, True]
    app = build_app(conninfo, WorkerSettings(ADSYNC_SCHEDULE_MINUTES=0), pool_size=3)
    async with app.open_async():
        jobs = app.job_manager
        alone = await defer_sync(app, "alone")
        busy = await defer_sync(app, "busy")
        dead_worker = await jobs.register_worker()
        for _ in range(2):
            assert await jobs.fetch_job(queues=[QUEUE_SYNC], worker_id=dead_worker)
        # While "busy" runs, the schedule queues it again: allowed, the first is not waiting.
        waiting = await defer_sync(app, "busy")
        assert waiting is not None
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(
                "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
            )
        stalled = {j.id: j for j in await jobs.get_stalled_jobs(seconds_since_heartbeat=30)}
        assert set(stalled) == {alone, busy}

        # The trap (procrastinate #1446): a plain retry of "busy" is refused, and the
        # job would stay "doing" for good, holding the account's lock.
        with pytest.raises(pexc.UniqueViolation):
            await jobs.retry_job(stalled[busy])

        result = await recover_stalled(app, stalled_after=30)
        assert (result.retried, result.closed) == ([alone], [busy])
        assert await jobs.get_job_status_async(busy) == Status.FAILED
        live_worker = await jobs.register_worker()
        fetched = {
            (await jobs.fetch_job(queues=[QUEUE_SYNC], worker_id=live_worker)).id  # type: ignore[union-attr]
            for _ in range(2)
        }
        assert fetched == {alone, waiting}  # both accounts can run again
        again = await recover_stalled(app, stalled_after=30)
        assert again.retried == again.closed == []


@pytest.mark.slow
@pytest.mark.postgres
def test_a_platform_down_is_retried_with_backoff_and_refused_credentials_are_not(
    tmp_path: Path, pg_url: str
) -> None:
    accounts = sim_accounts(10, 3)
    accounts[2]["always_503"] = True
    with (
        accounts_simulator(13, accounts, sync_delay=0.01) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, 3)
        env["ADSYNC_TEST_PASSWORD_1"] = "not-the-password"
        env |= {
            "ADSYNC_RETRY_ATTEMPTS": "3",
            "ADSYNC_RETRY_INITIAL_SECONDS": "0.4",
            "AD_PLATFORM_MAX_ATTEMPTS": "2",
        }
        assert adsync("enqueue", "--all", env=env, cwd=tmp_path).returncode == 0
        worker = start_worker(env, tmp_path, "worker", "--concurrency", "3")

        def jobs_of(client: str) -> list[Any]:
            return db.rows(
                "SELECT id, status::text AS status, (args->>'attempt')::int AS attempt "
                "FROM procrastinate_jobs WHERE lock = :l ORDER BY id",
                l=f"adsync:account:{client}",
            )

        wait_for(
            lambda: [j.status for j in jobs_of(client_id(2))] == ["failed"] * 3,
            timeout=30,
            interval=0.1,
            what="three failed attempts of the account whose platform is down",
        )
        time.sleep(1.0)  # time enough for a fourth attempt, were there one
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0

        down = jobs_of(client_id(2))
        assert [(j.status, j.attempt) for j in down] == [("failed", n) for n in (1, 2, 3)]
        scheduled = db.rows(
            "SELECT e.job_id, e.at FROM procrastinate_events e WHERE e.type = 'scheduled'"
        )
        failed_at = {
            r.job_id: r.at
            for r in db.rows("SELECT job_id, at FROM procrastinate_events WHERE type = 'failed'")
        }
        when = {r.job_id: r.at for r in scheduled}
        for previous, retry in itertools.pairwise(down):
            # Backoff: half to all of 0.4 s, doubling.
            gap = (when[retry.id] - failed_at[previous.id]).total_seconds()
            assert gap >= 0.4 * 2 ** (previous.attempt - 1) / 2 - 0.05
        (run,) = [r for r in db.runs() if r.client_id == client_id(2)]
        # Every attempt resumed the same run: no attempt started over.
        assert (run.status, run.resumable, run.resumes) == ("failed", True, 2)

        assert [(j.status, j.attempt) for j in jobs_of(client_id(1))] == [("failed", 1)]
        assert [j.status for j in jobs_of(client_id(0))] == ["succeeded"]
        db.assert_every_campaign_once(client_id(0), 10)
    assert "not retried (AuthError" in worker.stderr
    assert "not-the-password" not in worker.stderr
