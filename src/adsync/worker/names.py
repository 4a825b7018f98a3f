"""The names adsync gives things in Procrastinate's queue: queues, tasks, account locks.

Apart from :mod:`adsync.worker.queue`, which loads Procrastinate, so that what only
reads the queue's tables (``adsync jobs``) can name them without it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "PRUNE_TASK",
    "QUEUE_MAINTENANCE",
    "QUEUE_SYNC",
    "RECOVER_TASK",
    "SCHEDULE_TASK",
    "SYNC_TASK",
    "account_lock",
]

QUEUE_SYNC: Final = "adsync-sync"
QUEUE_MAINTENANCE: Final = "adsync-maintenance"
SYNC_TASK: Final = "adsync.sync_account"
SCHEDULE_TASK: Final = "adsync.schedule"
RECOVER_TASK: Final = "adsync.recover_stalled"
PRUNE_TASK: Final = "adsync.remove_old_jobs"


def account_lock(client_id: str) -> str:
    """The lock and queueing lock of an account's sync jobs."""
    return f"adsync:account:{client_id}"
