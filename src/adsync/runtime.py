"""What every sync of one process shares, built once at the process's edge.

``adsync sync`` (:func:`adsync.runner.sync_many`) and ``adsync worker``
(:class:`adsync.worker.runtime.WorkerRuntime`) build one :class:`ProcessRuntime`
each and hand it to every account's sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adsync.ratelimit import Margin, SendLogBatcher
from adsync.runwriter import RunWriter

if TYPE_CHECKING:
    from adsync.store.protocol import Store

__all__ = ["ProcessRuntime"]


class ProcessRuntime:
    """The rate log's batcher, the jitter margin and the run writer of one process.

    - ``send_log``: every account's reservations in the shared rate log go
      together, many per transaction;
    - ``margin``: arrival jitter belongs to the process and its path to the
      platform, so the first refusal that shows the margin too small widens it for
      every account; it starts at the process's configured ``rate_margin``;
    - ``writer``: every run's writes go together, many runs per transaction, to
      ``runs_store`` (the store itself unless given, e.g. one that waits out an
      outage).
    """

    def __init__(
        self, store: Store, *, rate_margin: float, runs_store: Store | None = None
    ) -> None:
        self.margin = Margin(rate_margin)
        # Not patient: a shared rate log that does not answer is replaced at once
        # by this process's own pacing.
        self.send_log = SendLogBatcher(store.send_log())
        self.writer = RunWriter(store if runs_store is None else runs_store)

    async def aclose(self) -> None:
        """Flush what waits for the shared rate log and stop its thread (after the last sync)."""
        await self.send_log.aclose()
