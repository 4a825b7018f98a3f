"""A worker outlives its database: restarts and outages of a PostgreSQL cluster of the test's own.

Never the shared server: the cluster (``pg_cluster``) is started by the test on a
free port and thrown away afterwards. A real ``adsync worker`` process syncs the
simulator's accounts while the test restarts or stops the cluster under it.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from _proc import Db, database, sync_ok, wait_for
from _workers import (
    accounts_simulator,
    client_id,
    free_port,
    get,
    run,
    setup,
    sim_accounts,
    start_worker,
    succeeded_runs,
    sync_jobs,
)

from pgcluster import PgCluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(300)]


ACCOUNTS = 3
CAMPAIGNS = 120


def _health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        status, body = get(url, timeout=3)
    except OSError as exc:
        return 0, {"error": repr(exc)}
    return status, json.loads(body)


def _runs_under_way(db: Db, count: int) -> bool:
    running = db.scalar(
        "SELECT count(*) FROM sync_runs r WHERE r.status = 'running' AND (SELECT count(*) "
        "FROM run_items i WHERE i.run_id = r.id AND i.state = 'synced') >= 10"
    )
    return running == count


def test_a_worker_rides_out_a_database_restart_and_a_ten_second_outage(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    url = pg_cluster.create_database("adsync")
    with (
        accounts_simulator(
            31, sim_accounts(CAMPAIGNS, ACCOUNTS), process=True, sync_delay=0.05
        ) as sim,
        database(url) as db,
    ):
        env = setup(tmp_path, sim, url, ACCOUNTS)
        port = free_port()
        healthz = f"http://127.0.0.1:{port}/healthz"
        worker = start_worker(
            env, tmp_path, "worker", "--concurrency", str(ACCOUNTS), "--health-port", str(port)
        )
        wait_for(lambda: _health(healthz)[0] == 200, timeout=30, what="a healthy worker")

        # Idle: nothing running, only the worker's own connections are cut.
        pg_cluster.restart()
        time.sleep(3)
        assert worker.alive(), worker.stderr[-3000:]

        # A restart in the middle of the runs.
        assert run(env, tmp_path, "enqueue", "--all").returncode == 0
        wait_for(lambda: _runs_under_way(db, ACCOUNTS), timeout=30, what="runs under way")
        pg_cluster.restart()
        wait_for(
            lambda: succeeded_runs(db) == ACCOUNTS,
            timeout=90,
            interval=0.2,
            what="every account synced after the restart",
        )
        assert worker.alive(), worker.stderr[-3000:]

        # A stop of about ten seconds in the middle of the runs.
        assert run(env, tmp_path, "enqueue", "--all").returncode == 0
        wait_for(lambda: _runs_under_way(db, ACCOUNTS), timeout=30, what="runs under way")
        pg_cluster.stop()
        down_until = time.monotonic() + 10
        while_down: list[tuple[int, dict[str, Any]]] = []
        while time.monotonic() < down_until:
            while_down.append(_health(healthz))
            time.sleep(0.5)
        pg_cluster.start()
        wait_for(
            lambda: succeeded_runs(db) == 2 * ACCOUNTS,
            timeout=120,
            interval=0.2,
            what="every account synced after the outage",
        )
        wait_for(lambda: _health(healthz)[0] == 200, timeout=30, what="healthy again")
        assert worker.alive(), worker.stderr[-3000:]

        left = sync_jobs(db, "todo") + sync_jobs(db, "doing")
        runs = db.runs()
        counts = {client_id(i): sync_ok(sim, client_id(i)) for i in range(ACCOUNTS)}
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.stderr[-3000:]

    unhealthy = [body for status, body in while_down if status == 503]
    assert unhealthy, while_down
    assert any(
        any(p.startswith("database not answering") for p in body["problems"]) for body in unhealthy
    ), unhealthy
    assert left == []
    for client, synced in counts.items():
        mine = [r for r in runs if r.client_id == client]
        assert [r.status for r in mine] == ["succeeded", "succeeded"], mine
        # Two runs, each campaign synced once in each: nothing lost, nothing twice.
        assert synced == {f"campaign_{n}": 2 for n in range(1, CAMPAIGNS + 1)}
    assert "signal" not in " ".join(str(r.error) for r in runs)
    assert "ended by itself" not in worker.stderr
