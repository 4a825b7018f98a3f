"""What every store keeps the same way, written once: item states, kept text, run
records, messages.

:class:`~adsync.store.SqlStore` and :class:`~adsync.store.InMemoryStore` both
use these, so that what one stores and says is what the other does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

from adsync.models import (
    CampaignFailure,
    RunCounters,
    RunRecord,
    RunStatus,
    RunWrite,
    SyncedCampaign,
)
from adsync.printable import shorten
from adsync.redact import REDACTOR

__all__ = [
    "ITEM_FAILED",
    "ITEM_PENDING",
    "ITEM_SYNCED",
    "ITEM_UNLISTED",
    "OneRunWrites",
    "abandon_note",
    "counter_values",
    "kept",
    "lease_held",
    "no_longer_ours",
    "run_record",
    "unique_ids",
]

# The state of one listed campaign in a run (``run_items.state``).
ITEM_PENDING: Final = "pending"
ITEM_SYNCED: Final = "synced"
ITEM_FAILED: Final = "failed"
# Listed by an earlier part of a resumed run, but no longer by the listing it
# finished with: not part of the run's result.
ITEM_UNLISTED: Final = "unlisted"


def kept(text: str) -> str:
    """``text`` as a store keeps it (a failure's reason, a run's error)."""
    # Reasons and errors quote the platform and exceptions: no secret the process
    # knows goes into the database, and no megabyte error body either. NUL is
    # shown, not stored: PostgreSQL text cannot hold it.
    return shorten(REDACTOR.scrub(text)).replace("\x00", "\\x00")


def unique_ids(values: Iterable[str]) -> list[str]:
    """The non-empty ids of ``values``, each once, in their first order."""
    return list(dict.fromkeys(v for v in values if v))


def abandon_note(resume_within: float) -> str:
    """Why a run was closed as ``abandoned``; added to its error (after ``; ``, if it had one)."""
    return f"abandoned: not resumed within {resume_within:g}s of when it last ran"


def lease_held(client_id: str, run_id: str, owner: str, lease_until: datetime) -> str:
    """Why a claim is refused while another owner's lease holds."""
    return (
        f"client {client_id!r} already has a run in progress: run {run_id} "
        f"is held by {owner} until {lease_until.isoformat()}; "
        "it is taken over automatically once that lease expires"
    )


def no_longer_ours(run_id: str, status: str, owner: str) -> str:
    """Why a run cannot be finished by a process that no longer holds it."""
    return f"run {run_id} is no longer held by this process: it is {status}, owned by {owner}"


def counter_values(counters: RunCounters) -> dict[str, int]:
    """A run's counters by column name (``extra`` is not stored)."""
    return {
        "seen": counters.seen,
        "synced": counters.synced,
        "failed": counters.failed,
        "requests": counters.requests,
        "retries": counters.retries,
        "rate_limited": counters.rate_limited,
        "pages": counters.pages,
    }


def run_record(row: Any, *, resumed: bool = False) -> RunRecord:
    """The :class:`RunRecord` of a ``sync_runs`` row (anything with its columns as attributes)."""
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


class OneRunWrites:
    """Writes of one run's part at a time, for tests and tools; the pipeline uses ``write_runs``.

    Each is one transaction of the store's ``_write``, under its own name in messages.
    """

    def _write(self, op: str, writes: Sequence[RunWrite]) -> None:
        raise NotImplementedError

    def write_synced(self, run_id: str, client_id: str, batch: Sequence[SyncedCampaign]) -> None:
        """Store a batch of synced campaigns in one transaction.

        Upserts ``campaigns`` (latest values; ``first_synced_at`` kept; never
        overwritten by an earlier run, whatever the platform's ``synced_at`` says:
        runs are ordered by their ``run_seq``), adds one history row per campaign
        per run (a resumed run's repeat is ignored), marks the items synced and
        drops their earlier failure records in this run.
        """
        self._write("write_synced", [RunWrite(run_id, client_id, synced=tuple(batch))])

    def write_failures(
        self, run_id: str, client_id: str, failures: Sequence[CampaignFailure]
    ) -> None:
        """Record failed campaigns with their reasons in one transaction.

        An empty ``campaign_id`` (a payload without a usable id) is stored without
        one and has no checkpoint item. A campaign already synced in this run stays
        synced: a later failure report cannot undo a stored campaign.
        """
        self._write("write_failures", [RunWrite(run_id, client_id, failures=tuple(failures))])

    def save_counters(self, run_id: str, counters: RunCounters) -> None:
        """Record the run's counters (absolute values, not increments)."""
        self._write("save_counters", [RunWrite(run_id, "", counters=counters)])
