"""What becomes of a sync job when its worker pauses, its run is held elsewhere, its worker
cannot serve its account, or its account is disabled; and how long finished jobs stay.

Real ``adsync worker`` processes on a PostgreSQL database of the test's own, the
simulator's per-campaign sync counts as the proof that nothing ran twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _proc import Db, database, start_sync, sync_ok, wait_for
from _workers import (
    SYNC_TASK,
    accounts_simulator,
    client_id,
    free_port,
    get,
    run,
    setup,
    sim_accounts,
    start_worker,
)
from procrastinate.job_context import JobContext
from procrastinate.jobs import Job, Status

from adsync.worker.queue import (
    PRUNE_TASK,
    QUEUE_MAINTENANCE,
    QUEUE_SYNC,
    defer_sync,
    ensure_queue_schema,
)
from adsync.worker.settings import WorkerSettings, queue_conninfo
from adsync.worker.supervisor import tolerate_outages
from adsync.worker.tasks import build_app

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def _jobs(db: Db, client: str) -> list[Any]:
    return db.rows(
        "SELECT id, status::text AS status, attempts, args FROM procrastinate_jobs "
        "WHERE task_name = :t AND lock = :l ORDER BY id",
        t=SYNC_TASK,
        l=f"adsync:account:{client}",
    )


def _synced(db: Db, client: str, campaigns: int) -> bool:
    return (
        db.scalar(
            "SELECT count(*) FROM sync_runs WHERE client_id = :c AND status = 'succeeded' "
            "AND synced = :n",
            c=client,
            n=campaigns,
        )
        == 1
    )


def _run_under_way(db: Db, client: str, at_least: int = 20) -> bool:
    synced = db.scalar(
        "SELECT count(*) FROM run_items i JOIN sync_runs r ON r.id = i.run_id "
        "WHERE r.client_id = :c AND r.status = 'running' AND i.state = 'synced'",
        c=client,
    )
    return bool(synced and synced >= at_least)


def _settled(db: Db) -> bool:
    """No sync job waiting or running."""
    return (
        db.scalar(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = :t "
            "AND status IN ('todo', 'doing')",
            t=SYNC_TASK,
        )
        == 0
    )


@pytest.mark.slow
def test_a_worker_paused_past_the_stalled_threshold_keeps_its_job_and_syncs_once(
    tmp_path: Path, pg_url: str
) -> None:
    campaigns = 300
    with (
        accounts_simulator(41, sim_accounts(campaigns, 1), process=True) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, 1)
        # Longer than the pause: a request in flight when the process stops must not
        # time out the moment it resumes (its answer is waiting in the socket).
        env |= {"AD_PLATFORM_REQUEST_TIMEOUT": "8", "AD_PLATFORM_REQUEST_DEADLINE": "8"}
        client = client_id(0)
        assert run(env, tmp_path, "enqueue", "--all").returncode == 0
        first = start_worker(env, tmp_path, "first", "--concurrency", "1")
        wait_for(lambda: _run_under_way(db, client), timeout=30, what="the run under way")
        second = start_worker(env, tmp_path, "second", "--concurrency", "1")
        wait_for(lambda: "worker started" in second.stderr, timeout=30, what="a second worker")

        # Paused for four recovery ticks past the 1 s stalled threshold; the run's
        # lease (32 s) still holds.
        first.proc.send_signal(signal.SIGSTOP)
        time.sleep(4)
        first.proc.send_signal(signal.SIGCONT)

        wait_for(lambda: _synced(db, client, campaigns), timeout=60, what="the account synced")
        wait_for(lambda: _settled(db), timeout=20, what="no job left waiting")
        time.sleep(1)  # time enough for a retry, were one queued
        jobs = _jobs(db, client)
        runs = db.runs()
        counts = sync_ok(sim, client)
        for worker in (first, second):
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0, worker.stderr[-3000:]

    assert [(r.status, r.resumes) for r in runs] == [("succeeded", 0)]
    assert counts == {f"campaign_{n}": 1 for n in range(1, campaigns + 1)}
    # One job, done by its first worker: never failed, never run a second time.
    assert [(j.status, j.attempts) for j in jobs] == [("succeeded", 1)]


@pytest.mark.slow
def test_a_job_whose_run_another_process_holds_waits_for_it_and_ends_done(
    tmp_path: Path, pg_url: str
) -> None:
    campaigns = 200
    with (
        accounts_simulator(42, sim_accounts(campaigns, 1), process=True, rate_limit=10) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, 1, limit=10)
        client = client_id(0)
        worker = start_worker(env, tmp_path, "worker", "--concurrency", "1")
        wait_for(lambda: "worker started" in worker.stderr, timeout=30, what="the worker")
        # `adsync sync` holds the account's run; a job for the same account meanwhile.
        cli = start_sync(env, tmp_path, "--client", client)
        wait_for(lambda: _run_under_way(db, client), timeout=30, what="the CLI's run under way")
        assert run(env, tmp_path, "enqueue", "--all").returncode == 0
        wait_for(
            lambda: [j.status for j in _jobs(db, client)][:1] not in ([], ["todo"]),
            timeout=30,
            interval=0.05,
            what="the job taken by the worker",
        )
        assert cli.proc.poll() is None  # taken while the CLI's run held the account
        assert cli.wait(60) == 0, cli.stderr
        wait_for(lambda: _settled(db), timeout=30, what="the job ended")
        time.sleep(1)  # time enough for a retry, were one queued
        jobs = _jobs(db, client)
        runs = db.runs()
        counts = sync_ok(sim, client)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.stderr[-3000:]

    # The CLI's run did the work; the job waited for it and ended done, unfailed,
    # without a run of its own.
    assert [r.status for r in runs] == ["succeeded"]
    assert counts == {f"campaign_{n}": 1 for n in range(1, campaigns + 1)}
    assert [(j.status, j.args["attempt"]) for j in jobs] == [("succeeded", 1)]
    assert "finished by another process" in worker.stderr


@pytest.mark.slow
def test_a_worker_without_an_accounts_secret_leaves_its_jobs_to_other_workers(
    tmp_path: Path, pg_url: str
) -> None:
    count, campaigns = 3, 20
    with (
        accounts_simulator(
            43, sim_accounts(campaigns, count), process=True, sync_delay=0.01
        ) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, count)
        lacking = dict(env)
        del lacking["ADSYNC_TEST_PASSWORD_1"]
        port = free_port()
        without = start_worker(
            lacking, tmp_path, "without", "--concurrency", "3", "--health-port", str(port)
        )
        healthz = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: "worker started" in without.stderr, timeout=30, what="the worker")
        assert run(env, tmp_path, "enqueue", "--all").returncode == 0
        for i in (0, 2):
            wait_for(lambda i=i: _synced(db, client_id(i), campaigns), timeout=30, what="synced")
        time.sleep(1)  # the job of client-01 comes and goes back meanwhile
        status, body = get(healthz)
        assert _synced(db, client_id(1), campaigns) is False

        # A worker that has the password takes client-01's job.
        full = start_worker(env, tmp_path, "full", "--concurrency", "3")
        wait_for(lambda: _synced(db, client_id(1), campaigns), timeout=30, what="client-01 synced")
        wait_for(lambda: _settled(db), timeout=20, what="no job left waiting")

        # A reload of the accounts file is checked too: a new account whose password
        # file cannot be read is reported.
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(
            accounts.read_text()
            + '[[accounts]]\nclient_id = "client-09"\nemail = "x@client9.example"\n'
            f'password_file = "{tmp_path / "missing-secret"}"\n'
        )
        wait_for(
            lambda: "client-09" in json.loads(get(healthz)[1])["unservable_accounts"],
            timeout=30,
            what="the new account reported",
        )
        after = json.loads(get(healthz)[1])
        failed = db.rows(
            "SELECT id FROM procrastinate_jobs WHERE task_name = :t AND status = 'failed'",
            t=SYNC_TASK,
        )
        for worker in (without, full):
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0, worker.stderr[-3000:]
        counts = {client_id(i): sync_ok(sim, client_id(i)) for i in range(count)}

    # Reported, not swallowed: healthy (it serves the others), the account named
    # with what is missing, a clear log line; no job ended failed.
    assert status == 200
    report = json.loads(body)
    assert report["status"] == "degraded"
    assert list(report["unservable_accounts"]) == [client_id(1)]
    assert "ADSYNC_TEST_PASSWORD_1" in report["unservable_accounts"][client_id(1)]
    assert "missing-secret" in after["unservable_accounts"]["client-09"]
    assert "cannot be served by this worker" in without.stderr
    assert failed == []
    for client, ok in counts.items():
        assert ok == {f"campaign_{n}": 1 for n in range(1, campaigns + 1)}, client


@pytest.mark.slow
def test_an_account_disabled_while_its_job_waits_is_not_synced(tmp_path: Path, pg_url: str) -> None:
    count, campaigns = 3, 60
    with (
        accounts_simulator(
            44, sim_accounts(campaigns, count), process=True, rate_limit=10, sync_delay=0.01
        ) as sim,
        database(pg_url) as db,
    ):
        env = setup(tmp_path, sim, pg_url, count, limit=10)
        assert run(env, tmp_path, "enqueue", "--all").returncode == 0
        worker = start_worker(env, tmp_path, "worker", "--concurrency", "1")
        wait_for(lambda: _run_under_way(db, client_id(0), 5), timeout=30, what="client-00 syncing")
        accounts = tmp_path / "accounts.toml"
        text = accounts.read_text()
        assert text.count('client_id = "client-01"') == 1
        accounts.write_text(
            text.replace('client_id = "client-01"', 'client_id = "client-01"\nenabled = false')
        )
        wait_for(lambda: _synced(db, client_id(2), campaigns), timeout=60, what="client-02 synced")
        wait_for(lambda: _settled(db), timeout=20, what="no job left waiting")
        jobs = _jobs(db, client_id(1))
        runs = db.scalar("SELECT count(*) FROM sync_runs WHERE client_id = :c", c=client_id(1))
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.stderr[-3000:]
        stats = sim.stats()["clients"]

    assert client_id(1) not in stats  # not one request for the disabled account
    assert runs == 0
    assert [j.status for j in jobs] == ["succeeded"]
    assert "account disabled" in worker.stderr


async def test_finished_jobs_past_the_retention_are_removed_and_recent_ones_kept(
    pg_url: str,
) -> None:
    conninfo = queue_conninfo(pg_url)
    await ensure_queue_schema(conninfo)
    settings = WorkerSettings(ADSYNC_SCHEDULE_MINUTES=0, ADSYNC_JOB_RETENTION_HOURS=48)
    app = build_app(conninfo, settings, pool_size=3)

    # Scheduled on the maintenance queue, with the retention as its argument.
    prunes = [p for p in app.periodic_registry.periodic_tasks.values() if p.task.name == PRUNE_TASK]
    assert len(prunes) == 1
    prune = prunes[0]
    assert prune.task.queue == QUEUE_MAINTENANCE
    assert prune.configure_kwargs["task_kwargs"]["max_hours"] == 48

    async with app.open_async():
        tolerate_outages(app, stopping=asyncio.Event(), grace_seconds=1.0)
        jobs = app.job_manager
        worker_id = await jobs.register_worker()
        ids = {}
        for name, status in [
            ("old-succeeded", Status.SUCCEEDED),
            ("old-failed", Status.FAILED),
            ("old-aborted", Status.ABORTED),
            ("new-succeeded", Status.SUCCEEDED),
            ("old-waiting", None),
        ]:
            ids[name] = await defer_sync(app, name)
            if status is not None:
                job = await jobs.fetch_job(queues=[QUEUE_SYNC], worker_id=worker_id)
                assert job is not None
                assert job.id == ids[name]
                await jobs.finish_job(job, status, delete_job=False)
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(
                "UPDATE procrastinate_events SET at = now() - interval '49 hours' "
                "WHERE job_id = ANY(%s)",
                (
                    [
                        ids["old-succeeded"],
                        ids["old-failed"],
                        ids["old-aborted"],
                        ids["old-waiting"],
                    ],
                ),
            )
            await conn.execute(
                "UPDATE procrastinate_events SET at = now() - interval '47 hours' "
                "WHERE job_id = %s",
                (ids["new-succeeded"],),
            )
        kwargs = prune.configure_kwargs["task_kwargs"]
        job = Job(
            id=None,
            queue=QUEUE_MAINTENANCE,
            lock=None,
            queueing_lock=None,
            task_name=PRUNE_TASK,
            task_kwargs=dict(kwargs),
        )
        context = JobContext(
            app=app, job=job, start_timestamp=time.time(), abort_reason=lambda: None
        )
        await prune.task(context, timestamp=int(time.time()), **kwargs)
        left = {j.id for j in await jobs.list_jobs_async()}
    # Finished for longer than the retention: gone, whatever their end. Younger, or
    # not finished: kept.
    assert left == {ids["new-succeeded"], ids["old-waiting"]}


async def test_a_job_queued_again_while_its_worker_was_silent_is_left_to_its_new_worker(
    pg_url: str,
) -> None:
    conninfo = queue_conninfo(pg_url)
    await ensure_queue_schema(conninfo)
    app = build_app(conninfo, WorkerSettings(ADSYNC_SCHEDULE_MINUTES=0), pool_size=3)
    async with app.open_async():
        tolerate_outages(app, stopping=asyncio.Event(), grace_seconds=1.0)
        jobs = app.job_manager
        job_id = await defer_sync(app, "acme")
        silent = await jobs.register_worker()
        taken = await jobs.fetch_job(queues=[QUEUE_SYNC], worker_id=silent)
        assert taken is not None
        # The worker looked dead: recovery queued its job again and another took it.
        await jobs.retry_job(taken)
        live = await jobs.register_worker()
        again = await jobs.fetch_job(queues=[QUEUE_SYNC], worker_id=live)
        assert again is not None
        assert again.id == job_id

        # The silent worker wakes up and ends its attempt: the job is no longer its own.
        await jobs.finish_job(taken, Status.SUCCEEDED, delete_job=False)
        assert await jobs.get_job_status_async(job_id) == Status.DOING
        await jobs.finish_job(again, Status.SUCCEEDED, delete_job=False)
        assert await jobs.get_job_status_async(job_id) == Status.SUCCEEDED

        # Pruned as dead while silent: registered again at its next heartbeat, so the
        # jobs it fetches from now on still name a worker that exists.
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute("DELETE FROM procrastinate_workers WHERE id = %s", (silent,))
            await jobs.update_heartbeat(silent)
            cursor = await conn.execute(
                "SELECT count(*) FROM procrastinate_workers WHERE id = %s", (silent,)
            )
            row = await cursor.fetchone()
    assert row == (1,)
