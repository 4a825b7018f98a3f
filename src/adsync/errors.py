"""The one error tree of adsync.

AdsyncError
├── ConfigError            bad or missing settings, or what they name is unusable (exit code 2)
├── AuthError              the platform refused our credentials (exit code 3)
├── PlatformError          the platform answered in a way we cannot use
│   ├── TransientError     worth retrying: 5xx, timeout, connection error, invalid JSON
│   │   └── RateLimited    429: the budget pauses, then the request is retried
│   ├── PermanentError     not worth retrying: a 4xx other than 401/429
│   ├── UnusableToken      the token endpoint sent a token no request can carry
│   └── PaginationError    the listing is inconsistent beyond what the guards can repair
├── PayloadError           a campaign payload did not validate
├── JobFailed              a worker's sync job ended without syncing its account
├── Stopped                a request was not sent: its run is stopping (signal, lease lost)
└── StoreError             the database failed (after retries)
    ├── RunLocked          another live process holds this client's run (or took ours over)
    └── AmbiguousRunId     a run id prefix matches more than one run

Library errors (httpx, SQLAlchemy, pydantic) are translated into these only in the
module that calls the library, always with ``raise ... from exc``.
"""

from __future__ import annotations


class AdsyncError(Exception):
    """Base class of every error adsync raises on purpose."""


class ConfigError(AdsyncError):
    """A setting is missing or invalid, or what it names cannot be used as it is.

    A port already in use, a database that does not exist or needs ``adsync db
    upgrade``: fixed by changing the setting or the environment, not by retrying.
    """


class AuthError(AdsyncError):
    """The platform refused the credentials."""


class PlatformError(AdsyncError):
    """The platform answered in a way we cannot use."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(PlatformError):
    """A failure worth retrying: 5xx, timeout, connection error, invalid JSON."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """The platform answered 429; ``retry_after`` is seconds from now when it said so."""


class PermanentError(PlatformError):
    """A failure that retrying cannot fix (4xx other than 401 and 429)."""


class UnusableToken(PlatformError):
    """The token endpoint sent an access token that cannot go into a request header.

    The account's problem, not a campaign's: it ends the run (resumable).
    """


class PaginationError(PlatformError):
    """The campaign listing is inconsistent beyond what the guards can repair."""


class PayloadError(AdsyncError):
    """A campaign payload did not validate."""


class JobFailed(AdsyncError):
    """A sync job ended without syncing its account; the message says why and what next."""


class Stopped(AdsyncError):
    """A request was not sent because its run is stopping: told to, or its lease is lost.

    Not a failure of the campaign it was for: that campaign stays pending, and
    the run that takes over (or the next one) sends it.
    """


class StoreError(AdsyncError):
    """The database failed, after retries."""


class StoreUnavailable(StoreError):
    """The database could not be reached (or stayed busy) through every retry."""


class RunLocked(StoreError):
    """Another live process holds the run lease for this client, or took ours over."""


class AmbiguousRunId(StoreError):
    """A run id prefix matches more than one run."""
