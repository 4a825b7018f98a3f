"""Run the simulator on a free loopback port, for tests and benchmarks.

The server runs its own event loop in a background thread, so the same context
manager serves sync tests and async tests alike::

    from collections.abc import Iterator

    import httpx
    import pytest

    from adsync.simulator.testing import SimulatorHandle, running_simulator


    @pytest.fixture
    def simulator() -> Iterator[SimulatorHandle]:
        with running_simulator(
            rate_limit=5, rate_window=0.5, sync_delay=0.01, error_rate=0, hang_rate=0, seed=7
        ) as sim:
            yield sim


    async def test_health(simulator: SimulatorHandle) -> None:
        async with httpx.AsyncClient(base_url=simulator.url) as client:
            assert (await client.get("/health")).status_code == 200
        assert simulator.stats()["tokens_issued"] == 0

Knobs are the fields of :class:`~adsync.simulator.config.SimulatorConfig`
(``accounts`` may also be a path or a list of dicts); unset ones keep the
production defaults, so pass ``error_rate=0, hang_rate=0`` for a calm platform.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx

from adsync.simulator.app import build_server
from adsync.simulator.config import SimulatorConfig, build_config

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SimulatorHandle:
    """A running simulator: where it is, how it is set up, and its control plane."""

    url: str
    port: int
    config: SimulatorConfig

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``."""
        with httpx.Client(base_url=self.url, trust_env=False, timeout=5.0) as client:
            response = client.get("/_sim/stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    def reset(self, *, tokens: bool = False) -> None:
        """``POST /_sim/reset``: clear stats, windows and fault streams (and tokens)."""
        with httpx.Client(base_url=self.url, trust_env=False, timeout=5.0) as client:
            response = client.post("/_sim/reset", params={"tokens": "1" if tokens else "0"})
            response.raise_for_status()


def _serve_from_stdin() -> None:
    """The body of a simulator process (see ``running_simulator(process=True)``).

    The parent pickles the knobs and the number of the listening socket's file
    descriptor (inherited at the same number) to stdin.
    """
    knobs, fd = pickle.load(sys.stdin.buffer)  # noqa: S301 - from our own parent process
    config = build_config(**knobs)
    server = build_server(
        config, log_level="warning", access_log=False, log_config=None, loop="asyncio"
    )
    sock = socket.socket(fileno=fd)
    # uvicorn stops on SIGTERM in a main thread; the server releases hangs first.
    server.run(sockets=[sock])


def _wait_until_serving(url: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    with httpx.Client(base_url=url, trust_env=False, timeout=1.0) as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health").status_code == HTTPStatus.OK:
                    return
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not start at {url}")
            time.sleep(0.02)


@contextmanager
def running_simulator(*, process: bool = False, **knobs: Any) -> Iterator[SimulatorHandle]:
    """Start the simulator with ``knobs`` on 127.0.0.1 (a free port unless given); stop on exit.

    By default the server runs in a thread of this process. With ``process=True``
    it runs in a child process instead, so that it never waits for this process's
    GIL: its arrival stamps then lag the client's sends by the network's delay,
    not by however long the client keeps the interpreter busy. Tests that hold the
    client to the exact window with short windows want that.

    Stopping releases hanging requests first, so it takes well under a second.
    """
    host = knobs.pop("host", "127.0.0.1")
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets that do, and
    # without it every response on a kept-alive connection waits ~40 ms for
    # Nagle and delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, knobs.pop("port", 0)))
        port: int = sock.getsockname()[1]
        config = build_config(host=host, port=port, **knobs)
        handle = SimulatorHandle(url=f"http://{host}:{port}", port=port, config=config)
        serving = (
            _in_process(handle, sock, {"host": host, "port": port, **knobs})
            if process
            else _in_thread(handle, sock)
        )
        with serving:
            yield handle
    finally:
        sock.close()


@contextmanager
def _in_thread(handle: SimulatorHandle, sock: socket.socket) -> Iterator[None]:
    server = build_server(
        handle.config, log_level="warning", access_log=False, log_config=None, loop="asyncio"
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"simulator:{handle.port}", daemon=True
    )
    thread.start()
    try:
        _wait_until_serving(handle.url, thread.is_alive)
        yield
    finally:
        server.should_exit = True
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_STOP_TIMEOUT)


@contextmanager
def _in_process(
    handle: SimulatorHandle, sock: socket.socket, knobs: dict[str, Any]
) -> Iterator[None]:
    # A fresh interpreter (not fork: this process may have threads, and not
    # multiprocessing's spawn, which re-imports the caller's __main__).
    code = "from adsync.simulator.testing import _serve_from_stdin; _serve_from_stdin()"
    child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        pass_fds=(sock.fileno(),),
    )
    try:
        with child.stdin as stdin:  # type: ignore[union-attr]  # stdin=PIPE above
            stdin.write(pickle.dumps((knobs, sock.fileno())))
        _wait_until_serving(handle.url, lambda: child.poll() is None)
        yield
    finally:
        child.terminate()
        try:
            child.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(_STOP_TIMEOUT)
