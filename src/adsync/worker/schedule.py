"""The worker's cron strings (the accounts' schedule, the recovery) and their next ticks."""

from __future__ import annotations

from typing import Final

from adsync.errors import ConfigError

__all__ = ["PRUNE_CRON", "next_ticks", "recovery_cron", "schedule_cron"]

# The clean-up of old jobs: hourly, off the hour (the retention is counted in hours).
PRUNE_CRON: Final = "17 * * * *"

_MINUTE_STEPS = "1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60"


def schedule_cron(minutes: int) -> str | None:
    """A cron string for "every ``minutes`` minutes"; ``None`` when 0 (no schedule).

    Cron can only step evenly through an hour or a day, so other intervals are refused
    rather than drifting (``*/45`` would fire at :00 and :45, 15 minutes apart).
    """
    if minutes == 0:
        return None
    if minutes > 0 and 60 % minutes == 0:
        return "0 * * * *" if minutes == 60 else f"*/{minutes} * * * *"
    if minutes > 0 and minutes % 60 == 0 and 1440 % minutes == 0:
        hours = minutes // 60
        return "0 0 * * *" if hours == 24 else f"0 */{hours} * * *"
    raise ConfigError(
        f"ADSYNC_SCHEDULE_MINUTES={minutes} is not an even step of cron: use 0 (off), "
        f"{_MINUTE_STEPS}, or whole hours that divide a day (120, 180, 240, 360, 480, 720, 1440)"
    )


def recovery_cron(seconds: int) -> str:
    """A cron string for "every ``seconds`` seconds".

    Procrastinate's croniter reads a sixth field as seconds and expects it *last*:
    ``* * * * * */5`` is every 5 seconds, while ``*/5 * * * * *`` would be every
    second of every fifth minute.
    """
    if 0 < seconds < 60 and 60 % seconds == 0:
        return f"* * * * * */{seconds}"
    if seconds >= 60 and seconds % 60 == 0:
        cron = schedule_cron(seconds // 60)
        if cron is not None:
            return cron
    raise ConfigError(
        f"ADSYNC_RECOVERY_EVERY_SECONDS={seconds} is not an even step of cron: use a divisor "
        "of 60 or a whole number of minutes that divides an hour"
    )


def next_ticks(minutes: int, now: float, count: int = 3) -> list[float]:
    """The next ``count`` Unix times a schedule of ``minutes`` fires after ``now``.

    The cron steps of :func:`schedule_cron` divide an hour or a day evenly, and
    Procrastinate's croniter counts in UTC, so they fall on multiples of the step
    since the epoch.
    """
    step = minutes * 60
    first = (int(now // step) + 1) * step
    return [float(first + i * step) for i in range(count)]
