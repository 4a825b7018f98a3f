"""How much the shared rate log (``rate_sends``) costs, on SQLite and PostgreSQL.

Two figures per database:

* ``reserve()`` latency, one caller, one client id (the cost of one send's
  transaction: lock, housekeeping delete, window read, insert, commit);
* many accounts in one process: ``--accounts`` rate budgets, each sending at
  about ``--rate`` requests per second through the real path
  (``RateBudget.acquire`` -> ``SendLogBatcher`` -> ``SqlSendLog.reserve_many``),
  for ``--seconds``, all accounts starting together (the worst burst): sends per
  second against the target, process CPU per send, reservations per transaction,
  and the time each send spent in the log (thread hand-off included).

    python bench/rate_log.py [--postgres postgresql://postgres@127.0.0.1/postgres]
        [--accounts 100] [--rate 5] [--seconds 10]

Never a pass/fail: the figures are for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from adsync.clock import SystemClock
from adsync.ratelimit import RateBudget, SendLogBatcher
from adsync.sendlog import Reservation, SendChange, SendRequest
from adsync.store import SqlSendLog, SqlStore, make_owner


class TimedLog:
    """A SharedSendLog that counts batches and refusals."""

    def __init__(self, inner: SqlSendLog) -> None:
        self.inner = inner
        self.refused = 0
        self.batches = 0
        self.reservations = 0

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        answers = self.inner.reserve_many(requests, changes)
        self.batches += 1
        self.reservations += len(answers)
        self.refused += sum(1 for a in answers if not a.ok)
        return answers


async def _ready() -> None:
    return None


def percentiles(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return "n/a"
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"


def single_caller(store: SqlStore, n: int) -> None:
    log = store.send_log()
    owner = make_owner()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        log.reserve("solo", owner, span=0.02, limit=10**6, spacing=0.0)
        times.append(time.perf_counter() - started)
    print(f"  reserve(), one caller, {n} calls: {percentiles(times)}")


async def many_accounts(store: SqlStore | None, accounts: int, rate: float, seconds: float) -> None:
    clock = SystemClock()
    timed = TimedLog(store.send_log()) if store is not None else None
    batcher = SendLogBatcher(timed) if timed is not None else None
    in_log: list[float] = []
    sent = 0

    async def account(i: int) -> None:
        nonlocal sent
        # A window of one second holding ``rate`` sends: about ``rate`` per second.
        budget = RateBudget(
            max(1, round(rate)),
            1.0,
            clock,
            shared=batcher,
            client_id=f"acct-{i}",
            owner=make_owner(),
        )
        budget.observe_rtt(0.02)
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            before = budget.waited_seconds
            started = time.monotonic()
            await budget.acquire(_ready)
            in_log.append(time.monotonic() - started - (budget.waited_seconds - before))
            sent += 1

    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(account(i) for i in range(accounts)))
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    target = accounts * rate
    print(
        f"  {accounts} accounts x {rate:g}/s for {seconds:g} s: {sent / elapsed:.0f} sends/s "
        f"(target {target:.0f}/s), CPU {cpu / sent * 1000:.3f} ms per send, "
        f"log refusals {timed.refused if timed else 'n/a'}"
    )
    if timed is not None:
        print(
            f"  {timed.reservations} reservations in {timed.batches} transactions "
            f"({timed.reservations / max(1, timed.batches):.1f} per transaction)"
        )
    print(f"  time per send in the log (thread hand-off included): {percentiles(in_log)}")


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    name = f"adsync_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{admin_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def bench(url: str, label: str, args: argparse.Namespace) -> None:
    store = SqlStore.from_url(url)
    store.upgrade()
    try:
        print(label)
        single_caller(store, args.calls)
        asyncio.run(many_accounts(store, args.accounts, args.rate, args.seconds))
    finally:
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    print("No shared log (the in-memory budget alone)")
    asyncio.run(many_accounts(None, args.accounts, args.rate, args.seconds))
    with tempfile.TemporaryDirectory() as tmp:
        bench(f"sqlite:///{Path(tmp) / 'bench.db'}", "SQLite (file, WAL)", args)
    with postgres_database(args.postgres) as url:
        bench(url, "PostgreSQL", args)


if __name__ == "__main__":
    main()
