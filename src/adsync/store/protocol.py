"""The seam between adsync and its storage: what the code that uses a store calls.

Exactly the calls of its users, and nothing that only tests need: the pipeline
(:class:`~adsync.sync.SyncJob` and its :class:`~adsync.sync.RunWriter`), the
wiring of a process's accounts (:mod:`adsync.runner`), the worker, the history
commands (``adsync status``, ``adsync runs show``, on a read-only store) and
the demo. :class:`~adsync.store.SqlStore` and
:class:`~adsync.store.InMemoryStore` keep it, and the same contract tests hold
them to it.

How a store is opened, migrated and inspected is its own business (the CLI
builds a :class:`~adsync.store.SqlStore` and migrates it before handing it on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from adsync.models import (
    CampaignFailure,
    Checkpoint,
    RunCounters,
    RunRecord,
    RunStatus,
    RunWrite,
)
from adsync.sendlog import SharedSendLog

__all__ = ["Store"]


class Store(Protocol):
    """Runs, their checkpoints and campaigns, their history, and the shared send log.

    Thread-safe and blocking: the async pipeline calls it through
    ``asyncio.to_thread``. Every method is all or nothing. Time (leases, stamps)
    is the store's own clock, the database's, never the caller's. Failures are
    :class:`~adsync.errors.StoreError`: :class:`~adsync.errors.StoreUnavailable`
    when the store cannot be reached, :class:`~adsync.errors.RunLocked` when a run
    is another owner's.
    """

    # --- a run: the pipeline -----------------------------------------------------

    def claim_run(
        self,
        client_id: str,
        owner: str,
        lease_seconds: float,
        *,
        owner_is_dead: Callable[[str], bool] | None = None,
        resume_within: float | None = None,
    ) -> RunRecord:
        """Take the client's unfinished run over, or start a new one; hold it for ``owner``.

        Resumes a ``running`` run whose lease expired (or whose owner
        ``owner_is_dead`` says is gone), else the latest run finished resumable.
        One that last ran more than ``resume_within`` seconds ago is closed as
        ``abandoned`` instead and a new run starts. A new run comes after the
        client's earlier ones (``run_seq``); a resumed one keeps its place.
        Raises :class:`~adsync.errors.RunLocked` while another owner's lease holds.
        """
        ...

    def heartbeat(self, run_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease from now; False when the run is no longer ``owner``'s."""
        ...

    def record_listed(self, run_id: str, client_id: str, campaign_ids: Sequence[str]) -> None:
        """Remember listed campaigns as pending; others keep their state (``unlisted``: pending)."""
        ...

    def mark_listing_complete(self, run_id: str, unlisted: Iterable[str] = ()) -> None:
        """Record that the listing is complete; ``unlisted`` campaigns leave the run's result."""
        ...

    def checkpoint(self, run_id: str) -> Checkpoint:
        """What the run has durably done: listed, synced and failed campaign ids."""
        ...

    def write_runs(self, writes: Sequence[RunWrite]) -> None:
        """Failures, synced campaigns and counters of one or more runs: all, or none.

        A campaign's stored row is the latest run's (by ``run_seq``), whatever the
        platform's ``synced_at`` says; its history has one row per run. A value
        the store cannot hold refuses the whole call with a
        :class:`~adsync.errors.StoreError` that is not ``StoreUnavailable``.
        """
        ...

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
        """Close the run; :class:`~adsync.errors.RunLocked` if it is no longer ``owner``'s.

        ``resumable`` (default: only ``interrupted``) lets the next claim resume it.
        """
        ...

    # --- the rate budget shared by processes ----------------------------------

    def send_log(self) -> SharedSendLog:
        """The log of sends to the platform that every process using this store sees."""
        ...

    # --- history: the worker, ``adsync status`` and ``adsync runs show`` ---------

    def live_run(self, client_id: str) -> RunRecord | None:
        """The client's ``running`` run while its lease holds, else None."""
        ...

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id or unique id prefix; AmbiguousRunId if several match."""
        ...

    def recent_runs(self, client_id: str | None = None, limit: int = 20) -> list[RunRecord]:
        """Runs, newest first, of one client or of all."""
        ...

    def run_failures(self, run_id: str) -> list[CampaignFailure]:
        """The run's failed campaigns with kind and reason, oldest first."""
        ...

    # --- the demo ---------------------------------------------------------------

    def count_campaigns(self, client_id: str | None = None) -> int:
        """How many campaigns are stored (for one client, or in all)."""
        ...

    def dispose(self) -> None:
        """Let go of what the store holds (connections); it is not used afterwards."""
        ...
