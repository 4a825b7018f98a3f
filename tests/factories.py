"""Campaign values for store tests: valid by default, any field changed by name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from adsync.models import Campaign, SyncedCampaign

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def campaign(cid: str, **changes: Any) -> Campaign:
    values: dict[str, Any] = {
        "id": cid,
        "name": f"Campaign {cid}",
        "status": "active",
        "budget": 100.0,
        "impressions": 1_000,
        "clicks": 10,
        "conversions": 1,
        "created_at": datetime(2024, 1, 1, tzinfo=UTC),
    }
    values.update(changes)
    return Campaign(**values)


def synced(cid: str, at: datetime = T0, **changes: Any) -> SyncedCampaign:
    return SyncedCampaign(campaign=campaign(cid, **changes), synced_at=at)
