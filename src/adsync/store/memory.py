"""A store in memory that keeps every promise of the SQL one, for tests above the store.

:class:`InMemoryStore` is a real implementation of :class:`~adsync.store.Store`,
not a mock (procrastinate's ``InMemoryConnector`` is the model): runs are
claimed, leased, taken over, resumed and abandoned as
:class:`~adsync.store.SqlStore` does them, on a clock that stands for the
database's; writes are all or nothing; campaigns follow adsync's order of runs;
history is one row per campaign per run. It refuses what a real database
refuses (a number beyond BIGINT, a text too long for its column or holding NUL,
a write for a run that does not exist): the stricter of SQLite and PostgreSQL,
so that what works here works on both. The store contract tests
(``tests/contract``) run the same tests on it and on both databases.

Thread-safe like :class:`~adsync.store.SqlStore`: one lock makes each call one
transaction. It imports no SQLAlchemy.
"""

from __future__ import annotations

import itertools
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from adsync.errors import AmbiguousRunId, RunLocked, StoreError
from adsync.models import (
    CampaignFailure,
    Checkpoint,
    RunCounters,
    RunRecord,
    RunStatus,
    RunWrite,
    SyncedCampaign,
)
from adsync.sendlog import InMemorySendLog
from adsync.store.protocol import Store
from adsync.store.rules import (
    ITEM_FAILED,
    ITEM_PENDING,
    ITEM_SYNCED,
    ITEM_UNLISTED,
    OneRunWrites,
    abandon_note,
    counter_values,
    kept,
    lease_held,
    no_longer_ours,
    run_record,
    unique_ids,
)

__all__ = ["InMemoryStore"]

# What the columns hold (see adsync.store.schema): the widths PostgreSQL
# enforces, and the ranges of INTEGER and BIGINT.
_WIDTHS: Final = {
    "client_id": 128,
    "campaign_id": 255,
    "status": 64,
    "kind": 32,
    "owner": 200,
}
_INTEGER: Final = (-(2**31), 2**31 - 1)
_BIGINT: Final = (-(2**63), 2**63 - 1)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # As UTCDateTime stores it: naive is UTC, anything else is converted.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(slots=True)
class _Run:
    """One run, as a row of ``sync_runs`` (the same columns, so :func:`run_record` reads it)."""

    id: str
    client_id: str
    status: str
    started_at: datetime
    heartbeat_at: datetime
    lease_until: datetime
    owner: str
    run_seq: int
    finished_at: datetime | None = None
    resumes: int = 0
    seen: int = 0
    synced: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    pages: int = 0
    listing_complete: bool = False
    resumable: bool = False
    error: str | None = None
    active_seconds: float = 0.0

    def ran_until(self, now: datetime) -> None:
        """Count the time since the last beat as time the run was running."""
        self.active_seconds += max(0.0, (now - self.heartbeat_at).total_seconds())
        self.heartbeat_at = now

    def count(self, counters: RunCounters) -> None:
        for name, value in counter_values(counters).items():
            setattr(self, name, value)


@dataclass(slots=True)
class _Item:
    """One listed campaign of a run, as a row of ``run_items``."""

    client_id: str
    state: str
    updated_at: datetime


@dataclass(slots=True)
class _Failure:
    """One row of ``sync_failures``."""

    id: int
    run_id: str
    client_id: str
    campaign_id: str | None
    kind: str
    reason: str
    failed_at: datetime


class InMemoryStore(OneRunWrites):
    """:class:`~adsync.store.Store` in memory, with the same promises as the SQL store.

    ``now`` stands for the database's clock: leases, run times and the shared
    send log's stamps all read it (default: the host's UTC time).
    """

    def __init__(self, *, now: Callable[[], datetime] | None = None) -> None:
        self._clock = now or _utcnow
        self._lock = threading.RLock()
        self._runs: dict[str, _Run] = {}
        # (run_id, campaign_id) -> its state in the run
        self._items: dict[tuple[str, str], _Item] = {}
        # (client_id, campaign id) -> the row, by column name
        self._campaigns: dict[tuple[str, str], dict[str, Any]] = {}
        # (run_id, client_id, campaign id) -> the history row, in the order written
        self._snapshots: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._failures: list[_Failure] = []
        self._row_ids = itertools.count(1)
        self._send_log = InMemorySendLog(lambda: self._now().timestamp())

    def _now(self) -> datetime:
        return _utc(self._clock())

    # --- runs -------------------------------------------------------------------

    def claim_run(
        self,
        client_id: str,
        owner: str,
        lease_seconds: float,
        *,
        owner_is_dead: Callable[[str], bool] | None = None,
        resume_within: float | None = None,
    ) -> RunRecord:
        """Take the client's unfinished run over, or start a new one (see :class:`Store`)."""
        with self._lock:
            _refuse_any("claim_run", [_text("client_id", client_id), _text("owner", owner)])
            now = self._now()
            lease_until = now + timedelta(seconds=lease_seconds)
            stale_before = None if resume_within is None else now - timedelta(seconds=resume_within)
            note = "" if resume_within is None else abandon_note(resume_within)
            running = next(
                (
                    r
                    for r in self._runs.values()
                    if r.client_id == client_id and r.status == RunStatus.RUNNING
                ),
                None,
            )
            if running is not None:
                if running.owner == owner:
                    # Ours already (as when an earlier claim's answer was lost).
                    return run_record(running, resumed=running.resumes > 0)
                dead = owner_is_dead is not None and owner_is_dead(running.owner)
                if running.lease_until >= now and not dead:
                    raise RunLocked(
                        lease_held(client_id, running.id, running.owner, running.lease_until)
                    )
                if stale_before is not None and running.heartbeat_at < stale_before:
                    _abandon(running, note)
                else:
                    _take_over(running, owner, now, lease_until)
                    return run_record(running, resumed=True)

            candidates = [
                r for r in self._runs.values() if r.client_id == client_id and r.resumable
            ]
            candidate = max(candidates, key=lambda r: (r.started_at, r.id), default=None)
            if (
                candidate is not None
                and stale_before is not None
                and candidate.heartbeat_at < stale_before
            ):
                _abandon(candidate, note)
                candidate = None
            if candidate is not None:
                candidate.status = RunStatus.RUNNING.value
                candidate.resumable = False
                candidate.finished_at = None
                candidate.error = None
                _take_over(candidate, owner, now, lease_until)
                return run_record(candidate, resumed=True)

            seq = 1 + max(
                (r.run_seq for r in self._runs.values() if r.client_id == client_id), default=0
            )
            run = _Run(
                id=uuid.uuid4().hex,
                client_id=client_id,
                status=RunStatus.RUNNING.value,
                started_at=now,
                heartbeat_at=now,
                lease_until=lease_until,
                owner=owner,
                run_seq=seq,
            )
            self._runs[run.id] = run
            return run_record(run)

    def heartbeat(self, run_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False when the run is no longer ``owner``'s."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.owner != owner or run.status != RunStatus.RUNNING:
                return False
            now = self._now()
            run.ran_until(now)
            run.lease_until = now + timedelta(seconds=lease_seconds)
            return True

    def finish_run(
        self,
        run_id: str,
        owner: str,
        status: RunStatus,
        counters: RunCounters,
        error: str | None = None,
        *,
        resumable: bool | None = None,
    ) -> None:
        """Close the run; RunLocked if it is no longer ``owner``'s."""
        if status is RunStatus.RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")
        keep = status is RunStatus.INTERRUPTED if resumable is None else resumable
        stored_error = None if error is None else kept(error)
        with self._lock:
            _refuse_any("finish_run", [*_counter_problems(counters), _text("error", stored_error)])
            run = self._runs.get(run_id)
            if run is None:
                raise StoreError(f"no run {run_id}")
            if run.owner != owner or run.status != RunStatus.RUNNING:
                if run.owner == owner and run.status == status:
                    return  # as when an earlier call's answer was lost
                raise RunLocked(no_longer_ours(run_id, run.status, run.owner))
            now = self._now()
            run.ran_until(now)
            run.status = status.value
            run.finished_at = now
            run.resumable = keep
            run.error = stored_error
            run.count(counters)

    # --- checkpoint -------------------------------------------------------------

    def record_listed(self, run_id: str, client_id: str, campaign_ids: Sequence[str]) -> None:
        """Remember listed campaigns as pending; others keep their state (``unlisted``: pending)."""
        ids = unique_ids(campaign_ids)
        if not ids:
            return
        with self._lock:
            _refuse_any(
                "record_listed",
                [
                    self._missing(run_id),
                    _text("client_id", client_id),
                    *(_text("campaign_id", cid) for cid in ids),
                ],
            )
            now = self._now()
            for cid in ids:
                item = self._items.get((run_id, cid))
                if item is None:
                    self._items[run_id, cid] = _Item(client_id, ITEM_PENDING, now)
                elif item.state == ITEM_UNLISTED:
                    item.state, item.updated_at = ITEM_PENDING, now

    def mark_listing_complete(self, run_id: str, unlisted: Iterable[str] = ()) -> None:
        """Record that the listing is complete; ``unlisted`` campaigns leave the run's result."""
        gone = set(unique_ids(unlisted))
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.listing_complete = True
            if not gone:
                return
            now = self._now()
            for cid in gone:
                item = self._items.get((run_id, cid))
                if item is not None:
                    item.state, item.updated_at = ITEM_UNLISTED, now
            self._failures = [
                f for f in self._failures if not (f.run_id == run_id and f.campaign_id in gone)
            ]

    def checkpoint(self, run_id: str) -> Checkpoint:
        """What the run has durably done: listed, synced and failed campaign ids."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise StoreError(f"no run {run_id}")
            states = [(cid, i.state) for (rid, cid), i in self._items.items() if rid == run_id]
            return Checkpoint(
                synced=frozenset(cid for cid, state in states if state == ITEM_SYNCED),
                failed=frozenset(cid for cid, state in states if state == ITEM_FAILED),
                listed=frozenset(cid for cid, state in states if state != ITEM_UNLISTED),
                listing_complete=run.listing_complete,
            )

    # --- campaigns --------------------------------------------------------------

    def write_runs(self, writes: Sequence[RunWrite]) -> None:
        """Failures, synced campaigns and counters of one or more runs: all, or none."""
        self._write("write_runs", writes)

    def _write(self, op: str, writes: Sequence[RunWrite]) -> None:
        with self._lock:
            # Everything is checked before anything changes: one transaction.
            for w in writes:
                if w.failures or w.synced:
                    _refuse_any(op, [self._missing(w.run_id)])
                _refuse_any(op, _write_problems(w))
            now = self._now()
            for w in writes:
                self._write_failures(w.run_id, w.client_id, w.failures, now)
                self._write_synced(w.run_id, w.client_id, w.synced, now)
                run = self._runs.get(w.run_id)
                if w.counters is not None and run is not None:
                    run.count(w.counters)

    def _write_failures(
        self, run_id: str, client_id: str, failures: Sequence[CampaignFailure], now: datetime
    ) -> None:
        with_id = list({f.campaign_id: f for f in failures if f.campaign_id}.values())
        for f in with_id:
            same = next(
                (
                    old
                    for old in self._failures
                    if (old.run_id, old.client_id, old.campaign_id)
                    == (run_id, client_id, f.campaign_id)
                ),
                None,
            )
            if same is None:
                self._failures.append(self._failure(run_id, client_id, f, now))
            else:
                same.kind, same.reason, same.failed_at = f.kind, kept(f.reason), now
            item = self._items.get((run_id, f.campaign_id))
            if item is None:
                self._items[run_id, f.campaign_id] = _Item(client_id, ITEM_FAILED, now)
            elif item.state != ITEM_SYNCED:
                item.state, item.updated_at = ITEM_FAILED, now
        # Without an id, a failure has nothing to be unique by.
        self._failures.extend(
            self._failure(run_id, client_id, f, now) for f in failures if not f.campaign_id
        )

    def _failure(self, run_id: str, client_id: str, f: CampaignFailure, now: datetime) -> _Failure:
        return _Failure(
            next(self._row_ids),
            run_id,
            client_id,
            f.campaign_id or None,
            f.kind,
            kept(f.reason),
            now,
        )

    def _write_synced(
        self, run_id: str, client_id: str, batch: Sequence[SyncedCampaign], now: datetime
    ) -> None:
        if not batch:
            return
        seq = self._runs[run_id].run_seq
        for s in {s.campaign.id: s for s in batch}.values():
            c, synced_at = s.campaign, _utc(s.synced_at)
            row = self._campaigns.get((client_id, c.id))
            # adsync's order of runs decides, not the platform's clock.
            if row is None or row["last_run_seq"] <= seq:
                self._campaigns[client_id, c.id] = {
                    "client_id": client_id,
                    "id": c.id,
                    "name": c.name,
                    "status": c.status,
                    "budget": c.budget,
                    "impressions": c.impressions,
                    "clicks": c.clicks,
                    "conversions": c.conversions,
                    "created_at": None if c.created_at is None else _utc(c.created_at),
                    "first_synced_at": synced_at if row is None else row["first_synced_at"],
                    "last_synced_at": synced_at,
                    "last_run_id": run_id,
                    "last_run_seq": seq,
                }
            self._snapshots.setdefault(
                (run_id, client_id, c.id),
                {
                    "id": next(self._row_ids),
                    "run_id": run_id,
                    "client_id": client_id,
                    "campaign_id": c.id,
                    "synced_at": synced_at,
                    "status": c.status,
                    "budget": c.budget,
                    "impressions": c.impressions,
                    "clicks": c.clicks,
                    "conversions": c.conversions,
                },
            )
            self._items[run_id, c.id] = _Item(client_id, ITEM_SYNCED, now)
            self._failures = [
                f
                for f in self._failures
                if (f.run_id, f.client_id, f.campaign_id) != (run_id, client_id, c.id)
            ]

    # --- the shared send log ----------------------------------------------------

    def send_log(self) -> InMemorySendLog:
        """The log of sends to the platform, on this store's clock."""
        return self._send_log

    # --- reading ----------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id or unique id prefix; AmbiguousRunId if several match."""
        ref = run_id.strip().lower()
        if not ref:
            return None
        with self._lock:
            exact = self._runs.get(ref)
            if exact is not None:
                return run_record(exact)
            matches = [r for r in self._runs.values() if r.id.startswith(ref)]
            if len(matches) > 1:
                raise AmbiguousRunId(
                    f"run id {run_id!r} matches several runs; give more characters"
                )
            return run_record(matches[0]) if matches else None

    def recent_runs(self, client_id: str | None = None, limit: int = 20) -> list[RunRecord]:
        """Runs, newest first, of one client or of all."""
        with self._lock:
            runs = [r for r in self._runs.values() if client_id in (None, r.client_id)]
            runs.sort(key=lambda r: (r.started_at, r.id), reverse=True)
            return [run_record(r) for r in runs[:limit]]

    def live_run(self, client_id: str) -> RunRecord | None:
        """The client's ``running`` run while its lease holds (on this store's clock)."""
        with self._lock:
            now = self._now()
            for r in self._runs.values():
                if r.client_id == client_id and r.status == RunStatus.RUNNING:
                    return run_record(r) if r.lease_until >= now else None
            return None

    def run_failures(self, run_id: str) -> list[CampaignFailure]:
        """The run's failed campaigns with kind and reason, oldest first."""
        with self._lock:
            ours = sorted(
                (f for f in self._failures if f.run_id == run_id), key=lambda f: (f.failed_at, f.id)
            )
            return [CampaignFailure(f.campaign_id or "", f.reason, f.kind) for f in ours]

    def campaign_rows(self, client_id: str) -> list[dict[str, Any]]:
        """The stored campaigns of a client, by id, as column → value dicts."""
        with self._lock:
            rows = [dict(r) for (cid, _), r in self._campaigns.items() if cid == client_id]
            return sorted(rows, key=lambda r: r["id"])

    def snapshot_rows(self, client_id: str) -> list[dict[str, Any]]:
        """The history rows of a client, oldest first, as column → value dicts."""
        with self._lock:
            rows = [dict(r) for r in self._snapshots.values() if r["client_id"] == client_id]
            return sorted(rows, key=lambda r: (r["synced_at"], r["id"]))

    def count_campaigns(self, client_id: str | None = None) -> int:
        """How many campaigns are stored (for one client, or in all)."""
        with self._lock:
            return sum(1 for cid, _ in self._campaigns if client_id in (None, cid))

    def count_snapshots(self, client_id: str | None = None) -> int:
        """How many history rows are stored (for one client, or in all)."""
        with self._lock:
            return sum(1 for _, cid, _ in self._snapshots if client_id in (None, cid))

    def dispose(self) -> None:
        """Nothing to let go of: the data stays until the store is dropped."""

    # --- what a database refuses ------------------------------------------------

    def _missing(self, run_id: str) -> str | None:
        # The foreign key of every row that belongs to a run.
        return None if run_id in self._runs else f"no run {run_id} for the rows that belong to it"


def _refuse_any(op: str, problems: Iterable[str | None]) -> None:
    """Raise the StoreError a database would for the first value it would not hold."""
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise StoreError(f"database error in {op} (memory): {problem}")


def _text(column: str, value: str | None) -> str | None:
    if value is None:
        return None
    if "\x00" in value:
        return f"{column} contains NUL (PostgreSQL text cannot)"
    width = _WIDTHS.get(column)
    if width is not None and len(value) > width:
        return f"{column} is longer than {width} characters"
    return None


def _number(column: str, value: int, bounds: tuple[int, int]) -> str | None:
    return None if bounds[0] <= value <= bounds[1] else f"{column} is out of range: {value}"


def _write_problems(w: RunWrite) -> Iterator[str | None]:
    yield _text("client_id", w.client_id)
    for f in w.failures:
        yield _text("campaign_id", f.campaign_id)
        yield _text("kind", f.kind)
        yield _text("reason", kept(f.reason))
    for s in w.synced:
        c = s.campaign
        yield _text("campaign_id", c.id)
        yield _text("name", c.name)
        yield _text("status", c.status)
        # SQLite stores NaN as NULL, which the column refuses.
        yield "budget is NaN" if math.isnan(c.budget) else None
        for name in ("impressions", "clicks", "conversions"):
            yield _number(name, getattr(c, name), _BIGINT)
    if w.counters is not None:
        yield from _counter_problems(w.counters)


def _counter_problems(counters: RunCounters) -> Iterator[str | None]:
    for name, value in counter_values(counters).items():
        yield _number(name, value, _INTEGER)


def _take_over(run: _Run, owner: str, now: datetime, lease_until: datetime) -> None:
    run.owner = owner
    run.heartbeat_at = now
    run.lease_until = lease_until
    run.resumes += 1


def _abandon(run: _Run, note: str) -> None:
    run.status = RunStatus.ABANDONED.value
    run.resumable = False
    run.finished_at = run.finished_at or run.heartbeat_at
    run.error = note if run.error is None else f"{run.error}; {note}"


def _conforms(store: InMemoryStore) -> Store:
    # Lets mypy prove that InMemoryStore satisfies the Store protocol.
    return store
