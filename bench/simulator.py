"""How many list requests per second the simulator sustains with limits and faults off.

The simulator must never be the bottleneck of later benchmarks (target: 1,000
requests/s). It runs in its own process, hammered over httpx by client
processes of their own; since an httpx request costs the client several times
what it costs the simulator, the simulator's own CPU time per request is also
printed, which gives its capacity whatever the client.

    python bench/simulator.py [--requests 5000] [--concurrency 50] [--limit 10]
                              [--client-processes 2]

Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import httpx

from adsync.simulator.app import build_server
from adsync.simulator.config import DEFAULT_EMAIL, DEFAULT_PASSWORD, build_config

CALM: dict[str, Any] = {
    "rate_limit": 1_000_000_000,
    "error_rate": 0.0,
    "hang_rate": 0.0,
    "sync_delay": 0.0,
    "seed": 1,
}
# One httpx pool slows down as it grows (its connection bookkeeping is linear
# in the pool size), so workers are spread over small clients.
CONNECTIONS_PER_CLIENT = 8
_SPAWN = multiprocessing.get_context("spawn")


def _serve(port: int) -> None:
    config = build_config(port=port, **CALM)
    build_server(config, log_level="warning", access_log=False).run()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used (Linux only)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of proc(5): 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _simulator_process() -> Iterator[tuple[str, int]]:
    port = _free_port()
    process = _SPAWN.Process(target=_serve, args=(port,))
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1.0, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or not process.is_alive():
                    raise
                time.sleep(0.05)
        assert process.pid is not None
        yield url, process.pid
    finally:
        process.terminate()
        process.join(10)


async def _hammer(url: str, requests: int, concurrency: int, limit: int) -> list[float]:
    clients = [
        httpx.AsyncClient(
            base_url=url,
            limits=httpx.Limits(
                max_connections=CONNECTIONS_PER_CLIENT,
                max_keepalive_connections=CONNECTIONS_PER_CLIENT,
            ),
            trust_env=False,
        )
        for _ in range(-(-concurrency // CONNECTIONS_PER_CLIENT))
    ]
    try:
        token = (
            await clients[0].post("/auth/token", auth=(DEFAULT_EMAIL, DEFAULT_PASSWORD))
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "X-Client-ID": f"bench-{os.getpid()}"}
        latencies: list[float] = []
        remaining = iter(range(requests))

        async def worker(client: httpx.AsyncClient) -> None:
            for number in remaining:
                started = time.perf_counter()
                response = await client.get(
                    "/api/campaigns",
                    params={"page": number % 10 + 1, "limit": limit},
                    headers=headers,
                )
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text

        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
        return latencies
    finally:
        for client in clients:
            await client.aclose()


def _client_process(
    url: str,
    *,
    requests: int,
    concurrency: int,
    limit: int,
    start: Barrier,
    results: Queue[Any],
) -> None:
    asyncio.run(_hammer(url, 100, concurrency, limit))  # connections, imports, caches
    start.wait()
    # CLOCK_MONOTONIC is system-wide on Linux, so stamps compare across processes.
    began = time.monotonic()
    latencies = asyncio.run(_hammer(url, requests, concurrency, limit))
    results.put((began, time.monotonic(), latencies))


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--limit", type=int, default=10, help="campaigns per page")
    parser.add_argument("--client-processes", type=int, default=2)
    args = parser.parse_args()
    processes = max(1, args.client_processes)

    with _simulator_process() as (url, pid):
        start = _SPAWN.Barrier(processes + 1)
        results: Queue[Any] = _SPAWN.Queue()
        clients = [
            _SPAWN.Process(
                target=_client_process,
                args=(url,),
                kwargs={
                    "requests": args.requests // processes,
                    "concurrency": max(1, args.concurrency // processes),
                    "limit": args.limit,
                    "start": start,
                    "results": results,
                },
            )
            for _ in range(processes)
        ]
        for client in clients:
            client.start()
        start.wait()
        cpu_before = _cpu_seconds(pid)
        outcomes = [results.get(timeout=600) for _ in clients]
        cpu_after = _cpu_seconds(pid)
        for client in clients:
            client.join(10)

    elapsed = max(end for _, end, _ in outcomes) - min(began for began, _, _ in outcomes)
    latencies = sorted(latency for _, _, batch in outcomes for latency in batch)
    print(
        f"simulator: GET /api/campaigns limit={args.limit}, {len(latencies)} requests over "
        f"httpx from {processes} client process(es), concurrency {args.concurrency}: "
        f"{len(latencies) / elapsed:,.0f} requests/s "
        f"(p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms)"
    )
    if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
        per_request = (cpu_after - cpu_before) / len(latencies)
        print(
            f"simulator CPU: {per_request * 1e6:,.0f} us per request, so one core serves "
            f"about {1 / per_request:,.0f} requests/s whatever the client"
        )


if __name__ == "__main__":
    main()
