"""PlatformClient over httpx.MockTransport: auth, classification, retries. No sockets, no sleeping."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from adsync.auth import TokenPayload, TokenProvider, plan_token
from adsync.client import PlatformClient, parse_page
from adsync.clock import FakeClock
from adsync.errors import AuthError, PermanentError, TransientError, UnusableToken
from adsync.ratelimit import RateBudget
from adsync.retry import RetryPolicy

PASSWORD = "S3cret-pässword!"
Handler = Callable[[httpx.Request], httpx.Response]


def campaign(i: int, **over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": f"campaign_{i}",
        "name": f"Campaign {i}",
        "status": "active",
        "budget": 1000 + i,
        "impressions": 10 * i,
        "clicks": i,
        "conversions": 0,
        "created_at": "2024-12-11T10:30:00.000Z",
    }
    base.update(over)
    return base


class Platform:
    """A scripted platform: tokens, then whatever `script` answers for /api calls."""

    def __init__(self, clock: FakeClock, script: Handler, ttl: float = 3600) -> None:
        self.clock = clock
        self.script = script
        self.ttl = ttl
        self.tokens = 0
        self.api_calls: list[httpx.Request] = []
        self.valid: set[str] = set()
        # When set, the access token handed out instead of tok-N.
        self.token_value: str | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            expected = "Basic " + base64.b64encode(f"me@x.io:{PASSWORD}".encode()).decode()
            if request.headers.get("authorization") != expected:
                return httpx.Response(401, json={"error": "Unauthorized", "message": "bad"})
            self.tokens += 1
            token = self.token_value if self.token_value is not None else f"tok-{self.tokens}"
            self.valid.add(token)
            return httpx.Response(
                200,
                json={
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": self.ttl,
                    "issued_at": self.clock.wall(),
                },
            )
        self.api_calls.append(request)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token not in self.valid:
            return httpx.Response(401, json={"error": "Token expired", "message": "x"})
        return self.script(request)


def make_client(
    platform: Platform,
    clock: FakeClock,
    *,
    password: str = PASSWORD,
    attempts: int = 4,
    on_secret: Callable[[str], None] = lambda _secret: None,
) -> PlatformClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(platform), base_url="http://platform")
    auth = TokenProvider(
        http,
        email="me@x.io",
        password=SecretStr(password),
        clock=clock,
        margin=60,
        policy=RetryPolicy(max_attempts=3),
        rng=random.Random(0),
        on_secret=on_secret,
    )
    return PlatformClient(
        http,
        auth=auth,
        budget=RateBudget(1000, 1.0, clock),
        clock=clock,
        client_id="client-a",
        policy=RetryPolicy(max_attempts=attempts, backoff_initial=0.1, backoff_max=1),
        rng=random.Random(0),
    )


def page_body(
    items: list[dict[str, object]], page: int = 1, total: int = 2, more: bool = False
) -> dict[str, object]:
    return {
        "data": items,
        "pagination": {"page": page, "limit": 10, "total": total, "has_more": more},
    }


async def test_lists_a_page_with_bearer_token_and_client_id() -> None:
    clock = FakeClock()
    platform = Platform(
        clock, lambda r: httpx.Response(200, json=page_body([campaign(1), campaign(2)]))
    )
    client = make_client(platform, clock)
    page = await client.list_page(1, 10)
    assert [i.campaign_id for i in page.items] == ["campaign_1", "campaign_2"]
    req = platform.api_calls[0]
    assert req.headers["authorization"] == "Bearer tok-1"
    assert req.headers["x-client-id"] == "client-a"
    assert req.url.params["page"] == "1"


async def test_bad_credentials_raise_auth_error_without_a_retry_storm() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])))
    client = make_client(platform, clock, password="wrong")
    with pytest.raises(AuthError) as info:
        await client.list_page(1, 10)
    assert "wrong" not in str(info.value)
    assert platform.api_calls == []
    assert clock.sleeps == []


async def test_token_is_refreshed_before_it_expires() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])), ttl=100)
    client = make_client(platform, clock)
    await client.list_page(1, 10)
    clock.advance(89)  # margin is min(60, 10% of 100) = 10 s
    await client.list_page(1, 10)
    assert platform.tokens == 1
    clock.advance(2)
    await client.list_page(1, 10)
    assert platform.tokens == 2
    assert client.auth.refreshes == 2
    counters = client.counters()
    assert counters.refreshes == 2
    assert counters.requests == 3
    assert counters.retries == 0


async def test_a_401_refreshes_once_and_retries() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])))
    client = make_client(platform, clock)
    await client.list_page(1, 10)
    platform.valid.clear()  # a newer login elsewhere invalidated our token
    await client.list_page(1, 10)
    assert platform.tokens == 2
    assert client.stats.by_status["list:401"] == 1
    assert all(s < 0.01 for s in clock.sleeps)  # paced, but no backoff for a refresh


async def test_one_refresh_for_many_waiters() -> None:
    import asyncio

    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])))
    client = make_client(platform, clock)
    await asyncio.gather(*(client.list_page(1, 10) for _ in range(20)))
    assert platform.tokens == 1


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(503, json={"error": "Service temporarily unavailable"}),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, content=b'{"data": [{"id": "campa'),
        httpx.Response(200, content=b"<html>oops</html>"),
        httpx.Response(200, json={"data": "not a list"}),
        # A body its Content-Encoding cannot undo (decoded only when the client reads it).
        httpx.Response(
            200, stream=httpx.ByteStream(b"not gzip at all"), headers={"Content-Encoding": "gzip"}
        ),
    ],
    ids=["503", "502", "truncated-json", "not-json", "not-a-page", "undecodable"],
)
async def test_transient_failures_are_retried(failure: httpx.Response) -> None:
    clock = FakeClock()
    answers = [failure, httpx.Response(200, json=page_body([campaign(1)], total=1))]
    platform = Platform(clock, lambda r: answers.pop(0))
    client = make_client(platform, clock)
    page = await client.list_page(1, 10)
    assert len(page.items) == 1
    assert client.stats.retries == 1
    assert len(platform.api_calls) == 2


async def test_connection_errors_and_timeouts_are_retried() -> None:
    clock = FakeClock()
    errors: list[Exception] = [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("reset")]

    def script(request: httpx.Request) -> httpx.Response:
        if errors:
            raise errors.pop(0)
        return httpx.Response(
            200, json={"success": True, "campaign_id": "c1", "synced_at": "2025-01-01T00:00:00Z"}
        )

    client = make_client(Platform(clock, script), clock)
    receipt = await client.sync_campaign("c1")
    assert receipt.campaign_id == "c1"
    assert receipt.synced_at.year == 2025
    assert client.stats.timeouts == 1
    assert client.stats.retries == 2


async def test_other_4xx_are_not_retried() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(404, json={"error": "Not found"}))
    client = make_client(platform, clock)
    with pytest.raises(PermanentError, match="404"):
        await client.sync_campaign("nope")
    assert len(platform.api_calls) == 1


async def test_gives_up_after_bounded_attempts() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(500, json={"error": "down"}))
    client = make_client(platform, clock, attempts=3)
    with pytest.raises(TransientError, match="500"):
        await client.sync_campaign("c1")
    assert len(platform.api_calls) == 3


async def test_a_429_is_reported_to_the_budget_and_retried() -> None:
    clock = FakeClock()
    answers = [
        httpx.Response(
            429,
            json={"error": "Rate limit exceeded", "retry_after": 60},
            headers={"Retry-After": "3"},
        ),
        httpx.Response(
            200, json={"success": True, "campaign_id": "c1", "synced_at": "2025-01-01T00:00:00Z"}
        ),
    ]
    platform = Platform(clock, lambda r: answers.pop(0))
    client = make_client(platform, clock)
    start = clock.monotonic()
    await client.sync_campaign("c1")
    assert client.stats.rate_limited == 1
    assert client.budget.refusals == 1
    # The header's 3 s is obeyed; the body's fixed 60 s is not.
    assert 3 <= clock.monotonic() - start < 10


async def test_campaign_ids_are_escaped_in_the_path() -> None:
    clock = FakeClock()
    seen: list[str] = []

    def script(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        assert json.loads(request.content) == {"campaign_id": "a/b?c"}
        return httpx.Response(200, json={"success": True, "campaign_id": "a/b?c", "synced_at": "x"})

    await make_client(Platform(clock, script), clock).sync_campaign("a/b?c")
    assert seen == ["/api/campaigns/a%2Fb%3Fc/sync"]


async def test_sync_without_success_is_not_success() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json={"success": False}))
    with pytest.raises(TransientError, match="success"):
        await make_client(platform, clock, attempts=2).sync_campaign("c1")
    # Retried like any transient failure, within the attempts.
    assert len(platform.api_calls) == 2


async def test_a_403_is_not_retried_and_still_counts() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(403, json={"error": "Forbidden"}))
    client = make_client(platform, clock)
    with pytest.raises(PermanentError, match="403"):
        await client.list_page(1, 10)
    assert len(platform.api_calls) == 1
    assert platform.tokens == 1
    # It passed authentication, so the platform counted it.
    assert client.budget.in_window(clock.monotonic()) == 1


async def test_a_token_the_api_always_refuses_is_bounded_and_spends_no_quota() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(401, json={"error": "Token expired"}))
    client = make_client(platform, clock, attempts=3)
    with pytest.raises(TransientError, match="token refused after refresh"):
        await client.list_page(1, 10)
    # Each attempt: the request, one refresh, the request again.
    assert len(platform.api_calls) == 6
    assert platform.tokens == 4
    # Refused as unauthenticated: none of them counted by the platform.
    assert client.budget.in_window(clock.monotonic()) == 0


def test_parse_page_keeps_bad_items_as_data() -> None:
    page = parse_page(
        page_body(
            [campaign(1), campaign(2, budget="n/a"), {"name": "no id"}, campaign(3, clicks=-1)],
            total=4,
        )
    )
    assert [i.campaign is not None for i in page.items] == [True, False, False, False]
    assert page.items[1].campaign_id == "campaign_2"
    assert "budget" in (page.items[1].error or "")
    assert page.items[2].campaign_id is None
    assert "clicks" in (page.items[3].error or "")


def test_parse_page_rejects_a_page_without_pagination() -> None:
    with pytest.raises(TransientError, match="malformed"):
        parse_page({"data": []})


def test_token_plan_refreshes_early_and_trusts_the_earlier_clock() -> None:
    token = plan_token(TokenPayload(access_token="t", expires_in=3600, issued_at=1000), 1010, 60)
    assert token.expires_at == 4601  # issued_at is whole seconds: issued within 1 s after it
    assert token.refresh_at == 4541
    # Our clock ahead of the platform's: a tenth of a short life as margin.
    short = plan_token(TokenPayload(access_token="t", expires_in=10, issued_at=1000), 1000.5, 60)
    assert short.refresh_at == 1000.5 + 9
    # A platform clock far behind ours: still used for half its life.
    skewed = plan_token(TokenPayload(access_token="t", expires_in=100, issued_at=0), 5000, 60)
    assert skewed.refresh_at == 5050
    assert "t" not in repr(token).replace("Token", "").replace("refresh_at", "").replace(
        "expires_at", ""
    )


@pytest.mark.parametrize(
    "token", ["tök-123456", "tok-1\r\nX-Injected: 1", "", "tok 1", "tok-\x00", "tok-\x7f"]
)
async def test_a_token_that_cannot_go_in_a_header_is_a_platform_error(token: str) -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])))
    platform.token_value = token
    client = make_client(platform, clock)
    with pytest.raises(UnusableToken, match="access token") as info:
        await client.list_page(1, 10)
    if token:
        assert token not in str(info.value)
    # Asking again would bring the same token: no retry, and nothing sent with it.
    assert platform.tokens == 1
    assert platform.api_calls == []


async def test_every_token_and_the_basic_value_are_handed_to_the_redaction_callback() -> None:
    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])))
    secrets: list[str] = []
    client = make_client(platform, clock, on_secret=secrets.append)
    basic = base64.b64encode(f"me@x.io:{PASSWORD}".encode()).decode()
    # Known before anything is sent: the token exchange itself may be logged.
    assert secrets == [basic]
    await client.list_page(1, 10)
    platform.valid.clear()  # refused: a second token
    await client.list_page(1, 10)
    assert secrets == [basic, "tok-1", "tok-2"]


async def test_a_token_echoed_in_an_error_body_is_not_in_the_error() -> None:
    clock = FakeClock()

    def echo(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        return httpx.Response(
            403, json={"error": "Forbidden", "message": f"token {token} lacks scope"}
        )

    platform = Platform(clock, echo)
    platform.token_value = "tok-9a8b7c6d5e4f"
    client = make_client(platform, clock)
    with pytest.raises(PermanentError) as info:
        await client.sync_campaign("c1")
    assert str(info.value) == "HTTP 403: Forbidden - token *** lacks scope"


async def test_a_client_built_for_an_account_teaches_the_process_redactor_its_secrets() -> None:
    from adsync.config import load_settings
    from adsync.observability import REDACTOR
    from adsync.runner import build_client

    clock = FakeClock()
    platform = Platform(clock, lambda r: httpx.Response(200, json=page_body([])))
    platform.token_value = "tok-taught-to-the-redactor-42"
    settings = load_settings(
        AD_PLATFORM_API_URL="http://platform",
        AD_PLATFORM_EMAIL="me@x.io",
        AD_PLATFORM_PASSWORD=PASSWORD,
        AD_PLATFORM_SHARED_BUDGET=False,
    )
    http = httpx.AsyncClient(transport=httpx.MockTransport(platform), base_url="http://platform")
    client = build_client(settings, http, clock)
    basic = base64.b64encode(f"me@x.io:{PASSWORD}".encode()).decode()
    assert REDACTOR.scrub(f"sent {basic}") == "sent ***"
    await client.list_page(1, 10)
    assert REDACTOR.scrub("token tok-taught-to-the-redactor-42 lacks scope") == (
        "token *** lacks scope"
    )
