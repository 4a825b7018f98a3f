"""The worker's decisions as pure functions: retry or not, backoff, cron strings, health."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import croniter
import procrastinate
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from adsync.clock import FakeClock
from adsync.config import Settings
from adsync.errors import (
    AuthError,
    ConfigError,
    PaginationError,
    PermanentError,
    RunLocked,
    StoreError,
    StoreUnavailable,
    TransientError,
)
from adsync.metrics import Metrics, WorkerMetrics
from adsync.models import RunCounters, RunStatus
from adsync.store import SqlStore, make_owner, sync_runs
from adsync.sync import SyncOutcome
from adsync.worker.health import Health, watch_accounts, watch_health
from adsync.worker.policy import Action, JobRetryPolicy, decide_next
from adsync.worker.runtime import PatientStore, WorkerRuntime, unservable_accounts
from adsync.worker.schedule import next_ticks, recovery_cron, schedule_cron
from adsync.worker.settings import queue_conninfo
from adsync.worker.supervisor import supervise
from adsync.worker.tasks import run_sync_job

POLICY = JobRetryPolicy(max_attempts=4, initial=10.0, maximum=60.0)


def _outcome(status: RunStatus, fatal: BaseException | None = None) -> SyncOutcome:
    return SyncOutcome(
        run_id="r1",
        client_id="acme",
        status=status,
        counters=RunCounters(),
        failures=[],
        problems=[],
        seconds=1.0,
        resumed=False,
        error=None if fatal is None else str(fatal),
        fatal=fatal,
    )


@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.PARTIAL])
def test_a_finished_run_is_done_even_with_failed_campaigns(status: RunStatus) -> None:
    decision = decide_next(1, POLICY, random.Random(1), outcome=_outcome(status))
    assert decision.action is Action.DONE


@pytest.mark.parametrize(
    "error",
    [AuthError("credentials refused"), ConfigError("no such account"), PermanentError("403")],
)
def test_what_retrying_cannot_fix_is_not_retried(error: Exception) -> None:
    for outcome, raised in ((_outcome(RunStatus.FAILED, error), None), (None, error)):
        decision = decide_next(1, POLICY, random.Random(1), outcome=outcome, error=raised)
        assert decision.action is Action.GIVE_UP
        assert type(error).__name__ in decision.reason


@pytest.mark.parametrize(
    "error",
    [
        TransientError("503"),
        PaginationError("could not list page 1: 503"),
        StoreError("database down"),
        RunLocked("held by another process"),
        ConnectionRefusedError("refused"),
    ],
)
def test_transient_failures_are_retried_with_the_next_attempt_number(error: Exception) -> None:
    decision = decide_next(2, POLICY, random.Random(1), error=error)
    assert decision.action is Action.RETRY
    assert decision.next_attempt == 3
    assert 10.0 <= decision.delay <= 20.0  # half to all of 10 * 2**(2-1)


def test_a_failed_run_with_a_transient_cause_is_retried() -> None:
    outcome = _outcome(RunStatus.FAILED, TransientError("platform down"))
    assert decide_next(1, POLICY, random.Random(1), outcome=outcome).action is Action.RETRY


def test_attempts_run_out() -> None:
    decision = decide_next(4, POLICY, random.Random(1), error=TransientError("503"))
    assert decision.action is Action.GIVE_UP
    assert "after 4 attempts" in decision.reason
    assert "resumable" in decision.reason


def test_an_unknown_bug_is_not_retried() -> None:
    decision = decide_next(1, POLICY, random.Random(1), error=KeyError("oops"))
    assert decision.action is Action.GIVE_UP


def test_an_interrupted_run_is_handed_over_when_the_worker_stops() -> None:
    outcome = _outcome(RunStatus.INTERRUPTED)
    stopping = decide_next(3, POLICY, random.Random(1), outcome=outcome, stopping=True)
    assert (stopping.action, stopping.next_attempt, stopping.delay) == (Action.CONTINUE, 3, 0.0)
    # Without a stop, a run is interrupted by its lease: taken over, the new holder
    # finishes it; not renewable (database trouble), another attempt resumes it.
    taken = replace(outcome, taken_over=True, error="another process took the run over")
    assert decide_next(3, POLICY, random.Random(1), outcome=taken).action is Action.DONE
    lapsed = replace(outcome, error="could not renew the run's lease; resumable")
    retry = decide_next(3, POLICY, random.Random(1), outcome=lapsed)
    assert (retry.action, retry.next_attempt) == (Action.RETRY, 4)
    assert "could not renew" in retry.reason


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_half_to_all_of_the_capped_doubling(attempt: int, seed: int) -> None:
    delay = POLICY.delay(attempt, random.Random(seed))
    ceiling = min(60.0, 10.0 * 2 ** (attempt - 1))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_spreads_accounts_that_failed_together() -> None:
    rng = random.Random(3)
    assert len({round(POLICY.delay(2, rng), 3) for _ in range(30)}) > 25


@pytest.mark.parametrize(
    ("minutes", "cron"),
    [
        (0, None),
        (1, "*/1 * * * *"),
        (15, "*/15 * * * *"),
        (60, "0 * * * *"),
        (120, "0 */2 * * *"),
        (1440, "0 0 * * *"),
    ],
)
def test_schedule_cron(minutes: int, cron: str | None) -> None:
    assert schedule_cron(minutes) == cron


@pytest.mark.parametrize("minutes", [7, 45, 90, 300, 2880])
def test_a_schedule_cron_cannot_step_evenly_is_refused(minutes: int) -> None:
    with pytest.raises(ConfigError, match="ADSYNC_SCHEDULE_MINUTES"):
        schedule_cron(minutes)


@pytest.mark.parametrize("seconds", [1, 2, 5, 30])
def test_recovery_cron_puts_seconds_last_and_fires_every_n_seconds(seconds: int) -> None:
    cron = recovery_cron(seconds)
    assert cron == f"* * * * * */{seconds}"
    # What Procrastinate will read: croniter, with the seconds field last.
    it = croniter.croniter(cron, 1_800_000_000.0)
    ticks = [it.get_next(float) for _ in range(4)]
    assert {b - a for a, b in itertools.pairwise(ticks)} == {float(seconds)}


def test_recovery_every_few_minutes_uses_a_minute_cron() -> None:
    assert recovery_cron(120) == "*/2 * * * *"
    with pytest.raises(ConfigError):
        recovery_cron(7)


@pytest.mark.parametrize("minutes", [5, 60, 180])
def test_next_ticks_match_procrastinates_croniter(minutes: int) -> None:
    now = 1_800_000_123.0
    cron = schedule_cron(minutes)
    assert cron is not None
    it = croniter.croniter(cron, now)
    assert next_ticks(minutes, now) == [it.get_next(float) for _ in range(3)]


@pytest.mark.parametrize(
    ("url", "conninfo"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql+psycopg://u:p@h:5432/db", "postgresql://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
    ],
)
def test_queue_conninfo(url: str, conninfo: str) -> None:
    assert queue_conninfo(url) == conninfo


def test_sqlite_has_no_job_queue() -> None:
    with pytest.raises(ConfigError, match="need PostgreSQL"):
        queue_conninfo("sqlite:///adsync.db")


async def _turns(count: int = 5) -> None:
    """Let the event loop run its other tasks ``count`` times (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_health_needs_a_turning_loop_and_an_answering_database() -> None:
    clock = FakeClock()
    health = Health(max_silence=5.0, clock=clock)
    ok, body = health.report()
    assert not ok
    assert "worker loop not started" in body["problems"]

    health.loop_at = health.db_ok_at = clock.monotonic()
    assert health.report() == (
        True,
        {
            "status": "ok",
            "problems": [],
            "loop_age_seconds": 0.0,
            "database_age_seconds": 0.0,
            "stopping": False,
            "unservable_accounts": {},
        },
    )

    clock.advance(6)
    health.loop_at = clock.monotonic()  # the loop turns, the database stopped answering
    health.db_error = "ConnectorException"
    ok, body = health.report()
    assert not ok
    assert body["problems"] == ["database not answering (ConnectorException)"]

    health.db_ok_at = clock.monotonic()
    clock.advance(6)  # now the loop is stuck too
    ok, body = health.report()
    assert body["problems"][0] == "worker loop silent for 6s"


class _HangingDatabase:
    """An app whose database check is sent and never answered (a stopped proxy)."""

    def __init__(self) -> None:
        self.checks = 0
        self._never = asyncio.Event()

    async def check_connection_async(self) -> bool:
        self.checks += 1
        await self._never.wait()
        return True


async def test_a_hanging_database_is_blamed_not_the_event_loop() -> None:
    clock = FakeClock()
    health = Health(max_silence=5.0, clock=clock)
    db = _HangingDatabase()
    app = cast(procrastinate.App, db)
    watcher = asyncio.create_task(
        watch_health(app, health, WorkerMetrics(Metrics().registry), every=0.001)
    )
    try:
        await _turns()
        assert db.checks == 1
        clock.advance(20)  # twenty seconds without an answer; the loop keeps turning
        await _turns()
        ok, body = health.report()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert not ok
    assert body["problems"] == ["database not answering (no reply for 20s)"]
    assert body["loop_age_seconds"] < 1


class _AnsweringDatabase:
    def __init__(self) -> None:
        self.checks = 0

    async def check_connection_async(self) -> bool:
        self.checks += 1
        return True


async def test_the_health_watch_keeps_time_and_sleeps_by_the_injected_clock() -> None:
    clock = FakeClock()
    health = Health(max_silence=30.0, clock=clock)
    registry = Metrics().registry
    db = _AnsweringDatabase()
    watcher = asyncio.create_task(
        watch_health(cast(procrastinate.App, db), health, WorkerMetrics(registry), every=10.0)
    )
    try:
        await _turns()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    # Both the ticks and the database checks waited through the clock: no real time
    # passed, fake time did, and the database was asked again after each wait.
    assert clock.sleeps
    assert set(clock.sleeps) == {10.0}
    assert db.checks >= 2
    assert health.loop_at is not None
    assert health.loop_at >= 1_000.0 + 10.0
    # The loop's timestamp is the clock's wall time at its last tick.
    wall_offset = clock.wall() - clock.monotonic()
    loop_time = registry.get_sample_value("adsync_worker_loop_timestamp_seconds")
    assert loop_time == health.loop_at + wall_offset
    assert health.report()[0]


async def _until(condition: Callable[[], bool], turns: int = 100_000) -> None:
    """Let the loop run until ``condition`` holds (threads finish meanwhile); no sleeping."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_the_accounts_are_checked_again_on_a_change_or_once_a_minute_by_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = tmp_path / "accounts.toml"
    entry = '[[accounts]]\nclient_id = "c0"\nemail = "c0@example.com"\n'
    accounts.write_text(entry + 'password_env = "UNIT_WORKER_PASSWORD"\n')
    monkeypatch.setenv("UNIT_WORKER_PASSWORD", "pw")
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'w.db'}")
    metrics = Metrics()
    runtime = WorkerRuntime(
        store=store,
        accounts_file=accounts,
        policy=POLICY,
        stalled_after=60.0,
        metrics=metrics,
        worker_metrics=WorkerMetrics(metrics.registry),
    )
    clock = FakeClock()
    start = clock.monotonic()
    health = Health(max_silence=5.0, clock=clock)
    watcher = asyncio.create_task(watch_accounts(runtime, health, every=1.0))
    try:
        await _until(lambda: clock.monotonic() >= start + 2)  # the first check is done
        # A secret can go away without the accounts file changing: seen within a minute.
        monkeypatch.delenv("UNIT_WORKER_PASSWORD")
        await _until(lambda: "c0" in health.unservable)
        noticed_after = clock.monotonic() - start
        # A change of the file is looked at on the next tick.
        accounts.write_text(entry + 'password_env = "UNIT_OTHER_PASSWORD"\n')
        monkeypatch.setenv("UNIT_OTHER_PASSWORD", "pw")
        changed_at = clock.monotonic()
        await _until(lambda: not health.unservable)
        fixed_after = clock.monotonic() - changed_at
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await runtime.aclose()
        store.dispose()
    assert 60.0 <= noticed_after <= 62.0
    assert fixed_after <= 2.0
    assert set(clock.sleeps) == {1.0}


async def test_the_jobs_of_a_worker_share_one_writer_rate_log_and_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        "\n".join(
            f'[[accounts]]\nclient_id = "c{i}"\nemail = "c{i}@example.com"\n'
            'password_env = "UNIT_WORKER_PASSWORD"\n'
            for i in range(2)
        )
    )
    monkeypatch.setenv("UNIT_WORKER_PASSWORD", "pw")
    calls: list[dict[str, Any]] = []

    async def fake_sync(settings: Settings, store: SqlStore, **kwargs: Any) -> SyncOutcome:
        calls.append(kwargs)
        return _outcome(RunStatus.SUCCEEDED)

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'w.db'}")
    metrics = Metrics()
    runtime = WorkerRuntime(
        store=store,
        sync=fake_sync,
        concurrency=4,
        accounts_file=accounts,
        policy=POLICY,
        stalled_after=60.0,
        metrics=metrics,
        worker_metrics=WorkerMetrics(metrics.registry),
    )
    app = cast(procrastinate.App, None)  # a finished run needs no follow-up job
    try:
        for client_id in ("c0", "c1"):
            assert (await run_sync_job(app, runtime, client_id, 1))["status"] == "succeeded"
    finally:
        await runtime.aclose()
        store.dispose()
    assert len(calls) == 2
    # One process runtime for every job: its writer, rate log and margin.
    assert calls[0]["runtime"] is calls[1]["runtime"] is runtime.process
    for key in ("writer", "send_log", "margin"):
        assert getattr(calls[0]["runtime"], key) is not None
        assert getattr(calls[0]["runtime"], key) is getattr(calls[1]["runtime"], key)
    assert calls[0]["accounts"] == 4


async def test_a_job_run_again_after_its_run_ended_does_not_sync_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker went silent after its run succeeded but before it recorded its job's
    # end; recovery queued the job again. That attempt must not start a second run.
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        '[[accounts]]\nclient_id = "c0"\nemail = "c0@example.com"\n'
        'password_env = "UNIT_WORKER_PASSWORD"\n'
    )
    monkeypatch.setenv("UNIT_WORKER_PASSWORD", "pw")
    calls: list[str] = []

    async def fake_sync(settings: Settings, store: SqlStore, **kwargs: Any) -> SyncOutcome:
        calls.append(settings.client_id)
        return _outcome(RunStatus.SUCCEEDED)

    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'w.db'}")
    store.upgrade()
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(sync_runs).values(
                id="r-job7",
                client_id="c0",
                status=RunStatus.SUCCEEDED.value,
                started_at=now,
                finished_at=now,
                heartbeat_at=now,
                lease_until=now,
                owner=f"{make_owner()}/job7",
            )
        )
    metrics = Metrics()
    runtime = WorkerRuntime(
        store=store,
        sync=fake_sync,
        accounts_file=accounts,
        policy=POLICY,
        stalled_after=60.0,
        metrics=metrics,
        worker_metrics=WorkerMetrics(metrics.registry),
    )
    app = cast(procrastinate.App, None)  # a finished run needs no follow-up job
    try:
        again = await run_sync_job(app, runtime, "c0", 1, job_id=7)
        other = await run_sync_job(app, runtime, "c0", 1, job_id=8)
    finally:
        await runtime.aclose()
        store.dispose()
    assert again["run_id"] == "r-job7"
    assert "already" in again["decision"]
    assert calls == ["c0"]  # only job 8, which had no run yet
    assert other["status"] == "succeeded"


@pytest.mark.parametrize("patience", [0.0, 7.5, 300.0])
def test_a_patient_store_waits_out_at_least_its_patience(patience: float) -> None:
    # The store's waits are jittered: counting attempts as if they were not would
    # give up after about half the patience. Nothing listens on port 1.
    waits: list[float] = []
    prompt = SqlStore.from_url("postgresql://adsync@127.0.0.1:1/adsync", sleep=waits.append)
    patient = PatientStore(prompt, patience=patience, sleep=waits.append)
    try:
        with pytest.raises(StoreUnavailable):
            patient.live_run("acme")
    finally:
        patient.dispose()
    assert sum(waits) >= patience
    assert not waits or sum(waits[:-1]) < patience  # and no longer than it needs


async def test_a_job_queue_worker_that_ends_by_itself_is_started_again() -> None:
    requested = asyncio.Event()
    started: list[str] = []

    class _App:
        async def run_worker_async(self, **options: Any) -> None:
            started.append(options["name"])
            if len(started) == 1:
                # Cannot register itself: the database is down.
                raise procrastinate.exceptions.ConnectorException("down")
            if len(started) == 2:
                return  # ended by itself (its listener failed)
            requested.set()  # the third runs until the stop

    await supervise(
        cast(procrastinate.App, _App()),
        requested,
        random.Random(1),
        backoff=JobRetryPolicy(initial=0.001, maximum=0.001),
        name="adsync-sync",
    )
    assert started == ["adsync-sync"] * 3


def test_unservable_accounts_are_named_with_what_is_missing_and_leave_the_worker_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        '[[accounts]]\nclient_id = "ok"\nemail = "ok@example.com"\n'
        'password_env = "UNIT_OK_PASSWORD"\n\n'
        '[[accounts]]\nclient_id = "no-env"\nemail = "a@example.com"\n'
        'password_env = "UNIT_MISSING_PASSWORD"\n\n'
        '[[accounts]]\nclient_id = "no-file"\nemail = "b@example.com"\n'
        f'password_file = "{tmp_path / "absent"}"\n\n'
        '[[accounts]]\nclient_id = "off"\nemail = "c@example.com"\n'
        'password_env = "UNIT_MISSING_PASSWORD"\nenabled = false\n'
    )
    monkeypatch.setenv("UNIT_OK_PASSWORD", "pw")
    monkeypatch.delenv("UNIT_MISSING_PASSWORD", raising=False)
    problems = unservable_accounts(accounts)
    assert sorted(problems) == ["no-env", "no-file"]  # a disabled account is not served
    assert "UNIT_MISSING_PASSWORD" in problems["no-env"]
    assert "absent" in problems["no-file"]

    clock = FakeClock()
    health = Health(max_silence=5.0, clock=clock, unservable=problems)
    health.loop_at = health.db_ok_at = clock.monotonic()
    ok, body = health.report()
    assert ok
    assert body["status"] == "degraded"
    assert body["unservable_accounts"] == problems
