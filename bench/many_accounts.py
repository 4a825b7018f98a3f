"""Many accounts in one process: 1, 10 and 100 accounts x 100 campaigns.

Each account has its own credentials, token and rate budget, so a good run of
N accounts takes about as long as one account's floor. Prints, per size: wall
time, its ratio to the single-account floor, peak RSS and client CPU seconds per
1,000 requests. Each size runs in a fresh child process (clean RSS figure) against
a simulator in its own process, scaled window, production fault rates.

    python bench/many_accounts.py [--sizes 1,10,100] [--window 2] [--limit 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _support import floor_seconds, sim_stats, simulator_process
from adsync.accounts import parse_accounts
from adsync.observability import configure_logging
from adsync.runner import sync_many
from adsync.store import SqlStore

CAMPAIGNS = 100


def child(size: int, args: argparse.Namespace) -> dict[str, float]:
    """Run one size in this process; print its figures as JSON."""
    configure_logging("ERROR", "console")
    sim_accounts = [
        {"email": f"acct{i}@bench.example", "password": f"pw-{i}", "campaigns": CAMPAIGNS}
        for i in range(size)
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator_process(
            rate_limit=args.limit,
            rate_window=args.window,
            sync_delay=args.sync_delay,
            seed=args.seed,
            accounts=_accounts_file(Path(tmp), sim_accounts),
        ) as url,
    ):
        for i in range(size):
            os.environ[f"BENCH_PW_{i}"] = f"pw-{i}"
        accounts = parse_accounts(
            {
                "accounts": [
                    {
                        "client_id": f"bench-{i:03d}",
                        "email": f"acct{i}@bench.example",
                        "password_env": f"BENCH_PW_{i}",
                    }
                    for i in range(size)
                ]
            }
        )
        base = {
            "AD_PLATFORM_API_URL": url,
            "AD_PLATFORM_RATE_LIMIT": args.limit,
            "AD_PLATFORM_RATE_WINDOW": args.window,
            "AD_PLATFORM_REQUEST_TIMEOUT": max(0.5, args.sync_delay * 4),
            "AD_PLATFORM_REQUEST_DEADLINE": max(1.0, args.sync_delay * 8),
            "AD_PLATFORM_BACKOFF_INITIAL": 0.05,
            "AD_PLATFORM_BACKOFF_MAX": 1.0,
            "DATABASE_URL": args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}",
        }
        settings = [a.settings(**base) for a in accounts]
        store = SqlStore.from_url(settings[0].database_url.get_secret_value())
        store.upgrade()
        cpu0 = time.process_time()
        started = time.monotonic()
        results = asyncio.run(sync_many(settings, store))
        wall = time.monotonic() - started
        cpu = time.process_time() - cpu0
        rows = store.count_campaigns()
        store.dispose()
        stats = sim_stats(url)["clients"]
    counted = [int(stats[r.client_id]["requests"]) for r in results]
    sent = sum(r.outcome.counters.requests for r in results if r.outcome)
    floors = [floor_seconds(n, args.limit, args.window, args.sync_delay) for n in counted]
    return {
        "size": size,
        "wall": wall,
        "floor_max": max(floors),
        "ratio": wall / max(floors),
        "rows": rows,
        "succeeded": sum(1 for r in results if r.exit_code == 0),
        "sent": sent,
        "r429": sum(int(stats[r.client_id]["rate_limited"]) for r in results),
        "window_max": max(int(stats[r.client_id]["max_in_window"]) for r in results),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_per_1000": cpu / max(1, sent) * 1000,
    }


def _accounts_file(tmp: Path, accounts: list[dict[str, object]]) -> str:
    path = tmp / "sim-accounts.json"
    path.write_text(json.dumps({"accounts": accounts}))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--sync-delay", type=float, default=0.2)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    print(
        f"many accounts in one process: {CAMPAIGNS} campaigns each, limit {args.limit} per "
        f"{args.window}s per client id, sync delay {args.sync_delay}s, production fault rates"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(size),
            "--seed",
            str(args.seed),
            "--limit",
            str(args.limit),
            "--window",
            str(args.window),
            "--sync-delay",
            str(args.sync_delay),
        ]
        if args.database_url:
            cmd += ["--database-url", args.database_url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{size:4} accounts: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['size']:4} accounts: wall {r['wall']:6.2f}s  single-account floor {r['floor_max']:6.2f}s  "
            f"ratio {r['ratio']:.3f}  rows {r['rows']}  succeeded {r['succeeded']}/{r['size']}  "
            f"requests {r['sent']}  429s {r['r429']}  window max {r['window_max']}/{args.limit}  "
            f"peak RSS {r['rss_mib']:.0f} MiB  CPU {r['cpu_per_1000']:.2f}s per 1,000 requests"
        )


if __name__ == "__main__":
    main()
