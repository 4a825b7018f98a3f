"""The run writer: what the runs of a process have ready, many runs per transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from adsync.errors import StoreError, StoreUnavailable
from adsync.groupcommit import GroupCommit
from adsync.models import RunWrite

if TYPE_CHECKING:
    from adsync.store.protocol import Store

__all__ = ["RunWriter"]


class RunWriter:
    """Writes what the runs of a process have ready, many runs per transaction.

    Group commit (:class:`~adsync.groupcommit.GroupCommit`): while one transaction
    is under way, whatever other runs hand in waits and goes into the next one, so
    100 accounts cost about as many transactions as one. Each caller returns once
    its own part is committed (or gets the store's error), so a run never counts as
    written what is not. When a shared transaction fails for a reason other than
    the database being unreachable (data one run brought), each part is written
    again alone, so that only the run whose part fails gets the error.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._group: GroupCommit[RunWrite, None] = GroupCommit(
            self._commit, alone=_one_parts_fault, name="run-writer"
        )

    async def write(self, part: RunWrite) -> None:
        """Commit ``part`` (with whatever else is waiting); raise the store's error."""
        await self._group.submit(part)

    async def _commit(self, parts: Sequence[RunWrite]) -> list[None]:
        await asyncio.to_thread(self._store.write_runs, parts)
        return [None] * len(parts)


def _one_parts_fault(exc: Exception) -> bool:
    return isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable)
