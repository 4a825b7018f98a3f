"""The simulator's pure parts: sliding window, fault dice, campaign data; and its app on a fake clock."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adsync.simulator.app import Simulator, create_app
from adsync.simulator.config import DEFAULT_EMAIL, DEFAULT_PASSWORD, build_config
from adsync.simulator.data import (
    MALFORMATIONS,
    RARE_STATUS,
    SPECIAL_NAMES,
    CampaignBook,
    malform,
    malformation_for,
)
from adsync.simulator.faults import (
    FaultDice,
    FaultKind,
    FaultRates,
    Roll,
    roll_fault,
)
from adsync.simulator.limiter import SlidingWindowLimiter

# -- limiter ------------------------------------------------------------------


def test_limiter_allows_up_to_the_limit_in_a_sliding_window() -> None:
    limiter = SlidingWindowLimiter(limit=2, window_ms=1000)
    assert limiter.acquire("a", 0).allowed
    second = limiter.acquire("a", 500)
    assert (second.allowed, second.in_window) == (True, 2)
    refused = limiter.acquire("a", 999)
    # The stamp at 0 leaves the window at 1000, one millisecond later.
    assert (refused.allowed, refused.wait_ms) == (False, 1)
    assert limiter.acquire("a", 1000).allowed  # a stamp one window old no longer counts
    assert not limiter.acquire("a", 1001).allowed  # 500 and 1000 are in (1, 1001]
    assert limiter.acquire("a", 1500).allowed


def test_refused_requests_take_no_slot() -> None:
    limiter = SlidingWindowLimiter(limit=1, window_ms=100)
    limiter.acquire("a", 0)
    for now in range(1, 100):
        assert not limiter.acquire("a", now).allowed
    assert limiter.acquire("a", 100).allowed


def test_limiter_keys_are_independent_and_reset_forgets() -> None:
    limiter = SlidingWindowLimiter(limit=1, window_ms=1000)
    assert limiter.acquire("a", 0).allowed
    assert limiter.acquire("b", 0).allowed
    assert not limiter.acquire("a", 1).allowed
    limiter.reset()
    assert limiter.acquire("a", 2).allowed


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=200))
def test_no_window_ever_holds_more_than_the_limit(gaps: list[int]) -> None:
    limiter = SlidingWindowLimiter(limit=3, window_ms=100)
    now, accepted = 0, []
    for gap in gaps:
        now += gap
        if limiter.acquire("k", now).allowed:
            accepted.append(now)
    for index, stamp in enumerate(accepted):
        assert sum(1 for other in accepted[index:] if other < stamp + 100) <= 3


# -- faults -------------------------------------------------------------------

CALM_ROLL = Roll(0.99, 0.99, 0.99, 0.5, 0.99, 0.99)
SURE_ROLL = Roll(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
ALL_RATES = FaultRates(hang=0.2, error=0.2, sync_error=0.2, reset=0.2, bad_json=0.2)


def test_roll_fault_follows_the_precedence() -> None:
    assert roll_fault(CALM_ROLL, ALL_RATES, "list").kind is FaultKind.NONE
    assert roll_fault(SURE_ROLL, ALL_RATES, "list").kind is FaultKind.HANG
    assert roll_fault(SURE_ROLL, ALL_RATES, "list", always_503=True).status == 503
    assert roll_fault(SURE_ROLL, ALL_RATES, "sync", fail_sync=True).status == 500
    no_hang = FaultRates(error=0.5, sync_error=0.5, reset=0.5, bad_json=0.5)
    assert roll_fault(SURE_ROLL, no_hang, "list").kind is FaultKind.UNAVAILABLE
    assert roll_fault(SURE_ROLL, no_hang, "sync").kind is FaultKind.SYNC_ERROR
    assert (
        roll_fault(SURE_ROLL, FaultRates(reset=0.1, bad_json=0.1), "sync").kind is FaultKind.RESET
    )
    assert roll_fault(SURE_ROLL, FaultRates(bad_json=0.1), "list").kind is FaultKind.BAD_JSON
    # Unknown /api paths only hang: they have no body to spoil.
    assert roll_fault(SURE_ROLL, no_hang, "other").kind is FaultKind.NONE
    # fail_sync is about sync calls only.
    assert roll_fault(CALM_ROLL, FaultRates(), "list", fail_sync=True).kind is FaultKind.NONE


def test_sync_error_statuses_cover_500_502_503() -> None:
    rates = FaultRates(sync_error=1.0)
    statuses = {
        roll_fault(Roll(0.9, 0.9, 0.0, pick, 0.9, 0.9), rates, "sync").status
        for pick in (0.0, 0.4, 0.7, 0.999999)
    }
    assert statuses == {500, 502, 503}


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        (FaultRates(hang=0.1, error=0.2), {"hang": 0.1, "unavailable": 0.2}),
        (
            FaultRates(hang=0.1, error=0.2, reset=0.05, bad_json=0.05),
            {"hang": 0.1, "unavailable": 0.2, "reset": 0.05, "bad_json": 0.05},
        ),
        (FaultRates(hang=0.6, error=0.6), {"hang": 0.6, "unavailable": 0.4}),
    ],
)
def test_rates_are_shares_of_all_requests(rates: FaultRates, expected: dict[str, float]) -> None:
    draws = random.Random(0)
    trials = 100_000
    tally = Counter(
        roll_fault(Roll(*(draws.random() for _ in range(6))), rates, "list").kind.value
        for _ in range(trials)
    )
    for kind, share in expected.items():
        assert tally[kind] / trials == pytest.approx(share, abs=0.006)


def test_dice_replay_per_seed_client_and_endpoint() -> None:
    def rolls(dice: FaultDice, client: str) -> list[Roll]:
        return [dice.roll(client, "list") for _ in range(5)]

    first, second, other_seed = FaultDice(1), FaultDice(1), FaultDice(2)
    assert rolls(first, "a") == rolls(second, "a")
    assert rolls(FaultDice(1), "a") != rolls(other_seed, "a")
    # Interleaving another client does not shift this one's sequence.
    dice = FaultDice(1)
    interleaved = []
    for _ in range(5):
        interleaved.append(dice.roll("a", "list"))
        dice.roll("b", "list")
        dice.roll("a", "sync")
    assert interleaved == rolls(FaultDice(1), "a")
    dice.reset()
    assert rolls(dice, "a") == rolls(FaultDice(1), "a")


# -- data ---------------------------------------------------------------------


def _snapshot(book: CampaignBook) -> list[dict[str, object]]:
    return [campaign.read() for campaign in book.page(1, book.total)]


def test_data_is_deterministic_per_seed_and_account() -> None:
    assert _snapshot(CampaignBook(5, "a@x", 20)) == _snapshot(CampaignBook(5, "a@x", 20))
    assert _snapshot(CampaignBook(5, "a@x", 20)) != _snapshot(CampaignBook(6, "a@x", 20))
    assert _snapshot(CampaignBook(5, "a@x", 20)) != _snapshot(CampaignBook(5, "b@x", 20))


def test_data_does_not_depend_on_read_order() -> None:
    forward, backward = CampaignBook(3, "a@x", 12), CampaignBook(3, "a@x", 12)
    for page in (1, 2, 3):
        forward.page(page, 4)
    for page in (3, 2, 1):
        backward.page(page, 4)
    assert _snapshot(forward) == _snapshot(backward)


def test_special_names_and_rare_status_sit_at_fixed_ids() -> None:
    book = CampaignBook(9, "a@x", 10)
    for index, name in SPECIAL_NAMES.items():
        campaign = book.find(f"campaign_{index}")
        assert campaign is not None
        assert campaign.name == name
    rare = book.find("campaign_8")
    assert rare is not None
    assert rare.status == RARE_STATUS


@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=0, max_value=60),
    st.integers(min_value=1, max_value=25),
)
def test_pages_partition_the_book(seed: int, total: int, limit: int) -> None:
    book = CampaignBook(seed, "a@x", total)
    pages = [book.page(page, limit) for page in range(1, total // limit + 3)]
    ids = [campaign.id for page in pages for campaign in page]
    assert ids == [f"campaign_{n}" for n in range(1, total + 1)]


def test_find_knows_only_this_accounts_ids() -> None:
    book = CampaignBook(1, "a@x", 5)
    assert book.find("campaign_5") is not None
    for unknown in ("campaign_6", "campaign_0", "campaign_01", "Campaign_1", "x"):
        assert book.find(unknown) is None


def test_malformations_vary_by_id_and_break_the_named_field() -> None:
    assert [malformation_for(f"campaign_{n}") for n in range(4, 8)] == list(MALFORMATIONS)
    payload = CampaignBook(1, "a@x", 1).page(1, 1)[0].read()
    broken = {how: malform(payload, how) for how in MALFORMATIONS}
    assert broken["budget_not_a_number"]["budget"] == "n/a"
    assert "name" not in broken["missing_name"]
    assert broken["negative_clicks"]["clicks"] < 0
    assert broken["bad_created_at"]["created_at"] == "yesterday"
    assert payload["budget"] != "n/a"  # the original is untouched


# -- the app on a fake clock ----------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.ms = 1_000_000
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)
        self.wall += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def _app_client(fake_time: FakeTime, **knobs: object) -> httpx.AsyncClient:
    config = build_config(error_rate=0.0, hang_rate=0.0, sync_delay=0.0, seed=1, **knobs)
    simulator = Simulator(config, now_ms=lambda: fake_time.ms, wall=lambda: fake_time.wall)
    # ASGITransport skips lifespan events, which only install a log filter here.
    transport = httpx.ASGITransport(app=create_app(config, simulator=simulator))
    return httpx.AsyncClient(transport=transport, base_url="http://simulator")


@pytest.fixture
async def app_client(fake_time: FakeTime) -> AsyncIterator[httpx.AsyncClient]:
    async with _app_client(fake_time, token_ttl=10, rate_limit=2, rate_window=60) as client:
        yield client


async def _bearer(client: httpx.AsyncClient) -> dict[str, str]:
    token = (await client.post("/auth/token", auth=(DEFAULT_EMAIL, DEFAULT_PASSWORD))).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


async def test_token_expires_exactly_after_its_ttl(
    app_client: httpx.AsyncClient, fake_time: FakeTime
) -> None:
    headers = await _bearer(app_client)
    fake_time.advance(9.999)
    assert (await app_client.get("/api/campaigns", headers=headers)).status_code == 200
    fake_time.advance(0.001)
    expired = await app_client.get("/api/campaigns", headers=headers)
    assert expired.status_code == 401
    assert expired.json()["expired_at"] == "2023-11-14T22:13:30.000Z"  # 1_700_000_010


@pytest.mark.parametrize("mode", ["seconds", "http-date"])
async def test_retry_after_header_tells_when_a_slot_frees(fake_time: FakeTime, mode: str) -> None:
    async with _app_client(
        fake_time, rate_limit=1, rate_window=60, retry_after_header=mode
    ) as client:
        headers = await _bearer(client)
        await client.get("/api/campaigns", headers=headers)
        fake_time.advance(20.5)
        refused = await client.get("/api/campaigns", headers=headers)
    assert refused.json()["retry_after"] == 60  # the body stays fixed, as in production
    header = refused.headers["retry-after"]
    if mode == "seconds":
        assert header == "40"  # 39.5 s rounded up
    else:
        # 1_700_000_020.5 + 39.5, never rounded down to before the slot frees
        assert parsedate_to_datetime(header).timestamp() == 1_700_000_060


async def test_issued_token_payload(app_client: httpx.AsyncClient, fake_time: FakeTime) -> None:
    response = await app_client.post("/auth/token", auth=(DEFAULT_EMAIL, DEFAULT_PASSWORD))
    body = response.json()
    assert body["issued_at"] == int(fake_time.wall)
    assert body["expires_in"] == 10
    assert body["token_type"] == "Bearer"


async def test_fractional_ttl_is_reported_as_is(fake_time: FakeTime) -> None:
    async with _app_client(fake_time, token_ttl=0.5) as client:
        response = await client.post("/auth/token", auth=(DEFAULT_EMAIL, DEFAULT_PASSWORD))
    assert response.json()["expires_in"] == 0.5


async def test_bad_json_body_is_a_prefix_of_the_real_one(fake_time: FakeTime) -> None:
    async with _app_client(fake_time, bad_json_rate=1.0) as client:
        body = (await client.get("/api/campaigns", headers=await _bearer(client))).content
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    assert body.startswith(b'{"data":[{"id":"campaign_1"')


async def test_stats_count_per_account_and_client(fake_time: FakeTime) -> None:
    async with _app_client(fake_time, rate_limit=1, rate_window=60) as client:
        headers = {**(await _bearer(client)), "X-Client-ID": "c1"}
        await client.post("/api/campaigns/campaign_2/sync", headers=headers)
        await client.get("/api/campaigns", headers=headers)  # 429
        fake_time.advance(60)
        await client.get("/api/campaigns", headers=headers)
        stats = (await client.get("/_sim/stats")).json()
    c1 = stats["clients"]["c1"]
    assert (c1["requests"], c1["rate_limited"], c1["list_calls"]) == (2, 1, 1)
    assert c1["sync_calls"] == c1["sync_ok"] == {"campaign_2": 1}
    assert c1["max_in_window"] == 1
    assert stats["clients"]["default"]["tokens_issued"] == 1
    assert stats["accounts"][DEFAULT_EMAIL]["requests"] == 2
    assert stats["uptime"] == 60.0
    assert stats["seed"] == 1


async def test_stats_record_when_each_sync_call_arrived_counted_or_not(
    fake_time: FakeTime,
) -> None:
    async with _app_client(fake_time, rate_limit=1, rate_window=60) as client:
        headers = {**(await _bearer(client)), "X-Client-ID": "c1"}
        await client.post("/api/campaigns/campaign_2/sync", headers=headers)
        fake_time.advance(1.25)
        refused = await client.post("/api/campaigns/campaign_3/sync", headers=headers)
        fake_time.advance(60)
        await client.post("/api/campaigns/campaign_2/sync", headers=headers)
        stats = (await client.get("/_sim/stats")).json()
    c1 = stats["clients"]["c1"]
    assert refused.status_code == 429
    assert c1["sync_arrivals"] == {
        "campaign_2": [1_700_000_000.0, 1_700_000_061.25],
        "campaign_3": [1_700_000_001.25],
    }
    assert c1["sync_calls"] == {"campaign_2": 2}
