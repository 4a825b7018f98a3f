"""A full disk is an outage, not bad data: the run fails resumable and costs no campaign.

SQLite is made to run out of space with ``PRAGMA max_page_count`` on the
connections (no real full disk needed): capped at the pages the file has when the
first campaign is written, lifted again when "space is back".
"""

from __future__ import annotations

from typing import Any

import pytest
from _client_standin import StandIn, campaign, job
from sqlalchemy import event

from adsync.models import RunStatus
from adsync.store import SqlStore

pytestmark = pytest.mark.timeout(60)

TOTAL = 60
ROOMY = 1_073_741_823  # SQLite's default cap


def fill_up_at_the_first_campaign_write(store: SqlStore) -> dict[str, Any]:
    """From the first write to ``campaigns`` on, the file cannot grow until ``disk["full"]`` is off."""
    disk: dict[str, Any] = {"full": True, "pages": None}

    @event.listens_for(store.engine, "before_cursor_execute")
    def cap(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if disk["pages"] is None:
            if not statement.startswith("INSERT INTO campaigns"):
                return
            disk["pages"] = cursor.execute("PRAGMA page_count").fetchone()[0]
        pages = disk["pages"] if disk["full"] else ROOMY
        cursor.execute(f"PRAGMA max_page_count = {pages}")

    return disk


async def test_a_full_disk_fails_the_run_resumable_and_the_resumed_run_syncs_everything(
    sqlite_url: str,
) -> None:
    store = SqlStore.from_url(sqlite_url, sleep=lambda _s: None, retry_attempts=2)
    try:
        store.upgrade()
        disk = fill_up_at_the_first_campaign_write(store)
        # Long names: every campaign needs room the file no longer has.
        campaigns = [campaign(i, name=f"{i} " + "x" * 3_000) for i in range(1, TOTAL + 1)]
        platform = StandIn(campaigns)

        failed = await job(platform, store).run()
        assert disk["pages"] is not None  # the disk really did fill up
        assert failed.status is RunStatus.FAILED
        assert "SQLITE_FULL" in (failed.error or "")
        # Nothing is blamed on a campaign: the next run must sync every one of them.
        assert [f.kind for f in failed.failures] == []
        assert store.run_failures(failed.run_id) == []
        record = store.get_run(failed.run_id)
        assert record is not None
        assert (record.status, record.resumable) == (RunStatus.FAILED, True)

        disk["full"] = False
        resumed = await job(platform, store).run()
        assert resumed.run_id == failed.run_id
        assert resumed.resumed
        assert resumed.status is RunStatus.SUCCEEDED
        assert (resumed.counters.synced, resumed.counters.failed) == (TOTAL, 0)
        assert store.count_campaigns("acme") == TOTAL
        assert store.count_snapshots("acme") == TOTAL
        checkpoint = store.checkpoint(failed.run_id)
        assert checkpoint.failed == frozenset()
        assert len(checkpoint.synced) == TOTAL
    finally:
        store.dispose()
