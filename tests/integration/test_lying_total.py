"""A platform whose ``total`` lies: the run fetches the pages that exist, not the ones it claims.

The stand-in platform below lists a few real campaigns under a ``total`` of 500
(``has_more`` following that total, as a platform computing it from the lie
would) and counts every request it receives.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adsync.config import load_settings
from adsync.models import RunStatus
from adsync.runner import sync_account
from adsync.store import SqlStore

CLAIMED_TOTAL = 500


@dataclass
class LyingPlatform:
    """What the stand-in serves and what it saw."""

    campaigns: int
    pages: list[int] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> Starlette:
        async def token(_request: Request) -> JSONResponse:
            return JSONResponse(
                {
                    "access_token": "stand-in-token",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "issued_at": int(time.time()),
                }
            )

        async def campaigns(request: Request) -> JSONResponse:
            page = int(request.query_params["page"])
            limit = int(request.query_params["limit"])
            self.pages.append(page)
            # Long enough for the pages sent together to be in flight together.
            await asyncio.sleep(0.02)
            ids = range((page - 1) * limit + 1, min(page * limit, self.campaigns) + 1)
            data = [
                {
                    "id": f"campaign_{i}",
                    "name": f"Campaign {i}",
                    "status": "active",
                    "budget": 100,
                    "impressions": 1,
                    "clicks": 1,
                    "conversions": 0,
                    "created_at": "2024-12-11T10:30:00.000Z",
                }
                for i in ids
            ]
            pagination = {
                "page": page,
                "limit": limit,
                "total": CLAIMED_TOTAL,
                "has_more": page * limit < CLAIMED_TOTAL,
            }
            return JSONResponse({"data": data, "pagination": pagination})

        async def sync(request: Request) -> JSONResponse:
            campaign_id = request.path_params["campaign_id"]
            self.syncs.append(campaign_id)
            return JSONResponse(
                {
                    "success": True,
                    "campaign_id": campaign_id,
                    "synced_at": datetime.now(UTC).isoformat(),
                    "message": "synced",
                }
            )

        return Starlette(
            routes=[
                Route("/auth/token", token, methods=["POST"]),
                Route("/api/campaigns", campaigns, methods=["GET"]),
                Route("/api/campaigns/{campaign_id}/sync", sync, methods=["POST"]),
            ]
        )


@contextmanager
def serving(platform: LyingPlatform) -> Iterator[LyingPlatform]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        platform.app(), log_level="warning", access_log=False, log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "the stand-in platform died while starting"
            assert time.monotonic() < deadline, "the stand-in platform did not start"
            time.sleep(0.01)
        platform.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield platform
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


RATE_LIMIT = 10


def run(platform: LyingPlatform, database_url: str) -> Any:
    settings = load_settings(
        AD_PLATFORM_API_URL=platform.url,
        AD_PLATFORM_EMAIL="a@x.io",
        AD_PLATFORM_PASSWORD="pw-123456",
        AD_PLATFORM_CLIENT_ID="liar",
        AD_PLATFORM_RATE_LIMIT=RATE_LIMIT,
        AD_PLATFORM_RATE_WINDOW=0.5,
        AD_PLATFORM_PAGE_SIZE=10,
        AD_PLATFORM_REQUEST_TIMEOUT=2,
        AD_PLATFORM_REQUEST_DEADLINE=3,
        DATABASE_URL=database_url,
    )
    store = SqlStore.from_url(database_url)
    store.upgrade()
    try:
        return asyncio.run(sync_account(settings, store))
    finally:
        store.dispose()


def test_one_short_page_is_the_whole_listing(database_url: str) -> None:
    with serving(LyingPlatform(campaigns=5)) as platform:
        outcome = run(platform, database_url)
    # 6 requests: one page and five sync calls, not the 50 pages the total implies.
    assert platform.pages == [1]
    assert sorted(platform.syncs) == [f"campaign_{i}" for i in range(1, 6)]
    assert outcome.counters.synced == 5
    assert outcome.status is RunStatus.PARTIAL
    assert any(
        f"495 campaign(s) fewer than its total {CLAIMED_TOTAL}" in p for p in outcome.problems
    )


def test_planned_pages_after_a_short_one_are_not_sent(database_url: str) -> None:
    with serving(LyingPlatform(campaigns=25)) as platform:
        outcome = run(platform, database_url)
    # Page 1 plans pages 2 to 50. Page 3 comes back short: the pages sent with it
    # in the first window may finish, none waiting for a later window is sent.
    assert 3 in platform.pages
    assert len(platform.pages) == len(set(platform.pages)) <= RATE_LIMIT, platform.pages
    assert max(platform.pages) <= RATE_LIMIT
    assert sorted(platform.syncs) == sorted(f"campaign_{i}" for i in range(1, 26))
    assert outcome.counters.synced == 25
    assert any(
        f"475 campaign(s) fewer than its total {CLAIMED_TOTAL}" in p for p in outcome.problems
    )


def test_the_stand_in_lies_as_described() -> None:
    with serving(LyingPlatform(campaigns=5)) as platform:
        body = httpx.get(f"{platform.url}/api/campaigns", params={"page": 2, "limit": 10}).json()
    assert body["data"] == []
    assert body["pagination"] == {"page": 2, "limit": 10, "total": 500, "has_more": True}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
