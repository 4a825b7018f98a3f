"""All SQL of adsync: tables, upserts, history, runs and checkpoints (SQLAlchemy Core).

The store is synchronous; the async pipeline calls it through ``asyncio.to_thread``.
One :class:`~sqlalchemy.engine.Engine` per process is built at the edge
(:meth:`SqlStore.from_url`) and passed in.

Every public method is one transaction, retried as a whole on transient database
faults (server restarted, connection refused, SQLite busy), so a retry after a lost
connection can never leave half a write behind. Whatever still fails comes out as
:class:`~adsync.errors.StoreError`, whose message never carries the DSN password.

The rate budget shared across processes lives here too (:class:`SqlSendLog`, the
``rate_sends`` table): every send to the platform is reserved, in a short
transaction serialized per client id, against the sends of every process.

Run ownership is a lease: the process that claims a run stamps it with its owner
string and ``lease_until`` and keeps renewing it (:meth:`SqlStore.heartbeat`). A
``running`` run whose lease has expired belongs to a dead process and is taken over
by the next claimer; a partial unique index guarantees, in the database itself, at
most one ``running`` run per client.

Leases and the shared rate log go by the database's clock, read inside the
transaction that decides (``clock_timestamp()`` on PostgreSQL; on SQLite the
clock of the one host that can open the file), never by the calling process's
clock: hosts whose clocks disagree still agree on who holds a run and on when
each send was made.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import quote, unquote

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, Row
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from adsync.config import sqlalchemy_url
from adsync.errors import (
    AdsyncError,
    AmbiguousRunId,
    ConfigError,
    RunLocked,
    StoreError,
    StoreUnavailable,
)
from adsync.models import (
    CampaignFailure,
    Checkpoint,
    RunCounters,
    RunRecord,
    RunStatus,
    RunWrite,
    SyncedCampaign,
)
from adsync.observability import REDACTOR
from adsync.printable import shorten
from adsync.ratelimit import (
    LOOKBACK_SPANS,
    Reservation,
    SendChange,
    SendRequest,
    SharedSendLog,
    decide_reservation,
)

__all__ = [
    "MIGRATIONS_DIR",
    "SqlSendLog",
    "SqlStore",
    "Store",
    "UTCDateTime",
    "database_secrets",
    "host_identity",
    "is_transient",
    "make_owner",
    "metadata",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

# Any fixed 64-bit number will do; it only has to be the same in every adsync process.
_PG_MIGRATION_LOCK: Final = 0x61_64_73_79_6E_63_01

_CLAIM_ROUNDS: Final = 3

# How long a read-only command waits for a lock another process holds (a writer
# outside WAL mode, a migration) before it says the database is busy.
_READ_LOCK_WAIT_MS: Final = 2000

ITEM_PENDING: Final = "pending"
ITEM_SYNCED: Final = "synced"
ITEM_FAILED: Final = "failed"
# Listed by an earlier part of a resumed run, but no longer by the listing it
# finished with: not part of the run's result.
ITEM_UNLISTED: Final = "unlisted"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _kept(text: str) -> str:
    # Reasons and errors quote the platform and exceptions: no secret the process
    # knows goes into the database, and no megabyte error body either.
    return shorten(REDACTOR.scrub(text))


@functools.cache
def host_identity() -> str:
    """This host as the processes that see one another's pids know it.

    The host name, and on Linux the pid namespace too: containers that share a
    host name (host networking) each number their processes on their own, so a
    pid missing here says nothing about a process in the container next door.
    """
    host = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        return host
    inode = "".join(c for c in namespace if c.isdigit())
    return f"{host}@{inode}" if inode else host


# Query parameters of a database URL that carry a secret (libpq's names).
_SECRET_QUERY_KEYS = ("password", "sslpassword")


def database_secrets(database_url: str | sa.URL) -> list[str]:
    """The secrets a database URL carries: its password, also as a query parameter."""
    try:
        url = sa.make_url(database_url) if isinstance(database_url, str) else database_url
    except (ArgumentError, ValueError):
        return []
    found = [str(url.password)] if url.password else []
    for key in _SECRET_QUERY_KEYS:
        value = url.query.get(key)
        values = [value] if isinstance(value, str) else list(value or ())
        found.extend(v for v in values if v)
    return found


def make_owner() -> str:
    """A lease owner string for this process: ``host:pid:random`` (host: :func:`host_identity`)."""
    return f"{host_identity()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def local_owner_is_dead(owner: str) -> bool:
    """Whether ``owner`` names a process of this host that no longer exists.

    Only a definite answer counts: another host (or pid namespace), an unreadable
    owner or a pid that exists (even if reused) all say "not known dead", and the
    lease decides.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != host_identity() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every backend.

    SQLite stores no offset, so values go in as naive UTC and get ``tzinfo`` back on
    the way out. Naive input is taken as UTC: platform timestamps without an offset
    are UTC by the platform's contract.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- schema: must match migrations/versions (a test compares them) -------------------

metadata = sa.MetaData()

_RUNNING_ONLY = sa.text("status = 'running'")
_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PK = rowid

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    sa.Column("lease_until", UTCDateTime(), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("seen", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("synced", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("requests", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("retries", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("rate_limited", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("pages", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("listing_complete", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("resumable", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("error", sa.Text(), nullable=True),
    # The client's run order (1, 2, ...): what decides which write to `campaigns` wins.
    sa.Column("run_seq", sa.BigInteger(), nullable=False, server_default="0"),
    # Time some process was running the run, summed over claims (gaps left out).
    sa.Column("active_seconds", sa.Double(), nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("id", name="pk_sync_runs"),
    sa.Index("ix_sync_runs_client_id", "client_id"),
    sa.Index("ix_sync_runs_started_at", "started_at"),
    sa.Index("uq_sync_runs_client_seq", "client_id", "run_seq", unique=True),
    sa.Index(
        "uq_sync_runs_one_running",
        "client_id",
        unique=True,
        sqlite_where=_RUNNING_ONLY,
        postgresql_where=_RUNNING_ONLY,
    ),
)

run_items = sa.Table(
    "run_items",
    metadata,
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("campaign_id", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("run_id", "campaign_id", name="pk_run_items"),
    sa.ForeignKeyConstraint(
        ["run_id"], ["sync_runs.id"], name="fk_run_items_run_id", ondelete="CASCADE"
    ),
)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("id", sa.String(255), nullable=False),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("status", sa.String(64), nullable=False),
    sa.Column("budget", sa.Double(), nullable=False),
    sa.Column("impressions", sa.BigInteger(), nullable=False),
    sa.Column("clicks", sa.BigInteger(), nullable=False),
    sa.Column("conversions", sa.BigInteger(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=True),
    sa.Column("first_synced_at", UTCDateTime(), nullable=False),
    sa.Column("last_synced_at", UTCDateTime(), nullable=False),
    sa.Column("last_run_id", sa.String(36), nullable=True),
    # The run_seq of last_run_id: a row is only overwritten by a run as late or later.
    sa.Column("last_run_seq", sa.BigInteger(), nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("client_id", "id", name="pk_campaigns"),
)

campaign_snapshots = sa.Table(
    "campaign_snapshots",
    metadata,
    sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("campaign_id", sa.String(255), nullable=False),
    sa.Column("synced_at", UTCDateTime(), nullable=False),
    sa.Column("status", sa.String(64), nullable=False),
    sa.Column("budget", sa.Double(), nullable=False),
    sa.Column("impressions", sa.BigInteger(), nullable=False),
    sa.Column("clicks", sa.BigInteger(), nullable=False),
    sa.Column("conversions", sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_campaign_snapshots"),
    sa.UniqueConstraint(
        "run_id", "client_id", "campaign_id", name="uq_campaign_snapshots_run_campaign"
    ),
    sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_campaign_snapshots_run_id"),
    sa.Index("ix_campaign_snapshots_campaign", "client_id", "campaign_id", "synced_at"),
)

sync_failures = sa.Table(
    "sync_failures",
    metadata,
    sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("campaign_id", sa.String(255), nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("failed_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_sync_failures"),
    sa.UniqueConstraint("run_id", "client_id", "campaign_id", name="uq_sync_failures_run_campaign"),
    sa.ForeignKeyConstraint(
        ["run_id"], ["sync_runs.id"], name="fk_sync_failures_run_id", ondelete="CASCADE"
    ),
)

# Every send to the platform by any process, for the shared rate budget. ``sent_at``
# is unix seconds on the database's clock (a double: microseconds survive), so that
# processes agree on it whatever their own clocks say, and it outlives a restart.
rate_sends = sa.Table(
    "rate_sends",
    metadata,
    sa.Column("id", _AUTO_ID, nullable=False, autoincrement=True),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("sent_at", sa.Double(), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_rate_sends"),
    sa.Index("ix_rate_sends_client_sent", "client_id", "sent_at"),
)


# --- transient faults -----------------------------------------------------------------

# PostgreSQL SQLSTATE classes worth a retry: connection exceptions, serialization
# failures and deadlocks, insufficient resources, server shutting down or starting up.
_PG_TRANSIENT_SQLSTATES: Final = ("08", "40", "53", "57P", "55P03")
# SQLite's busy and locked, and its resources running out (disk full, I/O error,
# out of memory): an outage as PostgreSQL's class 53 is, never a campaign's fault.
_SQLITE_TRANSIENT: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_NOMEM",
)


def is_transient(exc: BaseException) -> bool:
    """True for database failures that a retry a moment later can fix."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlite_name, str):
        return sqlite_name.startswith(_SQLITE_TRANSIENT)
    sqlstate = getattr(orig, "sqlstate", None)
    if not isinstance(sqlstate, str):
        # No SQLSTATE: the server never answered (refused, reset, timed out), or a
        # driver that does not report one (sqlite3 before 3.11): "locked" is the
        # only transient SQLite operational error.
        return "sqlite" not in type(orig).__module__ or "locked" in str(orig)
    return sqlstate.startswith(_PG_TRANSIENT_SQLSTATES)


# The database's clock as it is now (not the transaction's start).
_PG_CLOCK: Final = sa.select(sa.func.clock_timestamp(type_=sa.DateTime(timezone=True)))


class _LostRace(Exception):
    """Another claimer changed the run between our read and our write: look again."""


# --- the store -----------------------------------------------------------------------


class Store(Protocol):
    """What the pipeline and the CLI need from storage (a fake can stand in for tests)."""

    def upgrade(self) -> None: ...

    def claim_run(
        self,
        client_id: str,
        owner: str,
        lease_seconds: float,
        *,
        owner_is_dead: Callable[[str], bool] | None = None,
        resume_within: float | None = None,
    ) -> RunRecord: ...

    def heartbeat(self, run_id: str, owner: str, lease_seconds: float) -> bool: ...

    def record_listed(self, run_id: str, client_id: str, campaign_ids: Sequence[str]) -> None: ...

    def mark_listing_complete(self, run_id: str, unlisted: Iterable[str] = ()) -> None: ...

    def checkpoint(self, run_id: str) -> Checkpoint: ...

    def write_synced(
        self, run_id: str, client_id: str, batch: Sequence[SyncedCampaign]
    ) -> None: ...

    def write_failures(
        self, run_id: str, client_id: str, failures: Sequence[CampaignFailure]
    ) -> None: ...

    def save_counters(self, run_id: str, counters: RunCounters) -> None: ...

    def finish_run(
        self,
        run_id: str,
        owner: str,
        status: RunStatus,
        counters: RunCounters,
        error: str | None = None,
        *,
        resumable: bool | None = None,
    ) -> None: ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def recent_runs(self, client_id: str | None = None, limit: int = 20) -> list[RunRecord]: ...

    def run_failures(self, run_id: str) -> list[CampaignFailure]: ...


class SqlStore:
    """The SQLite / PostgreSQL store. Thread-safe: one per process, shared by all tasks."""

    def __init__(
        self,
        engine: Engine,
        *,
        retry_attempts: int = 5,
        retry_wait: float = 0.5,
        retry_wait_max: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime] | None = None,
        read_only: bool = False,
    ) -> None:
        """``now`` stands in for the database's clock (tests); see :meth:`_db_now`."""
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise StoreError(
                f"unsupported database {engine.dialect.name!r}: use SQLite or PostgreSQL"
            )
        self.engine = engine
        self._attempts = max(1, retry_attempts)
        self._wait = retry_wait
        self._wait_max = retry_wait_max
        self._sleep = sleep
        self._clock = now
        # Stamps that only record when something happened (not decisions).
        self._now = now or _utcnow
        self._sqlite = engine.dialect.name == "sqlite"
        self.read_only = read_only
        if self._sqlite:
            _prepare_sqlite(engine, read_only=read_only)
        elif read_only and not event.contains(engine, "begin", _pg_read_only_on_begin):
            event.listen(engine, "begin", _pg_read_only_on_begin)
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
        netloc = database_url.partition("://")[2].partition("/")[0]
        if netloc.count("@") > 1:
            # user:p@ss@host parses as host "ss@host": the password would be
            # half taken for a host name, and printed with it.
            raise ConfigError("invalid DATABASE_URL: write an @ in the password as %40")
        try:
            url = sa.make_url(sqlalchemy_url(database_url))
            url.port  # noqa: B018 - a non-numeric port only fails when read
        except (ArgumentError, ValueError):
            raise ConfigError(
                "invalid DATABASE_URL: expected sqlite:///PATH or postgresql://USER@HOST/DB"
            ) from None
        engine_kw: dict[str, Any] = {"pool_pre_ping": True}
        if read_only and url.get_backend_name() == "sqlite":
            url = _read_only_sqlite_url(url)
        if url.get_backend_name() == "sqlite":
            # The pipeline calls in from worker threads; the pool hands each call
            # its own connection, so sqlite3's same-thread check only gets in the way.
            engine_kw["connect_args"] = {"check_same_thread": False}
            if url.database in (None, "", ":memory:"):
                # Every pooled connection to :memory: would be a different database.
                engine_kw["poolclass"] = sa.StaticPool
        elif url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            # libpq waits forever for an unreachable host by default.
            engine_kw["connect_args"] = {"connect_timeout": 10}
        try:
            engine = sa.create_engine(url, **engine_kw)
        except (ArgumentError, ImportError) as exc:
            raise ConfigError(
                f"cannot use DATABASE_URL: {type(exc).__name__} (adsync supports "
                "sqlite:///PATH and postgresql://USER@HOST/DB)"
            ) from None
        return cls(engine, read_only=read_only, **kw)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def send_log(self) -> SqlSendLog:
        """The rate budget's log of sends shared by every process using this database."""
        if self._send_log is None:
            self._send_log = SqlSendLog(self)
        return self._send_log

    def _db_now(self, conn: Connection) -> datetime:
        """The database's clock, read in the transaction that acts on it.

        PostgreSQL's ``clock_timestamp()`` (the time now, not the transaction's
        start: a claim may have waited for a lock); on SQLite the host's clock, the
        one clock of every process that can open the file.
        """
        if self._clock is not None:
            return self._clock()
        if self._sqlite:
            return _utcnow()
        value: datetime = conn.execute(_PG_CLOCK).scalar_one()
        return value.astimezone(UTC)

    def _seconds_since(self, now: datetime, column: sa.ColumnElement[Any]) -> Any:
        """SQL for the seconds from ``column`` to ``now`` (never negative)."""
        bound = sa.bindparam(None, now, type_=UTCDateTime())
        if self._sqlite:
            # julianday() keeps whole milliseconds: round the difference to them.
            days = sa.func.julianday(bound) - sa.func.julianday(column)
            return sa.func.max(0.0, sa.func.round(days * 86_400_000.0) / 1000.0)
        return sa.func.greatest(0.0, sa.extract("epoch", bound - column))

    # --- schema -----------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply the Alembic migrations up to head; a no-op when already there.

        Safe when several processes start at once: on PostgreSQL they queue on an
        advisory lock, on SQLite on the write lock (``BEGIN IMMEDIATE``); the later
        ones then find the schema at head.
        """

        def migrate(conn: Connection) -> None:
            if not self._sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
            cfg = Config()
            # Config values go through configparser interpolation.
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

        try:
            self._transaction("upgrade", migrate, write=True)
        except CommandError as exc:
            raise StoreError(
                f"cannot migrate the database: {exc} (is it from a newer adsync?)"
            ) from exc

    def require_schema(self) -> None:
        """Check, without changing anything, that the schema is this adsync's.

        For the commands that only read: a missing database or a schema that is
        missing, older or newer is a :class:`ConfigError` saying what to do.
        """
        try:
            current = self._transaction(
                "schema",
                lambda conn: frozenset(MigrationContext.configure(conn).get_current_heads()),
            )
        except StoreError as exc:
            cause = exc.__cause__
            if cause is not None and _no_such_database(cause):
                raise ConfigError(
                    f"cannot open the database of DATABASE_URL ({self._where()}): "
                    f"{self._describe(cause)}"
                ) from exc
            raise
        script = ScriptDirectory(str(MIGRATIONS_DIR))
        known = frozenset(rev.revision for rev in script.walk_revisions())
        problem = schema_problem(current, frozenset(script.get_heads()), known)
        if problem is not None:
            raise ConfigError(f"{problem} (DATABASE_URL: {self._where()})")

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
        database's (:meth:`_db_now`). Every takeover is a compare-and-set, and the
        one-running-run index settles concurrent inserts, so exactly one claimer wins.
        """
        for _ in range(_CLAIM_ROUNDS):
            try:
                return self._transaction(
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
        now = self._db_now(conn)
        lease_until = now + timedelta(seconds=lease_seconds)
        # An unfinished run that last ran before this is too old to resume.
        stale_before = None if resume_within is None else now - timedelta(seconds=resume_within)
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
                return _record(running, resumed=running.resumes > 0)
            dead = owner_is_dead is not None and owner_is_dead(running.owner)
            if running.lease_until >= now and not dead:
                raise RunLocked(
                    f"client {client_id!r} already has a run in progress: run {running.id} "
                    f"is held by {running.owner} until {running.lease_until.isoformat()}; "
                    "it is taken over automatically once that lease expires"
                )
            still_theirs = (
                sync_runs.c.id == running.id,
                sync_runs.c.status == RunStatus.RUNNING.value,
                sync_runs.c.owner == running.owner,
                sync_runs.c.resumes == running.resumes,
                sa.true() if dead else sync_runs.c.lease_until < now,
            )
            if stale_before is not None and running.heartbeat_at < stale_before:
                self._abandon(conn, still_theirs, running.heartbeat_at, resume_within)
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
            self._abandon(conn, unchanged, candidate.heartbeat_at, resume_within)
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
        resume_within: float | None,
    ) -> None:
        """Close a run too old to resume, if it is still as it was read (else look again)."""
        note = f"abandoned: not resumed within {resume_within:g}s of when it last ran"
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
            now = self._db_now(conn)
            result = conn.execute(
                sa.update(sync_runs)
                .where(
                    sync_runs.c.id == run_id,
                    sync_runs.c.owner == owner,
                    sync_runs.c.status == RunStatus.RUNNING.value,
                )
                .values(
                    heartbeat_at=now,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    active_seconds=sync_runs.c.active_seconds
                    + self._seconds_since(now, sync_runs.c.heartbeat_at),
                )
            )
            return result.rowcount == 1

        return self._transaction("heartbeat", beat, write=True)

    def save_counters(self, run_id: str, counters: RunCounters) -> None:
        """Record the run's counters (absolute values, not increments)."""
        self._transaction("save_counters", self._counters_step(run_id, counters), write=True)

    def _counters_step(self, run_id: str, counters: RunCounters) -> Callable[[Connection], object]:
        statement = (
            sa.update(sync_runs).where(sync_runs.c.id == run_id).values(**_counter_values(counters))
        )
        return lambda conn: conn.execute(statement)

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
            now = self._db_now(conn)
            result = conn.execute(
                sa.update(sync_runs)
                .where(
                    sync_runs.c.id == run_id,
                    sync_runs.c.owner == owner,
                    sync_runs.c.status == RunStatus.RUNNING.value,
                )
                .values(
                    status=status.value,
                    finished_at=now,
                    heartbeat_at=now,
                    active_seconds=sync_runs.c.active_seconds
                    + self._seconds_since(now, sync_runs.c.heartbeat_at),
                    resumable=keep,
                    error=None if error is None else _kept(error),
                    **_counter_values(counters),
                )
            )
            if result.rowcount == 1:
                return
            row = conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id)).first()
            if row is None:
                raise StoreError(f"no run {run_id}")
            if row.owner == owner and row.status == status.value:
                return  # an earlier attempt committed but its answer was lost
            raise RunLocked(
                f"run {run_id} is no longer held by this process: it is {row.status}, "
                f"owned by {row.owner}"
            )

        self._transaction("finish_run", finish, write=True)

    # --- checkpoint -------------------------------------------------------------------

    def record_listed(self, run_id: str, client_id: str, campaign_ids: Sequence[str]) -> None:
        """Remember listed campaigns as pending; rows already there keep their state.

        Except ``unlisted`` ones: listed again, they are pending again.
        """
        ids = _ids(campaign_ids)
        if not ids:
            return
        now = self._now()
        rows = [
            {
                "run_id": run_id,
                "client_id": client_id,
                "campaign_id": cid,
                "state": ITEM_PENDING,
                "updated_at": now,
            }
            for cid in ids
        ]
        ins = self._insert(run_items)
        stmt = ins.on_conflict_do_update(
            index_elements=[run_items.c.run_id, run_items.c.campaign_id],
            set_={"state": ins.excluded.state, "updated_at": ins.excluded.updated_at},
            where=run_items.c.state == ITEM_UNLISTED,
        )
        self._transaction("record_listed", lambda conn: conn.execute(stmt, rows), write=True)

    def mark_listing_complete(self, run_id: str, unlisted: Iterable[str] = ()) -> None:
        """Record that every page of the listing has been seen.

        ``unlisted``: campaigns an earlier part of a resumed run listed that this
        listing no longer has. Whatever their state, they leave the run's result:
        their items become ``unlisted`` and their failures in the run are dropped.
        """
        keys = [{"b_run_id": run_id, "b_campaign_id": cid} for cid in _ids(unlisted)]
        now = self._now()

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
                .values(state=ITEM_UNLISTED, updated_at=now),
                keys,
            )
            conn.execute(
                sa.delete(sync_failures).where(
                    sync_failures.c.run_id == sa.bindparam("b_run_id"),
                    sync_failures.c.campaign_id == sa.bindparam("b_campaign_id"),
                ),
                keys,
            )

        self._transaction("mark_listing_complete", complete, write=True)

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

        return self._transaction("checkpoint", read)

    # --- campaigns ----------------------------------------------------------------------

    def write_synced(self, run_id: str, client_id: str, batch: Sequence[SyncedCampaign]) -> None:
        """Store a batch of synced campaigns in one transaction.

        Upserts ``campaigns`` (latest values; ``first_synced_at`` kept; never
        overwritten by an earlier run, whatever the platform's ``synced_at`` says:
        runs are ordered by their ``run_seq``), adds one history row per campaign
        per run (a resumed run's repeat is ignored), marks the items synced and
        drops their earlier failure records in this run.
        """
        step = self._synced_step(run_id, client_id, batch)
        if step is not None:
            self._transaction("write_synced", step, write=True)

    def write_runs(self, writes: Sequence[RunWrite]) -> None:
        """What the writers of several runs have ready, in one transaction.

        Group commit: a process syncing many accounts pays one transaction per
        round instead of several per account. Each part is what
        :meth:`write_failures`, :meth:`write_synced` and :meth:`save_counters` do.
        """
        steps: list[Callable[[Connection], object]] = []
        for w in writes:
            for step in (
                self._failures_step(w.run_id, w.client_id, w.failures),
                self._synced_step(w.run_id, w.client_id, w.synced),
                None if w.counters is None else self._counters_step(w.run_id, w.counters),
            ):
                if step is not None:
                    steps.append(step)
        if not steps:
            return

        def write(conn: Connection) -> None:
            for step in steps:
                step(conn)

        self._transaction("write_runs", write, write=True)

    def _synced_step(
        self, run_id: str, client_id: str, batch: Sequence[SyncedCampaign]
    ) -> Callable[[Connection], None] | None:
        # ON CONFLICT cannot touch one row twice in a statement: last one wins.
        latest = list({s.campaign.id: s for s in batch}.values())
        if not latest:
            return None
        now = self._now()
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
        item_rows = [
            {
                "run_id": run_id,
                "client_id": client_id,
                "campaign_id": s.campaign.id,
                "state": ITEM_SYNCED,
                "updated_at": now,
            }
            for s in latest
        ]

        upsert = self._insert(campaigns)
        kept = ("client_id", "id", "first_synced_at")
        # adsync's own order of runs decides, not the platform's clock (it may jump
        # to 2099 once, or run minutes behind). Within one run the later write wins.
        upsert_campaigns = upsert.on_conflict_do_update(
            index_elements=[campaigns.c.client_id, campaigns.c.id],
            set_={c.name: upsert.excluded[c.name] for c in campaigns.c if c.name not in kept},
            where=campaigns.c.last_run_seq <= upsert.excluded.last_run_seq,
        )
        insert_snapshots = self._insert(campaign_snapshots).on_conflict_do_nothing(
            index_elements=[
                campaign_snapshots.c.run_id,
                campaign_snapshots.c.client_id,
                campaign_snapshots.c.campaign_id,
            ]
        )
        items = self._insert(run_items)
        mark_synced = items.on_conflict_do_update(
            index_elements=[run_items.c.run_id, run_items.c.campaign_id],
            set_={"state": items.excluded.state, "updated_at": items.excluded.updated_at},
        )
        forget_failures = sa.delete(sync_failures).where(
            sync_failures.c.run_id == sa.bindparam("b_run_id"),
            sync_failures.c.client_id == sa.bindparam("b_client_id"),
            sync_failures.c.campaign_id == sa.bindparam("b_campaign_id"),
        )
        failure_keys = [
            {"b_run_id": run_id, "b_client_id": client_id, "b_campaign_id": s.campaign.id}
            for s in latest
        ]

        def write(conn: Connection) -> None:
            seq = self._run_seq(conn, run_id)
            conn.execute(upsert_campaigns, [{**r, "last_run_seq": seq} for r in campaign_rows])
            conn.execute(insert_snapshots, snapshot_rows)
            conn.execute(mark_synced, item_rows)
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

    def write_failures(
        self, run_id: str, client_id: str, failures: Sequence[CampaignFailure]
    ) -> None:
        """Record failed campaigns with their reasons in one transaction.

        An empty ``campaign_id`` (a payload without a usable id) is stored as NULL
        and has no checkpoint item. A campaign already synced in this run stays
        synced: a later failure report cannot undo a stored campaign.
        """
        step = self._failures_step(run_id, client_id, failures)
        if step is not None:
            self._transaction("write_failures", step, write=True)

    def _failures_step(
        self, run_id: str, client_id: str, failures: Sequence[CampaignFailure]
    ) -> Callable[[Connection], None] | None:
        if not failures:
            return None
        now = self._now()
        with_id = list({f.campaign_id: f for f in failures if f.campaign_id}.values())
        without_id = [f for f in failures if not f.campaign_id]
        failure_rows = [
            {
                "run_id": run_id,
                "client_id": client_id,
                "campaign_id": f.campaign_id or None,
                "kind": f.kind,
                "reason": _kept(f.reason),
                "failed_at": now,
            }
            for f in [*with_id, *without_id]
        ]
        item_rows = [
            {
                "run_id": run_id,
                "client_id": client_id,
                "campaign_id": f.campaign_id,
                "state": ITEM_FAILED,
                "updated_at": now,
            }
            for f in with_id
        ]
        ins = self._insert(sync_failures)
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
        items = self._insert(run_items)
        mark_failed = items.on_conflict_do_update(
            index_elements=[run_items.c.run_id, run_items.c.campaign_id],
            set_={"state": items.excluded.state, "updated_at": items.excluded.updated_at},
            where=run_items.c.state != ITEM_SYNCED,
        )

        def write(conn: Connection) -> None:
            conn.execute(upsert_failures, failure_rows)
            if item_rows:
                conn.execute(mark_failed, item_rows)

        return write

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
                return _record(exact)
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
            return _record(matches[0]) if matches else None

        return self._transaction("get_run", read)

    def recent_runs(self, client_id: str | None = None, limit: int = 20) -> list[RunRecord]:
        """Runs, newest first, of one client or of all."""
        stmt = sa.select(sync_runs)
        if client_id is not None:
            stmt = stmt.where(sync_runs.c.client_id == client_id)
        stmt = stmt.order_by(sync_runs.c.started_at.desc(), sync_runs.c.id.desc()).limit(limit)
        return self._transaction(
            "recent_runs", lambda conn: [_record(r) for r in conn.execute(stmt)]
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
                sync_runs.c.lease_until >= self._db_now(conn),
            )
            row = conn.execute(stmt).first()
            return None if row is None else _record(row)

        return self._transaction("live_run", read)

    def run_failures(self, run_id: str) -> list[CampaignFailure]:
        """The run's failed campaigns with kind and reason, oldest first."""
        stmt = (
            sa.select(sync_failures.c.campaign_id, sync_failures.c.reason, sync_failures.c.kind)
            .where(sync_failures.c.run_id == run_id)
            .order_by(sync_failures.c.failed_at, sync_failures.c.id)
        )
        return self._transaction(
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
        return self._transaction(
            "campaign_rows", lambda conn: [dict(r._mapping) for r in conn.execute(stmt)]
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
        return self._transaction("count", lambda conn: int(conn.execute(stmt).scalar_one()))

    # --- plumbing -----------------------------------------------------------------------

    def _insert(self, table: sa.Table) -> Any:
        # The two dialects' Insert classes share on_conflict_do_* but no common type.
        return sqlite.insert(table) if self._sqlite else postgresql.insert(table)

    def _read_run(self, conn: Connection, run_id: str, *, resumed: bool) -> RunRecord:
        row = conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id)).one()
        return _record(row, resumed=resumed)

    def _transaction(self, op: str, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        """Run ``fn`` in one transaction, retrying the whole of it on transient faults."""

        def once() -> T:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(adsync_write=True)
                with conn.begin():
                    return fn(conn)

        retrying = Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=self._wait, max=self._wait_max),
            retry=retry_if_exception(is_transient),
            sleep=self._sleep,
            before_sleep=lambda state: self._log_retry(op, state),
            reraise=True,
        )
        try:
            return retrying(once)
        except AdsyncError:
            raise
        except (SQLAlchemyError, OverflowError) as exc:
            # OverflowError: sqlite3 refuses an int beyond 64 bits before SQLAlchemy sees it.
            if is_transient(exc):
                busy = (
                    " (busy: another process holds a lock on it; try again)" if _busy(exc) else ""
                )
                raise StoreUnavailable(
                    f"database unavailable after {self._attempts} "
                    f"attempt{'s' if self._attempts != 1 else ''} "
                    f"({self._where()}): {self._describe(exc)}{busy}"
                ) from exc
            raise StoreError(
                f"database error in {op} ({self._where()}): {self._describe(exc)}"
            ) from exc

    def _log_retry(self, op: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "database call %s failed (attempt %d of %d), retrying: %s",
            op,
            state.attempt_number,
            self._attempts,
            self._describe(exc) if exc is not None else "?",
        )

    def _where(self) -> str:
        url = self.engine.url.difference_update_query(_SECRET_QUERY_KEYS)
        if self.read_only and self._sqlite:
            # The file as the user named it, not its percent-encoded read-only URI.
            return f"sqlite:///{unquote((url.database or '').removeprefix('file:'))}"
        return url.render_as_string(hide_password=True)

    def _describe(self, exc: BaseException) -> str:
        """Class, SQLSTATE and first line of the driver's message, password scrubbed.

        Not ``str(exc)``: SQLAlchemy's text carries the statement and its parameters.
        """
        orig = getattr(exc, "orig", None) or exc
        code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
        lines = str(orig).strip().splitlines()
        text = f"{type(orig).__name__}{f' [{code}]' if code else ''}: {lines[0] if lines else ''}"
        for secret in database_secrets(self.engine.url):
            text = text.replace(secret, "***")
        return text


# --- the shared rate log ----------------------------------------------------------------


def rate_lock_key(client_id: str) -> int:
    """The PostgreSQL advisory lock key of a client id's rate log: a stable 63-bit hash.

    A collision with another key only makes two client ids take turns; it never
    lets two sends of one client id pass each other.
    """
    digest = hashlib.blake2b(client_id.encode(), digest_size=8, person=b"adsync-rate").digest()
    return int.from_bytes(digest, "big") >> 1


# Built once: reservations run these for every request sent to the platform.
#
# PostgreSQL, one round trip: the batch's client ids locked in ascending order (two
# processes never wait for each other in a circle), and no wait for the WAL flush
# at commit. A reservation lost to a server crash costs at worst one 429; other
# sessions see the row as soon as it commits, which is all the serialization needs.
_LOCK_KEYS = (
    sa.select(
        sa.func.unnest(sa.bindparam("keys", type_=postgresql.ARRAY(sa.BigInteger()))).label("key")
    )
    .order_by(sa.literal_column("key"))
    .subquery()
)
_RATE_LOCK = sa.select(
    sa.func.pg_advisory_xact_lock(_LOCK_KEYS.c.key),
    sa.func.set_config("synchronous_commit", "off", sa.true()),
)
_RATE_SWEEP = sa.delete(rate_sends).where(
    rate_sends.c.client_id.in_(sa.bindparam("client_ids", expanding=True)),
    rate_sends.c.sent_at <= sa.bindparam("before"),
)
_RATE_WINDOW = sa.select(rate_sends.c.client_id, rate_sends.c.sent_at, rate_sends.c.owner).where(
    rate_sends.c.client_id.in_(sa.bindparam("client_ids", expanding=True)),
    rate_sends.c.sent_at > sa.bindparam("after"),
)
_RATE_INSERT = sa.insert(rate_sends)
_RATE_FORGET = sa.delete(rate_sends).where(
    rate_sends.c.client_id == sa.bindparam("client_id"),
    rate_sends.c.owner == sa.bindparam("owner"),
    rate_sends.c.sent_at == sa.bindparam("sent_at"),
)
# UPDATE reserves the column names for its SET clause: hence the b_ names.
_RATE_MOVE = (
    sa.update(rate_sends)
    .where(
        rate_sends.c.client_id == sa.bindparam("b_client_id"),
        rate_sends.c.owner == sa.bindparam("b_owner"),
        rate_sends.c.sent_at == sa.bindparam("b_sent_at"),
    )
    .values(sent_at=sa.bindparam("b_to"))
)


class SqlSendLog:
    """:class:`~adsync.ratelimit.SharedSendLog` over the ``rate_sends`` table.

    A batch of reservations is one write transaction: on PostgreSQL it first takes
    transaction-scoped advisory locks on its client ids (other client ids go on in
    parallel); on SQLite ``BEGIN IMMEDIATE`` has already taken the database's one
    write lock. Only then is the clock read (the database's, once per batch: see
    :meth:`SqlStore._db_now`), the windows read, and the sends inserted, so no two
    processes can both take the last slot, and every send of a client id is
    stamped after the ones before it, whatever the clocks of the hosts. About once a window,
    a batch also deletes its client ids' rows older than the log reports (an index
    range scan), so the table stays a few windows deep.
    """

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._postgres = store.engine.dialect.name == "postgresql"
        # When each client id's old rows were last swept (the log's clock).
        self._swept: dict[str, float] = {}

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        """Apply ``changes`` to our sends, then take ``requests``: one transaction."""
        if not requests and not changes:
            return []
        client_ids = sorted({r.client_id for r in requests})
        locked = sorted({rate_lock_key(c) for c in [*client_ids, *(c.client_id for c in changes)]})
        # A send is moved (maybe more than once) before it is removed, never after.
        moves = [
            {"b_client_id": c.client_id, "b_owner": c.owner, "b_sent_at": c.sent_at, "b_to": c.to}
            for c in changes
            if c.to is not None
        ]
        removals = [
            {"client_id": c.client_id, "owner": c.owner, "sent_at": c.sent_at}
            for c in changes
            if c.to is None
        ]

        def reserve(conn: Connection) -> list[Reservation]:
            if self._postgres:
                conn.execute(_RATE_LOCK, {"keys": locked})
            if moves:  # in order: a send moved twice ends where it went last
                conn.execute(_RATE_MOVE, moves)
            if removals:
                conn.execute(_RATE_FORGET, removals)
            if not requests:
                return []
            lookback = max(LOOKBACK_SPANS * r.span for r in requests)
            # Read under the locks: one moment for the whole batch.
            at = self._store._db_now(conn).timestamp()
            due = [c for c in client_ids if at - self._swept.get(c, float("-inf")) >= lookback]
            if due:
                before = at - lookback - max(r.span for r in requests)
                conn.execute(_RATE_SWEEP, {"client_ids": due, "before": before})
                self._swept.update(dict.fromkeys(due, at))
            sends: dict[str, list[tuple[float, str]]] = {c: [] for c in client_ids}
            for row in conn.execute(
                _RATE_WINDOW, {"client_ids": client_ids, "after": at - lookback}
            ):
                sends[row.client_id].append((row.sent_at, row.owner))
            answers, rows = [], []
            for r in requests:
                horizon = at - LOOKBACK_SPANS * r.span
                decision = decide_reservation(
                    [s for s in sends[r.client_id] if s[0] > horizon],
                    r.owner,
                    at,
                    span=r.span,
                    limit=r.limit,
                    spacing=r.spacing,
                )
                if decision.ok:
                    # Later requests of this batch for the same client id see it too.
                    sends[r.client_id].append((at, r.owner))
                    rows.append({"client_id": r.client_id, "sent_at": at, "owner": r.owner})
                answers.append(decision)
            if rows:
                conn.execute(_RATE_INSERT, rows)
            return answers

        return self._store._transaction("reserve_sends", reserve, write=True)

    def reserve(
        self, client_id: str, owner: str, *, span: float, limit: int, spacing: float
    ) -> Reservation:
        """One request on its own (see :meth:`reserve_many`)."""
        return self.reserve_many([SendRequest(client_id, owner, span, limit, spacing)])[0]

    def forget(self, client_id: str, owner: str, sent_at: float) -> None:
        """Delete one of our sends that the platform did not count (a 429, a 401)."""
        self.reserve_many([], [SendChange(client_id, owner, sent_at)])

    def restamp(self, client_id: str, owner: str, sent_at: float, to: float) -> None:
        """Move one of our sends to when its bytes actually left."""
        self.reserve_many([], [SendChange(client_id, owner, sent_at, to)])

    def sends(self, client_id: str) -> list[tuple[float, str]]:
        """The logged ``(sent_at, owner)`` sends of a client id, oldest first."""
        stmt = (
            sa.select(rate_sends.c.sent_at, rate_sends.c.owner)
            .where(rate_sends.c.client_id == client_id)
            .order_by(rate_sends.c.sent_at, rate_sends.c.id)
        )
        return self._store._transaction(
            "rate_sends", lambda conn: [(r.sent_at, r.owner) for r in conn.execute(stmt)]
        )


def _prepare_sqlite(engine: Engine, *, read_only: bool = False) -> None:
    """Install the SQLite connection setup once per engine."""
    on_connect = _sqlite_read_only_on_connect if read_only else _sqlite_on_connect
    if not event.contains(engine, "connect", on_connect):
        event.listen(engine, "connect", on_connect)
    if not event.contains(engine, "begin", _sqlite_on_begin):
        event.listen(engine, "begin", _sqlite_on_begin)


def _read_only_sqlite_url(url: sa.URL) -> sa.URL:
    """The same SQLite file as a read-only URI (``mode=ro``), which never creates it."""
    if url.database in (None, "", ":memory:"):
        raise ConfigError(
            "DATABASE_URL names an in-memory SQLite database: there is nothing to read"
        )
    path = Path(url.database)
    if not path.exists():
        raise ConfigError(
            f"no database at {path} (DATABASE_URL): point DATABASE_URL at the database "
            "adsync sync writes, or create one with `adsync db upgrade`"
        )
    return url.set(
        database="file:" + quote(str(path.absolute())),
        query={**url.query, "mode": "ro", "uri": "true"},
    )


def _sqlite_read_only_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # No journal_mode or synchronous pragma: both are the writers' to set. A reader
    # in WAL mode never waits; outside it, it waits this long for a writer's lock.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={_READ_LOCK_WAIT_MS}")
        cursor.execute("PRAGMA query_only=ON")
    finally:
        cursor.close()


def _pg_read_only_on_begin(conn: Connection) -> None:
    # The first statements of the transaction psycopg opens: a write is refused by
    # the server, and a lock held by a migration is waited for only briefly.
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {_READ_LOCK_WAIT_MS}")


def schema_problem(
    current: frozenset[str], heads: frozenset[str], known: frozenset[str]
) -> str | None:
    """What is wrong with a database at Alembic revisions ``current``, if anything.

    ``heads`` are the revisions this adsync's migrations end at, ``known`` all of
    its revisions.
    """
    if current == heads:
        return None
    if not current:
        return "the database has no adsync schema yet: run `adsync db upgrade`"
    at = ", ".join(sorted(current))
    if current <= known:
        return (
            f"the database schema is older than this adsync (revision {at}, needs "
            f"{', '.join(sorted(heads))}): run `adsync db upgrade`"
        )
    return f"the database schema (revision {at}) is newer than this adsync: upgrade adsync"


def _no_such_database(exc: BaseException) -> bool:
    # libpq reports a missing database (or role) at connect time, with no SQLSTATE.
    return isinstance(exc, DBAPIError) and "does not exist" in str(exc.orig)


def _busy(exc: BaseException) -> bool:
    """Whether a transient failure is another process's lock rather than an outage."""
    orig = getattr(exc, "orig", None) or exc
    name = getattr(orig, "sqlite_errorname", None) or ""
    sqlstate = getattr(orig, "sqlstate", None) or ""
    return (
        name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
        or sqlstate == "55P03"
        or ("sqlite" in type(orig).__module__ and "locked" in str(orig))
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # sqlite3's own transaction handling skips BEGIN before SELECT and DDL; we emit
    # BEGIN ourselves (see _sqlite_on_begin) so every call is one real transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers never block the writer. NORMAL is crash-safe in WAL mode (a
        # power cut may lose the last commits, which only means re-syncing them).
        cursor.execute("PRAGMA busy_timeout=15000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the write lock up front: a deferred transaction that reads and then
    # writes can fail with SQLITE_BUSY at once, whatever the busy timeout.
    immediate = conn.get_execution_options().get("adsync_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _counter_values(counters: RunCounters) -> dict[str, int]:
    return {
        "seen": counters.seen,
        "synced": counters.synced,
        "failed": counters.failed,
        "requests": counters.requests,
        "retries": counters.retries,
        "rate_limited": counters.rate_limited,
        "pages": counters.pages,
    }


def _record(row: Row[Any], *, resumed: bool = False) -> RunRecord:
    return RunRecord(
        id=row.id,
        client_id=row.client_id,
        status=RunStatus(row.status),
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
        lease_until=row.lease_until,
        owner=row.owner,
        resumes=row.resumes,
        seen=row.seen,
        synced=row.synced,
        failed=row.failed,
        requests=row.requests,
        retries=row.retries,
        rate_limited=row.rate_limited,
        pages=row.pages,
        listing_complete=bool(row.listing_complete),
        resumable=bool(row.resumable),
        error=row.error,
        resumed=resumed,
        run_seq=row.run_seq,
        active_seconds=row.active_seconds,
    )


def _ids(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _conforms(store: SqlStore) -> Store:
    # Lets mypy prove that SqlStore satisfies the Store protocol.
    return store


def _logs(log: SqlSendLog) -> SharedSendLog:
    # And that SqlSendLog is a SharedSendLog.
    return log
