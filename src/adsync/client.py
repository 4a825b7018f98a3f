"""PlatformClient: every call to the platform goes through the rate budget,
the token provider and the retry policy, over one injected ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import structlog
from pydantic import ValidationError

from adsync.auth import TokenProvider
from adsync.clock import Clock
from adsync.errors import AuthError, PermanentError, RateLimited, Stopped, TransientError
from adsync.events import ClientCounters, RequestEvent
from adsync.gate import SendGate
from adsync.models import (
    Campaign,
    ListedItem,
    Page,
    PagePayload,
    SyncReceipt,
    is_storable_id,
)
from adsync.ratelimit import RateBudget, Send
from adsync.retry import RetryPolicy, RetryStats, parse_retry_after, retrying

log = structlog.get_logger("adsync.client")

T = TypeVar("T")

__all__ = ["ClientStats", "PlatformClient", "RequestEvent", "classify", "parse_page"]


@dataclass(slots=True)
class ClientStats:
    """Counts of what the client sent and heard, for run records and metrics."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    timeouts: int = 0
    by_status: Counter[str] = field(default_factory=Counter)


def _same(text: str) -> str:
    return text


def classify(
    response: httpx.Response, now_wall: float, scrub: Callable[[str], str] = _same
) -> Exception | None:
    """Decide what a response means: ``None`` for success, else the error to raise.

    ``scrub`` takes secrets out of the platform's words (a 403 may quote the token).
    """
    status = response.status_code
    if 200 <= status < 300:
        return None
    retry_after = parse_retry_after(response.headers.get("retry-after"), now_wall)
    message = _error_text(response, scrub)
    if status == 429:
        return RateLimited(f"rate limited: {message}", status=status, retry_after=retry_after)
    if status >= 500:
        return TransientError(f"HTTP {status}: {message}", status=status, retry_after=retry_after)
    if status == 401:
        # The token: refreshed once and tried again by the caller.
        return AuthError(f"HTTP {status}: {message}")
    # 403 and every other 4xx: this request will not succeed by repeating it.
    return PermanentError(f"HTTP {status}: {message}", status=status)


def _error_text(response: httpx.Response, scrub: Callable[[str], str]) -> str:
    # The platform's own error words only; headers (and so tokens) never. Each
    # part scrubbed before it is cut, so that no piece of a secret survives.
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return scrub(response.reason_phrase)[:200] or "no reason given"
    if isinstance(body, dict):
        parts = [scrub(str(body[k]))[:200] for k in ("error", "message") if k in body]
        if parts:
            return " - ".join(parts)
    return scrub(response.reason_phrase)[:200] or "no reason given"


def parse_page(body: Any) -> Page:
    """Validate a listing page; each item separately, so one bad campaign sinks nothing."""
    try:
        payload = PagePayload.model_validate(body)
    except ValidationError as exc:
        raise TransientError(f"malformed campaign page: {exc.error_count()} problem(s)") from exc
    items = []
    for raw in payload.data:
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        # A bad campaign is recorded under its id, when that id could be stored:
        # one the database cannot hold (NUL, too long) would sink the run's
        # bookkeeping instead, so such an item goes on record without an id.
        campaign_id = raw_id if is_storable_id(raw_id) else None
        try:
            items.append(ListedItem(campaign_id, Campaign.from_payload(raw)))
        except Exception as exc:  # noqa: BLE001 - any validation problem becomes data
            items.append(ListedItem(campaign_id, None, str(exc)))
    p = payload.pagination
    return Page(p.page, p.limit, p.total, p.has_more, tuple(items))


class PlatformClient:
    """The platform's API for one account and client id."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        auth: TokenProvider,
        budget: RateBudget,
        clock: Clock,
        client_id: str | None,
        policy: RetryPolicy,
        deadline: float = 30.0,
        rng: random.Random | None = None,
        observe: Callable[[RequestEvent], None] | None = None,
    ) -> None:
        self._http = http
        self.auth = auth
        self.budget = budget
        self._clock = clock
        self._client_id = client_id
        self._policy = policy
        self._deadline = deadline
        self._rng = rng or random.Random()
        self._observe = observe
        self.stats = ClientStats()
        # Asked right before every send, after whatever wait came first; the
        # pipeline of the run puts its own here. This one never closes.
        self.gate = SendGate(clock)

    def counters(self) -> ClientCounters:
        """What this client sent, heard and waited so far."""
        s = self.stats
        return ClientCounters(
            requests=s.requests,
            retries=s.retries,
            rate_limited=s.rate_limited,
            timeouts=s.timeouts,
            refreshes=self.auth.refreshes,
            waited_seconds=self.budget.waited_seconds,
        )

    def seconds_for(self, requests: int) -> float:
        """How long ``requests`` more requests take at the rate enforced now (an ETA)."""
        return self.budget.seconds_for(requests)

    async def list_page(self, page: int, limit: int) -> Page:
        """One page of the campaign listing."""
        return await self._call(
            "GET", "/api/campaigns", "list", parse_page, params={"page": page, "limit": limit}
        )

    async def sync_campaign(self, campaign_id: str) -> SyncReceipt:
        """Ask the platform to sync one campaign (slow); success only on ``success: true``."""
        path = f"/api/campaigns/{quote(campaign_id, safe='')}/sync"

        def receipt(body: Any) -> SyncReceipt:
            if not isinstance(body, dict) or body.get("success") is not True:
                raise TransientError("sync call did not report success")
            synced_at = _parse_time(body.get("synced_at"), self._clock.wall())
            return SyncReceipt(campaign_id=campaign_id, synced_at=synced_at)

        return await self._call(
            "POST", path, "sync", receipt, json_body={"campaign_id": campaign_id}
        )

    async def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        parse: Callable[[Any], T],
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
    ) -> T:
        """One request with retries; ``parse`` reads the answer inside them, so a
        malformed answer is retried like any other transient failure."""
        stats = RetryStats()

        def on_retry(exc: BaseException, wait: float) -> None:
            log.debug("retrying", endpoint=endpoint, error=str(exc), wait=round(wait, 3))

        try:
            async for attempt in retrying(
                self._policy, self._clock, self._rng, stats, on_retry, sleep=self.gate.sleep
            ):
                with attempt:
                    return parse(await self._attempt(method, path, endpoint, params, json_body))
        finally:
            self.stats.retries += stats.retries
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _attempt(
        self,
        method: str,
        path: str,
        endpoint: str,
        params: dict[str, Any] | None,
        json_body: Any,
    ) -> Any:
        refreshed = False
        while True:
            # The wait for a slot (and for a token) ends at once when the gate
            # closes; what it waited for may be refused all the same.
            send, token = await self.gate.race(self.budget.acquire(self.auth.get))
            if self.gate.closed:
                self.budget.forget(send)
                raise Stopped(self.gate.reason or "stopped")
            headers = {"Authorization": f"Bearer {token}"}
            if self._client_id is not None:
                headers["X-Client-ID"] = self._client_id
            started = self._clock.monotonic()
            self.stats.requests += 1

            async def trace(event: str, info: dict[str, Any], send: Send = send) -> None:
                if event == "http11.send_request_body.complete":
                    self.budget.restamp(send, self._clock.monotonic())

            try:
                # httpx's timeouts bound each phase; the deadline bounds the whole
                # request, so a server that trickles bytes cannot hold us forever.
                async with asyncio.timeout(self._deadline):
                    response = await self._http.request(
                        method,
                        path,
                        params=params,
                        json=json_body,
                        headers=headers,
                        extensions={"trace": trace},
                    )
            except (TimeoutError, httpx.TimeoutException) as exc:
                self._record(endpoint, "timeout", started)
                self.stats.timeouts += 1
                raise TransientError(f"{endpoint} request timed out") from exc
            except httpx.TransportError as exc:
                self._record(endpoint, "connection", started)
                raise TransientError(f"{endpoint} request failed: {type(exc).__name__}") from exc
            except httpx.DecodingError as exc:
                # A body its Content-Encoding cannot undo: as broken as bad JSON.
                self._record(endpoint, "invalid_json", started)
                raise TransientError(f"{endpoint}: undecodable body in the answer") from exc
            error = classify(response, self._clock.wall(), self.auth.scrub)
            if error is None:
                try:
                    body = json.loads(response.content)
                except (ValueError, UnicodeDecodeError) as exc:
                    self._record(endpoint, "invalid_json", started)
                    raise TransientError(
                        f"{endpoint}: invalid JSON in a {response.status_code} answer"
                    ) from exc
                self._record(endpoint, str(response.status_code), started)
                return body
            self._record(endpoint, str(response.status_code), started)
            if isinstance(error, AuthError):
                # Unauthenticated requests are not counted by the platform.
                self.budget.forget(send)
                if refreshed:
                    # A fresh token refused again: maybe invalidated by a newer login
                    # elsewhere. Worth a retry with backoff, not an endless loop.
                    raise TransientError(f"{endpoint}: token refused after refresh")
                self.auth.invalidate(token)
                refreshed = True
                continue
            if isinstance(error, RateLimited):
                self.stats.rate_limited += 1
                change = self.budget.refused(send, error.retry_after)
                log.warning(
                    "rate limited by the platform",
                    endpoint=endpoint,
                    limit=self.budget.limit,
                    learned=None if change is None else change.new,
                    retry_after=error.retry_after,
                )
                raise error
            raise error

    def _record(self, endpoint: str, outcome: str, started: float) -> None:
        seconds = self._clock.monotonic() - started
        self.stats.by_status[f"{endpoint}:{outcome}"] += 1
        if outcome not in ("timeout", "connection") and (endpoint == "list" or outcome == "429"):
            # Quick answers time the round trip, which paces consecutive sends.
            self.budget.observe_rtt(seconds)
        if self._observe is not None:
            self._observe(RequestEvent(endpoint, outcome, seconds))


def _parse_time(value: object, fallback_wall: float) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.fromtimestamp(fallback_wall, tz=UTC)
