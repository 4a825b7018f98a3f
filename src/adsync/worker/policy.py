"""What follows a sync attempt: done, retried after a backoff, handed over, or given up.

Pure: the decision depends only on the attempt's end, its number and the policy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from adsync.errors import (
    AdsyncError,
    AuthError,
    ConfigError,
    PermanentError,
    PlatformError,
    StoreError,
)
from adsync.models import RunStatus
from adsync.retry import full_jitter_backoff

if TYPE_CHECKING:
    from adsync.sync import SyncOutcome

__all__ = [
    "Action",
    "Decision",
    "JobRetryPolicy",
    "decide_next",
    "is_retryable_job_error",
]


class Action(StrEnum):
    """What the worker does once a sync attempt has ended."""

    DONE = "done"  # synced (or partly: failed campaigns are recorded); nothing to redo
    RETRY = "retry"  # transient failure: a new attempt after the backoff, resuming the run
    CONTINUE = "continue"  # the worker is stopping: another worker picks the run up now
    GIVE_UP = "give_up"  # retrying cannot help (credentials, config) or attempts exhausted
    # This worker cannot serve the account (its secret is missing here): another
    # worker takes the job, the attempt is not counted.
    HAND_BACK = "hand_back"


@dataclass(frozen=True, slots=True)
class Decision:
    """The worker's verdict on one attempt."""

    action: Action
    reason: str
    delay: float = 0.0
    next_attempt: int | None = None
    # The run the next attempt is about, when one was reached: the next attempt ends
    # as done if that run has ended well meanwhile, instead of starting another.
    run_id: str | None = None


class _TopOfRange(random.Random):
    """Draws the top of every range: full jitter's ceiling, the capped doubling itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


_TOP: Final = _TopOfRange()


@dataclass(frozen=True, slots=True)
class JobRetryPolicy:
    """Backoff of failed attempts: exponential, capped, jittered."""

    max_attempts: int = 6
    initial: float = 30.0
    maximum: float = 900.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds before the attempt after ``attempt``: half to all of the capped doubling.

        The fixed half gives what failed time to come back; the other half is
        :func:`adsync.retry.full_jitter_backoff`, which keeps accounts that failed
        together (platform down for all) from coming back in lockstep.
        """

        def half(rng: random.Random) -> float:
            return full_jitter_backoff(
                attempt, initial=self.initial / 2, maximum=self.maximum / 2, rng=rng
            )

        # The top of the half-range, plus a draw within it.
        return half(_TOP) + half(rng)


def is_retryable_job_error(error: BaseException) -> bool:
    """Whether another attempt at an account's sync can succeed where this one failed.

    About a whole attempt, after the client's retries of each request and the
    store's of each transaction (their own rules, in ``retry.py`` and the store): a
    platform or database still down after those is worth an attempt later;
    credentials or configuration are not.
    """
    if isinstance(error, ConfigError | AuthError | PermanentError):
        return False
    # Platform down or inconsistent listing, database down, run held by a live
    # process (its lease ends), network trouble: all pass.
    return isinstance(error, PlatformError | StoreError | OSError)


def decide_next(
    attempt: int,
    policy: JobRetryPolicy,
    rng: random.Random,
    *,
    outcome: SyncOutcome | None = None,
    error: BaseException | None = None,
    stopping: bool = False,
) -> Decision:
    """Decide what follows attempt number ``attempt`` of an account's sync.

    ``outcome`` is the run's end when the run was reached, ``error`` what stopped it
    before (bad account entry, run locked, database down); ``stopping`` says this
    worker is shutting down.
    """
    if outcome is not None:
        if outcome.status in (RunStatus.SUCCEEDED, RunStatus.PARTIAL):
            return Decision(Action.DONE, f"run {outcome.status.value}")
        if outcome.status is RunStatus.INTERRUPTED:
            if outcome.taken_over:
                # Another process holds the run now and finishes it.
                return Decision(Action.DONE, "another process took the run over")
            if stopping:
                return Decision(
                    Action.CONTINUE, "worker stopping; run left resumable", 0.0, attempt
                )
            # The lease could not be renewed (database trouble): resume it soon.
            error = error or StoreError(outcome.error or "run interrupted")
        else:
            error = outcome.fatal or error
            if error is None:
                error = AdsyncError(outcome.error or "run failed")
    if error is None:
        return Decision(Action.DONE, "nothing to do")
    reason = f"{type(error).__name__}: {error}"
    if not is_retryable_job_error(error):
        return Decision(Action.GIVE_UP, f"not retried ({reason})")
    if attempt >= policy.max_attempts:
        return Decision(
            Action.GIVE_UP,
            f"gave up after {attempt} attempts ({reason}); the run stays resumable and "
            "the next scheduled job resumes it",
        )
    return Decision(Action.RETRY, reason, policy.delay(attempt, rng), attempt + 1)
