"""Shared pieces of the benchmarks: a simulator in its own process, and figures."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def simulator_process(**knobs: Any) -> Iterator[str]:
    """``adsync simulate`` in a child process (so it never shares our GIL); yields its URL."""
    port = free_port()
    args = [sys.executable, "-m", "adsync.cli", "simulate", "--port", str(port)]
    for key, value in knobs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"simulator did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sim_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(url + "/_sim/stats", timeout=5).json()
    return stats


def floor_seconds(requests: int, limit: int, window: float, last_latency: float) -> float:
    """PLATFORM_API.md's floor: floor((N - 1) / R) * W plus the last call's latency."""
    return math.floor((requests - 1) / limit) * window + last_latency
