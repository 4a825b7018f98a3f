"""100 accounts x 100 campaigns on Procrastinate workers, each worker its own process.

The simulator runs in a process of its own with a scaled window and production
fault rates (20% 503 on lists, 10% hangs); the accounts are queued with ``adsync
enqueue --all`` before the workers start. Prints the wall time from the first job
started to the last run finished (and from launching the workers), the
single-account floor of PLATFORM_API.md (for the account that needed most requests,
as bench/many_accounts.py) and their ratio, 429s, and per worker its
peak RSS and CPU seconds per 1,000 requests.

    python bench/many_accounts_workers.py [--accounts 100] [--campaigns 100] [--workers 2]
        [--concurrency 50] [--limit 10] [--window 2] [--sync-delay 0.2] [--seed 7] [--calm]

Needs PostgreSQL: ADSYNC_BENCH_POSTGRES_URL (else ADSYNC_TEST_POSTGRES_URL, else
postgresql://postgres@127.0.0.1:5432/postgres) names the server; a throwaway
database is created and dropped. ``run_workers()`` is the same as a function, for
bench/many_accounts.py. Figures only, never a pass/fail.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from _support import floor_seconds, sim_stats, simulator_process
from adsync.config import sqlalchemy_url

PAGE = 10
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _admin_url() -> str:
    return os.environ.get(
        "ADSYNC_BENCH_POSTGRES_URL",
        os.environ.get("ADSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new PostgreSQL database for one run, dropped afterwards."""
    admin = _admin_url()
    name = f"adsync_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{admin.rpartition('/')[0]}/{name}"
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _files(tmp: Path, accounts: int, campaigns: int) -> tuple[Path, Path, dict[str, str]]:
    """The simulator's accounts, adsync's accounts file, and the password variables."""
    sim_lines, lines, passwords = [], [], {}
    for i in range(accounts):
        email, password, var = (
            f"ads{i}@bench.example",
            f"pw-{i}-{uuid.uuid4().hex[:6]}",
            f"BENCH_PW_{i}",
        )
        passwords[var] = password
        sim_lines += ["[[accounts]]", f'email = "{email}"', f'password = "{password}"',
                      f"campaigns = {campaigns}", ""]  # fmt: skip
        lines += ["[[accounts]]", f'client_id = "bench-{i:03d}"', f'email = "{email}"',
                  f'password_env = "{var}"', ""]  # fmt: skip
    sim_file, accounts_file = tmp / "sim-accounts.toml", tmp / "accounts.toml"
    sim_file.write_text("\n".join(sim_lines))
    accounts_file.write_text("\n".join(lines))
    return sim_file, accounts_file, passwords


def _proc_figures(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MiB) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    hwm = next(
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )  # fmt: skip
    return cpu, int(hwm.split()[1]) / 1024


def run_workers(
    *,
    accounts: int = 100,
    campaigns: int = 100,
    workers: int = 2,
    concurrency: int | None = None,
    limit: int = 10,
    window: float = 2.0,
    sync_delay: float = 0.2,
    seed: int = 7,
    calm: bool = False,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Sync ``accounts`` accounts on ``workers`` worker processes; the figures as a dict."""
    concurrency = concurrency or -(-accounts // workers)
    faults = {"error_rate": 0.0, "hang_rate": 0.0} if calm else {}
    with tempfile.TemporaryDirectory() as tmp_name, throwaway_database() as url:
        tmp = Path(tmp_name)
        sim_file, accounts_file, passwords = _files(tmp, accounts, campaigns)
        with simulator_process(
            rate_limit=limit,
            rate_window=window,
            sync_delay=sync_delay,
            seed=seed,
            accounts=sim_file,
            **faults,
        ) as sim_url:
            env = {
                **os.environ,
                **passwords,
                "DATABASE_URL": url,
                "ADSYNC_ACCOUNTS_FILE": str(accounts_file),
                "ADSYNC_SCHEDULE_MINUTES": "0",
                "AD_PLATFORM_API_URL": sim_url,
                "AD_PLATFORM_RATE_LIMIT": str(limit),
                "AD_PLATFORM_RATE_WINDOW": str(window),
                "AD_PLATFORM_REQUEST_TIMEOUT": str(max(0.5, sync_delay * 4)),
                "AD_PLATFORM_REQUEST_DEADLINE": str(max(1.0, sync_delay * 8)),
                "AD_PLATFORM_BACKOFF_INITIAL": "0.05",
                "AD_PLATFORM_BACKOFF_MAX": "1.0",
            }
            adsync = [sys.executable, "-m", "adsync.cli"]
            subprocess.run([*adsync, "enqueue", "--all"], env=env, check=True, capture_output=True)
            launched = time.monotonic()
            procs = [
                subprocess.Popen(
                    [
                        *adsync,
                        "worker",
                        "--concurrency",
                        str(concurrency),
                        "--log-level",
                        "WARNING",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp / f"worker-{n}.err").open("wb"),
                )
                for n in range(workers)
            ]
            engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.NullPool)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    with engine.connect() as conn:
                        done = conn.execute(
                            sa.text(
                                "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'todo' "
                                "AND status <> 'doing' AND task_name = 'adsync.sync_account'"
                            )
                        ).scalar_one()
                    if done >= accounts:
                        break
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        raise RuntimeError(
                            "workers did not finish:\n"
                            + (tmp / "worker-0.err").read_text(errors="replace")[-3000:]
                        )
                    time.sleep(0.2)
                since_launch = time.monotonic() - launched
                figures = [_proc_figures(p.pid) for p in procs]
                with engine.connect() as conn:
                    row = conn.execute(
                        sa.text(
                            "SELECT (SELECT min(at) FROM procrastinate_events WHERE type = 'started'"
                            "  AND job_id IN (SELECT id FROM procrastinate_jobs"
                            "  WHERE task_name = 'adsync.sync_account')) AS first_start, "
                            "(SELECT max(finished_at) FROM sync_runs) AS last_end, "
                            "(SELECT count(*) FROM sync_runs WHERE status = 'succeeded') AS ok, "
                            "(SELECT count(*) FROM campaigns) AS rows"
                        )
                    ).one()
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait(60)
                engine.dispose()
            stats = sim_stats(sim_url)["clients"]
    counted = [int(s["requests"]) for s in stats.values()]
    r429 = sum(int(s["rate_limited"]) for s in stats.values())
    needed = campaigns + -(-campaigns // PAGE)
    floor_ideal = floor_seconds(needed, limit, window, sync_delay)
    floor_worst = floor_seconds(max(counted), limit, window, sync_delay)
    wall = (row.last_end - row.first_start).total_seconds()
    sent = sum(counted) + r429
    return {
        "wall": wall,
        "since_launch": since_launch,
        # As bench/many_accounts.py: the floor of the account that needed most requests.
        "floor": floor_worst,
        "ratio": wall / floor_worst,
        "floor_ideal": floor_ideal,
        "ratio_ideal": wall / floor_ideal,
        "succeeded": int(row.ok),
        "rows": int(row.rows),
        "requests": sum(counted),
        "r429": r429,
        "max_in_window": max(int(s["max_in_window"]) for s in stats.values()),
        "rss_mib": [round(f[1], 1) for f in figures],
        "cpu_per_1000": sum(f[0] for f in figures) / sent * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--campaigns", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="default: all accounts at once"
    )
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--sync-delay", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--calm", action="store_true", help="no 503s, no hangs")
    args = parser.parse_args()
    r = run_workers(
        accounts=args.accounts,
        campaigns=args.campaigns,
        workers=args.workers,
        concurrency=args.concurrency,
        limit=args.limit,
        window=args.window,
        sync_delay=args.sync_delay,
        seed=args.seed,
        calm=args.calm,
    )
    print(
        f"{args.accounts} accounts x {args.campaigns} campaigns on {args.workers} workers, "
        f"limit {args.limit} per {args.window}s, sync delay {args.sync_delay}s, "
        f"{'calm' if args.calm else '20% 503 on lists, 10% hangs'}, seed {args.seed}"
    )
    print(
        f"wall {r['wall']:.2f}s (first job start -> last run end; {r['since_launch']:.2f}s from "
        f"launching the workers)  single-account floor {r['floor']:.2f}s (the account that "
        f"needed most requests) -> ratio {r['ratio']:.3f}  |  fault-free floor "
        f"{r['floor_ideal']:.2f}s -> ratio {r['ratio_ideal']:.3f}"
    )
    print(
        f"{r['succeeded']}/{args.accounts} runs succeeded, {r['rows']} campaign rows, "
        f"{r['requests']} requests counted, {r['r429']} 429s, window max {r['max_in_window']}/"
        f"{args.limit}, peak RSS per worker {r['rss_mib']} MiB, worker CPU "
        f"{r['cpu_per_1000']:.2f}s per 1,000 requests"
    )


if __name__ == "__main__":
    main()
