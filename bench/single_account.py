"""One account, 100 campaigns, production fault rates, a scaled window.

Prints wall time, the floor of PLATFORM_API.md, their ratio, requests sent versus
requests needed, and 429s received, for two cases: the right limit configured,
and a limit configured three times too high (adsync must learn the real one).

    python bench/single_account.py [--seed 7] [--window 2] [--limit 10] [--sync-delay 0.2]

Never a pass/fail: the figures are for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _support import floor_seconds, sim_stats, simulator_process
from adsync.config import load_settings
from adsync.observability import configure_logging
from adsync.runner import sync_account
from adsync.store import SqlStore

CAMPAIGNS = 100
PAGE = 10


def run_case(
    name: str, configured_limit: int, args: argparse.Namespace, tmp: Path
) -> dict[str, float]:
    with simulator_process(
        rate_limit=args.limit,
        rate_window=args.window,
        sync_delay=args.sync_delay,
        campaigns=CAMPAIGNS,
        seed=args.seed,
    ) as url:
        settings = load_settings(
            AD_PLATFORM_API_URL=url,
            AD_PLATFORM_EMAIL="admin@mixoads.com",
            AD_PLATFORM_PASSWORD="SuperSecret123!",
            AD_PLATFORM_CLIENT_ID="bench",
            AD_PLATFORM_RATE_LIMIT=configured_limit,
            AD_PLATFORM_RATE_WINDOW=args.window,
            AD_PLATFORM_REQUEST_TIMEOUT=max(0.5, args.sync_delay * 4),
            AD_PLATFORM_REQUEST_DEADLINE=max(1.0, args.sync_delay * 8),
            AD_PLATFORM_BACKOFF_INITIAL=0.05,
            AD_PLATFORM_BACKOFF_MAX=1.0,
            DATABASE_URL=f"sqlite:///{tmp / (name + '.db')}",
        )
        store = SqlStore.from_url(settings.database_url.get_secret_value())
        store.upgrade()
        started = time.monotonic()
        outcome = asyncio.run(sync_account(settings, store))
        wall = time.monotonic() - started
        rows = store.count_campaigns("bench")
        store.dispose()
        stats = sim_stats(url)["clients"]["bench"]
    counted = int(stats["requests"])
    needed = CAMPAIGNS + CAMPAIGNS // PAGE
    floor_counted = floor_seconds(counted, args.limit, args.window, args.sync_delay)
    floor_needed = floor_seconds(needed, args.limit, args.window, args.sync_delay)
    return {
        "wall": wall,
        "floor": floor_counted,
        "ratio": wall / floor_counted,
        "floor_ideal": floor_needed,
        "ratio_ideal": wall / floor_needed,
        "sent": outcome.counters.requests,
        "counted": counted,
        "needed": needed,
        "r429": int(stats["rate_limited"]),
        "max_in_window": int(stats["max_in_window"]),
        "rows": rows,
        "status": outcome.status.value,  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--sync-delay", type=float, default=0.2)
    args = parser.parse_args()
    configure_logging("ERROR", "console")
    print(
        f"single account: {CAMPAIGNS} campaigns, platform limit {args.limit} per {args.window}s, "
        f"sync delay {args.sync_delay}s, 20% 503 on lists, 10% hangs, seed {args.seed}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, configured in (
            ("right-limit", args.limit),
            ("limit-3x-too-high", args.limit * 3),
        ):
            r = run_case(name, configured, args, Path(tmp))
            print(
                f"{name:18} configured {configured:3}: wall {r['wall']:6.2f}s  "
                f"floor {r['floor']:6.2f}s (for the {r['counted']} requests the platform counted)  "
                f"ratio {r['ratio']:.3f}  |  ideal floor {r['floor_ideal']:.2f}s for {r['needed']} "
                f"needed, ratio {r['ratio_ideal']:.3f}  |  sent {r['sent']} vs needed {r['needed']}  "
                f"429s {r['r429']}  window max {r['max_in_window']}/{args.limit}  "
                f"rows {r['rows']}  {r['status']}"
            )


if __name__ == "__main__":
    main()
