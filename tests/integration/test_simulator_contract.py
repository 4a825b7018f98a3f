"""The simulator honours PLATFORM_API.md, tested over a real socket.

Windows are fractions of a second and sync delays a few milliseconds so the
whole file runs in seconds; every test asserts what would break with the feature.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from adsync.simulator.testing import SimulatorHandle, running_simulator

pytestmark = pytest.mark.timeout(30)

ADMIN = ("admin@mixoads.com", "SuperSecret123!")
CALM: dict[str, Any] = {"error_rate": 0.0, "hang_rate": 0.0, "sync_delay": 0.01, "seed": 7}
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _client(sim: SimulatorHandle, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(base_url=sim.url, timeout=timeout, trust_env=False)


def _token(client: httpx.Client, auth: tuple[str, str] = ADMIN) -> str:
    response = client.post("/auth/token", auth=auth)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def _headers(token: str, client_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if client_id is not None:
        headers["X-Client-ID"] = client_id
    return headers


def _all_campaigns(client: httpx.Client, token: str, limit: int = 100) -> list[dict[str, Any]]:
    campaigns: list[dict[str, Any]] = []
    page = 1
    while True:
        response = client.get(
            "/api/campaigns", params={"page": page, "limit": limit}, headers=_headers(token)
        )
        assert response.status_code == 200, response.text
        body = response.json()
        campaigns.extend(body["data"])
        if not body["pagination"]["has_more"]:
            return campaigns
        page += 1


@pytest.fixture(scope="module")
def calm() -> Iterator[SimulatorHandle]:
    """A fault-free simulator with a limit no test of this fixture reaches."""
    with running_simulator(rate_limit=100_000, **CALM) as sim:
        yield sim


# -- health and authentication ------------------------------------------------


def test_health_needs_no_token(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        body = client.get("/health").json()
    assert body["status"] == "ok"
    assert ISO_MS.fullmatch(body["timestamp"])
    assert body["uptime"] >= 0


def test_kept_alive_requests_are_not_delayed(calm: SimulatorHandle) -> None:
    # Without TCP_NODELAY on the server's sockets each response after the first
    # on a connection waits ~40 ms for a delayed ACK; 20 would take 0.8 s.
    with _client(calm) as client:
        client.get("/health")
        started = time.monotonic()
        for _ in range(20):
            client.get("/health")
        elapsed = time.monotonic() - started
    assert elapsed < 0.4


def test_good_credentials_get_a_working_bearer_token(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        response = client.post("/auth/token", auth=ADMIN)
        body = response.json()
        listed = client.get("/api/campaigns", headers=_headers(body["access_token"]))
    assert response.status_code == 200
    assert set(body) == {"access_token", "token_type", "expires_in", "issued_at"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert abs(body["issued_at"] - time.time()) < 5
    assert len(body["access_token"]) >= 32
    assert listed.status_code == 200


def _basic(raw: str) -> str:
    return "Basic " + base64.b64encode(raw.encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer something",
        "Basic not-base64!",
        _basic("admin@mixoads.com"),
        _basic("admin@mixoads.com:wrong"),
        _basic("nobody@mixoads.com:SuperSecret123!"),
    ],
    ids=["missing", "not-basic", "bad-base64", "no-colon", "wrong-password", "unknown-email"],
)
def test_bad_credentials_get_401(calm: SimulatorHandle, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with _client(calm) as client:
        response = client.post("/auth/token", headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body.keys() >= {"error", "message"}
    assert "access_token" not in body


@pytest.mark.parametrize(
    ("client_id", "authorization"),
    [
        ("missing", None),
        ("basic", "Basic YWRtaW5AbWl4b2Fkcy5jb206U3VwZXJTZWNyZXQxMjMh"),
        ("empty-bearer", "Bearer"),
        ("unknown-token", "Bearer forged"),
    ],
)
def test_api_refuses_requests_without_a_valid_token(
    calm: SimulatorHandle, client_id: str, authorization: str | None
) -> None:
    headers = {"X-Client-ID": client_id}
    if authorization is not None:
        headers["Authorization"] = authorization
    with _client(calm) as client:
        listed = client.get("/api/campaigns", headers=headers)
        synced = client.post("/api/campaigns/campaign_1/sync", headers=headers)
    assert listed.status_code == synced.status_code == 401
    assert listed.json().keys() >= {"error", "message"}
    stats = calm.stats()["clients"][client_id]
    assert stats["unauthorized"] == 2
    assert stats["requests"] == 0  # refused before counting


def test_token_endpoint_is_not_rate_limited() -> None:
    with running_simulator(rate_limit=1, rate_window=60, **CALM) as sim, _client(sim) as client:
        statuses = [client.post("/auth/token", auth=ADMIN).status_code for _ in range(5)]
        tokens = sim.stats()["tokens_issued"]
    assert statuses == [200] * 5
    assert tokens == 5


def test_expired_token_gets_401_with_expired_at() -> None:
    with running_simulator(token_ttl=0.3, **CALM) as sim, _client(sim) as client:
        issued = client.post("/auth/token", auth=ADMIN).json()
        token = issued["access_token"]
        fresh = client.get("/api/campaigns", headers=_headers(token))
        time.sleep(0.35)
        stale = client.get("/api/campaigns", headers=_headers(token))
        renewed = client.get("/api/campaigns", headers=_headers(_token(client)))
        counted = sim.stats()["clients"]["default"]["requests"]
    assert fresh.status_code == 200
    assert stale.status_code == 401
    body = stale.json()
    assert body["error"] == "Token expired"
    assert ISO_MS.fullmatch(body["expired_at"])
    expired_at = datetime.strptime(body["expired_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(expired_at.timestamp() - (issued["issued_at"] + 0.3)) < 1.5
    assert renewed.status_code == 200
    assert counted == 2  # the expired call was not counted


def test_tokens_expire_one_by_one() -> None:
    with running_simulator(token_ttl=0.6, **CALM) as sim, _client(sim) as client:
        first = _token(client)
        time.sleep(0.35)
        second = _token(client)
        time.sleep(0.35)
        statuses = [
            client.get("/api/campaigns", headers=_headers(token)).status_code
            for token in (first, second)
        ]
    assert statuses == [401, 200]


@pytest.mark.parametrize("invalidate", [True, False])
def test_new_token_may_invalidate_older_ones(invalidate: bool) -> None:
    with (
        running_simulator(invalidate_old_tokens=invalidate, **CALM) as sim,
        _client(sim) as client,
    ):
        old, new = _token(client), _token(client)
        old_status = client.get("/api/campaigns", headers=_headers(old)).status_code
        new_status = client.get("/api/campaigns", headers=_headers(new)).status_code
    assert new_status == 200
    assert old_status == (401 if invalidate else 200)


# -- campaigns ----------------------------------------------------------------


@pytest.mark.parametrize("limit", [7, 10, 33, 100])
def test_pages_cover_every_campaign_once(calm: SimulatorHandle, limit: int) -> None:
    with _client(calm) as client:
        token = _token(client)
        pages = []
        page = 1
        while True:
            body = client.get(
                "/api/campaigns", params={"page": page, "limit": limit}, headers=_headers(token)
            ).json()
            pages.append(body)
            if not body["pagination"]["has_more"]:
                break
            page += 1
        beyond = client.get(
            "/api/campaigns", params={"page": page + 1, "limit": limit}, headers=_headers(token)
        ).json()
    ids = [campaign["id"] for body in pages for campaign in body["data"]]
    assert sorted(ids) == sorted(f"campaign_{n}" for n in range(1, 101))
    assert len(pages) == -(-100 // limit)
    assert [body["pagination"]["has_more"] for body in pages] == [True] * (len(pages) - 1) + [False]
    assert all(body["pagination"]["total"] == 100 for body in pages)
    assert all(body["pagination"]["limit"] == limit for body in pages)
    assert [body["pagination"]["page"] for body in pages] == list(range(1, len(pages) + 1))
    assert beyond["data"] == []
    assert beyond["pagination"]["has_more"] is False


def test_default_page_and_limit(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        body = client.get("/api/campaigns", headers=_headers(_token(client))).json()
    assert [c["id"] for c in body["data"]] == [f"campaign_{n}" for n in range(1, 11)]
    assert body["pagination"] == {"page": 1, "limit": 10, "total": 100, "has_more": True}


def test_limit_is_capped_at_max_page_size() -> None:
    with running_simulator(max_page_size=25, **CALM) as sim, _client(sim) as client:
        body = client.get(
            "/api/campaigns", params={"limit": 1000}, headers=_headers(_token(client))
        ).json()
    assert len(body["data"]) == 25
    assert body["pagination"]["limit"] == 25
    assert body["pagination"]["has_more"] is True


@pytest.mark.parametrize(
    "params",
    [{"page": "0"}, {"page": "-1"}, {"page": "abc"}, {"limit": "0"}, {"limit": "1.5"}],
)
def test_bad_paging_parameters_get_400(calm: SimulatorHandle, params: dict[str, str]) -> None:
    with _client(calm) as client:
        response = client.get("/api/campaigns", params=params, headers=_headers(_token(client)))
    assert response.status_code == 400
    assert response.json().keys() >= {"error", "message"}


def test_campaign_data_is_realistic_and_stresses_storage(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        campaigns = _all_campaigns(client, _token(client))
    names = {c["name"] for c in campaigns}
    assert {
        'O\'Brien "Summer" Sale',
        "Café ☕ 夏季促销 🚀",
        "'; DROP TABLE campaigns; --",
    } <= names
    assert {"active", "paused", "ended", "archived"} <= {c["status"] for c in campaigns}
    for campaign in campaigns:
        assert set(campaign) == {
            "id", "name", "status", "budget", "impressions", "clicks", "conversions",
            "created_at",
        }  # fmt: skip
        assert isinstance(campaign["budget"], int | float)
        assert not isinstance(campaign["budget"], bool)
        assert campaign["impressions"] >= campaign["clicks"] >= campaign["conversions"] >= 0
        assert ISO_MS.fullmatch(campaign["created_at"])


def test_counters_grow_and_never_decrease(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        token = _token(client)
        reads = [
            client.get("/api/campaigns", params={"limit": 5}, headers=_headers(token)).json()
            for _ in range(6)
        ]
    for index in range(5):
        series = [read["data"][index] for read in reads]
        for before, after in itertools.pairwise(series):
            assert after["impressions"] > before["impressions"]
            assert after["clicks"] >= before["clicks"]
            assert after["conversions"] >= before["conversions"]
            for fixed in ("id", "name", "status", "budget", "created_at"):
                assert after[fixed] == before[fixed]


def test_sync_answers_slowly_with_success() -> None:
    with running_simulator(**{**CALM, "sync_delay": 0.2}) as sim, _client(sim) as client:
        token = _token(client)
        started = time.monotonic()
        response = client.post(
            "/api/campaigns/campaign_3/sync",
            json={"campaign_id": "campaign_3"},
            headers=_headers(token),
        )
        elapsed = time.monotonic() - started
        bare = client.post("/api/campaigns/campaign_4/sync", headers=_headers(token))
        stats = sim.stats()["clients"]["default"]
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["campaign_id"] == "campaign_3"
    assert isinstance(body["message"], str)
    synced_at = datetime.fromisoformat(body["synced_at"].replace("Z", "+00:00"))
    assert abs(synced_at.timestamp() - time.time()) < 5
    assert elapsed >= 0.2
    assert bare.status_code == 200  # the JSON body is optional
    assert stats["sync_calls"] == {"campaign_3": 1, "campaign_4": 1}
    assert stats["sync_ok"] == {"campaign_3": 1, "campaign_4": 1}


def test_sync_of_unknown_campaign_or_mismatched_body_fails(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        headers = _headers(_token(client), "sync-errors")
        unknown = client.post("/api/campaigns/campaign_101/sync", headers=headers)
        garbage = client.post("/api/campaigns/nonsense/sync", headers=headers)
        mismatch = client.post(
            "/api/campaigns/campaign_1/sync", json={"campaign_id": "campaign_2"}, headers=headers
        )
        not_json = client.post("/api/campaigns/campaign_1/sync", content=b"{", headers=headers)
    assert unknown.status_code == garbage.status_code == 404
    assert mismatch.status_code == not_json.status_code == 400
    stats = calm.stats()["clients"]["sync-errors"]
    assert stats["requests"] == 4  # authenticated, so counted
    assert stats["sync_ok"] == {}


def test_unknown_api_path_is_authenticated_and_counted(calm: SimulatorHandle) -> None:
    with _client(calm) as client:
        anonymous = client.get("/api/reports", headers={"X-Client-ID": "paths"})
        known = client.get("/api/reports", headers=_headers(_token(client), "paths"))
    assert anonymous.status_code == 401
    assert known.status_code == 404
    assert calm.stats()["clients"]["paths"]["requests"] == 1


# -- rate limiting ------------------------------------------------------------


def test_429_after_the_limit_then_accepted_when_the_window_slides() -> None:
    with (
        running_simulator(rate_limit=2, rate_window=0.4, **CALM) as sim,
        _client(sim) as client,
    ):
        headers = _headers(_token(client))
        first_sent = time.monotonic()
        accepted = [client.get("/api/campaigns", headers=headers).status_code for _ in range(2)]
        last_accepted = time.monotonic()
        refused = []
        # Keep knocking until just before the first stamp can leave the window:
        # if refused requests were counted, the window would stay full long after.
        while time.monotonic() < first_sent + 0.35:
            refused.append(client.get("/api/campaigns", headers=headers))
            time.sleep(0.02)
        time.sleep(max(0.0, last_accepted + 0.42 - time.monotonic()))
        again = client.get("/api/campaigns", headers=headers)
        stats = sim.stats()["clients"]["default"]
    assert accepted == [200, 200]
    assert len(refused) >= 3
    assert {r.status_code for r in refused} == {429}
    body = refused[0].json()
    assert body["error"] == "Rate limit exceeded"
    assert body["retry_after"] == 60
    assert "message" in body
    assert "retry-after" not in refused[0].headers  # production sends none by default
    assert again.status_code == 200
    assert stats["requests"] == 3
    assert stats["rate_limited"] == len(refused)
    assert stats["max_in_window"] == 2


def test_the_window_slides_rather_than_resets() -> None:
    with (
        running_simulator(rate_limit=2, rate_window=1.0, **CALM) as sim,
        _client(sim) as client,
    ):
        headers = _headers(_token(client))
        start = time.monotonic()
        first = client.get("/api/campaigns", headers=headers).status_code
        time.sleep(max(0.0, start + 0.5 - time.monotonic()))
        second = client.get("/api/campaigns", headers=headers).status_code
        time.sleep(max(0.0, start + 1.05 - time.monotonic()))
        # The first request has left the window, the second has not: one slot.
        third = client.get("/api/campaigns", headers=headers).status_code
        fourth = client.get("/api/campaigns", headers=headers).status_code
    assert [first, second, third, fourth] == [200, 200, 200, 429]


@pytest.mark.parametrize("mode", ["none", "seconds", "http-date"])
def test_retry_after_header_modes(mode: str) -> None:
    with (
        running_simulator(rate_limit=1, rate_window=2.0, retry_after_header=mode, **CALM) as sim,
        _client(sim) as client,
    ):
        headers = _headers(_token(client))
        assert client.get("/api/campaigns", headers=headers).status_code == 200
        refused = client.get("/api/campaigns", headers=headers)
    assert refused.status_code == 429
    assert refused.json()["retry_after"] == 60
    header = refused.headers.get("retry-after")
    if mode == "none":
        assert header is None
    elif mode == "seconds":
        assert header is not None
        assert header.isdigit()
        assert 1 <= int(header) <= 2
    else:
        assert header is not None
        moment = parsedate_to_datetime(header).timestamp()
        assert time.time() - 1 <= moment <= time.time() + 3


def test_each_client_id_has_its_own_bucket() -> None:
    with (
        running_simulator(rate_limit=2, rate_window=60, **CALM) as sim,
        _client(sim) as client,
    ):
        token = _token(client)

        def burst(client_id: str | None) -> list[int]:
            headers = _headers(token, client_id)
            return [client.get("/api/campaigns", headers=headers).status_code for _ in range(3)]

        outcomes = {name: burst(name) for name in ("alpha", "beta", None)}
        stats = sim.stats()["clients"]
    assert outcomes == {name: [200, 200, 429] for name in ("alpha", "beta", None)}
    for name in ("alpha", "beta", "default"):
        assert stats[name]["requests"] == 2
        assert stats[name]["rate_limited"] == 1


async def test_a_concurrent_burst_is_cut_at_the_limit() -> None:
    with running_simulator(rate_limit=5, rate_window=60, **CALM) as sim:
        async with httpx.AsyncClient(base_url=sim.url, trust_env=False) as client:
            token = (await client.post("/auth/token", auth=ADMIN)).json()["access_token"]
            responses = await asyncio.gather(
                *(client.get("/api/campaigns", headers=_headers(token)) for _ in range(20))
            )
        stats = sim.stats()["clients"]["default"]
    assert Counter(r.status_code for r in responses) == {200: 5, 429: 15}
    assert stats["requests"] == 5
    assert stats["rate_limited"] == 15
    assert stats["max_in_window"] == 5


# -- faults -------------------------------------------------------------------


async def _fire(
    sim: SimulatorHandle, requests: int, path: str = "/api/campaigns", method: str = "GET"
) -> Counter[str]:
    """Send requests concurrently; tally statuses, with "hang" for read timeouts."""
    timeout = httpx.Timeout(0.5, pool=30.0)
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(
        base_url=sim.url, timeout=timeout, limits=limits, trust_env=False
    ) as client:
        token = (await client.post("/auth/token", auth=ADMIN)).json()["access_token"]

        async def one() -> str:
            try:
                response = await client.request(method, path, headers=_headers(token, "dice"))
            except httpx.ReadTimeout:
                return "hang"
            return str(response.status_code)

        return Counter(await asyncio.gather(*(one() for _ in range(requests))))


async def test_503_and_hang_rates_match_their_knobs() -> None:
    with running_simulator(
        rate_limit=10_000, error_rate=0.2, hang_rate=0.1, sync_delay=0.0, seed=42
    ) as sim:
        tally = await _fire(sim, 200)
        stats = sim.stats()["clients"]["dice"]
    assert tally.total() == 200
    assert set(tally) <= {"200", "503", "hang"}
    assert 20 <= tally["503"] <= 60  # 40 expected
    assert 8 <= tally["hang"] <= 35  # 20 expected
    assert stats["errors_503"] == stats["errors_5xx"] == tally["503"]
    assert stats["hangs"] == tally["hang"]
    assert stats["requests"] == stats["list_calls"] == 200  # hung and 503 requests count


async def test_error_rate_spares_sync_calls_but_hangs_do_not() -> None:
    with running_simulator(
        rate_limit=10_000, error_rate=1.0, hang_rate=0.2, sync_delay=0.0, seed=3
    ) as sim:
        syncs = await _fire(sim, 60, "/api/campaigns/campaign_1/sync", "POST")
        lists = await _fire(sim, 20)
    assert set(syncs) == {"200", "hang"}
    assert set(lists) <= {"503", "hang"}
    assert lists["503"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_hangs_block_nothing_else_and_do_not_hold_shutdown(process: bool) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        with running_simulator(
            process=process, rate_limit=10_000, hang_rate=1.0, error_rate=0.0, seed=1
        ) as sim:
            auth = await client.post(f"{sim.url}/auth/token", auth=ADMIN)
            headers = _headers(auth.json()["access_token"])
            hung = [
                asyncio.create_task(client.get(f"{sim.url}/api/campaigns", headers=headers))
                for _ in range(5)
            ]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            health = await client.get(f"{sim.url}/health")
            health_time = time.monotonic() - started
            still_hanging = [not task.done() for task in hung]
            hangs = sim.stats()["clients"]["default"]["hangs"]
            stopping = time.monotonic()
        stop_time = time.monotonic() - stopping
        # Shutdown released the hung requests; they must end now, not at the timeout.
        outcomes = await asyncio.wait_for(asyncio.gather(*hung, return_exceptions=True), 5)
    assert health.status_code == 200
    assert health_time < 1.0
    assert still_hanging == [True] * 5
    assert hangs == 5
    assert stop_time < 2.0
    for outcome in outcomes:
        if isinstance(outcome, httpx.Response):
            assert outcome.status_code == 503
        else:
            assert isinstance(outcome, httpx.TransportError)


def test_a_hung_request_times_out_on_the_client() -> None:
    with running_simulator(rate_limit=10_000, hang_rate=1.0, error_rate=0.0, seed=1) as sim:
        with _client(sim, timeout=0.3) as client:
            token = _token(client)
            with pytest.raises(httpx.ReadTimeout):
                client.get("/api/campaigns", headers=_headers(token))
        stats = sim.stats()["clients"]["default"]
    assert stats["hangs"] == 1
    assert stats["requests"] == 1


def test_the_same_seed_replays_the_same_faults_and_data() -> None:
    def run(seed: int) -> tuple[list[int], list[dict[str, Any]]]:
        knobs = {"rate_limit": 10_000, "error_rate": 0.3, "hang_rate": 0.0, "seed": seed}
        with running_simulator(**knobs) as sim, _client(sim) as client:
            headers = _headers(_token(client), "replay")
            statuses = [
                client.get("/api/campaigns", headers=headers).status_code for _ in range(40)
            ]
            sim.reset()
            data: list[dict[str, Any]] = []
            while not data:  # the first read after a 503-free roll
                response = client.get("/api/campaigns", params={"limit": 100}, headers=headers)
                if response.status_code == 200:
                    data = response.json()["data"]
            return statuses, data

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first[0] != other[0]
    assert 200 in first[0]
    assert 503 in first[0]
    assert first[1] != other[1]


def test_sync_error_rate_answers_500_502_503() -> None:
    with (
        running_simulator(rate_limit=10_000, sync_error_rate=1.0, **CALM) as sim,
        _client(sim) as client,
    ):
        headers = _headers(_token(client))
        statuses = Counter(
            client.post(f"/api/campaigns/campaign_{n}/sync", headers=headers).status_code
            for n in range(1, 31)
        )
        stats = sim.stats()["clients"]["default"]
    assert set(statuses) <= {500, 502, 503}
    assert len(statuses) >= 2
    assert stats["errors_5xx"] == 30
    assert stats["errors_503"] == statuses[503]
    assert stats["sync_ok"] == {}


def test_fail_sync_ids_always_answer_500() -> None:
    with (
        running_simulator(fail_sync_ids="campaign_2,campaign_5", **CALM) as sim,
        _client(sim) as client,
    ):
        headers = _headers(_token(client))
        failing = [
            client.post(f"/api/campaigns/{cid}/sync", headers=headers).status_code
            for cid in ("campaign_2", "campaign_5", "campaign_2")
        ]
        fine = client.post("/api/campaigns/campaign_1/sync", headers=headers).status_code
        stats = sim.stats()["clients"]["default"]
    assert failing == [500, 500, 500]
    assert fine == 200
    assert stats["sync_calls"] == {"campaign_2": 2, "campaign_5": 1, "campaign_1": 1}
    assert stats["sync_ok"] == {"campaign_1": 1}


def test_malformed_ids_break_their_payloads_in_varied_ways() -> None:
    ids = ["campaign_1", "campaign_2", "campaign_3", "campaign_4"]
    with running_simulator(malformed_ids=ids, **CALM) as sim, _client(sim) as client:
        data = client.get(
            "/api/campaigns", params={"limit": 6}, headers=_headers(_token(client))
        ).json()["data"]
    by_id = {campaign["id"]: campaign for campaign in data}
    assert "name" not in by_id["campaign_1"]
    assert by_id["campaign_2"]["clicks"] < 0
    assert by_id["campaign_3"]["created_at"] == "yesterday"
    assert by_id["campaign_4"]["budget"] == "n/a"
    for healthy in ("campaign_5", "campaign_6"):
        assert isinstance(by_id[healthy]["name"], str)
        assert isinstance(by_id[healthy]["budget"], int | float)
        assert by_id[healthy]["clicks"] >= 0


def test_reset_fault_drops_the_connection_mid_body(caplog: pytest.LogCaptureFixture) -> None:
    with running_simulator(reset_rate=1.0, **CALM) as sim, _client(sim) as client:
        headers = _headers(_token(client))
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.get("/api/campaigns", headers=headers)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post("/api/campaigns/campaign_1/sync", headers=headers)
        stats = sim.stats()["clients"]["default"]
    assert stats["resets"] == 2
    assert stats["sync_ok"] == {}  # the client never learnt of the success
    # A deliberate reset is not reported as an application error.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_bad_json_fault_sends_a_truncated_200() -> None:
    with running_simulator(bad_json_rate=1.0, **CALM) as sim, _client(sim) as client:
        response = client.get("/api/campaigns", headers=_headers(_token(client)))
        stats = sim.stats()["clients"]["default"]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content.startswith(b'{"data":')
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
    assert stats["bad_json"] == 1


# -- accounts -----------------------------------------------------------------

ACCOUNTS_TOML = """
[[accounts]]
email = "small@agency.test"
password = "small-secret"
campaigns = 5

[[accounts]]
email = "big@agency.test"
password = "big-secret"
campaigns = 12
error_rate = 0.0

[[accounts]]
email = "down@agency.test"
password = "down-secret"
campaigns = 3
always_503 = true
"""


@pytest.fixture(params=["toml", "json"])
def accounts_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    import tomllib

    if request.param == "toml":
        path = tmp_path / "accounts.toml"
        path.write_text(ACCOUNTS_TOML, encoding="utf-8")
    else:
        path = tmp_path / "accounts.json"
        path.write_text(json.dumps(tomllib.loads(ACCOUNTS_TOML)["accounts"]), encoding="utf-8")
    return path


def test_accounts_are_independent(accounts_file: Path) -> None:
    small, big = ("small@agency.test", "small-secret"), ("big@agency.test", "big-secret")
    # The global error rate is 1: only the big account's override lets its lists through.
    knobs = {**CALM, "error_rate": 1.0}
    with running_simulator(accounts=accounts_file, **knobs) as sim, _client(sim) as client:
        small_token, big_token = _token(client, small), _token(client, big)
        small_list = client.get(
            "/api/campaigns", params={"limit": 100}, headers=_headers(small_token, "s")
        )
        big_list = client.get(
            "/api/campaigns", params={"limit": 100}, headers=_headers(big_token, "b")
        )
        cross = client.post("/api/campaigns/campaign_10/sync", headers=_headers(small_token, "s"))
        own = client.post("/api/campaigns/campaign_10/sync", headers=_headers(big_token, "b"))
        wrong = client.post("/auth/token", auth=("small@agency.test", "big-secret"))
        default = client.post("/auth/token", auth=ADMIN)
        stats = sim.stats()
    assert small_list.status_code == 503
    assert big_list.status_code == 200
    big_body = big_list.json()
    assert big_body["pagination"]["total"] == 12
    assert [c["id"] for c in big_body["data"]] == [f"campaign_{n}" for n in range(1, 13)]
    assert cross.status_code == 404  # campaign_10 is not the small account's
    assert own.status_code == 200
    assert wrong.status_code == default.status_code == 401
    assert stats["accounts"]["small@agency.test"]["tokens_issued"] == 1
    assert stats["accounts"]["big@agency.test"]["tokens_issued"] == 1
    assert stats["accounts"]["big@agency.test"]["sync_ok"] == {"campaign_10": 1}
    assert stats["accounts"]["small@agency.test"]["sync_ok"] == {}
    assert stats["tokens_issued"] == 2


def test_ids_repeat_across_accounts_with_their_own_data(accounts_file: Path) -> None:
    with running_simulator(accounts=accounts_file, **CALM) as sim, _client(sim) as client:
        lists = [
            client.get("/api/campaigns", headers=_headers(_token(client, auth))).json()
            for auth in (("small@agency.test", "small-secret"), ("big@agency.test", "big-secret"))
        ]
    small, big = lists
    assert small["pagination"]["total"] == 5
    assert small["pagination"]["has_more"] is False
    assert big["pagination"]["has_more"] is True
    assert small["data"][0]["id"] == big["data"][0]["id"] == "campaign_1"
    assert small["data"] != big["data"][: len(small["data"])]


def test_always_503_account_fails_every_counted_request(accounts_file: Path) -> None:
    with running_simulator(accounts=accounts_file, **CALM) as sim, _client(sim) as client:
        headers = _headers(_token(client, ("down@agency.test", "down-secret")), "down")
        statuses = [
            client.get("/api/campaigns", headers=headers).status_code,
            client.post("/api/campaigns/campaign_1/sync", headers=headers).status_code,
            client.get("/api/campaigns", params={"page": 2}, headers=headers).status_code,
        ]
        stats = sim.stats()["clients"]["down"]
    assert statuses == [503, 503, 503]
    assert stats["requests"] == 3
    assert stats["errors_503"] == 3


# -- control plane --------------------------------------------------------------


def test_stats_shape_and_reset() -> None:
    with (
        running_simulator(rate_limit=3, rate_window=60, **CALM) as sim,
        _client(sim) as client,
    ):
        token = _token(client)
        headers = _headers(token, "ctl")
        for _ in range(4):
            client.get("/api/campaigns", headers=headers)
        before = sim.stats()
        sim.reset()
        after_reset = sim.stats()
        # Windows were cleared and the token kept.
        allowed = client.get("/api/campaigns", headers=headers).status_code
        sim.reset(tokens=True)
        revoked = client.get("/api/campaigns", headers=headers).status_code
    ctl = before["clients"]["ctl"]
    assert ctl == {
        "requests": 3,
        "rate_limited": 1,
        "errors_503": 0,
        "errors_5xx": 0,
        "hangs": 0,
        "resets": 0,
        "bad_json": 0,
        "unauthorized": 0,
        "tokens_issued": 0,
        "list_calls": 3,
        "sync_calls": {},
        "sync_ok": {},
        "sync_arrivals": {},
        "max_in_window": 3,
    }
    assert before["clients"]["default"]["tokens_issued"] == 1
    assert before["accounts"] == {
        "admin@mixoads.com": {"tokens_issued": 1, "requests": 3, "sync_calls": {}, "sync_ok": {}}
    }
    assert before["tokens_issued"] == 1
    assert before["uptime"] >= 0
    assert after_reset["clients"] == {}
    assert after_reset["tokens_issued"] == 0
    assert allowed == 200
    assert revoked == 401
