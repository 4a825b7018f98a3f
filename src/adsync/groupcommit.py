"""Group commit: what many callers hand in while a commit is under way goes in the next one.

One commit is in flight at a time; whatever arrives meanwhile waits and goes
together in the next, in the order it was handed in. At low rates each item goes
alone; under load many share one commit, so the cost per item falls as load rises.
Each caller gets its own item's result (or the commit's error), so nobody counts
as committed what is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["GroupCommit"]


class GroupCommit(Generic[T, R]):
    """Commits items in groups through ``commit``, which answers one result per item.

    ``alone``: given the error of a commit of several items, whether to commit each
    of them again alone, so that only the caller whose item is at fault gets the
    error (data one caller brought, say); otherwise every caller of the failed
    commit gets it (the database is down: trying each alone would only wait longer).
    """

    def __init__(
        self,
        commit: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        alone: Callable[[Exception], bool] | None = None,
        name: str = "group-commit",
    ) -> None:
        self._commit = commit
        self._alone = alone
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R] | None]] = []
        self._draining: asyncio.Task[None] | None = None
        # Commits made so far (each retry of an item alone is one too).
        self.batches = 0

    async def submit(self, item: T) -> R:
        """Commit ``item`` (with whatever else is waiting); its result, or the commit's error.

        A caller cancelled meanwhile does not withdraw its item: it is committed all
        the same.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A caller stopped while its item is being committed is no longer there
        # to read the outcome: the error is marked read, not logged at exit.
        future.add_done_callback(_mark_read)
        self._pending.append((item, future))
        self._kick()
        return await asyncio.shield(future)

    def post(self, item: T) -> None:
        """Hand in ``item`` with nobody waiting for it: it goes with the next commit."""
        self._pending.append((item, None))
        self._kick()

    async def flush(self) -> None:
        """Wait until everything handed in so far is committed (or failed to be)."""
        while (task := self._draining) is not None and not task.done():
            await asyncio.wait({task})

    def _kick(self) -> None:
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain(), name=self._name)

    async def _drain(self) -> None:
        while self._pending:
            taken, self._pending = self._pending, []
            try:
                await self._commit_group(taken)
            except BaseException:
                _cancel(taken)  # cancelled: the loop is going away
                raise

    async def _commit_group(self, taken: list[tuple[T, asyncio.Future[R] | None]]) -> None:
        self.batches += 1
        try:
            results = await self._commit([item for item, _ in taken])
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets it, as its own
            if len(taken) > 1 and self._alone is not None and self._alone(exc):
                for one in taken:
                    await self._commit_group([one])
                return
            for _, future in taken:
                if future is not None and not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(taken, results, strict=True):
            # Its caller may have been cancelled meanwhile.
            if future is not None and not future.done():
                future.set_result(result)


def _mark_read(future: asyncio.Future[R]) -> None:
    if not future.cancelled():
        future.exception()


def _cancel(taken: list[tuple[T, asyncio.Future[R] | None]]) -> None:
    for _, future in taken:
        if future is not None:
            future.cancel()
