"""A process that sends as fast as its rate budget lets it, for test_shared_budget_db.py.

    python _hammer.py SECONDS WORKERS [SKEW]

Settings come from the environment (``AD_PLATFORM_*``, ``DATABASE_URL``), as for
``adsync sync``. The client is built as ``adsync sync`` builds it
(:func:`adsync.runner.build_client`, with the store's shared send log unless
``AD_PLATFORM_SHARED_BUDGET`` is off). Once authenticated it prints ``ready`` and
waits for a line on stdin; then ``WORKERS`` tasks list campaign pages for
``SECONDS``. Two of these at once are two processes syncing the same client id,
without the run lock that keeps ``adsync sync`` from doing that. ``SKEW`` sets
this process's wall clock that many seconds off (a badly set host). Ends with one
JSON line: requests sent and 429s received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

from _client_standin import SkewedClock

from adsync.config import load_settings
from adsync.errors import TransientError
from adsync.observability import configure_logging
from adsync.ratelimit import SendLogBatcher
from adsync.runner import build_client, build_http
from adsync.store import SqlStore, make_owner


async def hammer(seconds: float, workers: int, skew: float) -> dict[str, int]:
    settings = load_settings()
    store = SqlStore.from_url(settings.database_url.get_secret_value())
    shared = SendLogBatcher(store.send_log()) if settings.shared_budget else None
    try:
        async with build_http(settings) as http:
            clock = SkewedClock(skew)
            client = build_client(settings, http, clock, shared=shared, owner=make_owner())
            await client.auth.get()  # the token endpoint is not rate limited
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            stop_at = time.monotonic() + seconds

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    # Out of retries: go on, the stats have counted it.
                    with contextlib.suppress(TransientError):
                        await client.list_page(1, 10)

            await asyncio.gather(*(worker() for _ in range(workers)))
            await client.budget.flush()
            return {
                "requests": client.stats.requests,
                "rate_limited": client.stats.rate_limited,
                "shared_failures": client.budget.shared_failures,
            }
    finally:
        store.dispose()


def main() -> None:
    configure_logging("WARNING", stream=sys.stderr)
    seconds, workers = float(sys.argv[1]), int(sys.argv[2])
    skew = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    print(json.dumps(asyncio.run(hammer(seconds, workers, skew))))


if __name__ == "__main__":
    main()
