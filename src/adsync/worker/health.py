"""What a worker's ``/healthz`` reports, and the watches that keep it up to date.

Healthy: its event loop turns and its database answers. The accounts it cannot
serve are listed too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import procrastinate
import structlog

from adsync.clock import Clock, SystemClock
from adsync.metrics import WorkerMetrics
from adsync.worker.queue import db_error_name

if TYPE_CHECKING:
    from adsync.worker.runtime import WorkerRuntime

__all__ = ["Health", "watch_accounts", "watch_health"]

log = structlog.get_logger("adsync.worker")


@dataclass(slots=True)
class Health:
    """What ``/healthz`` reports: is the event loop turning, is the database answering.

    Written on the event loop (:func:`watch_health`, the accounts check), read by the
    metrics server's threads (:class:`adsync.metrics.MetricsServer`). The loop and the
    database are watched apart, so a database that hangs is reported as such, not as
    a silent loop. Its times are ``clock``'s monotonic ones; the watches that write
    it keep time and sleep by the same clock.
    """

    max_silence: float
    clock: Clock = field(default_factory=SystemClock)
    loop_at: float | None = None
    db_ok_at: float | None = None
    db_error: str | None = None
    # When the database check now waiting for its answer was sent.
    db_asked_at: float | None = None
    stopping: bool = False
    # Enabled accounts this worker cannot serve, with why (their jobs go to other workers).
    unservable: dict[str, str] = field(default_factory=dict)

    def tick(self) -> None:
        """The event loop is turning."""
        self.loop_at = self.clock.monotonic()

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): unhealthy when the loop or the database is silent too long.

        Accounts this worker cannot serve are listed but leave it healthy: it still
        serves the others, and restarting it would not bring their secrets.
        """
        now = self.clock.monotonic()
        loop_age = None if self.loop_at is None else now - self.loop_at
        db_age = None if self.db_ok_at is None else now - self.db_ok_at
        problems: list[str] = []
        if loop_age is None:
            problems.append("worker loop not started")
        elif loop_age > self.max_silence:
            problems.append(f"worker loop silent for {loop_age:.0f}s")
        if db_age is None or db_age > self.max_silence:
            if self.db_asked_at is not None and now - self.db_asked_at > self.max_silence:
                why = f"no reply for {now - self.db_asked_at:.0f}s"
            else:
                why = self.db_error or "no answer yet"
            problems.append(f"database not answering ({why})")
        unservable = dict(self.unservable)
        status = "unhealthy" if problems else "degraded" if unservable else "ok"
        body: dict[str, Any] = {
            "status": status,
            "problems": problems,
            "loop_age_seconds": None if loop_age is None else round(loop_age, 3),
            "database_age_seconds": None if db_age is None else round(db_age, 3),
            "stopping": self.stopping,
            "unservable_accounts": unservable,
        }
        return not problems, body


async def watch_health(
    app: procrastinate.App, health: Health, metrics: WorkerMetrics, every: float
) -> None:
    """Tick the loop timestamp and check the database every ``every`` seconds, forever.

    Two tasks: a database check that hangs (a stopped proxy, a server that accepts
    and never answers) must not stop the loop's ticks, or ``/healthz`` would blame
    the loop for the database's silence. Time and waits are ``health.clock``'s.
    """
    clock = health.clock

    async def ticks() -> None:
        while True:
            health.tick()
            metrics.loop_time.set(clock.wall())
            await clock.sleep(every)

    ticking = asyncio.create_task(ticks(), name="health-ticks")
    # Generous: a slow answer is still an answer. Past it, a check on a connection
    # that died silently is given up for a new one.
    patience = max(30.0, 3 * every)
    try:
        while True:
            if health.db_asked_at is None:
                health.db_asked_at = clock.monotonic()
            try:
                async with asyncio.timeout(patience):
                    ok = await app.check_connection_async()
            except TimeoutError:
                # Still no reply: db_asked_at keeps the time of the first question.
                ok, health.db_error = False, "no reply"
            except Exception as exc:  # noqa: BLE001 - any failure means "not answering"; keep watching
                ok, health.db_error, health.db_asked_at = False, db_error_name(exc), None
            else:
                health.db_error = None if ok else "procrastinate tables missing"
                health.db_asked_at = None
            if ok:
                health.db_ok_at = clock.monotonic()
            metrics.database_up.set(1 if ok else 0)
            await clock.sleep(every)
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)


# A password file can become readable (or not) without the accounts file changing.
_ACCOUNTS_RECHECK: Final = 60.0


async def watch_accounts(runtime: WorkerRuntime, health: Health, *, every: float) -> None:
    """Check the accounts' secrets again whenever the accounts file changes, forever.

    Also once a minute, and ``/healthz`` gets what the checks and the jobs found.
    Time and waits are ``health.clock``'s.
    """
    clock = health.clock
    seen: tuple[int, int, int] | None = None
    checked = clock.monotonic()
    while True:
        await clock.sleep(every)
        signature = _file_signature(runtime.accounts_file)
        if signature != seen or clock.monotonic() - checked >= _ACCOUNTS_RECHECK:
            if seen is not None and signature != seen:
                log.info("accounts file changed; checking its accounts' secrets")
            seen, checked = signature, clock.monotonic()
            # Reads every secret (files, the environment): off the event loop.
            await asyncio.to_thread(runtime.check_accounts)
        health.unservable = runtime.unservable


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
