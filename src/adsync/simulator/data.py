"""Deterministic campaign data for one account.

Everything about a campaign derives from ``(seed, account, index)``, so the same
seed serves the same campaigns whatever order they are read in. The performance
counters grow on every read, as the real platform's do between two syncs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

# Names that break naive storage code: quoting, multi-byte text, SQL injection,
# LIKE wildcards and backslashes. Placed at fixed low indices so that even a
# small account shows them and tests can find them without scanning.
SPECIAL_NAMES: Final[dict[int, str]] = {
    3: 'O\'Brien "Summer" Sale',
    5: "Café ☕ 夏季促销 🚀",
    7: "'; DROP TABLE campaigns; --",
    9: "100% off_sale \\ back\\slash",
}
# A status the contract does not list; clients must keep it as data, not fail.
RARE_STATUS: Final = "archived"
RARE_STATUS_INDEX: Final = 8
STATUSES: Final[tuple[str, ...]] = ("active", "paused", "ended")
_STATUS_WEIGHTS: Final[tuple[int, ...]] = (60, 25, 15)

# How a campaign listed in ``malformed_ids`` is broken; see :func:`malformation_for`.
MALFORMATIONS: Final[tuple[str, ...]] = (
    "budget_not_a_number",
    "missing_name",
    "negative_clicks",
    "bad_created_at",
)

_EPOCH: Final = datetime(2024, 1, 1, tzinfo=UTC)
_YEAR_MS: Final = 365 * 24 * 3600 * 1000
_ID_PATTERN: Final = re.compile(r"campaign_([1-9][0-9]*)")


def campaign_id(index: int) -> str:
    """The id of the campaign at 1-based ``index`` (ids repeat across accounts)."""
    return f"campaign_{index}"


def malformation_for(campaign: str) -> str:
    """Which way the payload of ``campaign`` is broken when it is in ``malformed_ids``.

    ``campaign_N`` gets ``MALFORMATIONS[N % 4]``, so consecutive ids cover every kind.
    """
    match = _ID_PATTERN.fullmatch(campaign)
    number = int(match.group(1)) if match else sum(campaign.encode())
    return MALFORMATIONS[number % len(MALFORMATIONS)]


@dataclass(slots=True)
class Campaign:
    """One campaign; only the counters change after creation."""

    id: str
    name: str
    status: str
    budget: int | float
    created_at: str
    impressions: int
    clicks: int
    conversions: int
    rng: random.Random

    def read(self) -> dict[str, Any]:
        """Grow the counters, as time passes between reads, and return the payload."""
        # random() is several times cheaper than randint(), and this runs ten
        # times per list request.
        draw = self.rng.random
        impressions = 1 + int(draw() * 500)
        clicks = int(draw() * (impressions // 10 + 1))
        self.impressions += impressions
        self.clicks += clicks
        self.conversions += int(draw() * (clicks // 4 + 1))
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "budget": self.budget,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "created_at": self.created_at,
        }


def malform(payload: dict[str, Any], how: str) -> dict[str, Any]:
    """Return ``payload`` broken in the way ``how`` (one of ``MALFORMATIONS``) names."""
    broken = dict(payload)
    if how == "budget_not_a_number":
        broken["budget"] = "n/a"
    elif how == "missing_name":
        del broken["name"]
    elif how == "negative_clicks":
        broken["clicks"] = -abs(int(broken["clicks"])) - 1
    elif how == "bad_created_at":
        broken["created_at"] = "yesterday"
    else:
        raise ValueError(f"unknown malformation {how!r}")
    return broken


class CampaignBook:
    """The campaigns of one account, created lazily on first use."""

    def __init__(self, seed: int, account: str, count: int) -> None:
        self._seed = seed
        self._account = account
        self.total = count
        self._campaigns: dict[int, Campaign] = {}

    def find(self, campaign: str) -> Campaign | None:
        """The campaign with id ``campaign`` in this account, or None."""
        match = _ID_PATTERN.fullmatch(campaign)
        if match is None:
            return None
        index = int(match.group(1))
        return self._get(index) if index <= self.total else None

    def page(self, page: int, limit: int) -> list[Campaign]:
        """Campaigns of 1-based ``page`` of size ``limit``; empty past the end."""
        first = (page - 1) * limit + 1
        last = min(self.total, first + limit - 1)
        return [self._get(index) for index in range(first, last + 1)]

    def _get(self, index: int) -> Campaign:
        campaign = self._campaigns.get(index)
        if campaign is None:
            campaign = self._campaigns[index] = self._create(index)
        return campaign

    def _create(self, index: int) -> Campaign:
        # A string seed is hashed with SHA-512, stable across runs and processes.
        rng = random.Random(f"{self._seed}|{self._account}|{index}")
        if index == RARE_STATUS_INDEX:
            status = RARE_STATUS
        else:
            status = rng.choices(STATUSES, weights=_STATUS_WEIGHTS)[0]
        budget: int | float
        if rng.random() < 0.2:
            budget = rng.randint(50_000, 5_000_000) / 100
        else:
            budget = rng.randint(10, 1000) * 50
        created = _EPOCH + timedelta(milliseconds=rng.randrange(_YEAR_MS))
        impressions = rng.randint(0, 200_000)
        clicks = rng.randint(0, impressions // 20)
        return Campaign(
            id=campaign_id(index),
            name=SPECIAL_NAMES.get(index, f"Campaign {index}"),
            status=status,
            budget=budget,
            created_at=created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            impressions=impressions,
            clicks=clicks,
            conversions=rng.randint(0, clicks // 5),
            rng=rng,
        )
