"""GroupCommit: grouping under load, each caller's own result or error, items alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from adsync.groupcommit import GroupCommit


async def settle() -> None:
    """Let every ready task run until it waits."""
    for _ in range(5):
        await asyncio.sleep(0)


class Log:
    """A commit that records its groups; refuses items named in ``bad`` or everything when down."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.bad: set[str] = set()
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def commit(self, items: Sequence[str]) -> list[str]:
        await self.gate.wait()
        if self.down:
            raise ConnectionError("down")
        if self.bad & set(items):
            raise ValueError(f"refused {sorted(self.bad & set(items))}")
        self.groups.append(list(items))
        return [item.upper() for item in items]


async def test_what_arrives_during_a_commit_goes_together_in_the_next() -> None:
    log = Log()
    group: GroupCommit[str, str] = GroupCommit(log.commit)
    log.gate.clear()
    first = asyncio.create_task(group.submit("a"))
    await settle()
    rest = [asyncio.create_task(group.submit(x)) for x in "bcd"]
    await settle()
    group.post("e")
    await settle()
    log.gate.set()
    assert await first == "A"
    assert [await t for t in rest] == ["B", "C", "D"]
    assert log.groups == [["a"], ["b", "c", "d", "e"]]
    assert group.batches == 2


async def test_a_group_that_fails_is_committed_alone_when_the_fault_is_ones_own() -> None:
    log = Log()
    log.bad = {"b"}
    group: GroupCommit[str, str] = GroupCommit(
        log.commit, alone=lambda exc: isinstance(exc, ValueError)
    )
    log.gate.clear()
    tasks = [asyncio.create_task(group.submit(x)) for x in "abc"]
    await settle()
    log.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == "A"
    assert isinstance(results[1], ValueError)
    assert results[2] == "C"
    assert log.groups == [["a"], ["c"]]


async def test_an_outage_is_every_callers_error_and_nobody_is_retried_alone() -> None:
    log = Log()
    log.down = True
    group: GroupCommit[str, str] = GroupCommit(
        log.commit, alone=lambda exc: isinstance(exc, ValueError)
    )
    log.gate.clear()
    tasks = [asyncio.create_task(group.submit(x)) for x in "ab"]
    await settle()
    log.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert group.batches == 1
    # The next item is committed once the store is back.
    log.down = False
    assert await group.submit("c") == "C"


async def test_a_cancelled_caller_does_not_withdraw_its_item() -> None:
    log = Log()
    group: GroupCommit[str, str] = GroupCommit(log.commit)
    log.gate.clear()
    task = asyncio.create_task(group.submit("a"))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    log.gate.set()
    await group.flush()
    assert log.groups == [["a"]]
