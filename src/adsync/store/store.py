"""The SQLite / PostgreSQL store: runs, checkpoints, campaigns and history (SQLAlchemy Core).

The store is synchronous; the async pipeline calls it through ``asyncio.to_thread``.
Every public method is one transaction of its :class:`~adsync.store.database.Database`
(retried whole on transient faults; failures come out as
:class:`~adsync.errors.StoreError`, without the DSN password).

Run ownership is a lease: the process that claims a run stamps it with its owner
string and ``lease_until`` and keeps renewing it (:meth:`SqlStore.heartbeat`). A
``running`` run whose lease has expired belongs to a dead process and is taken over
by the next claimer; a partial unique index guarantees, in the database itself, at
most one ``running`` run per client.

Leases, and every stamp the store writes, go by one clock, the database's
(:meth:`~adsync.store.database.Database.now`), read inside the transaction that
decides or writes (``clock_timestamp()`` on PostgreSQL; on SQLite the clock of
the one host that can open the file), never by the calling process's clock:
hosts whose clocks disagree still agree on who holds a run.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from adsync.errors import AmbiguousRunId, ConfigError, RunLocked, StoreError
from adsync.models import (
    CampaignFailure,
    Checkpoint,
    RunCounters,
    RunRecord,
    RunStatus,
    RunWrite,
    SyncedCampaign,
)
from adsync.store.database import Database, engine_for
from adsync.store.faults import is_missing_database
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
from adsync.store.schema import (
    MIGRATIONS_DIR,
    REVISIONS,
    VERSION_TABLE,
    campaign_snapshots,
    campaigns,
    run_items,
    schema_problem,
    sync_failures,
    sync_runs,
)
from adsync.store.sendlog import SqlSendLog

__all__ = ["SqlStore"]

log = logging.getLogger("adsync.store")

# Any fixed 64-bit number will do; it only has to be the same in every adsync process.
_PG_MIGRATION_LOCK: Final = 0x61_64_73_79_6E_63_01

_CLAIM_ROUNDS: Final = 3


class _LostRace(Exception):
    """Another claimer changed the run between our read and our write: look again."""


class SqlStore(OneRunWrites):
    """The SQLite / PostgreSQL store. Thread-safe: one per process, shared by all tasks."""

    def __init__(
        self,
        engine: Engine,
        *,
        retry_attempts: int = 5,
        retry_wait: float = 0.5,
        retry_wait_max: float = 10.0,
        retry_for: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        now: Callable[[], datetime] | None = None,
        read_only: bool = False,
    ) -> None:
        """The retries, ``sleep``, ``rng`` and ``now`` (the database's clock) are the
        :class:`~adsync.store.database.Database`'s."""
        self._db = Database(
            engine,
            retry_attempts=retry_attempts,
            retry_wait=retry_wait,
            retry_wait_max=retry_wait_max,
            retry_for=retry_for,
            sleep=sleep,
            rng=rng,
            now=now,
            read_only=read_only,
        )
        self.engine = engine
        self.read_only = read_only
        self._send_log: SqlSendLog | None = None
        # run id -> run_seq; a run's number never changes, so it is looked up once.
        self._run_seqs: dict[str, int] = {}

    @classmethod
    def from_url(cls, database_url: str, *, read_only: bool = False, **kw: Any) -> SqlStore:
        """Build the engine (one pool for the process) and the store over it.

        A URL that cannot be used is a :class:`ConfigError` (exit 2), never a
        database outage to retry. ``read_only`` opens SQLite with ``mode=ro``
        (a missing file is a :class:`ConfigError`: nothing is created) and runs
        every PostgreSQL transaction ``READ ONLY``.
        """
        return cls(engine_for(database_url, read_only=read_only), read_only=read_only, **kw)

    @property
    def database(self) -> Database:
        """The database under the store: its transactions, its clock, where it is."""
        return self._db

    def dispose(self) -> None:
        """Close every pooled connection."""
        self._db.dispose()

    def send_log(self) -> SqlSendLog:
        """The rate budget's log of sends shared by every process using this database."""
        if self._send_log is None:
            self._send_log = SqlSendLog(self._db)
        return self._send_log

    # --- schema -----------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply the Alembic migrations up to head; a no-op when already there.

        Safe when several processes start at once: on PostgreSQL they queue on an
        advisory lock, on SQLite on the write lock (``BEGIN IMMEDIATE``); the later
        ones then find the schema at head.
        """

        # Alembic is loaded by the commands that migrate, not by the ones that read.
        from alembic import command  # noqa: PLC0415
        from alembic.config import Config  # noqa: PLC0415
        from alembic.util.exc import CommandError  # noqa: PLC0415

        def migrate(conn: Connection) -> None:
            if not self._db.sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                _create_search_path_schema(conn)
            cfg = Config()
            # Config values go through configparser interpolation.
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

        try:
            self._db.transaction("upgrade", migrate, write=True)
        except CommandError as exc:
            raise StoreError(
                f"cannot migrate the database: {exc} (is it from a newer adsync?)"
            ) from exc

    def require_schema(self) -> None:
        """Check, without changing anything, that the schema is this adsync's.

        For the commands that only read: a missing database or a schema that is
        missing, older or newer is a :class:`ConfigError` saying what to do.
        """
        current = self.schema_revisions()
        problem = schema_problem(current, frozenset(REVISIONS[-1:]), frozenset(REVISIONS))
        if problem is not None:
            raise ConfigError(f"{problem} (DATABASE_URL: {self._db.where})")

    def schema_revisions(self) -> frozenset[str]:
        """The Alembic revisions the database is at (empty: no adsync schema), read only.

        A database that does not exist is a :class:`ConfigError`; one that does
        not answer, a :class:`StoreError`.
        """

        def heads(conn: Connection) -> frozenset[str]:
            if not sa.inspect(conn).has_table(VERSION_TABLE):
                return frozenset()
            version = sa.table(VERSION_TABLE, sa.column("version_num"))
            return frozenset(conn.execute(sa.select(version.c.version_num)).scalars())

        try:
            return self._db.transaction("schema", heads)
        except StoreError as exc:
            cause = exc.__cause__
            if cause is not None and is_missing_database(cause):
                raise ConfigError(
                    f"cannot open the database of DATABASE_URL ({self._db.where}): "
                    f"{self._db.describe(cause)}"
                ) from exc
            raise

    # --- runs ---------------------------------------------------------------------------

    def claim_run(
        self,
        client_id: str,
        owner: str,
        lease_seconds: float,
        *,
        owner_is_dead: Callable[[str], bool] | None = None,
        resume_within: float | None = None,
    ) -> RunRecord:
        """Take the client's unfinished run over, or start a new one.

        ``owner_is_dead`` may say that a live lease's holder is known to be gone
        (a process of this host that no longer exists), so its run is taken over
        at once instead of when the lease expires.

        Resumes, in this order: a ``running`` run whose lease expired (its process
        died), then the latest run finished as resumable (``interrupted``, or
        ``failed`` with ``resumable=True``). An unfinished run that last ran more
        than ``resume_within`` seconds ago (None: no bound) is not resumed: it is
        closed as ``abandoned`` and a new run starts. Raises :class:`RunLocked`
        while another owner holds a live lease. The lease's times are the
        database's (:meth:`Database.now`). Every takeover is a compare-and-set, and the
        one-running-run index settles concurrent inserts, so exactly one claimer wins.
        """
        for _ in range(_CLAIM_ROUNDS):
            try:
                return self._db.transaction(
                    "claim_run",
                    lambda conn: self._claim_once(
                        conn, client_id, owner, lease_seconds, owner_is_dead, resume_within
                    ),
                    write=True,
                )
            except _LostRace:
                log.debug("lost a race to claim a run for client %r; looking again", client_id)
        raise RunLocked(
            f"could not claim a run for client {client_id!r}: "
            "other processes kept claiming it at the same time"
        )

    def _claim_once(  # noqa: PLR0917 - private, called from one place
        self,
        conn: Connection,
        client_id: str,
        owner: str,
        lease_seconds: float,
        owner_is_dead: Callable[[str], bool] | None,
        resume_within: float | None,
    ) -> RunRecord:
        now = self._db.now(conn)
        lease_until = now + timedelta(seconds=lease_seconds)
        # An unfinished run that last ran before this is too old to resume.
        stale_before = None if resume_within is None else now - timedelta(seconds=resume_within)
        note = "" if resume_within is None else abandon_note(resume_within)
        running = conn.execute(
            sa.select(sync_runs).where(
                sync_runs.c.client_id == client_id,
                sync_runs.c.status == RunStatus.RUNNING.value,
            )
        ).first()
        takeover = {
            "owner": owner,
            "heartbeat_at": now,
            "lease_until": lease_until,
            "resumes": sync_runs.c.resumes + 1,
        }
        if running is not None:
            if running.owner == owner:
                # Ours already: an earlier attempt committed but its answer was lost.
                return run_record(running, resumed=running.resumes > 0)
            dead = owner_is_dead is not None and owner_is_dead(running.owner)
            if running.lease_until >= now and not dead:
                raise RunLocked(
                    lease_held(client_id, running.id, running.owner, running.lease_until)
                )
            still_theirs = (
                sync_runs.c.id == running.id,
                sync_runs.c.status == RunStatus.RUNNING.value,
                sync_runs.c.owner == running.owner,
                sync_runs.c.resumes == running.resumes,
                sa.true() if dead else sync_runs.c.lease_until < now,
            )
            if stale_before is not None and running.heartbeat_at < stale_before:
                self._abandon(conn, still_theirs, running.heartbeat_at, note)
            else:
                result = conn.execute(sa.update(sync_runs).where(*still_theirs).values(**takeover))
                if result.rowcount != 1:
                    raise _LostRace
                return self._read_run(conn, running.id, resumed=True)

        candidate = conn.execute(
            sa.select(sync_runs.c.id, sync_runs.c.status, sync_runs.c.heartbeat_at)
            .where(sync_runs.c.client_id == client_id, sync_runs.c.resumable.is_(True))
            .order_by(sync_runs.c.started_at.desc(), sync_runs.c.id.desc())
            .limit(1)
        ).first()
        if (
            candidate is not None
            and stale_before is not None
            and candidate.heartbeat_at < stale_before
        ):
            unchanged = (
                sync_runs.c.id == candidate.id,
                sync_runs.c.status == candidate.status,
                sync_runs.c.resumable.is_(True),
            )
            self._abandon(conn, unchanged, candidate.heartbeat_at, note)
            candidate = None
        if candidate is not None:
            try:
                result = conn.execute(
                    sa.update(sync_runs)
                    .where(
                        sync_runs.c.id == candidate.id,
                        sync_runs.c.status == candidate.status,
                        sync_runs.c.resumable.is_(True),
                    )
                    .values(
                        status=RunStatus.RUNNING.value,
                        resumable=False,
                        finished_at=None,
                        error=None,
                        **takeover,
                    )
                )
            except IntegrityError as exc:  # someone else's new run became 'running' first
                raise _LostRace from exc
            if result.rowcount != 1:
                raise _LostRace
            return self._read_run(conn, candidate.id, resumed=True)

        # The client's runs never overlap (one running at a time, in the database),
        # so the next number is one more than the last; a concurrent claimer taking
        # the same number loses on the unique index and looks again.
        seq = conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(sync_runs.c.run_seq), 0) + 1).where(
                sync_runs.c.client_id == client_id
            )
        ).scalar_one()
        run_id = uuid.uuid4().hex
        try:
            conn.execute(
                sa.insert(sync_runs).values(
                    id=run_id,
                    client_id=client_id,
                    status=RunStatus.RUNNING.value,
                    started_at=now,
                    heartbeat_at=now,
                    lease_until=lease_until,
                    owner=owner,
                    resumes=0,
                    listing_complete=False,
                    resumable=False,
                    run_seq=seq,
                    active_seconds=0.0,
                )
            )
        except IntegrityError as exc:  # a concurrent claimer inserted first
            raise _LostRace from exc
        return self._read_run(conn, run_id, resumed=False)

    def _abandon(
        self,
        conn: Connection,
        unchanged: tuple[sa.ColumnElement[bool], ...],
        last_ran: datetime,
        note: str,
    ) -> None:
        """Close a run too old to resume, if it is still as it was read (else look again)."""
        result = conn.execute(
            sa.update(sync_runs)
            .where(*unchanged)
            .values(
                status=RunStatus.ABANDONED.value,
                resumable=False,
                finished_at=sa.func.coalesce(sync_runs.c.finished_at, last_ran),
                error=sa.case(
                    (sync_runs.c.error.is_(None), note),
                    else_=sync_runs.c.error + f"; {note}",
                ),
            )
        )
        if result.rowcount != 1:
            raise _LostRace
        log.info("abandoned an unfinished run too old to resume (%s)", note)

    def heartbeat(self, run_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False when the run is no longer ours (taken over or finished).

        The lease runs from the database's clock, and the time since the last beat
        counts as time the run was running.
        """

        def beat(conn: Connection) -> bool:
            now = self._db.now(conn)
            result = conn.execute(
                self._ran_until(now, run_id, owner).values(
                    lease_until=now + timedelta(seconds=lease_seconds)
                )
            )
            return result.rowcount == 1

        return self._db.transaction("heartbeat", beat, write=True)

    def _ran_until(self, now: datetime, run_id: str, owner: str) -> sa.Update:
        """An UPDATE of the run while it is ``owner``'s and running, as of a beat at ``now``.

        The time since the last beat counts as time the run was running.
        """
        return (
            sa.update(sync_runs)
            .where(
                sync_runs.c.id == run_id,
                sync_runs.c.owner == owner,
                sync_runs.c.status == RunStatus.RUNNING.value,
            )
            .values(
                heartbeat_at=now,
                active_seconds=sync_runs.c.active_seconds
                + self._db.seconds_since(now, sync_runs.c.heartbeat_at),
            )
        )

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
        """Close the run with its final status and counters, at the database's time.

        ``resumable`` (default: True only for ``interrupted``) marks a run that the
        next :meth:`claim_run` for the client takes over instead of starting afresh;
        pass True for a run that failed for a passing reason (database or platform
        down) so its unwritten campaigns stay pending. Raises :class:`RunLocked` if
        the run is no longer ours.
        """
        if status is RunStatus.RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")
        keep = status is RunStatus.INTERRUPTED if resumable is None else resumable

        def finish(conn: Connection) -> None:
            now = self._db.now(conn)
            result = conn.execute(
                self._ran_until(now, run_id, owner).values(
                    status=status.value,
                    finished_at=now,
                    resumable=keep,
                    error=None if error is None else kept(error),
                    **counter_values(counters),
                )
            )
            if result.rowcount == 1:
                return
            row = conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id)).first()
            if row is None:
                raise StoreError(f"no run {run_id}")
            if row.owner == owner and row.status == status.value:
                return  # an earlier attempt committed but its answer was lost
            raise RunLocked(no_longer_ours(run_id, row.status, row.owner))

        self._db.transaction("finish_run", finish, write=True)

    # --- checkpoint -------------------------------------------------------------------

    def record_listed(self, run_id: str, client_id: str, campaign_ids: Sequence[str]) -> None:
        """Remember listed campaigns as pending; rows already there keep their state.

        Except ``unlisted`` ones: listed again, they are pending again.
        """
        rows = _item_rows(run_id, client_id, unique_ids(campaign_ids), ITEM_PENDING)
        if not rows:
            return
        stmt = self._mark_items(where=run_items.c.state == ITEM_UNLISTED)

        def record(conn: Connection) -> None:
            conn.execute(stmt, _stamped(rows, "updated_at", self._db.now(conn)))

        self._db.transaction("record_listed", record, write=True)

    def mark_listing_complete(self, run_id: str, unlisted: Iterable[str] = ()) -> None:
        """Record that every page of the listing has been seen.

        ``unlisted``: campaigns an earlier part of a resumed run listed that this
        listing no longer has. Whatever their state, they leave the run's result:
        their items become ``unlisted`` and their failures in the run are dropped.
        """
        keys = [{"b_run_id": run_id, "b_campaign_id": cid} for cid in unique_ids(unlisted)]

        def complete(conn: Connection) -> None:
            conn.execute(
                sa.update(sync_runs).where(sync_runs.c.id == run_id).values(listing_complete=True)
            )
            if not keys:
                return
            conn.execute(
                sa.update(run_items)
                .where(
                    run_items.c.run_id == sa.bindparam("b_run_id"),
                    run_items.c.campaign_id == sa.bindparam("b_campaign_id"),
                )
                .values(state=ITEM_UNLISTED, updated_at=self._db.now(conn)),
                keys,
            )
            conn.execute(
                sa.delete(sync_failures).where(
                    sync_failures.c.run_id == sa.bindparam("b_run_id"),
                    sync_failures.c.campaign_id == sa.bindparam("b_campaign_id"),
                ),
                keys,
            )

        self._db.transaction("mark_listing_complete", complete, write=True)

    def checkpoint(self, run_id: str) -> Checkpoint:
        """What the run has durably done: listed, synced and failed campaign ids."""

        def read(conn: Connection) -> Checkpoint:
            complete = conn.execute(
                sa.select(sync_runs.c.listing_complete).where(sync_runs.c.id == run_id)
            ).scalar_one_or_none()
            if complete is None:
                raise StoreError(f"no run {run_id}")
            items = conn.execute(
                sa.select(run_items.c.campaign_id, run_items.c.state).where(
                    run_items.c.run_id == run_id
                )
            ).all()
            return Checkpoint(
                synced=frozenset(i.campaign_id for i in items if i.state == ITEM_SYNCED),
                failed=frozenset(i.campaign_id for i in items if i.state == ITEM_FAILED),
                listed=frozenset(i.campaign_id for i in items if i.state != ITEM_UNLISTED),
                listing_complete=bool(complete),
            )

        return self._db.transaction("checkpoint", read)

    # --- campaigns ----------------------------------------------------------------------

    def write_runs(self, writes: Sequence[RunWrite]) -> None:
        """What the writers of several runs have ready, in one transaction.

        Group commit: a process syncing many accounts pays one transaction per
        round instead of several per account. For each run, in this order: its
        failures (as :meth:`write_failures`), its synced campaigns (as
        :meth:`write_synced`) and its counters (as :meth:`save_counters`).
        """
        self._write("write_runs", writes)

    def _write(self, op: str, writes: Sequence[RunWrite]) -> None:
        steps: list[_Step] = []
        for w in writes:
            for step in (
                self._failures_step(w.run_id, w.client_id, w.failures),
                self._synced_step(w.run_id, w.client_id, w.synced),
                None if w.counters is None else _counters_step(w.run_id, w.counters),
            ):
                if step is not None:
                    steps.append(step)
        if not steps:
            return

        def write(conn: Connection) -> None:
            # Read once, and only if some step stamps a row.
            now = functools.cache(functools.partial(self._db.now, conn))
            for step in steps:
                step(conn, now)

        self._db.transaction(op, write, write=True)

    def _synced_step(
        self, run_id: str, client_id: str, batch: Sequence[SyncedCampaign]
    ) -> _Step | None:
        # ON CONFLICT cannot touch one row twice in a statement: last one wins.
        latest = list({s.campaign.id: s for s in batch}.values())
        if not latest:
            return None
        campaign_rows = [
            {
                "client_id": client_id,
                "id": s.campaign.id,
                "name": s.campaign.name,
                "status": s.campaign.status,
                "budget": s.campaign.budget,
                "impressions": s.campaign.impressions,
                "clicks": s.campaign.clicks,
                "conversions": s.campaign.conversions,
                "created_at": s.campaign.created_at,
                "first_synced_at": s.synced_at,
                "last_synced_at": s.synced_at,
                "last_run_id": run_id,
            }
            for s in latest
        ]
        snapshot_rows = [
            {
                "run_id": run_id,
                "client_id": client_id,
                "campaign_id": s.campaign.id,
                "synced_at": s.synced_at,
                "status": s.campaign.status,
                "budget": s.campaign.budget,
                "impressions": s.campaign.impressions,
                "clicks": s.campaign.clicks,
                "conversions": s.campaign.conversions,
            }
            for s in latest
        ]
        item_rows = _item_rows(run_id, client_id, [s.campaign.id for s in latest], ITEM_SYNCED)

        upsert = self._db.insert(campaigns)
        kept_columns = ("client_id", "id", "first_synced_at")
        # adsync's own order of runs decides, not the platform's clock (it may jump
        # to 2099 once, or run minutes behind). Within one run the later write wins.
        upsert_campaigns = upsert.on_conflict_do_update(
            index_elements=[campaigns.c.client_id, campaigns.c.id],
            set_={
                c.name: upsert.excluded[c.name] for c in campaigns.c if c.name not in kept_columns
            },
            where=campaigns.c.last_run_seq <= upsert.excluded.last_run_seq,
        )
        insert_snapshots = self._db.insert(campaign_snapshots).on_conflict_do_nothing(
            index_elements=[
                campaign_snapshots.c.run_id,
                campaign_snapshots.c.client_id,
                campaign_snapshots.c.campaign_id,
            ]
        )
        mark_synced = self._mark_items()
        forget_failures = sa.delete(sync_failures).where(
            sync_failures.c.run_id == sa.bindparam("b_run_id"),
            sync_failures.c.client_id == sa.bindparam("b_client_id"),
            sync_failures.c.campaign_id == sa.bindparam("b_campaign_id"),
        )
        failure_keys = [
            {"b_run_id": run_id, "b_client_id": client_id, "b_campaign_id": s.campaign.id}
            for s in latest
        ]

        def write(conn: Connection, now: Callable[[], datetime]) -> None:
            seq = self._run_seq(conn, run_id)
            conn.execute(upsert_campaigns, _stamped(campaign_rows, "last_run_seq", seq))
            conn.execute(insert_snapshots, snapshot_rows)
            conn.execute(mark_synced, _stamped(item_rows, "updated_at", now()))
            conn.execute(forget_failures, failure_keys)

        return write

    def _run_seq(self, conn: Connection, run_id: str) -> int:
        seq = self._run_seqs.get(run_id)
        if seq is None:
            seq = int(
                conn.execute(
                    sa.select(sync_runs.c.run_seq).where(sync_runs.c.id == run_id)
                ).scalar_one()
            )
            self._run_seqs[run_id] = seq
        return seq

    def _failures_step(
        self, run_id: str, client_id: str, failures: Sequence[CampaignFailure]
    ) -> _Step | None:
        if not failures:
            return None
        with_id = list({f.campaign_id: f for f in failures if f.campaign_id}.values())
        without_id = [f for f in failures if not f.campaign_id]
        failure_rows = [
            {
                "run_id": run_id,
                "client_id": client_id,
                "campaign_id": f.campaign_id or None,
                "kind": f.kind,
                "reason": kept(f.reason),
            }
            for f in [*with_id, *without_id]
        ]
        item_rows = _item_rows(run_id, client_id, [f.campaign_id for f in with_id], ITEM_FAILED)
        ins = self._db.insert(sync_failures)
        upsert_failures = ins.on_conflict_do_update(
            index_elements=[
                sync_failures.c.run_id,
                sync_failures.c.client_id,
                sync_failures.c.campaign_id,
            ],
            set_={
                "kind": ins.excluded.kind,
                "reason": ins.excluded.reason,
                "failed_at": ins.excluded.failed_at,
            },
        )
        mark_failed = self._mark_items(where=run_items.c.state != ITEM_SYNCED)

        def write(conn: Connection, now: Callable[[], datetime]) -> None:
            conn.execute(upsert_failures, _stamped(failure_rows, "failed_at", now()))
            if item_rows:
                conn.execute(mark_failed, _stamped(item_rows, "updated_at", now()))

        return write

    def _mark_items(self, where: sa.ColumnElement[bool] | None = None) -> Any:
        """Insert run items, or set the state of those already there (``where`` they qualify)."""
        items = self._db.insert(run_items)
        return items.on_conflict_do_update(
            index_elements=[run_items.c.run_id, run_items.c.campaign_id],
            set_={"state": items.excluded.state, "updated_at": items.excluded.updated_at},
            where=where,
        )

    # --- reading ------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or with this unique id prefix (``adsync runs show abc1``).

        Raises :class:`AmbiguousRunId` when the prefix matches several runs.
        """
        ref = run_id.strip().lower()
        if not ref:
            return None

        def read(conn: Connection) -> RunRecord | None:
            exact = conn.execute(sa.select(sync_runs).where(sync_runs.c.id == ref)).first()
            if exact is not None:
                return run_record(exact)
            matches = conn.execute(
                sa.select(sync_runs)
                .where(sync_runs.c.id.startswith(ref, autoescape=True))
                .order_by(sync_runs.c.started_at.desc())
                .limit(2)
            ).all()
            if len(matches) > 1:
                raise AmbiguousRunId(
                    f"run id {run_id!r} matches several runs; give more characters"
                )
            return run_record(matches[0]) if matches else None

        return self._db.transaction("get_run", read)

    def recent_runs(self, client_id: str | None = None, limit: int = 20) -> list[RunRecord]:
        """Runs, newest first, of one client or of all."""
        stmt = sa.select(sync_runs)
        if client_id is not None:
            stmt = stmt.where(sync_runs.c.client_id == client_id)
        stmt = stmt.order_by(sync_runs.c.started_at.desc(), sync_runs.c.id.desc()).limit(limit)
        return self._db.transaction(
            "recent_runs", lambda conn: [run_record(r) for r in conn.execute(stmt)]
        )

    def live_run(self, client_id: str) -> RunRecord | None:
        """The client's ``running`` run while its lease holds, else None.

        The lease is read against the database's clock on PostgreSQL (the host's on
        SQLite), as for every process looking at the same row.
        """

        def read(conn: Connection) -> RunRecord | None:
            stmt = sa.select(sync_runs).where(
                sync_runs.c.client_id == client_id,
                sync_runs.c.status == RunStatus.RUNNING.value,
                sync_runs.c.lease_until >= self._db.now(conn),
            )
            row = conn.execute(stmt).first()
            return None if row is None else run_record(row)

        return self._db.transaction("live_run", read)

    def run_failures(self, run_id: str) -> list[CampaignFailure]:
        """The run's failed campaigns with kind and reason, oldest first."""
        stmt = (
            sa.select(sync_failures.c.campaign_id, sync_failures.c.reason, sync_failures.c.kind)
            .where(sync_failures.c.run_id == run_id)
            .order_by(sync_failures.c.failed_at, sync_failures.c.id)
        )
        return self._db.transaction(
            "run_failures",
            lambda conn: [
                CampaignFailure(campaign_id=r.campaign_id or "", reason=r.reason, kind=r.kind)
                for r in conn.execute(stmt)
            ],
        )

    def campaign_rows(self, client_id: str) -> list[dict[str, Any]]:
        """The stored campaigns of a client, by id, as column → value dicts."""
        stmt = (
            sa.select(campaigns).where(campaigns.c.client_id == client_id).order_by(campaigns.c.id)
        )
        return self._db.transaction(
            "campaign_rows", lambda conn: [dict(r._mapping) for r in conn.execute(stmt)]
        )

    def snapshot_rows(self, client_id: str) -> list[dict[str, Any]]:
        """The history rows of a client, oldest first, as column → value dicts."""
        stmt = (
            sa.select(campaign_snapshots)
            .where(campaign_snapshots.c.client_id == client_id)
            .order_by(campaign_snapshots.c.synced_at, campaign_snapshots.c.id)
        )
        return self._db.transaction(
            "snapshot_rows", lambda conn: [dict(r._mapping) for r in conn.execute(stmt)]
        )

    def count_campaigns(self, client_id: str | None = None) -> int:
        """How many campaigns are stored (for one client, or in all)."""
        return self._count(campaigns, client_id)

    def count_snapshots(self, client_id: str | None = None) -> int:
        """How many history rows are stored (for one client, or in all)."""
        return self._count(campaign_snapshots, client_id)

    def _count(self, table: sa.Table, client_id: str | None) -> int:
        stmt = sa.select(sa.func.count()).select_from(table)
        if client_id is not None:
            stmt = stmt.where(table.c.client_id == client_id)
        return self._db.transaction("count", lambda conn: int(conn.execute(stmt).scalar_one()))

    # --- plumbing -----------------------------------------------------------------------

    def _read_run(self, conn: Connection, run_id: str, *, resumed: bool) -> RunRecord:
        row = conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id)).one()
        return run_record(row, resumed=resumed)


# One part of a write transaction: given the connection and the database's time
# (read on first call), it executes its statements.
_Step = Callable[[Connection, Callable[[], datetime]], object]


def _counters_step(run_id: str, counters: RunCounters) -> _Step:
    statement = (
        sa.update(sync_runs).where(sync_runs.c.id == run_id).values(**counter_values(counters))
    )
    return lambda conn, _now: conn.execute(statement)


def _item_rows(run_id: str, client_id: str, ids: Sequence[str], state: str) -> list[dict[str, Any]]:
    return [
        {"run_id": run_id, "client_id": client_id, "campaign_id": cid, "state": state}
        for cid in ids
    ]


def _stamped(rows: list[dict[str, Any]], column: str, value: object) -> list[dict[str, Any]]:
    """``rows`` with ``column`` set to ``value``, known only inside the transaction."""
    return [{**row, column: value} for row in rows]


def _conforms(store: SqlStore) -> Store:
    # Lets mypy prove that SqlStore satisfies the Store protocol.
    return store


def _create_search_path_schema(conn: Connection) -> None:
    """Create the schema the connection's search_path names first, when none of it exists.

    ADSYNC_DB_SCHEMA sets the search_path; the server's default one
    (``"$user", public``) always has ``public``, so this is a no-op there.
    """
    if conn.execute(sa.text("SELECT current_schema()")).scalar() is not None:
        return
    path = str(conn.execute(sa.text("SELECT current_setting('search_path')")).scalar())
    first = path.split(",", maxsplit=1)[0].strip().strip('"')
    if first and first != "$user":
        quoted = conn.dialect.identifier_preparer.quote_identifier(first)
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
