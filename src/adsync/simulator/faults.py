"""Seeded fault decisions.

Each counted request draws one :class:`Roll` from a stream of its own
``(seed, client id, endpoint)``, always the same number of draws whatever the
rates are. So a seed replays the same faults for the same requests, and turning
one fault kind on does not reshuffle when the others happen.
:func:`roll_fault` turns a roll into a fault and is pure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

Endpoint = Literal["list", "sync", "other"]

SYNC_ERROR_STATUSES: Final[tuple[int, ...]] = (500, 502, 503)


class FaultKind(StrEnum):
    """What goes wrong with one request."""

    NONE = "none"
    HANG = "hang"
    UNAVAILABLE = "unavailable"  # 503 before any work
    SYNC_ERROR = "sync_error"  # 5xx after the sync's work
    RESET = "reset"
    BAD_JSON = "bad_json"


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault and, for errors, the status to answer with."""

    kind: FaultKind
    status: int = 200


NO_FAULT: Final = Fault(FaultKind.NONE)


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Probabilities of each fault kind for one request."""

    hang: float = 0.0
    error: float = 0.0
    sync_error: float = 0.0
    reset: float = 0.0
    bad_json: float = 0.0


@dataclass(frozen=True, slots=True)
class Roll:
    """Uniform draws in [0, 1), one per decision, taken for every counted request."""

    hang: float
    error: float
    sync_error: float
    sync_status: float
    reset: float
    bad_json: float


def roll_fault(
    roll: Roll,
    rates: FaultRates,
    endpoint: Endpoint,
    *,
    always_503: bool = False,
    fail_sync: bool = False,
) -> Fault:
    """The fault for one request.

    Precedence: an account that always answers 503, a campaign whose sync always
    fails, then a hang, a 503 (lists) or 5xx (syncs), a reset, a bad JSON body.
    Each rate is the share of *all* requests of the endpoint that get that fault
    (a 0.2 error rate beside a 0.1 hang rate still 503s one list request in
    five); when the rates add up past 1, earlier kinds win.
    """
    if always_503:
        return Fault(FaultKind.UNAVAILABLE, 503)
    if endpoint == "sync" and fail_sync:
        return Fault(FaultKind.SYNC_ERROR, 500)
    odds = _Odds()
    if odds.strikes(roll.hang, rates.hang):
        return Fault(FaultKind.HANG)
    if endpoint == "other":
        return NO_FAULT
    if endpoint == "list" and odds.strikes(roll.error, rates.error):
        return Fault(FaultKind.UNAVAILABLE, 503)
    if endpoint == "sync" and odds.strikes(roll.sync_error, rates.sync_error):
        pick = min(int(roll.sync_status * len(SYNC_ERROR_STATUSES)), len(SYNC_ERROR_STATUSES) - 1)
        return Fault(FaultKind.SYNC_ERROR, SYNC_ERROR_STATUSES[pick])
    if odds.strikes(roll.reset, rates.reset):
        return Fault(FaultKind.RESET)
    if odds.strikes(roll.bad_json, rates.bad_json):
        return Fault(FaultKind.BAD_JSON)
    return NO_FAULT


class _Odds:
    """Turns shares of all requests into chances among those not yet struck."""

    def __init__(self) -> None:
        self._left = 1.0  # share of requests no earlier fault kind took

    def strikes(self, draw: float, rate: float) -> bool:
        if rate <= 0.0:
            return False
        # draw < rate / left, without dividing by a left that rounding made 0.
        hit = draw * self._left < rate
        self._left = max(0.0, self._left - rate)
        return hit


class FaultDice:
    """One random stream per (client id, endpoint), derived from the seed."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._streams: dict[tuple[str, Endpoint], random.Random] = {}

    def roll(self, client_id: str, endpoint: Endpoint) -> Roll:
        """The next roll of this client's stream for this endpoint."""
        key = (client_id, endpoint)
        stream = self._streams.get(key)
        if stream is None:
            # A string seed is hashed with SHA-512: stable across processes,
            # unlike hash(), which PYTHONHASHSEED randomises.
            stream = self._streams[key] = random.Random(f"{self._seed}|{client_id}|{endpoint}")
        draw = stream.random
        return Roll(draw(), draw(), draw(), draw(), draw(), draw())

    def reset(self) -> None:
        """Restart every stream, so the same requests meet the same faults again."""
        self._streams.clear()
