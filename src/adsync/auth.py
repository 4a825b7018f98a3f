"""Token exchange: Basic credentials in, a Bearer token out, refreshed before it expires.

One refresh at a time however many requests wait for it; the credentials and the
token never reach a log line or an error message. Each secret is handed to an
``on_secret`` callback the moment the provider has it (the encoded credentials
when it is built, each token as it arrives), so that the process's redaction
knows it before anything can quote it.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import httpx
import structlog
from pydantic import BaseModel, ValidationError
from pydantic import SecretStr as _SecretStr

from adsync.clock import Clock
from adsync.errors import AuthError, TransientError, UnusableToken
from adsync.retry import RetryPolicy, RetryStats, retrying

log = structlog.get_logger("adsync.auth")

REDACTED: Final = "***"
# What a header value can carry unchanged: visible ASCII, no spaces (RFC 9110
# field values; RFC 6750 tokens are a subset). Anything else either fails to
# encode or changes the request, as a CR LF would.
_HEADER_SAFE: Final = re.compile(r"[\x21-\x7e]+")
# Far above any real token (JWTs of a few kilobytes), below what servers accept
# as a whole header section.
_MAX_TOKEN: Final = 8192
# This provider's current token and the ones before it, for scrubbing error texts.
_TOKENS_KEPT: Final = 4


def _ignore(_secret: str) -> None:
    return None


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be sent as ``Authorization: Bearer <token>``, or None."""
    if not token:
        return "is empty"
    if len(token) > _MAX_TOKEN:
        return f"is {len(token)} characters long (at most {_MAX_TOKEN})"
    if not token.isascii():
        return "has non-ASCII characters"
    if not _HEADER_SAFE.fullmatch(token):
        return "has spaces or control characters"
    return None


class TokenPayload(BaseModel):
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a secret
    expires_in: float
    issued_at: float | None = None


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and the wall time it must be replaced by."""

    value: str
    refresh_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"Token(refresh_at={self.refresh_at}, expires_at={self.expires_at})"


def plan_token(payload: TokenPayload, received_at: float, margin: float) -> Token:
    """When to refresh a token, from ``issued_at``/``expires_in`` and our own clock.

    ``issued_at`` is whole seconds, so the token was issued within a second after
    it. The earlier of that and our own receipt wins, so a platform clock behind
    ours only makes us refresh early; the margin never exceeds a tenth of the
    lifetime, and a token is used for at least half its life by our clock (a
    platform clock far behind ours must not make us refresh on every request;
    if it really expires sooner, the 401 makes us refresh then).
    """
    lifetime = max(0.0, payload.expires_in)
    issued = received_at
    if payload.issued_at is not None:
        issued = min(issued, payload.issued_at + 1.0)
    expires_at = issued + lifetime
    refresh_at = max(expires_at - min(margin, lifetime * 0.1), received_at + lifetime * 0.5)
    return Token(value=payload.access_token, refresh_at=refresh_at, expires_at=expires_at)


class TokenProvider:
    """Hands out a valid bearer token; refreshes it once for all waiters."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        email: str,
        password: _SecretStr,
        clock: Clock,
        margin: float = 60.0,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        timeout: float = 30.0,
        on_secret: Callable[[str], None] = _ignore,
    ) -> None:
        self._http = http
        self._email = email
        self._password = password
        self._clock = clock
        self._margin = margin
        self._policy = policy or RetryPolicy(max_attempts=5, max_seconds=120)
        self._rng = rng or random.Random()
        self._timeout = timeout
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self._on_secret = on_secret
        self._held: deque[str] = deque(maxlen=_TOKENS_KEPT)
        self.refreshes = 0
        on_secret(self._encoded())

    def _encoded(self) -> str:
        raw = f"{self._email}:{self._password.get_secret_value()}".encode()
        return base64.b64encode(raw).decode("ascii")

    def _basic(self) -> str:
        return "Basic " + self._encoded()

    def scrub(self, text: str) -> str:
        """``text`` without this provider's encoded credentials or any token it held.

        For what the platform says back: an error message may quote the token
        the request carried.
        """
        for secret in sorted((*self._held, self._encoded()), key=len, reverse=True):
            if secret and secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _valid(self) -> Token | None:
        token = self._token
        if token is not None and self._clock.wall() < token.refresh_at:
            return token
        return None

    async def get(self) -> str:
        """A token valid for a while yet; refreshes when due (one caller does it)."""
        token = self._valid()
        if token is not None:
            return token.value
        async with self._lock:
            token = self._valid()
            if token is None:
                token = await self._refresh()
            return token.value

    def invalidate(self, value: str) -> None:
        """Drop ``value`` after the platform refused it (401), unless already replaced."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def _refresh(self) -> Token:
        stats = RetryStats()
        async for attempt in retrying(self._policy, self._clock, self._rng, stats):
            with attempt:
                token = await self._exchange()
        self.refreshes += 1
        self._token = token
        log.debug("token refreshed", expires_in=round(token.expires_at - self._clock.wall(), 1))
        return token

    async def _exchange(self) -> Token:
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.post(
                    "/auth/token", headers={"Authorization": self._basic()}
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise TransientError("token request timed out") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"token request failed: {type(exc).__name__}") from exc
        if response.status_code in (401, 403):
            raise AuthError(
                f"the platform refused the credentials of {self._email} "
                f"(HTTP {response.status_code}): check the email and password "
                "(AD_PLATFORM_EMAIL / AD_PLATFORM_PASSWORD, or the account's entry)"
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(
                f"token endpoint answered {response.status_code}", status=response.status_code
            )
        if response.status_code != 200:
            raise AuthError(f"token endpoint answered HTTP {response.status_code}")
        try:
            payload = TokenPayload.model_validate_json(response.content)
        except ValidationError:
            # Not chained: pydantic's message would quote the body, token included.
            raise TransientError("token endpoint sent an unreadable body") from None
        token = payload.access_token
        self._on_secret(token)
        problem = token_problem(token)
        if problem is not None:
            # Not retried: the endpoint would most likely send the same again. The
            # token itself stays out of the message.
            raise UnusableToken(
                f"the token endpoint sent an access token that {problem}: it cannot be "
                "sent in an Authorization header; the platform must issue a usable one"
            )
        self._held.append(token)
        return plan_token(payload, self._clock.wall(), self._margin)
