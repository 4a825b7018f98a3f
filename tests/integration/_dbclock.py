"""A stand-in for the database's clock, for tests of leases and run times.

The store reads the time of its leases, runs and rate log from the database
(``SqlStore(now=...)`` replaces that clock); a test sets ``at`` and moves it.
"""

from __future__ import annotations

from datetime import datetime


class DbClock:
    """The database's clock as a test sets it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at
