"""Values adsync passes around, and the validation of platform payloads.

Pydantic lives only at the boundary (``CampaignPayload``, ``PagePayload``): once a
payload is validated it becomes a frozen dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adsync.errors import PayloadError
from adsync.validation import describe_problems

MAX_BIGINT = 2**63 - 1


MAX_ID_LENGTH = 255


def is_storable_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` can key a campaign in the database (PostgreSQL and SQLite)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value


class CampaignPayload(BaseModel):
    """One campaign as the platform lists it. Unknown statuses are data, not errors."""

    model_config = ConfigDict(extra="ignore", strict=False)

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    name: str = Field(max_length=10_000)
    status: str = Field(min_length=1, max_length=64)
    budget: float
    # Counters must fit the database's BIGINT; a bigger one is bad data, not a crash.
    impressions: int = Field(ge=0, le=MAX_BIGINT)
    clicks: int = Field(ge=0, le=MAX_BIGINT)
    conversions: int = Field(ge=0, le=MAX_BIGINT)
    created_at: datetime | None = None

    @field_validator("id", "name", "status")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # PostgreSQL text cannot hold NUL; refuse it here so one campaign fails, not a batch.
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("created_at")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        # Stored in UTC; a date at the edge of the calendar whose offset moves it
        # past year 1 or 9999 is bad data for this campaign, not a failed batch.
        if value is None:
            return None
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:
            raise ValueError("created_at is out of range once converted to UTC") from None

    @field_validator("budget")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("budget must be a finite number")
        return value


class PaginationPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    page: int = Field(ge=1)
    limit: int = Field(ge=1)
    total: int = Field(ge=0)
    has_more: bool


class PagePayload(BaseModel):
    """A page of the listing. Items stay raw so that one bad campaign cannot sink a page."""

    model_config = ConfigDict(extra="ignore")

    data: list[Any]
    pagination: PaginationPayload


@dataclass(frozen=True, slots=True)
class Campaign:
    """A validated campaign."""

    id: str
    name: str
    status: str
    budget: float
    impressions: int
    clicks: int
    conversions: int
    created_at: datetime | None

    @classmethod
    def from_payload(cls, raw: object) -> Campaign:
        """Validate one raw list item; raise :class:`PayloadError` with the reason."""
        try:
            payload = CampaignPayload.model_validate(raw)
        except ValidationError as exc:
            raise PayloadError(f"invalid campaign payload: {describe_problems(exc)}") from exc
        return cls(
            id=payload.id,
            name=payload.name,
            status=payload.status,
            budget=payload.budget,
            impressions=payload.impressions,
            clicks=payload.clicks,
            conversions=payload.conversions,
            created_at=payload.created_at,
        )


@dataclass(frozen=True, slots=True)
class ListedItem:
    """One entry of a listed page: either a valid campaign or the reason it is not."""

    campaign_id: str | None
    campaign: Campaign | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the campaign listing."""

    number: int
    limit: int
    total: int
    has_more: bool
    items: tuple[ListedItem, ...]


@dataclass(frozen=True, slots=True)
class SyncReceipt:
    """The platform's answer to a successful sync call."""

    campaign_id: str
    synced_at: datetime


@dataclass(frozen=True, slots=True)
class SyncedCampaign:
    """A campaign whose sync call succeeded: what the store writes."""

    campaign: Campaign
    synced_at: datetime


@dataclass(frozen=True, slots=True)
class CampaignFailure:
    """A campaign that could not be synced, and why."""

    campaign_id: str
    reason: str
    kind: str  # "payload", "sync", "duplicate", "store"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # finished, some campaigns failed
    FAILED = "failed"  # the run itself failed (auth, platform down, database down)
    INTERRUPTED = "interrupted"  # stopped by a signal; resumable
    # Left unfinished longer than the resume bound: closed, and a new run started.
    ABANDONED = "abandoned"


@dataclass(slots=True)
class RunCounters:
    """What a run did, as recorded in ``sync_runs``."""

    seen: int = 0
    synced: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    pages: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One row of ``sync_runs``; ``resumed`` is True when ``claim_run`` took it over."""

    id: str
    client_id: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime
    lease_until: datetime
    owner: str
    resumes: int
    seen: int
    synced: int
    failed: int
    requests: int
    retries: int
    rate_limited: int
    pages: int
    listing_complete: bool
    resumable: bool
    error: str | None
    resumed: bool = False
    # The client's run order: a later run has a higher number (a resumed run keeps its own).
    run_seq: int = 0
    # Seconds some process was running the run, summed over its claims; None in
    # records made by hand (then the duration is start to finish).
    active_seconds: float | None = None

    def counters(self) -> RunCounters:
        """The recorded counters, to carry on from when a run is resumed."""
        return RunCounters(
            seen=self.seen,
            synced=self.synced,
            failed=self.failed,
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            pages=self.pages,
        )

    @property
    def duration(self) -> timedelta | None:
        """The time the run was running; None while it is unfinished.

        The gaps between an interrupted run and the process that resumed it are
        not part of it.
        """
        if self.finished_at is None:
            return None
        if self.active_seconds is not None:
            return timedelta(seconds=self.active_seconds)
        return self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a run has durably done so far: the basis for resuming it."""

    synced: frozenset[str]
    failed: frozenset[str]
    listed: frozenset[str]
    listing_complete: bool

    @property
    def pending(self) -> frozenset[str]:
        """Listed campaigns that are neither synced nor failed yet."""
        return self.listed - self.synced - self.failed


@dataclass(frozen=True, slots=True)
class RunWrite:
    """What one run's writer has ready: synced campaigns, failures, counters."""

    run_id: str
    client_id: str
    synced: tuple[SyncedCampaign, ...] = ()
    failures: tuple[CampaignFailure, ...] = ()
    counters: RunCounters | None = None
