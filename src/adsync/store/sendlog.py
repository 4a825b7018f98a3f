"""The rate budget's log of sends, shared by every process using the database.

:class:`SqlSendLog` is the :class:`~adsync.sendlog.SharedSendLog` of the
``rate_sends`` table: every send to the platform is reserved, in a short
transaction serialized per client id, against the sends of every process, and
stamped with the database's clock. The rules of a reservation are
:func:`adsync.sendlog.decide_reservation`'s; this module only keeps the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from adsync.sendlog import (
    LOOKBACK_SPANS,
    Reservation,
    SendChange,
    SendLogShortcuts,
    SendRequest,
    SharedSendLog,
    decide_reservation,
)
from adsync.store.database import Database
from adsync.store.schema import rate_sends

__all__ = ["SqlSendLog", "rate_lock_key"]


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


class SqlSendLog(SendLogShortcuts):
    """:class:`~adsync.sendlog.SharedSendLog` over the ``rate_sends`` table.

    A batch of reservations is one write transaction: on PostgreSQL it first takes
    transaction-scoped advisory locks on its client ids (other client ids go on in
    parallel); on SQLite ``BEGIN IMMEDIATE`` has already taken the database's one
    write lock. Only then is the clock read (the database's, once per batch: see
    :meth:`Database.now`), the windows read, and the sends inserted, so no two
    processes can both take the last slot, and every send of a client id is
    stamped after the ones before it, whatever the clocks of the hosts. About once
    a window, a batch also deletes its client ids' rows older than the log reports
    (an index range scan), so the table stays a few windows deep.
    """

    def __init__(self, database: Database) -> None:
        self._db = database
        self._postgres = not database.sqlite
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
            at = self._db.now(conn).timestamp()
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

        return self._db.transaction("reserve_sends", reserve, write=True)

    def sends(self, client_id: str) -> list[tuple[float, str]]:
        """The logged ``(sent_at, owner)`` sends of a client id, oldest first."""
        stmt = (
            sa.select(rate_sends.c.sent_at, rate_sends.c.owner)
            .where(rate_sends.c.client_id == client_id)
            .order_by(rate_sends.c.sent_at, rate_sends.c.id)
        )
        return self._db.transaction(
            "rate_sends", lambda conn: [(r.sent_at, r.owner) for r in conn.execute(stmt)]
        )


def _logs(log: SqlSendLog) -> SharedSendLog:
    # Lets mypy prove that SqlSendLog is a SharedSendLog.
    return log
