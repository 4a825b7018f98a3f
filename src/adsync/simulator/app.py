"""The simulated ad platform: a Starlette app implementing ``docs/platform-api.md``.

Per ``/api/*`` request the order is the platform's: authenticate (401s are not
counted), rate-limit (429s are not counted), count, then roll the faults.
All state lives in one :class:`Simulator` served by one event loop, so no locks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import re
import secrets
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG

from adsync.simulator.config import AccountSpec, SimulatorConfig
from adsync.simulator.data import CampaignBook, malform, malformation_for
from adsync.simulator.faults import Endpoint, Fault, FaultDice, FaultKind, FaultRates, roll_fault
from adsync.simulator.limiter import Admission, SlidingWindowLimiter, monotonic_ms

# The contract fixes the body's retry_after whatever the real wait is.
BODY_RETRY_AFTER: Final = 60
_INT_PARAM: Final = re.compile(r"[0-9]{1,15}")
_ALL_METHODS: Final = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_UNFINISHED_RESPONSE_LOG: Final = "ASGI callable returned without completing response."


def iso(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``, as the platform writes times."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class SimClientStats:
    """What one client id did, for ``GET /_sim/stats``."""

    requests: int = 0
    rate_limited: int = 0
    errors_503: int = 0
    errors_5xx: int = 0
    hangs: int = 0
    resets: int = 0
    bad_json: int = 0
    unauthorized: int = 0
    tokens_issued: int = 0
    list_calls: int = 0
    sync_calls: Counter[str] = field(default_factory=Counter)
    sync_ok: Counter[str] = field(default_factory=Counter)
    # When each sync call arrived (wall-clock seconds), counted or not (401, 429):
    # tests tell by it whether a client sent anything after it was told to stop.
    sync_arrivals: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    max_in_window: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "errors_503": self.errors_503,
            "errors_5xx": self.errors_5xx,
            "hangs": self.hangs,
            "resets": self.resets,
            "bad_json": self.bad_json,
            "unauthorized": self.unauthorized,
            "tokens_issued": self.tokens_issued,
            "list_calls": self.list_calls,
            "sync_calls": dict(self.sync_calls),
            "sync_ok": dict(self.sync_ok),
            "sync_arrivals": {cid: list(times) for cid, times in self.sync_arrivals.items()},
            "max_in_window": self.max_in_window,
        }


@dataclass(slots=True)
class AccountStats:
    """What was done with one account, whatever client ids were used."""

    tokens_issued: int = 0
    requests: int = 0
    sync_calls: Counter[str] = field(default_factory=Counter)
    sync_ok: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "tokens_issued": self.tokens_issued,
            "requests": self.requests,
            "sync_calls": dict(self.sync_calls),
            "sync_ok": dict(self.sync_ok),
        }


@dataclass(slots=True)
class _Token:
    account: str
    issued_at: float  # wall clock, for the expired_at the client is told
    expires_ms: int  # monotonic, for the decision
    revoked: bool = False


@dataclass(slots=True)
class _Account:
    spec: AccountSpec
    book: CampaignBook
    rates: FaultRates
    live_tokens: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Admitted:
    client_id: str
    account: _Account
    stats: SimClientStats
    account_stats: AccountStats
    fault: Fault


class _ExpectedResetFilter(logging.Filter):
    """Hides uvicorn's error line for the connections the simulator drops on purpose.

    uvicorn closes the connection when an app returns mid-body, which is exactly
    the reset fault, but it also logs that as an application error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.expected = 0

    def expect(self) -> None:
        self.expected += 1

    def filter(self, record: logging.LogRecord) -> bool:
        if self.expected and record.getMessage() == _UNFINISHED_RESPONSE_LOG:
            self.expected -= 1
            return False
        return True


class _ResetResponse(Response):
    """Sends the headers and half the body, then drops the connection."""

    def __init__(self, body: bytes, before_abort: Callable[[], None]) -> None:
        super().__init__(body, 200, media_type="application/json")
        self._before_abort = before_abort

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        cut = max(1, len(self.body) // 2)
        await send({"type": "http.response.body", "body": self.body[:cut], "more_body": True})
        # Returning now, with Content-Length unmet, makes uvicorn close the socket.
        self._before_abort()


class _HangResponse(Response):
    """Answers nothing until the client gives up; a 503 if the server stops first."""

    def __init__(self, shutdown: asyncio.Event) -> None:
        super().__init__(status_code=503)
        self._shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        stopping = asyncio.ensure_future(self._shutdown.wait())
        try:
            done, _ = await asyncio.wait(
                (disconnected, stopping), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (disconnected, stopping):
                task.cancel()
            await asyncio.gather(disconnected, stopping, return_exceptions=True)
        if disconnected not in done:
            unavailable = {"error": "Service temporarily unavailable", "message": "Shutting down"}
            await JSONResponse(unavailable, 503)(scope, receive, send)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Simulator:
    """The platform's state and its request handlers."""

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        now_ms: Callable[[], int] = monotonic_ms,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else secrets.randbelow(2**32)
        self._now_ms = now_ms
        self._wall = wall
        self._started_ms = now_ms()
        self.shutdown_event = asyncio.Event()
        self.reset_filter = _ExpectedResetFilter()
        self._accounts = {
            spec.email: _Account(
                spec=spec,
                book=CampaignBook(self.seed, spec.email, spec.campaigns),
                rates=FaultRates(
                    hang=config.hang_rate,
                    error=config.error_rate if spec.error_rate is None else spec.error_rate,
                    sync_error=config.sync_error_rate,
                    reset=config.reset_rate,
                    bad_json=config.bad_json_rate,
                ),
            )
            for spec in config.effective_accounts
        }
        self._tokens: dict[str, _Token] = {}
        self._limiter = SlidingWindowLimiter(
            config.rate_limit, max(1, round(config.rate_window * 1000))
        )
        self._dice = FaultDice(self.seed)
        self._clients: dict[str, SimClientStats] = {}
        self._account_stats = {email: AccountStats() for email in self._accounts}

    def begin_shutdown(self) -> None:
        """Release every hanging request (call on the server's loop)."""
        self.shutdown_event.set()

    # -- bookkeeping -------------------------------------------------------

    def _client(self, request: Request) -> tuple[str, SimClientStats]:
        client_id = request.headers.get("x-client-id") or "default"
        stats = self._clients.get(client_id)
        if stats is None:
            stats = self._clients[client_id] = SimClientStats()
        return client_id, stats

    def _fail(
        self,
        stats: SimClientStats,
        status: int,
        error: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> JSONResponse:
        if status == 401:
            stats.unauthorized += 1
        if status >= 500:
            stats.errors_5xx += 1
            if status == 503:
                stats.errors_503 += 1
        return JSONResponse({"error": error, "message": message, **extra}, status, headers)

    def stats(self) -> dict[str, Any]:
        """The control plane's view of everything counted since the last reset."""
        return {
            "clients": {cid: stats.to_json() for cid, stats in self._clients.items()},
            "accounts": {email: stats.to_json() for email, stats in self._account_stats.items()},
            "tokens_issued": sum(s.tokens_issued for s in self._account_stats.values()),
            "uptime": round((self._now_ms() - self._started_ms) / 1000, 3),
            "seed": self.seed,
        }

    def reset(self, *, tokens: bool = False) -> None:
        """Forget stats, windows and fault streams; also tokens when asked."""
        self._clients.clear()
        self._account_stats = {email: AccountStats() for email in self._accounts}
        self._limiter.reset()
        self._dice.reset()
        if tokens:
            self._tokens.clear()
            for account in self._accounts.values():
                account.live_tokens.clear()

    # -- the gate every /api request passes ---------------------------------

    def _admit(
        self, request: Request, endpoint: Endpoint, campaign: str | None = None
    ) -> _Admitted | Response:
        client_id, stats = self._client(request)
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not credential:
            return self._fail(
                stats, 401, "Unauthorized", "Send Authorization: Bearer <token>", challenge
            )
        token = self._tokens.get(credential)
        if token is None or token.revoked:
            return self._fail(
                stats, 401, "Invalid token", "The access token is not valid", challenge
            )
        now = self._now_ms()
        if now >= token.expires_ms:
            return self._fail(
                stats,
                401,
                "Token expired",
                "The access token has expired; request a new one from /auth/token",
                challenge,
                expired_at=iso(token.issued_at + self.config.token_ttl),
            )
        admission = self._limiter.acquire(client_id, now)
        if not admission.allowed:
            stats.rate_limited += 1
            return self._rate_limited(admission)
        account = self._accounts[token.account]
        account_stats = self._account_stats[token.account]
        stats.requests += 1
        stats.max_in_window = max(stats.max_in_window, admission.in_window)
        account_stats.requests += 1
        fault = roll_fault(
            self._dice.roll(client_id, endpoint),
            account.rates,
            endpoint,
            always_503=account.spec.always_503,
            fail_sync=campaign in self.config.fail_sync_ids,
        )
        return _Admitted(client_id, account, stats, account_stats, fault)

    def _rate_limited(self, admission: Admission) -> JSONResponse:
        headers: dict[str, str] = {}
        wait = admission.wait_ms / 1000
        if self.config.retry_after_header == "seconds":
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        elif self.config.retry_after_header == "http-date":
            # HTTP-dates have whole seconds: round up so the date is never early.
            headers["Retry-After"] = formatdate(math.ceil(self._wall() + wait), usegmt=True)
        limit, window = self.config.rate_limit, self.config.rate_window
        body = {
            "error": "Rate limit exceeded",
            "message": f"Too many requests: at most {limit} per {window:g} seconds",
            "retry_after": BODY_RETRY_AFTER,
        }
        return JSONResponse(body, 429, headers)

    def _early_fault(self, admitted: _Admitted) -> Response | None:
        """The response for faults that strike before any work, or None."""
        kind = admitted.fault.kind
        if kind is FaultKind.HANG:
            admitted.stats.hangs += 1
            return _HangResponse(self.shutdown_event)
        if kind is FaultKind.UNAVAILABLE:
            return self._fail(
                admitted.stats,
                503,
                "Service temporarily unavailable",
                "The platform is overloaded; retry later",
            )
        return None

    def _deliver(self, admitted: _Admitted, payload: dict[str, Any]) -> Response:
        """A 200 with ``payload``, unless a reset or bad-JSON fault spoils it."""
        response = JSONResponse(payload)
        kind = admitted.fault.kind
        if kind is FaultKind.RESET:
            admitted.stats.resets += 1
            return _ResetResponse(bytes(response.body), self.reset_filter.expect)
        if kind is FaultKind.BAD_JSON:
            admitted.stats.bad_json += 1
            # Any strict prefix of a JSON object is invalid JSON.
            truncated = bytes(response.body[: len(response.body) // 2])
            return Response(truncated, 200, media_type="application/json")
        return response

    # -- endpoints ---------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """``GET /health``: no auth, no limit."""
        uptime = (self._now_ms() - self._started_ms) / 1000
        return JSONResponse({"status": "ok", "timestamp": iso(self._wall()), "uptime": uptime})

    async def issue_token(self, request: Request) -> Response:
        """``POST /auth/token``: Basic credentials for a Bearer token."""
        _, stats = self._client(request)
        credentials = _parse_basic(request.headers.get("authorization", ""))
        if credentials is None:
            return self._fail(
                stats,
                401,
                "Unauthorized",
                "Send Authorization: Basic base64(email:password)",
                {"WWW-Authenticate": "Basic"},
            )
        email, password = credentials
        account = self._accounts.get(email)
        if account is None or not hmac.compare_digest(
            password.encode(), account.spec.password.encode()
        ):
            return self._fail(stats, 401, "Invalid credentials", "Wrong email or password")
        if self.config.invalidate_old_tokens:
            for old in account.live_tokens:
                self._tokens[old].revoked = True
            account.live_tokens.clear()
        token = secrets.token_urlsafe(32)
        issued = self._wall()
        ttl = self.config.token_ttl
        self._tokens[token] = _Token(email, issued, self._now_ms() + round(ttl * 1000))
        account.live_tokens.append(token)
        stats.tokens_issued += 1
        self._account_stats[email].tokens_issued += 1
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(ttl) if float(ttl).is_integer() else ttl,
                "issued_at": int(issued),
            }
        )

    async def list_campaigns(self, request: Request) -> Response:
        """``GET /api/campaigns?page=P&limit=L``."""
        admitted = self._admit(request, "list")
        if isinstance(admitted, Response):
            return admitted
        admitted.stats.list_calls += 1
        early = self._early_fault(admitted)
        if early is not None:
            return early
        page = _positive_int(request.query_params.get("page"), 1)
        limit = _positive_int(request.query_params.get("limit"), 10)
        if page is None or limit is None:
            return self._fail(
                admitted.stats, 400, "Bad request", "page and limit must be integers >= 1"
            )
        limit = min(limit, self.config.max_page_size)
        book = admitted.account.book
        malformed = self.config.malformed_ids
        data = []
        for campaign in book.page(page, limit):
            payload = campaign.read()
            if campaign.id in malformed:
                payload = malform(payload, malformation_for(campaign.id))
            data.append(payload)
        pagination = {
            "page": page,
            "limit": limit,
            "total": book.total,
            "has_more": page * limit < book.total,
        }
        return self._deliver(admitted, {"data": data, "pagination": pagination})

    async def sync_campaign(self, request: Request) -> Response:
        """``POST /api/campaigns/{id}/sync``: slow, may fail after its work."""
        campaign_id: str = request.path_params["campaign_id"]
        self._client(request)[1].sync_arrivals[campaign_id].append(round(self._wall(), 3))
        admitted = self._admit(request, "sync", campaign_id)
        if isinstance(admitted, Response):
            return admitted
        stats = admitted.stats
        stats.sync_calls[campaign_id] += 1
        admitted.account_stats.sync_calls[campaign_id] += 1
        early = self._early_fault(admitted)
        if early is not None:
            return early
        problem = _check_sync_body(await request.body(), campaign_id)
        if problem is not None:
            return self._fail(stats, 400, "Bad request", problem)
        if admitted.account.book.find(campaign_id) is None:
            return self._fail(stats, 404, "Not found", f"Campaign {campaign_id} not found")
        if self.config.sync_delay > 0:
            try:
                async with asyncio.timeout(self.config.sync_delay):
                    await self.shutdown_event.wait()
            except TimeoutError:
                pass  # the normal case: the work took its time
            else:
                return self._fail(stats, 503, "Service temporarily unavailable", "Shutting down")
        if admitted.fault.kind is FaultKind.SYNC_ERROR:
            status = admitted.fault.status
            return self._fail(stats, status, "Sync failed", f"Upstream error {status}; retry")
        response = self._deliver(
            admitted,
            {
                "success": True,
                "campaign_id": campaign_id,
                "synced_at": iso(self._wall()),
                "message": f"Campaign {campaign_id} synced",
            },
        )
        if admitted.fault.kind is FaultKind.NONE:
            stats.sync_ok[campaign_id] += 1
            admitted.account_stats.sync_ok[campaign_id] += 1
        return response

    async def unknown_api(self, request: Request) -> Response:
        """Any other ``/api/*`` path: authenticated and counted like the rest, then 404."""
        admitted = self._admit(request, "other")
        if isinstance(admitted, Response):
            return admitted
        early = self._early_fault(admitted)
        if early is not None:
            return early
        return self._fail(admitted.stats, 404, "Not found", f"No endpoint {request.url.path}")

    async def stats_endpoint(self, request: Request) -> Response:
        """``GET /_sim/stats``."""
        return JSONResponse(self.stats())

    async def reset_endpoint(self, request: Request) -> Response:
        """``POST /_sim/reset[?tokens=1]``."""
        tokens = request.query_params.get("tokens", "").lower() in {"1", "true", "yes"}
        self.reset(tokens=tokens)
        return JSONResponse({"reset": True, "tokens_cleared": tokens})


def _parse_basic(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    email, colon, password = decoded.partition(":")
    return (email, password) if colon and email else None


def _positive_int(raw: str | None, default: int) -> int | None:
    if raw is None:
        return default
    if not _INT_PARAM.fullmatch(raw):
        return None
    value = int(raw)
    return value if value >= 1 else None


def _check_sync_body(raw: bytes, campaign_id: str) -> str | None:
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return 'The body must be JSON: {"campaign_id": "..."}'
    if not isinstance(body, dict):
        return "The body must be a JSON object"
    if "campaign_id" in body and body["campaign_id"] != campaign_id:
        return "campaign_id in the body does not match the URL"
    return None


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal error"
    headers = exc.headers if isinstance(exc, HTTPException) else None
    return JSONResponse(
        {"error": detail, "message": f"{request.method} {request.url.path}"}, status, headers
    )


def create_app(config: SimulatorConfig, *, simulator: Simulator | None = None) -> Starlette:
    """The platform as an ASGI app; its :class:`Simulator` is ``app.state.simulator``."""
    sim = simulator if simulator is not None else Simulator(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        uvicorn_errors = logging.getLogger("uvicorn.error")
        uvicorn_errors.addFilter(sim.reset_filter)
        try:
            yield
        finally:
            uvicorn_errors.removeFilter(sim.reset_filter)

    routes = [
        Route("/health", sim.health, methods=["GET"]),
        Route("/auth/token", sim.issue_token, methods=["POST"]),
        Route("/api/campaigns", sim.list_campaigns, methods=["GET"]),
        Route("/api/campaigns/{campaign_id}/sync", sim.sync_campaign, methods=["POST"]),
        Route("/api/{path:path}", sim.unknown_api, methods=_ALL_METHODS),
        Route("/_sim/stats", sim.stats_endpoint, methods=["GET"]),
        Route("/_sim/reset", sim.reset_endpoint, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.simulator = sim
    return app


class SimulatorServer(uvicorn.Server):
    """A uvicorn server that releases hanging requests before draining connections.

    Without this, a hung request would hold shutdown until the graceful timeout.
    """

    def __init__(self, config: uvicorn.Config, simulator: Simulator) -> None:
        super().__init__(config)
        self.simulator = simulator

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.simulator.begin_shutdown()
        await super().shutdown(sockets=sockets)


def build_server(
    config: SimulatorConfig,
    *,
    log_level: str = "info",
    access_log: bool = True,
    log_config: dict[str, Any] | None = LOGGING_CONFIG,
    loop: str = "auto",
    graceful_timeout: int = 5,
) -> SimulatorServer:
    """A uvicorn server for the simulator of ``config``, ready to ``run()`` or ``serve()``."""
    simulator = Simulator(config)
    uvicorn_config = uvicorn.Config(
        create_app(config, simulator=simulator),
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=access_log,
        log_config=log_config,
        loop=loop,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
    )
    return SimulatorServer(uvicorn_config, simulator)
