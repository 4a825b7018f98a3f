"""How long ``adsync`` takes to start: ``--help``, ``status``, and a sync's first request.

Three figures, each the median of ``--runs`` fresh processes (after one
untimed run that warms the disk cache and the bytecode):

* ``adsync --help``: from just before the process is spawned to its exit;
* ``adsync status`` on an empty, migrated SQLite file: the same;
* ``adsync sync``: from just before the process is spawned to the arrival of
  its first request at the platform. The platform is a tiny stand-in HTTP
  server in a process of its own (it grants a token and lists no campaigns, so
  every sync succeeds at once); it stamps each arrival with the system-wide
  monotonic clock, the one this process stamps the spawn with. Each sync gets
  a fresh copy of a migrated SQLite file, as a scheduled sync finds its
  database.

    python bench/startup.py [--runs 10]

Never a pass/fail: the figures and the targets are for reading.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TARGETS = {"help": 0.35, "status": 0.5, "first_request": 0.6}


# --- the stand-in platform (runs as ``startup.py --stand-in``) ---------------------------


class _Platform(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    first: float | None = None

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _arrived(self) -> None:
        now = time.monotonic()
        if _Platform.first is None:
            _Platform.first = now

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path == "/_reset":
            _Platform.first = None
            self._answer(200, {})
            return
        self._arrived()
        if self.path == "/auth/token":
            self._answer(
                200,
                {
                    "access_token": "stand-in-token",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "issued_at": int(time.time()),
                },
            )
        else:
            self._answer(404, {"error": "Not found"})

    def do_GET(self) -> None:
        if self.path == "/_first":
            self._answer(200, {"first": _Platform.first})
            return
        self._arrived()
        if self.path.startswith("/api/campaigns"):
            pagination = {"page": 1, "limit": 10, "total": 0, "has_more": False}
            self._answer(200, {"data": [], "pagination": pagination})
        else:
            self._answer(404, {"error": "Not found"})

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_stand_in() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Platform)
    print(server.server_address[1], flush=True)
    server.serve_forever()


@contextmanager
def stand_in_platform() -> Iterator[str]:
    """The stand-in platform in a process of its own; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--stand-in"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.terminate()
        proc.wait(10)


def _call(url: str, method: str = "GET") -> dict[str, Any]:
    # Our own stand-in on the loopback, over http: no other scheme reaches here.
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        answer: dict[str, Any] = json.load(response)
        return answer


# --- the measurements --------------------------------------------------------------------


def adsync_command() -> list[str]:
    """The console script installed beside this interpreter, as a user runs it."""
    script = Path(sys.executable).parent / "adsync"
    return [str(script)] if script.exists() else [sys.executable, "-m", "adsync.cli"]


def clean_env(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AD_PLATFORM_", "ADSYNC_")) and k != "DATABASE_URL"
    }
    env.update(values)
    return env


def run(args: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from just before spawning ``adsync ARGS`` to its exit (which must be 0)."""
    started = time.monotonic()
    done = subprocess.run(
        adsync_command() + args, env=env, cwd=cwd, capture_output=True, check=False
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"adsync {' '.join(args)} exited {done.returncode}: {done.stderr!r}")
    return elapsed


def first_request(platform: str, template: Path, work: Path, n: int) -> float:
    """Seconds from just before spawning ``adsync sync`` to its first request's arrival."""
    database = work / f"sync-{n}.db"
    shutil.copyfile(template, database)
    env = clean_env(
        AD_PLATFORM_API_URL=platform,
        AD_PLATFORM_EMAIL="bench@example.com",
        AD_PLATFORM_PASSWORD="bench-password",
        AD_PLATFORM_CLIENT_ID="startup",
        DATABASE_URL=f"sqlite:///{database}",
    )
    _call(platform + "/_reset", "POST")
    started = time.monotonic()
    run(["sync"], env, work)
    first = _call(platform + "/_first")["first"]
    if first is None:
        raise RuntimeError("adsync sync made no request")
    return float(first) - started


def measure(name: str, sample: Callable[[int], float], runs: int) -> list[float]:
    sample(-1)  # warm-up, not counted
    figures = [sample(i) for i in range(runs)]
    median = statistics.median(figures)
    print(
        f"{name:44} median {median:6.3f}s  (min {min(figures):.3f}, max {max(figures):.3f})"
        f"  target <= {TARGETS[name.split(maxsplit=1)[0]]:.2f}s"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_in:
        serve_stand_in()
        return
    print(f"adsync start-up, median of {args.runs} runs each ({' '.join(adsync_command())})")
    with tempfile.TemporaryDirectory(prefix="adsync-startup-") as tmp, stand_in_platform() as url:
        work = Path(tmp)
        template = work / "empty.db"
        run(["db", "upgrade"], clean_env(DATABASE_URL=f"sqlite:///{template}"), work)
        status_env = clean_env(DATABASE_URL=f"sqlite:///{template}")
        measure("help (adsync --help)", lambda _: run(["--help"], clean_env(), work), args.runs)
        measure(
            "status (adsync status, empty SQLite)",
            lambda _: run(["status"], status_env, work),
            args.runs,
        )
        measure(
            "first_request (adsync sync, to 1st request)",
            lambda n: first_request(url, template, work, n),
            args.runs,
        )


if __name__ == "__main__":
    main()
