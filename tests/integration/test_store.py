"""The store against real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import itertools
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _dbclock import DbClock
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from adsync.errors import AmbiguousRunId, RunLocked, StoreError
from adsync.models import (
    Campaign,
    CampaignFailure,
    RunCounters,
    RunRecord,
    RunStatus,
    SyncedCampaign,
)
from adsync.store import SqlStore, metadata, sync_runs

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
OWNER = "host-a:100:aaaa"
OTHER = "host-b:200:bbbb"

HOSTILE_NAMES = [
    "'; DROP TABLE campaigns; --",
    'Robert"); DROP TABLE sync_runs;--',
    "O'Brien's \"quoted\" campaign",
    "back\\slash %s %(name)s :name ? $1",
    "Ünïcødé — 日本語のキャンペーン 🚀",
    "tab\tnew\nline",
    "",
]


class Ceiling(random.Random):
    """Draws the top of every range: each retry waits its backoff's ceiling, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def campaign(cid: str, **changes: Any) -> Campaign:
    values: dict[str, Any] = {
        "id": cid,
        "name": f"Campaign {cid}",
        "status": "active",
        "budget": 100.0,
        "impressions": 1_000,
        "clicks": 10,
        "conversions": 1,
        "created_at": datetime(2024, 1, 1, tzinfo=UTC),
    }
    values.update(changes)
    return Campaign(**values)


def synced(cid: str, at: datetime = T0, **changes: Any) -> SyncedCampaign:
    return SyncedCampaign(campaign=campaign(cid, **changes), synced_at=at)


# The database's clock in these tests: each call below says what time it is.
DB_CLOCK = DbClock(T0)


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """The shared ``store`` fixture, on the clock the tests set."""
    DB_CLOCK.at = T0
    sql_store = SqlStore.from_url(database_url, sleep=lambda _seconds: None, now=DB_CLOCK)
    sql_store.upgrade()
    try:
        yield sql_store
    finally:
        sql_store.dispose()


def claim(store: SqlStore, client: str, owner: str, now: datetime) -> RunRecord:
    DB_CLOCK.at = now
    return store.claim_run(client, owner, LEASE)


def beat(store: SqlStore, run_id: str, owner: str, now: datetime) -> bool:
    DB_CLOCK.at = now
    return store.heartbeat(run_id, owner, LEASE)


def finish_at(  # noqa: PLR0917 - finish_run's arguments and the time
    store: SqlStore,
    run_id: str,
    owner: str,
    status: RunStatus,
    counters: RunCounters,
    now: datetime,
    error: str | None = None,
    **kw: bool,
) -> None:
    DB_CLOCK.at = now
    store.finish_run(run_id, owner, status, counters, error, **kw)


def start(
    store: SqlStore, client: str = "acme", owner: str = OWNER, now: datetime = T0
) -> RunRecord:
    return claim(store, client, owner, now)


def finish(store: SqlStore, run: RunRecord, status: RunStatus = RunStatus.SUCCEEDED) -> None:
    finish_at(
        store, run.id, run.owner, status, RunCounters(), run.started_at + timedelta(minutes=1)
    )


def race(*calls: Callable[[], RunRecord]) -> tuple[list[RunRecord], list[BaseException]]:
    """Start the calls at the same instant on separate threads."""
    barrier = threading.Barrier(len(calls))
    won: list[RunRecord] = []
    lost: list[BaseException] = []

    def run(call: Callable[[], RunRecord]) -> None:
        barrier.wait()
        try:
            won.append(call())
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            lost.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return won, lost


# --- migrations ------------------------------------------------------------------------


def test_migrations_apply_and_are_idempotent(fresh_database_url: str) -> None:
    store = SqlStore.from_url(fresh_database_url)
    try:
        store.upgrade()
        store.upgrade()
        with store.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            # The migration and store.metadata describe the same schema.
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata
            )
        assert {
            "sync_runs",
            "run_items",
            "campaigns",
            "campaign_snapshots",
            "sync_failures",
            "rate_sends",
        } <= tables
        assert versions == [("0004",)]
        assert diff == []
    finally:
        store.dispose()


def test_concurrent_upgrades_do_not_collide(fresh_database_url: str) -> None:
    stores = [SqlStore.from_url(fresh_database_url) for _ in range(3)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def upgrade(s: SqlStore) -> None:
        barrier.wait()
        try:
            s.upgrade()
        except BaseException as exc:  # noqa: BLE001 - asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert errors == []
        assert stores[0].count_campaigns() == 0
    finally:
        for s in stores:
            s.dispose()


def test_one_running_run_per_client_is_enforced_by_the_database(store: SqlStore) -> None:
    run = start(store)
    row = {
        "client_id": "acme",
        "status": "running",
        "started_at": T0,
        "heartbeat_at": T0,
        "lease_until": T0,
        "owner": OTHER,
    }
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(sa.insert(metadata.tables["sync_runs"]).values(id="x" * 32, **row))
    # A finished run for the same client is not constrained.
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(metadata.tables["sync_runs"]).values(
                id="y" * 32, **{**row, "status": "succeeded"}
            )
        )
    assert store.get_run(run.id) is not None


# --- campaigns and history -------------------------------------------------------------


def test_upsert_updates_changed_values_and_keeps_one_row(store: SqlStore) -> None:
    first = start(store)
    store.write_synced(first.id, "acme", [synced("c1"), synced("c2")])
    finish(store, first)
    t1 = T0 + timedelta(hours=1)
    second = start(store, now=t1)
    store.write_synced(
        second.id, "acme", [synced("c1", at=t1, name="Renamed", impressions=5_000, status="paused")]
    )

    rows = {r["id"]: r for r in store.campaign_rows("acme")}
    assert set(rows) == {"c1", "c2"}
    assert store.count_campaigns("acme") == 2
    c1 = rows["c1"]
    assert (c1["name"], c1["impressions"], c1["status"]) == ("Renamed", 5_000, "paused")
    assert c1["first_synced_at"] == T0
    assert c1["last_synced_at"] == t1
    assert c1["last_run_id"] == second.id
    assert rows["c2"]["name"] == "Campaign c2"
    assert rows["c2"]["last_run_id"] == first.id


def test_same_campaign_id_under_two_clients_is_two_rows(store: SqlStore) -> None:
    a = start(store, client="acme")
    b = start(store, client="globex")
    store.write_synced(a.id, "acme", [synced("c1", name="Acme's")])
    store.write_synced(b.id, "globex", [synced("c1", name="Globex's")])

    assert store.count_campaigns() == 2
    assert [r["name"] for r in store.campaign_rows("acme")] == ["Acme's"]
    assert [r["name"] for r in store.campaign_rows("globex")] == ["Globex's"]


def test_duplicates_within_one_batch_keep_the_last(store: SqlStore) -> None:
    run = start(store)
    store.write_synced(run.id, "acme", [synced("c1", clicks=1), synced("c1", clicks=2)])
    assert [r["clicks"] for r in store.campaign_rows("acme")] == [2]
    assert store.count_snapshots() == 1


def test_runs_are_ordered_by_adsync_not_by_the_platforms_clock(store: SqlStore) -> None:
    far = datetime(2099, 1, 1, tzinfo=UTC)
    first = start(store)
    store.write_synced(first.id, "acme", [synced("c1", at=far, clicks=50)])
    finish(store, first, RunStatus.INTERRUPTED)
    # A resumed run keeps its place in the order.
    resumed = start(store, now=T0 + timedelta(minutes=5))
    assert (resumed.id, resumed.run_seq) == (first.id, first.run_seq)
    finish(store, resumed)

    second = start(store, now=T0 + timedelta(hours=1))
    assert second.run_seq > first.run_seq
    store.write_synced(second.id, "acme", [synced("c1", at=T0, clicks=10)])
    [row] = store.campaign_rows("acme")
    assert (row["clicks"], row["last_synced_at"], row["last_run_id"]) == (10, T0, second.id)
    # Within one run, the later write wins too.
    store.write_synced(second.id, "acme", [synced("c1", at=T0 - timedelta(hours=1), clicks=11)])
    assert [r["clicks"] for r in store.campaign_rows("acme")] == [11]
    # A write of an earlier run that arrives late changes nothing.
    store.write_synced(first.id, "acme", [synced("c1", at=far, clicks=99)])
    [row] = store.campaign_rows("acme")
    assert (row["clicks"], row["last_run_id"]) == (11, second.id)
    # Each client numbers its own runs.
    assert start(store, client="globex").run_seq == 1


def test_history_has_one_row_per_successful_sync(store: SqlStore) -> None:
    first = start(store)
    store.write_synced(first.id, "acme", [synced("c1"), synced("c2")])
    # The same campaign written again in the same run (a resumed run repeating a
    # write whose commit it never saw) must not add history.
    store.write_synced(first.id, "acme", [synced("c1", at=T0 + timedelta(seconds=5))])
    assert store.count_snapshots("acme") == 2
    finish(store, first)

    second = start(store, now=T0 + timedelta(days=1))
    store.write_synced(
        second.id, "acme", [synced("c1", at=T0 + timedelta(days=1), impressions=2_000)]
    )
    assert store.count_snapshots("acme") == 3
    assert store.count_snapshots("globex") == 0
    assert store.count_campaigns("acme") == 2

    snapshots = metadata.tables["campaign_snapshots"]
    with store.engine.connect() as conn:
        history = conn.execute(
            sa.select(snapshots.c.run_id, snapshots.c.impressions)
            .where(snapshots.c.campaign_id == "c1")
            .order_by(snapshots.c.synced_at)
        ).all()
    assert [tuple(h) for h in history] == [(first.id, 1_000), (second.id, 2_000)]


def test_hostile_names_are_stored_verbatim(store: SqlStore) -> None:
    run = start(store)
    batch = [synced(f"c{i}", name=name) for i, name in enumerate(HOSTILE_NAMES)]
    store.write_synced(run.id, "acme", batch)
    store.write_failures(run.id, "acme", [CampaignFailure("x", HOSTILE_NAMES[0], "sync")])

    stored = {r["id"]: r["name"] for r in store.campaign_rows("acme")}
    assert stored == {f"c{i}": name for i, name in enumerate(HOSTILE_NAMES)}
    assert store.run_failures(run.id)[0].reason == HOSTILE_NAMES[0]
    assert store.count_campaigns() == len(HOSTILE_NAMES)  # the table is still there


def test_a_value_the_database_cannot_hold_fails_the_whole_batch(store: SqlStore) -> None:
    run = start(store)
    with pytest.raises(StoreError, match="database error in write_synced"):
        store.write_synced(run.id, "acme", [synced("ok"), synced("big", impressions=2**63)])
    assert store.count_campaigns() == 0
    assert store.count_snapshots() == 0


def test_hostile_client_and_campaign_ids(store: SqlStore) -> None:
    client = "acme'; DELETE FROM campaigns; --"
    run = start(store, client=client)
    store.write_synced(run.id, client, [synced("id'\"; --"), synced("%")])
    assert [r["id"] for r in store.campaign_rows(client)] == ["%", "id'\"; --"]
    assert store.recent_runs(client)[0].id == run.id


_ids = itertools.count()
_names = st.text(max_size=300)
_big = st.integers(min_value=0, max_value=2**63 - 1)
_budget = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=_names, status=st.text(min_size=1, max_size=64), big=_big, budget=_budget)
def test_arbitrary_values_round_trip(
    store: SqlStore, name: str, status: str, big: int, budget: float
) -> None:
    if store.engine.dialect.name == "postgresql":
        # PostgreSQL text cannot hold NUL at all (see the store's notes).
        name, status = name.replace("\x00", ""), status.replace("\x00", "") or "s"
    run = _shared_run(store)
    cid = f"h{next(_ids)}"
    store.write_synced(
        run.id,
        "prop",
        [
            synced(
                cid,
                name=name,
                status=status,
                impressions=big,
                clicks=big,
                conversions=big,
                budget=budget,
            )
        ],
    )
    row = next(r for r in store.campaign_rows("prop") if r["id"] == cid)
    assert row["name"] == name
    assert row["status"] == status
    assert (row["impressions"], row["clicks"], row["conversions"]) == (big, big, big)
    assert row["budget"] == budget


def _shared_run(store: SqlStore) -> RunRecord:
    # Every example of one test run shares the client's single running run.
    DB_CLOCK.at = T0
    return store.claim_run("prop", OWNER, 3600)


# --- claiming, leases, resume ----------------------------------------------------------


def test_claim_starts_a_new_run(store: SqlStore) -> None:
    run = start(store)
    assert run.status is RunStatus.RUNNING
    assert run.resumed is False
    assert run.resumes == 0
    assert run.owner == OWNER
    assert run.client_id == "acme"
    assert run.started_at == T0
    assert run.lease_until == T0 + timedelta(seconds=LEASE)
    assert run.finished_at is None
    assert run.duration is None
    assert len(run.id) == 32
    assert store.get_run(run.id) == run


def test_live_lease_blocks_a_second_claim(store: SqlStore) -> None:
    run = start(store)
    with pytest.raises(RunLocked) as info:
        start(store, owner=OTHER, now=T0 + timedelta(seconds=LEASE - 1))
    message = str(info.value)
    assert "'acme'" in message
    assert OWNER in message
    assert run.lease_until.isoformat() in message
    # Another client is not blocked.
    assert start(store, client="globex", owner=OTHER).client_id == "globex"


def test_same_owner_claiming_again_gets_its_own_run(store: SqlStore) -> None:
    run = start(store)
    again = start(store, now=T0 + timedelta(seconds=1))
    assert again.id == run.id
    assert again.resumed is False


def test_dead_lease_is_taken_over(store: SqlStore) -> None:
    run = start(store)
    store.record_listed(run.id, "acme", ["c1", "c2"])
    store.write_synced(run.id, "acme", [synced("c1")])
    store.save_counters(run.id, RunCounters(seen=2, synced=1, requests=7))

    later = T0 + timedelta(seconds=LEASE + 1)
    taken = start(store, owner=OTHER, now=later)

    assert taken.id == run.id
    assert taken.resumed is True
    assert taken.resumes == 1
    assert taken.owner == OTHER
    assert taken.lease_until == later + timedelta(seconds=LEASE)
    assert taken.counters() == RunCounters(seen=2, synced=1, requests=7)
    assert store.checkpoint(run.id).synced == {"c1"}
    # The old owner, if it was only slow, finds out and must not finish the run.
    assert beat(store, run.id, OWNER, later) is False
    with pytest.raises(RunLocked):
        finish_at(store, run.id, OWNER, RunStatus.SUCCEEDED, RunCounters(), later)
    assert beat(store, run.id, OTHER, later) is True


def test_interrupted_run_is_resumed(store: SqlStore) -> None:
    run = start(store)
    finish_at(
        store,
        run.id,
        OWNER,
        RunStatus.INTERRUPTED,
        RunCounters(seen=10, synced=4, failed=1, requests=20, retries=2, rate_limited=1, pages=1),
        T0 + timedelta(minutes=2),
        "stopped by a signal",
    )
    stopped = store.get_run(run.id)
    assert stopped is not None
    assert (stopped.status, stopped.resumable) == (RunStatus.INTERRUPTED, True)
    assert stopped.duration == timedelta(minutes=2)

    resumed = start(store, owner=OTHER, now=T0 + timedelta(minutes=3))
    assert resumed.id == run.id
    assert resumed.resumed is True
    assert resumed.status is RunStatus.RUNNING
    assert resumed.resumes == 1
    assert resumed.resumable is False
    assert resumed.finished_at is None
    assert resumed.error is None
    assert resumed.counters() == RunCounters(
        seen=10, synced=4, failed=1, requests=20, retries=2, rate_limited=1, pages=1
    )
    assert resumed.started_at == T0  # still the same run


def test_only_resumable_finished_runs_are_resumed(store: SqlStore) -> None:
    done = start(store)
    finish(store, done, RunStatus.SUCCEEDED)
    after_success = start(store, now=T0 + timedelta(hours=1))
    assert after_success.id != done.id
    assert after_success.resumed is False

    finish(store, after_success, RunStatus.FAILED)
    after_failure = start(store, now=T0 + timedelta(hours=2))
    assert after_failure.id not in {done.id, after_success.id}

    finish_at(
        store,
        after_failure.id,
        OWNER,
        RunStatus.FAILED,
        RunCounters(),
        T0 + timedelta(hours=2, minutes=1),
        "database unavailable",
        resumable=True,
    )
    resumed = start(store, now=T0 + timedelta(hours=3))
    assert resumed.id == after_failure.id
    assert resumed.resumed is True


def test_concurrent_new_claims_have_exactly_one_winner(store: SqlStore) -> None:
    for client in ("c-a", "c-b", "c-c"):
        won, lost = race(
            lambda c=client: claim(store, c, OWNER, T0),
            lambda c=client: claim(store, c, OTHER, T0),
        )
        assert len(won) == 1, lost
        assert len(lost) == 1
        assert isinstance(lost[0], RunLocked)
        assert [r.id for r in store.recent_runs(client)] == [won[0].id]


def test_concurrent_takeovers_have_exactly_one_winner(store: SqlStore) -> None:
    dead = start(store)
    later = T0 + timedelta(seconds=LEASE + 5)
    won, lost = race(
        lambda: claim(store, "acme", OTHER, later),
        lambda: claim(store, "acme", "host-c:300:cccc", later),
    )
    assert len(won) == 1, lost
    assert isinstance(lost[0], RunLocked)
    assert won[0].id == dead.id
    assert won[0].resumes == 1
    assert len(store.recent_runs("acme")) == 1


def test_concurrent_resumes_of_an_interrupted_run_have_one_winner(store: SqlStore) -> None:
    run = start(store)
    finish(store, run, RunStatus.INTERRUPTED)
    later = T0 + timedelta(hours=1)
    won, lost = race(
        lambda: claim(store, "acme", OTHER, later),
        lambda: claim(store, "acme", "host-c:300:cccc", later),
    )
    assert len(won) == 1, lost
    assert isinstance(lost[0], RunLocked)
    assert won[0].id == run.id
    again = store.get_run(run.id)
    assert again is not None
    assert again.resumes == 1


def test_heartbeat_extends_the_lease(store: SqlStore) -> None:
    run = start(store)
    later = T0 + timedelta(seconds=20)
    assert beat(store, run.id, OWNER, later) is True
    renewed = store.get_run(run.id)
    assert renewed is not None
    assert renewed.heartbeat_at == later
    assert renewed.lease_until == later + timedelta(seconds=LEASE)
    # Still alive past the first lease thanks to the heartbeat.
    with pytest.raises(RunLocked):
        start(store, owner=OTHER, now=T0 + timedelta(seconds=LEASE + 5))
    assert beat(store, "no-such-run", OWNER, later) is False


def test_heartbeat_fails_once_the_run_is_finished(store: SqlStore) -> None:
    run = start(store)
    finish(store, run)
    assert beat(store, run.id, OWNER, T0 + timedelta(minutes=2)) is False


def test_finish_run_records_status_counters_and_error(store: SqlStore) -> None:
    run = start(store)
    counters = RunCounters(seen=100, synced=98, failed=2, requests=130, retries=9, pages=10)
    finish_at(
        store, run.id, OWNER, RunStatus.PARTIAL, counters, T0 + timedelta(minutes=11), "2 failed"
    )
    # A retry of the same call (its first answer lost) is harmless.
    finish_at(
        store, run.id, OWNER, RunStatus.PARTIAL, counters, T0 + timedelta(minutes=11), "2 failed"
    )
    done = store.get_run(run.id)
    assert done is not None
    assert done.status is RunStatus.PARTIAL
    assert done.counters() == counters
    assert done.error == "2 failed"
    assert done.duration == timedelta(minutes=11)
    assert done.resumable is False
    with pytest.raises(ValueError, match="final status"):
        finish_at(store, run.id, OWNER, RunStatus.RUNNING, counters, T0)


def test_the_duration_is_the_time_processes_ran_the_run(store: SqlStore) -> None:
    run = start(store)
    assert beat(store, run.id, OWNER, T0 + timedelta(seconds=10))
    finish_at(
        store, run.id, OWNER, RunStatus.INTERRUPTED, RunCounters(), T0 + timedelta(seconds=20)
    )
    # Resumed 80 s later; that process dies after its first beat ...
    assert claim(store, "acme", OTHER, T0 + timedelta(seconds=100)).id == run.id
    assert beat(store, run.id, OTHER, T0 + timedelta(seconds=110))
    # ... and a third takes the run over once the lease has run out.
    taken_at = T0 + timedelta(seconds=110 + LEASE + 1)
    assert claim(store, "acme", "host-c:300:cccc", taken_at).id == run.id
    finish_at(
        store,
        run.id,
        "host-c:300:cccc",
        RunStatus.SUCCEEDED,
        RunCounters(),
        taken_at + timedelta(seconds=5),
    )
    done = store.get_run(run.id)
    assert done is not None
    # 20 s, then 10 s until the last beat of the process that died, then 5 s.
    assert done.duration == timedelta(seconds=35)
    assert done.finished_at is not None
    assert done.finished_at - done.started_at == timedelta(seconds=146)


def test_save_counters_stores_absolute_values(store: SqlStore) -> None:
    run = start(store)
    store.save_counters(run.id, RunCounters(seen=5, requests=5))
    store.save_counters(run.id, RunCounters(seen=8, synced=3, requests=11, rate_limited=1))
    saved = store.get_run(run.id)
    assert saved is not None
    assert saved.counters() == RunCounters(seen=8, synced=3, requests=11, rate_limited=1)


def test_a_live_run_is_a_running_one_whose_lease_holds(database_url: str) -> None:
    # The database's own clock (no stand-in): leases are measured from now.
    store = SqlStore.from_url(database_url, sleep=lambda _seconds: None)
    store.upgrade()

    def put(run_id: str, status: RunStatus, lease: timedelta) -> None:
        now = datetime.now(UTC)
        with store.engine.begin() as conn:
            conn.execute(sa.delete(sync_runs).where(sync_runs.c.id == run_id))
            conn.execute(
                sa.insert(sync_runs).values(
                    id=run_id,
                    client_id="acme",
                    status=status.value,
                    started_at=now,
                    heartbeat_at=now,
                    lease_until=now + lease,
                    owner=OWNER,
                    finished_at=None if status is RunStatus.RUNNING else now,
                )
            )

    try:
        assert store.live_run("acme") is None
        put("r1", RunStatus.RUNNING, timedelta(seconds=LEASE))
        live = store.live_run("acme")
        assert live is not None
        assert (live.id, live.owner) == ("r1", OWNER)
        assert store.live_run("other") is None

        # Its lease ran out (its process died or lost the database): not live.
        put("r1", RunStatus.RUNNING, timedelta(minutes=-5))
        assert store.live_run("acme") is None

        # Finished: not live either, whatever its lease says.
        put("r1", RunStatus.SUCCEEDED, timedelta(minutes=5))
        assert store.live_run("acme") is None
    finally:
        store.dispose()


# --- checkpoint and failures ----------------------------------------------------------


def test_checkpoint_reflects_listed_synced_and_failed(store: SqlStore) -> None:
    run = start(store)
    empty = store.checkpoint(run.id)
    assert (empty.listed, empty.synced, empty.failed) == (frozenset(), frozenset(), frozenset())

    store.record_listed(run.id, "acme", ["c1", "c2", "c3", "c4", "c1"])
    store.write_synced(run.id, "acme", [synced("c1")])
    store.write_failures(
        run.id, "acme", [CampaignFailure("c2", "HTTP 500 after 8 attempts", "sync")]
    )
    cp = store.checkpoint(run.id)
    assert cp.listed == {"c1", "c2", "c3", "c4"}
    assert cp.synced == {"c1"}
    assert cp.failed == {"c2"}
    assert cp.pending == {"c3", "c4"}
    assert cp.listing_complete is False

    # Listing a page again (after a resume) leaves progress alone.
    store.record_listed(run.id, "acme", ["c1", "c2", "c5"])
    # A late failure report cannot undo a stored campaign.
    store.write_failures(run.id, "acme", [CampaignFailure("c1", "id seen twice", "duplicate")])
    # A campaign synced without being listed first still counts.
    store.write_synced(run.id, "acme", [synced("c9")])
    store.mark_listing_complete(run.id)
    cp = store.checkpoint(run.id)
    assert cp.synced == {"c1", "c9"}
    assert cp.failed == {"c2"}
    assert cp.pending == {"c3", "c4", "c5"}
    assert cp.listing_complete is True
    with pytest.raises(StoreError, match="no run"):
        store.checkpoint("missing")


def test_failures_are_recorded_with_reasons(store: SqlStore) -> None:
    run = start(store)
    store.write_failures(
        run.id,
        "acme",
        [
            CampaignFailure("c1", "HTTP 503 after 8 attempts", "sync"),
            CampaignFailure("", "invalid campaign payload: id: field required", "payload"),
            CampaignFailure("", "invalid campaign payload: budget: not finite", "payload"),
        ],
    )
    store.write_failures(run.id, "acme", [CampaignFailure("c1", "timed out", "sync")])

    failures = store.run_failures(run.id)
    assert sorted(failures, key=lambda f: f.reason) == [
        CampaignFailure("", "invalid campaign payload: budget: not finite", "payload"),
        CampaignFailure("", "invalid campaign payload: id: field required", "payload"),
        CampaignFailure("c1", "timed out", "sync"),
    ]
    assert store.checkpoint(run.id).failed == {"c1"}
    assert store.run_failures("another-run") == []


def test_a_campaign_synced_after_failing_leaves_the_failure_list(store: SqlStore) -> None:
    run = start(store)
    store.write_failures(run.id, "acme", [CampaignFailure("c1", "HTTP 500", "sync")])
    store.write_synced(run.id, "acme", [synced("c1")])
    assert store.run_failures(run.id) == []
    cp = store.checkpoint(run.id)
    assert (cp.synced, cp.failed) == ({"c1"}, frozenset())


# --- faults ------------------------------------------------------------------------------


def _fail_statements(store: SqlStore, table: str, times: int) -> list[int]:
    """Make the next ``times`` INSERTs into ``table`` fail like a dropped connection."""
    calls: list[int] = []
    error: type[Exception] = (
        psycopg.OperationalError
        if store.engine.dialect.name == "postgresql"
        else sqlite3.OperationalError
    )

    @event.listens_for(store.engine, "before_cursor_execute")
    def flaky(*args: Any) -> None:
        statement = args[2]
        if statement.startswith(f"INSERT INTO {table}") and len(calls) < times:
            calls.append(1)
            raise error("database is locked (simulated)")

    return calls


def test_a_failed_write_is_retried_whole(database_url: str, store: SqlStore) -> None:
    run = start(store)
    store.record_listed(run.id, "acme", ["c1", "c2"])
    sleeps: list[float] = []
    flaky_store = SqlStore.from_url(
        database_url, sleep=sleeps.append, retry_wait=0.25, rng=Ceiling()
    )
    try:
        # Fails after the campaigns upsert, inside the same transaction.
        calls = _fail_statements(flaky_store, "campaign_snapshots", times=2)
        flaky_store.write_synced(run.id, "acme", [synced("c1"), synced("c2")])
    finally:
        flaky_store.dispose()
    assert len(calls) == 2
    assert sleeps == [0.25, 0.5]
    assert store.count_campaigns() == 2
    assert store.count_snapshots() == 2
    assert store.checkpoint(run.id).synced == {"c1", "c2"}


def test_a_write_that_keeps_failing_leaves_nothing_half_written(
    database_url: str, store: SqlStore
) -> None:
    run = start(store)
    store.record_listed(run.id, "acme", ["c1", "c2"])
    sleeps: list[float] = []
    flaky_store = SqlStore.from_url(database_url, sleep=sleeps.append, retry_attempts=3)
    try:
        _fail_statements(flaky_store, "run_items", times=100)
        with pytest.raises(StoreError, match="database unavailable after 3 attempts") as info:
            flaky_store.write_synced(run.id, "acme", [synced("c1"), synced("c2")])
    finally:
        flaky_store.dispose()
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    assert len(sleeps) == 2
    assert store.count_campaigns() == 0
    assert store.count_snapshots() == 0
    assert store.checkpoint(run.id).pending == {"c1", "c2"}


def test_every_stamp_is_the_databases_time_in_the_transaction_that_writes(
    database_url: str, store: SqlStore
) -> None:
    # One clock, the database's, read where the write happens: a write retried
    # after a wait is stamped when it is made, not when it was asked for.
    run = start(store)

    def wait(_seconds: float) -> None:
        DB_CLOCK.at += timedelta(seconds=10)

    flaky = SqlStore.from_url(database_url, sleep=wait, now=DB_CLOCK)
    try:
        _fail_statements(flaky, "run_items", times=1)
        flaky.record_listed(run.id, "acme", ["c1", "c2"])
        listed_at = DB_CLOCK.at
        _fail_statements(flaky, "sync_failures", times=1)
        flaky.write_failures(run.id, "acme", [CampaignFailure("c1", "HTTP 500", "sync")])
        failed_at = DB_CLOCK.at
        _fail_statements(flaky, "campaign_snapshots", times=1)
        flaky.write_synced(run.id, "acme", [synced("c2")])
        synced_at = DB_CLOCK.at
    finally:
        flaky.dispose()
    assert (listed_at, failed_at, synced_at) == (
        T0 + timedelta(seconds=10),
        T0 + timedelta(seconds=20),
        T0 + timedelta(seconds=30),
    )
    items, failures = metadata.tables["run_items"], metadata.tables["sync_failures"]
    with store.engine.connect() as conn:
        stamps = dict(conn.execute(sa.select(items.c.campaign_id, items.c.updated_at)).all())
        [failure_stamp] = conn.execute(sa.select(failures.c.failed_at)).scalars().all()
    assert stamps == {"c1": failed_at, "c2": synced_at}
    assert failure_stamp == failed_at


def test_a_non_transient_error_is_not_retried(fresh_database_url: str) -> None:
    sleeps: list[float] = []
    unmigrated = SqlStore.from_url(fresh_database_url, sleep=sleeps.append)
    try:
        with pytest.raises(StoreError, match="database error in count") as info:
            unmigrated.count_campaigns()
    finally:
        unmigrated.dispose()
    assert sleeps == []
    assert "SELECT" not in str(info.value)  # the statement stays out of the message


# --- reading ---------------------------------------------------------------------------


def test_datetimes_are_timezone_aware_utc(store: SqlStore) -> None:
    paris = timezone(timedelta(hours=2))
    run = claim(store, "acme", OWNER, datetime(2025, 6, 1, 14, 0, tzinfo=paris))
    store.write_synced(
        run.id,
        "acme",
        [
            SyncedCampaign(
                campaign=campaign("c1", created_at=datetime(2024, 5, 5, 8, 30)),  # naive: UTC
                synced_at=datetime(2025, 6, 1, 14, 5, tzinfo=paris),
            )
        ],
    )
    finish(store, run)
    got = store.get_run(run.id)
    assert got is not None
    for value in (got.started_at, got.heartbeat_at, got.lease_until, got.finished_at):
        assert value is not None
        assert value.utcoffset() == timedelta(0)
    assert got.started_at == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    [row] = store.campaign_rows("acme")
    assert row["created_at"] == datetime(2024, 5, 5, 8, 30, tzinfo=UTC)
    assert row["created_at"].tzinfo is not None
    assert row["last_synced_at"] == datetime(2025, 6, 1, 12, 5, tzinfo=UTC)
    assert row["last_synced_at"].utcoffset() == timedelta(0)


def test_recent_runs_newest_first(store: SqlStore) -> None:
    ids = []
    for hour in range(3):
        run = start(store, now=T0 + timedelta(hours=hour))
        finish(store, run)
        ids.append(run.id)
    other = start(store, client="globex", now=T0 + timedelta(hours=5))

    assert [r.id for r in store.recent_runs("acme")] == ids[::-1]
    assert [r.id for r in store.recent_runs("acme", limit=2)] == ids[:0:-1]
    assert [r.id for r in store.recent_runs()] == [other.id, *ids[::-1]]
    assert store.recent_runs("nobody") == []


def test_get_run_by_id_or_unique_prefix(store: SqlStore) -> None:
    runs = []
    for i in range(20):
        run = start(store, client=f"client-{i}")
        runs.append(run)
    target = runs[0]
    assert store.get_run(target.id) == target
    assert store.get_run(target.id.upper()) == target
    unique = next(
        target.id[:n]
        for n in range(1, 33)
        if sum(r.id.startswith(target.id[:n]) for r in runs) == 1
    )
    assert store.get_run(unique) == target
    assert store.get_run("zzzz") is None
    assert store.get_run("") is None
    assert store.get_run("%") is None  # not a wildcard
    # 20 ids over 16 hex digits: some first digit is shared.
    shared = next(c for c in "0123456789abcdef" if sum(r.id.startswith(c) for r in runs) > 1)
    with pytest.raises(AmbiguousRunId, match="several runs"):
        store.get_run(shared)


def test_an_unreachable_server_fails_cleanly_without_the_password() -> None:
    sleeps: list[float] = []
    # Port 1 on loopback refuses at once: the server is "down".
    down = SqlStore.from_url(
        "postgresql://adsync:s3cr3t-pw@127.0.0.1:1/adsync",
        retry_attempts=3,
        sleep=sleeps.append,
        rng=Ceiling(),
    )
    try:
        with pytest.raises(StoreError) as info:
            down.count_campaigns()
    finally:
        down.dispose()
    message = str(info.value)
    assert message.startswith("database unavailable after 3 attempts")
    assert "s3cr3t-pw" not in message
    assert "s3cr3t-pw" not in repr(info.value)
    assert "127.0.0.1:1" in message
    assert sleeps == [0.5, 1.0]


@pytest.mark.postgres
def test_an_owner_that_comes_back_between_read_and_takeover_keeps_its_run(
    postgres_url: str,
) -> None:
    # SQLite serializes claims (BEGIN IMMEDIATE); on PostgreSQL the takeover's
    # compare-and-set is what stops a claimer acting on a stale read.
    client = "cas-client"
    claimer = SqlStore.from_url(postgres_url, now=DB_CLOCK)
    original = SqlStore.from_url(postgres_url, now=DB_CLOCK)
    try:
        claimer.upgrade()
        run = claim(original, client, OWNER, T0)
        DB_CLOCK.at = T0 + timedelta(seconds=LEASE + 1)
        revived: list[bool] = []

        @event.listens_for(claimer.engine, "before_cursor_execute")
        def revive(*args: Any) -> None:
            if args[2].startswith("UPDATE sync_runs") and not revived:
                revived.append(original.heartbeat(run.id, OWNER, LEASE))

        with pytest.raises(RunLocked, match=OWNER):
            claimer.claim_run(client, OTHER, LEASE)
        assert revived == [True]
        kept = original.get_run(run.id)
        assert kept is not None
        assert (kept.owner, kept.resumes) == (OWNER, 0)
    finally:
        claimer.dispose()
        original.dispose()
