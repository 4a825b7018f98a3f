"""The sync jobs in Procrastinate's queue, as ``adsync jobs`` lists them.

Read with plain psycopg, one read-only query, without loading Procrastinate: a
look at the queue must not pay for the worker's machinery, nor create its tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

import psycopg

from adsync.errors import StoreError, StoreUnavailable
from adsync.worker.names import SYNC_TASK

__all__ = ["LISTED_STATUSES", "QueuedJob", "list_jobs"]

# Waiting, running, and failed for good (finished ones are the run history's).
LISTED_STATUSES: Final = ("todo", "doing", "failed")

_QUERY: Final = """
SELECT j.id, j.status::text, j.attempts, j.scheduled_at,
       (SELECT min(e.at) FROM procrastinate_events e
         WHERE e.job_id = j.id AND e.type = 'deferred') AS queued_at,
       (SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id) AS changed_at,
       coalesce(j.args ->> 'client_id', j.lock, '?') AS client_id
  FROM procrastinate_jobs j
 WHERE j.task_name = %(task)s AND j.status::text = ANY(%(statuses)s)
 ORDER BY j.id
"""


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """One sync job: its account, where it stands, since when."""

    id: int
    client_id: str
    status: str
    attempts: int
    queued_at: datetime | None
    scheduled_at: datetime | None
    changed_at: datetime | None


def list_jobs(conninfo: str, statuses: tuple[str, ...] = LISTED_STATUSES) -> list[QueuedJob]:
    """The sync jobs in ``statuses``, oldest first; none when the queue was never created."""
    try:
        with psycopg.connect(conninfo, connect_timeout=10, autocommit=True) as conn:
            conn.read_only = True
            row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if row is None or row[0] is None:
                return []
            rows = conn.execute(_QUERY, {"task": SYNC_TASK, "statuses": list(statuses)}).fetchall()
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot read the job queue: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the job queue: {_first_line(exc)}") from exc
    return [
        QueuedJob(
            id=job_id,
            client_id=client_id,
            status=status,
            attempts=attempts,
            queued_at=queued_at,
            scheduled_at=scheduled_at,
            changed_at=changed_at,
        )
        for job_id, status, attempts, scheduled_at, queued_at, changed_at, client_id in rows
    ]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
