"""The promises of a store, held by every store: InMemoryStore, SQLite and PostgreSQL.

The same tests run on each, so that the in-memory store the pipeline's unit
tests use cannot drift from the real ones: claims, leases and takeovers,
resuming and abandoning, the order of runs, checkpoints, writes (all or nothing,
values refused), finishing, history queries and the shared send log. Time is
the store's own clock, set by each test. What only the SQL store has
(migrations, retries, the database's own clock) is tested in
tests/integration/test_store.py.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adsync.errors import AmbiguousRunId, RunLocked, StoreError, StoreUnavailable
from adsync.models import (
    CampaignFailure,
    RunCounters,
    RunRecord,
    RunStatus,
    RunWrite,
    SyncedCampaign,
)
from adsync.sendlog import SendLogShortcuts
from adsync.store import InMemoryStore, SqlStore, metadata
from factories import T0, campaign, synced

AnyStore = InMemoryStore | SqlStore

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


class DbClock:
    """The store's clock (the database's) as a test sets it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


DB_CLOCK = DbClock(T0)


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def store(request: pytest.FixtureRequest) -> Iterator[AnyStore]:
    """Each store in turn, empty, on the clock the tests set."""
    DB_CLOCK.at = T0
    if request.param == "memory":
        yield InMemoryStore(now=DB_CLOCK)
        return
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    sql_store = SqlStore.from_url(url, sleep=lambda _seconds: None, now=DB_CLOCK)
    sql_store.upgrade()
    with sql_store.engine.begin() as conn:  # the session's PostgreSQL database is shared
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    try:
        yield sql_store
    finally:
        sql_store.dispose()


def holds_nul(store: AnyStore) -> bool:
    """Whether the store keeps text with NUL in it (SQLite does; PostgreSQL cannot)."""
    return isinstance(store, SqlStore) and store.engine.dialect.name == "sqlite"


def claim(store: AnyStore, client: str, owner: str, now: datetime, **kw: Any) -> RunRecord:
    DB_CLOCK.at = now
    return store.claim_run(client, owner, LEASE, **kw)


def beat(store: AnyStore, run_id: str, owner: str, now: datetime) -> bool:
    DB_CLOCK.at = now
    return store.heartbeat(run_id, owner, LEASE)


def finish_at(  # noqa: PLR0917 - finish_run's arguments and the time
    store: AnyStore,
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
    store: AnyStore, client: str = "acme", owner: str = OWNER, now: datetime = T0
) -> RunRecord:
    return claim(store, client, owner, now)


def finish(store: AnyStore, run: RunRecord, status: RunStatus = RunStatus.SUCCEEDED) -> None:
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


# --- campaigns and history ---------------------------------------------------------


def test_upsert_updates_changed_values_and_keeps_one_row(store: AnyStore) -> None:
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


def test_same_campaign_id_under_two_clients_is_two_rows(store: AnyStore) -> None:
    a = start(store, client="acme")
    b = start(store, client="globex")
    store.write_synced(a.id, "acme", [synced("c1", name="Acme's")])
    store.write_synced(b.id, "globex", [synced("c1", name="Globex's")])

    assert store.count_campaigns() == 2
    assert [r["name"] for r in store.campaign_rows("acme")] == ["Acme's"]
    assert [r["name"] for r in store.campaign_rows("globex")] == ["Globex's"]


def test_duplicates_within_one_batch_keep_the_last(store: AnyStore) -> None:
    run = start(store)
    store.write_synced(run.id, "acme", [synced("c1", clicks=1), synced("c1", clicks=2)])
    assert [r["clicks"] for r in store.campaign_rows("acme")] == [2]
    assert store.count_snapshots() == 1


def test_runs_are_ordered_by_adsync_not_by_the_platforms_clock(store: AnyStore) -> None:
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


def test_history_has_one_row_per_successful_sync(store: AnyStore) -> None:
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

    history = [
        (h["run_id"], h["impressions"])
        for h in store.snapshot_rows("acme")
        if h["campaign_id"] == "c1"
    ]
    assert history == [(first.id, 1_000), (second.id, 2_000)]


def test_hostile_names_are_stored_verbatim(store: AnyStore) -> None:
    run = start(store)
    batch = [synced(f"c{i}", name=name) for i, name in enumerate(HOSTILE_NAMES)]
    store.write_synced(run.id, "acme", batch)
    store.write_failures(run.id, "acme", [CampaignFailure("x", HOSTILE_NAMES[0], "sync")])

    stored = {r["id"]: r["name"] for r in store.campaign_rows("acme")}
    assert stored == {f"c{i}": name for i, name in enumerate(HOSTILE_NAMES)}
    assert store.run_failures(run.id)[0].reason == HOSTILE_NAMES[0]
    assert store.count_campaigns() == len(HOSTILE_NAMES)  # the table is still there


def test_a_value_the_database_cannot_hold_fails_the_whole_batch(store: AnyStore) -> None:
    run = start(store)
    with pytest.raises(StoreError, match="database error in write_synced"):
        store.write_synced(run.id, "acme", [synced("ok"), synced("big", impressions=2**63)])
    assert store.count_campaigns() == 0
    assert store.count_snapshots() == 0


def test_the_writes_of_several_runs_are_all_or_nothing(store: AnyStore) -> None:
    a, b = start(store, client="acme"), start(store, client="globex")
    store.write_runs(
        [
            RunWrite(
                a.id,
                "acme",
                (synced("c1"),),
                (CampaignFailure("c2", "HTTP 500", "sync"),),
                RunCounters(seen=2, synced=1, failed=1),
            ),
            RunWrite(b.id, "globex", (synced("g1"),), (), RunCounters(seen=1, synced=1)),
        ]
    )
    assert (store.count_campaigns("acme"), store.count_campaigns("globex")) == (1, 1)
    assert store.checkpoint(a.id).failed == {"c2"}
    # One value the database cannot hold refuses the whole call, every run's part.
    with pytest.raises(StoreError) as info:
        store.write_runs(
            [
                RunWrite(a.id, "acme", (synced("c3"),), (), RunCounters(seen=3, synced=2)),
                RunWrite(b.id, "globex", (synced("g2", clicks=2**63),), ()),
            ]
        )
    assert not isinstance(info.value, StoreUnavailable)  # refused, not an outage
    assert store.count_campaigns() == 2
    assert store.count_snapshots() == 2
    assert store.checkpoint(a.id).synced == {"c1"}
    record = store.get_run(a.id)
    assert record is not None
    assert record.counters() == RunCounters(seen=2, synced=1, failed=1)


def test_rows_of_a_run_that_does_not_exist_are_refused(store: AnyStore) -> None:
    with pytest.raises(StoreError):
        store.record_listed("no-such-run", "acme", ["c1"])
    with pytest.raises(StoreError):
        store.write_runs([RunWrite("no-such-run", "acme", (synced("c1"),))])
    with pytest.raises(StoreError):
        store.write_failures("no-such-run", "acme", [CampaignFailure("c1", "HTTP 500", "sync")])
    assert store.count_campaigns() == 0
    with pytest.raises(StoreError, match="no run"):
        finish_at(store, "no-such-run", OWNER, RunStatus.SUCCEEDED, RunCounters(), T0)


def test_hostile_client_and_campaign_ids(store: AnyStore) -> None:
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
    store: AnyStore, name: str, status: str, big: int, budget: float
) -> None:
    if not holds_nul(store):
        # PostgreSQL text cannot hold NUL at all (see the store's notes), nor the fake.
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


def _shared_run(store: AnyStore) -> RunRecord:
    # Every example of one test run shares the client's single running run.
    DB_CLOCK.at = T0
    return store.claim_run("prop", OWNER, 3600)


# --- claiming, leases, resume ------------------------------------------------------


def test_claim_starts_a_new_run(store: AnyStore) -> None:
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


def test_live_lease_blocks_a_second_claim(store: AnyStore) -> None:
    run = start(store)
    with pytest.raises(RunLocked) as info:
        start(store, owner=OTHER, now=T0 + timedelta(seconds=LEASE - 1))
    message = str(info.value)
    assert "'acme'" in message
    assert OWNER in message
    assert run.lease_until.isoformat() in message
    # Another client is not blocked.
    assert start(store, client="globex", owner=OTHER).client_id == "globex"


def test_same_owner_claiming_again_gets_its_own_run(store: AnyStore) -> None:
    run = start(store)
    again = start(store, now=T0 + timedelta(seconds=1))
    assert again.id == run.id
    assert again.resumed is False


def test_dead_lease_is_taken_over(store: AnyStore) -> None:
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


def test_interrupted_run_is_resumed(store: AnyStore) -> None:
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


def test_only_resumable_finished_runs_are_resumed(store: AnyStore) -> None:
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


def test_concurrent_new_claims_have_exactly_one_winner(store: AnyStore) -> None:
    for client in ("c-a", "c-b", "c-c"):
        won, lost = race(
            lambda c=client: claim(store, c, OWNER, T0),
            lambda c=client: claim(store, c, OTHER, T0),
        )
        assert len(won) == 1, lost
        assert len(lost) == 1
        assert isinstance(lost[0], RunLocked)
        assert [r.id for r in store.recent_runs(client)] == [won[0].id]


def test_concurrent_takeovers_have_exactly_one_winner(store: AnyStore) -> None:
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


def test_concurrent_resumes_of_an_interrupted_run_have_one_winner(store: AnyStore) -> None:
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


def test_a_run_whose_holder_is_known_dead_is_taken_over_before_its_lease_ends(
    store: AnyStore,
) -> None:
    run = start(store)
    soon = T0 + timedelta(seconds=1)
    with pytest.raises(RunLocked):
        claim(store, "acme", OTHER, soon, owner_is_dead=lambda _owner: False)
    taken = claim(store, "acme", OTHER, soon, owner_is_dead=lambda owner: owner == OWNER)
    assert (taken.id, taken.owner, taken.resumed, taken.resumes) == (run.id, OTHER, True, 1)
    assert taken.lease_until == soon + timedelta(seconds=LEASE)


def test_a_dead_run_that_last_ran_too_long_ago_is_abandoned_not_resumed(store: AnyStore) -> None:
    dead = start(store)
    store.record_listed(dead.id, "acme", ["c1"])
    later = T0 + timedelta(hours=2)
    fresh = claim(store, "acme", OTHER, later, resume_within=3600.0)
    assert fresh.id != dead.id
    assert (fresh.resumed, fresh.run_seq, fresh.started_at) == (False, dead.run_seq + 1, later)
    old = store.get_run(dead.id)
    assert old is not None
    assert (old.status, old.resumable) == (RunStatus.ABANDONED, False)
    assert old.finished_at == T0  # when it last ran
    assert old.error == "abandoned: not resumed within 3600s of when it last ran"
    assert store.checkpoint(fresh.id).listed == frozenset()
    # Closed for good: the next claim does not come back to it.
    finish(store, fresh, RunStatus.INTERRUPTED)
    assert claim(store, "acme", OWNER, later + timedelta(minutes=2)).id == fresh.id


def test_a_resumable_run_is_resumed_only_within_the_bound(store: AnyStore) -> None:
    run = start(store)
    stopped = T0 + timedelta(minutes=1)
    finish_at(
        store, run.id, OWNER, RunStatus.INTERRUPTED, RunCounters(), stopped, "stopped by a signal"
    )
    # Half an hour later: resumed.
    within = claim(store, "acme", OTHER, stopped + timedelta(minutes=30), resume_within=3600.0)
    assert (within.id, within.resumed) == (run.id, True)
    again = stopped + timedelta(minutes=31)
    finish_at(
        store, run.id, OTHER, RunStatus.FAILED, RunCounters(), again, "db down", resumable=True
    )
    # Two hours later: abandoned, its error kept, and a new run starts.
    fresh = claim(store, "acme", OWNER, again + timedelta(hours=2), resume_within=3600.0)
    assert fresh.id != run.id
    old = store.get_run(run.id)
    assert old is not None
    assert (old.status, old.resumable, old.finished_at) == (RunStatus.ABANDONED, False, again)
    assert old.error == "db down; abandoned: not resumed within 3600s of when it last ran"


def test_a_live_run_is_one_whose_lease_holds_on_the_stores_clock(store: AnyStore) -> None:
    assert store.live_run("acme") is None
    run = start(store)
    DB_CLOCK.at = T0 + timedelta(seconds=LEASE)
    live = store.live_run("acme")
    assert live is not None
    assert (live.id, live.owner) == (run.id, OWNER)
    assert store.live_run("other") is None
    # Its lease ran out (its process died or lost the database): not live.
    DB_CLOCK.at = T0 + timedelta(seconds=LEASE + 1)
    assert store.live_run("acme") is None
    # Renewed, it is live again; finished, it never is.
    assert beat(store, run.id, OWNER, T0 + timedelta(seconds=LEASE + 1))
    assert store.live_run("acme") is not None
    finish(store, run)
    assert store.live_run("acme") is None


def test_heartbeat_extends_the_lease(store: AnyStore) -> None:
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


def test_heartbeat_fails_once_the_run_is_finished(store: AnyStore) -> None:
    run = start(store)
    finish(store, run)
    assert beat(store, run.id, OWNER, T0 + timedelta(minutes=2)) is False


def test_finish_run_records_status_counters_and_error(store: AnyStore) -> None:
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


def test_the_duration_is_the_time_processes_ran_the_run(store: AnyStore) -> None:
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


def test_save_counters_stores_absolute_values(store: AnyStore) -> None:
    run = start(store)
    store.save_counters(run.id, RunCounters(seen=5, requests=5))
    store.save_counters(run.id, RunCounters(seen=8, synced=3, requests=11, rate_limited=1))
    saved = store.get_run(run.id)
    assert saved is not None
    assert saved.counters() == RunCounters(seen=8, synced=3, requests=11, rate_limited=1)


# --- checkpoint and failures ------------------------------------------------------


def test_checkpoint_reflects_listed_synced_and_failed(store: AnyStore) -> None:
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


def test_failures_are_recorded_with_reasons(store: AnyStore) -> None:
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


def test_a_campaign_synced_after_failing_leaves_the_failure_list(store: AnyStore) -> None:
    run = start(store)
    store.write_failures(run.id, "acme", [CampaignFailure("c1", "HTTP 500", "sync")])
    store.write_synced(run.id, "acme", [synced("c1")])
    assert store.run_failures(run.id) == []
    cp = store.checkpoint(run.id)
    assert (cp.synced, cp.failed) == ({"c1"}, frozenset())


def test_campaigns_no_longer_listed_leave_the_runs_result(store: AnyStore) -> None:
    run = start(store)
    store.record_listed(run.id, "acme", ["c1", "c2", "c3"])
    store.write_synced(run.id, "acme", [synced("c1")])
    store.write_failures(run.id, "acme", [CampaignFailure("c2", "HTTP 500", "sync")])
    store.mark_listing_complete(run.id, unlisted=["c1", "c2", "never-listed"])
    cp = store.checkpoint(run.id)
    assert (cp.listed, cp.synced, cp.failed) == ({"c3"}, frozenset(), frozenset())
    assert cp.listing_complete is True
    assert store.run_failures(run.id) == []
    # What was stored stays stored; only the run's result leaves it.
    assert store.count_campaigns("acme") == 1
    # Listed again, an unlisted campaign is pending again; others keep their state.
    store.record_listed(run.id, "acme", ["c1", "c3"])
    assert store.checkpoint(run.id).pending == {"c1", "c3"}


def test_failures_come_oldest_first(store: AnyStore) -> None:
    run = start(store)
    for at, cid in ((1, "c1"), (2, "c2"), (3, "c1")):
        DB_CLOCK.at = T0 + timedelta(seconds=at)
        store.write_failures(run.id, "acme", [CampaignFailure(cid, f"failed at {at}", "sync")])
    assert store.run_failures(run.id) == [
        CampaignFailure("c2", "failed at 2", "sync"),
        CampaignFailure("c1", "failed at 3", "sync"),
    ]


def test_a_reason_or_an_error_is_kept_to_2000_characters(store: AnyStore) -> None:
    run = start(store)
    long_reason = "x" * 5_000
    store.write_failures(run.id, "acme", [CampaignFailure("c1", long_reason, "sync")])
    [kept] = store.run_failures(run.id)
    assert kept.reason.startswith("x" * 2_000)
    assert kept.reason.endswith("... (3000 more characters)")
    finish_at(store, run.id, OWNER, RunStatus.FAILED, RunCounters(), T0, "y" * 3_000)
    done = store.get_run(run.id)
    assert done is not None
    assert done.error == "y" * 2_000 + "... (1000 more characters)"


def test_a_reason_or_an_error_with_nul_is_kept_without_it(store: AnyStore) -> None:
    # PostgreSQL text cannot hold NUL; a platform message with one must not sink
    # the write that records it.
    run = start(store)
    store.write_failures(run.id, "acme", [CampaignFailure("c1", "bad\x00body", "sync")])
    [kept] = store.run_failures(run.id)
    assert "\x00" not in kept.reason
    assert kept.reason.startswith("bad")
    finish_at(store, run.id, OWNER, RunStatus.FAILED, RunCounters(), T0, "boom\x00!")
    done = store.get_run(run.id)
    assert done is not None
    assert done.error is not None
    assert "\x00" not in done.error


# --- reading -------------------------------------------------------------------------


def test_datetimes_are_timezone_aware_utc(store: AnyStore) -> None:
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


def test_recent_runs_newest_first(store: AnyStore) -> None:
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


def test_get_run_by_id_or_unique_prefix(store: AnyStore) -> None:
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


# --- the shared send log -----------------------------------------------------------

# A realistic wall-clock stamp, in seconds: its microseconds must survive the round trip.
S0 = 1_700_000_000.123456
SPAN = 10.0


def reserve_at(log: SendLogShortcuts, t: float, client_id: str, owner: str, **kw: Any) -> Any:
    """``log.reserve(...)`` with the store's clock at ``t``."""
    DB_CLOCK.at = datetime.fromtimestamp(t, UTC)
    return log.reserve(client_id, owner, **kw)


def test_reserve_counts_every_owner_against_limit_and_spacing(store: AnyStore) -> None:
    log = store.send_log()

    def reserve(owner: str, t: float, client_id: str = "acme") -> Any:
        return reserve_at(log, t, client_id, owner, span=SPAN, limit=3, spacing=0.5)

    first = reserve("a", S0)
    assert (first.ok, first.at, first.foreign) == (True, S0, ())
    # Too close to a's send: refused, with the moment it would be taken.
    close = reserve("b", S0 + 0.2)
    assert (close.ok, close.retry_at, close.foreign) == (False, S0 + 0.5, (S0,))
    assert reserve("b", S0 + 0.5).ok
    third = reserve("a", S0 + 1.0)
    assert (third.ok, third.foreign) == (True, (S0 + 0.5,))
    # Three sends of two owners fill the window until the oldest leaves it.
    full = reserve("b", S0 + 2.0)
    assert (full.ok, full.retry_at) == (False, S0 + SPAN)
    assert full.foreign == (S0, S0 + 1.0)
    # Another client id has a window of its own.
    assert reserve("b", S0 + 2.0, client_id="other").ok
    # A refused send given back frees its slot (the stamp matches to the microsecond).
    log.forget("acme", "a", S0)
    assert reserve("b", S0 + 2.0).ok
    assert log.sends("acme") == [(S0 + 0.5, "b"), (S0 + 1.0, "a"), (S0 + 2.0, "b")]


def test_forget_touches_only_the_owners_own_send(store: AnyStore) -> None:
    log = store.send_log()
    assert reserve_at(log, S0, "acme", "a", span=SPAN, limit=5, spacing=0.0).ok
    assert reserve_at(log, S0 + 1, "acme", "b", span=SPAN, limit=5, spacing=0.0).ok
    log.forget("acme", "b", S0)  # not b's send
    log.forget("acme", "a", S0 + 1)  # not a's send
    assert len(log.sends("acme")) == 2
    log.forget("acme", "b", S0 + 1)
    assert log.sends("acme") == [(S0, "a")]


def test_restamp_moves_only_the_owners_own_send(store: AnyStore) -> None:
    log = store.send_log()
    assert reserve_at(log, S0, "acme", "a", span=SPAN, limit=5, spacing=0.0).ok
    log.restamp("acme", "b", S0, S0 + 0.25)  # not b's send
    assert log.sends("acme") == [(S0, "a")]
    log.restamp("acme", "a", S0, S0 + 0.25)
    assert log.sends("acme") == [(S0 + 0.25, "a")]
    # Others now count it from when it left.
    late = reserve_at(log, S0 + SPAN + 0.1, "acme", "b", span=SPAN, limit=1, spacing=0.0)
    assert (late.ok, late.retry_at) == (False, S0 + 0.25 + SPAN)
