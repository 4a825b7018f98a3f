"""The log of sends to the platform that every process sees: its protocol and values.

The rate budget (:mod:`adsync.ratelimit`) reserves each send in a
:class:`SharedSendLog` before it leaves; a database implements it
(:class:`adsync.store.SqlSendLog`, the ``rate_sends`` table), and
:class:`InMemorySendLog` stands in for it in tests. The rules of a reservation
are written once, here (:func:`decide_reservation`), so that every log admits
the same sends. This module knows neither the budget nor the database.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "LOOKBACK_SPANS",
    "InMemorySendLog",
    "Reservation",
    "SendChange",
    "SendLogShortcuts",
    "SendRequest",
    "SharedSendLog",
    "decide_reservation",
    "earliest_send",
]

# How far back a shared log reports other owners' sends, in kept windows: more
# than one, because a refusal is judged over a window plus a jitter tolerance.
LOOKBACK_SPANS = 2


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One budget asking a shared log for a send (see :meth:`SharedSendLog.reserve_many`)."""

    client_id: str
    owner: str
    span: float
    limit: int
    spacing: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """A shared log's answer to one :class:`SendRequest` (seconds on the log's clock)."""

    ok: bool
    # Our send's stamp when ``ok``; otherwise the moment the log was looked at.
    at: float
    # The earliest moment the log would take a send (``at`` itself when ``ok``).
    retry_at: float
    # Every other owner's send after ``at - LOOKBACK_SPANS * span``, ascending.
    foreign: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class SendChange:
    """One of our logged sends moved ``to`` when it really left, or (``to`` None) removed."""

    client_id: str
    owner: str
    sent_at: float
    to: float | None = None


class SharedSendLog(Protocol):
    """The sends of each client id by every process, where all of them can see them.

    Thread-safe and blocking (a database); budgets reach it through a
    :class:`~adsync.ratelimit.SendLogBatcher`.
    """

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        """Apply ``changes`` to our own sends, then take ``requests``; all atomically.

        For each request in order, a send is logged at the log's own clock if all
        owners' sends together leave room. The clock is read once the client ids'
        logs are locked, so stamps are in the order sends were admitted, and no
        process's clock comes into it. Each answer is
        :func:`decide_reservation` over the sends of the last
        ``LOOKBACK_SPANS * span`` (earlier requests of the batch included). Raises
        :class:`~adsync.errors.StoreError` when the log cannot be reached.
        """
        ...


def earliest_send(
    stamps: Sequence[float], at: float, *, span: float, limit: int, spacing: float
) -> float:
    """The earliest moment from ``at`` on that a send may leave after ``stamps`` (ascending)."""
    if stamps:
        at = max(at, stamps[-1] + spacing)
        live = [s for s in stamps if s > at - span]
        if len(live) >= limit:
            at = max(at, live[len(live) - limit] + span)
    return at


def decide_reservation(
    sends: Sequence[tuple[float, str]],
    owner: str,
    now: float,
    *,
    span: float,
    limit: int,
    spacing: float,
) -> Reservation:
    """Whether ``owner`` may send at ``now``, given every owner's ``(stamp, owner)`` sends.

    ``sends`` are those of the last ``LOOKBACK_SPANS * span``; ones stamped after
    ``now`` (another host's clock running ahead) count too.
    """
    ordered = sorted(sends)
    free_at = earliest_send([s for s, _ in ordered], now, span=span, limit=limit, spacing=spacing)
    foreign = tuple(s for s, o in ordered if o != owner)
    return Reservation(ok=free_at <= now, at=now, retry_at=free_at, foreign=foreign)


class SendLogShortcuts:
    """One request or one change at a time, through ``reserve_many`` (tests, tools)."""

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        """See :meth:`SharedSendLog.reserve_many`."""
        raise NotImplementedError

    def reserve(
        self, client_id: str, owner: str, *, span: float, limit: int, spacing: float
    ) -> Reservation:
        """One request on its own."""
        return self.reserve_many([SendRequest(client_id, owner, span, limit, spacing)])[0]

    def forget(self, client_id: str, owner: str, sent_at: float) -> None:
        """Delete one of our sends that the platform did not count (a 429, a 401)."""
        self.reserve_many([], [SendChange(client_id, owner, sent_at)])

    def restamp(self, client_id: str, owner: str, sent_at: float, to: float) -> None:
        """Move one of our sends to when its bytes actually left."""
        self.reserve_many([], [SendChange(client_id, owner, sent_at, to)])


class InMemorySendLog(SendLogShortcuts):
    """A :class:`SharedSendLog` in memory, for tests; thread-safe like the database one.

    ``now`` is its clock (the database's, in seconds), read once per batch.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._sends: dict[str, list[tuple[float, str]]] = {}
        self.reservations = 0
        self.batches = 0

    def reserve_many(
        self, requests: Sequence[SendRequest], changes: Sequence[SendChange] = ()
    ) -> list[Reservation]:
        with self._lock:
            self.batches += 1
            for change in changes:
                sends = self._sends.get(change.client_id, [])
                with contextlib.suppress(ValueError):
                    i = sends.index((change.sent_at, change.owner))
                    if change.to is None:
                        del sends[i]
                    else:
                        sends[i] = (change.to, change.owner)
            at = self._now()
            return [self._reserve(r, at) for r in requests]

    def sends(self, client_id: str) -> list[tuple[float, str]]:
        """The logged ``(stamp, owner)`` sends of a client id, oldest first."""
        with self._lock:
            return sorted(self._sends.get(client_id, []))

    def _reserve(self, r: SendRequest, at: float) -> Reservation:
        self.reservations += 1
        horizon = at - LOOKBACK_SPANS * r.span
        sends = [s for s in self._sends.get(r.client_id, []) if s[0] > horizon]
        decision = decide_reservation(
            sends, r.owner, at, span=r.span, limit=r.limit, spacing=r.spacing
        )
        if decision.ok:
            sends.append((at, r.owner))
        self._sends[r.client_id] = sends
        return decision
