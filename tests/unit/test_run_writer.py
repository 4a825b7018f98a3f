"""The run writer's group commit: every caller's error reaches a caller or is dropped quietly."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

from adsync.errors import StoreUnavailable
from adsync.models import RunWrite
from adsync.runwriter import RunWriter


class OutageStore:
    """A store whose ``write_runs`` blocks until released, then finds the database gone."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def write_runs(self, parts: list[RunWrite]) -> None:
        self.release.wait(5)
        raise StoreUnavailable("database unavailable after 3 attempts")


def test_a_write_whose_caller_was_cancelled_fails_without_an_unretrieved_error() -> None:
    # A run stopped (cancelled) while its part was being committed; the commit
    # then fails. Nobody is left to read that error, and asyncio must not log
    # it as "exception was never retrieved", with a traceback, at exit.
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        store = OutageStore()
        writer = RunWriter(store)  # type: ignore[arg-type]
        caller = asyncio.create_task(writer.write(RunWrite(run_id="r1", client_id="c1")))
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        store.release.set()
        for _ in range(50):  # let the drain settle the future
            await asyncio.sleep(0.01)
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert reported == []
