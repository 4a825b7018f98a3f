"""Secrets out of every text adsync prints, logs or stores: the redaction step.

The first line of defence is that secrets are ``SecretStr`` and never passed to a
logger. This is the second: it catches what slips through anyway, any registered
secret value and anything shaped like an Authorization header value or a URL's
password. A module of its own, on the standard library only, so that whatever
shows outside text (the command line's error lines, the store's reasons, log
lines) can scrub it without loading the logging stack.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any

REDACTED = "***"
_AUTH_VALUE = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# Linear on any input (a megabyte of an error body must not take minutes): a
# scheme starts only where a run of scheme characters does, nothing is given
# back once matched (possessive), and a password is looked for within 256
# characters. Longer ones are registered secrets anyway (``database_secrets``).
_URL_PASSWORD = re.compile(
    r"(?<![a-z0-9+.-])(?P<scheme>[a-z][a-z0-9+.-]*+://[^:/@\s]++):[^@\s]{1,256}+@",
    re.IGNORECASE,
)
# Shorter values would blank out ordinary words wherever they appear.
_MIN_SECRET = 4
# Bearer tokens of every account of a long-lived process, current and previous.
_RECENT_SECRETS = 1000


class Redactor:
    """Replaces known secrets and secret-shaped strings in every event.

    Fixed secrets (passwords, a DSN's password) are kept for the life of the
    process. Secrets that keep coming (bearer tokens: one per account and hour,
    for as long as a worker runs) are kept among the ``recent`` last ones, so that
    scrubbing stays cheap; that is every account's current and previous tokens
    and many more.
    """

    def __init__(self, recent: int = _RECENT_SECRETS) -> None:
        self._fixed: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._max_recent = recent
        # Shortest first, with their lengths: a text is only searched for the
        # secrets that fit in it, longest first, so that a secret containing
        # another is replaced whole. One tuple, swapped whole, for the threads.
        self._by_length: tuple[tuple[str, ...], tuple[int, ...]] = ((), ())
        # Tokens arrive on the event loop while store threads log.
        self._lock = threading.Lock()

    def register(self, *values: str) -> None:
        """Remember values that must never be printed (passwords, encoded credentials)."""
        with self._lock:
            self._fixed.update(v for v in values if v and len(v) >= _MIN_SECRET)
            self._reorder()

    def register_recent(self, value: str) -> None:
        """Remember a secret that is replaced from time to time (a bearer token)."""
        if len(value) < _MIN_SECRET:
            return
        with self._lock:
            self._recent[value] = None
            self._recent.move_to_end(value)
            while len(self._recent) > self._max_recent:
                self._recent.popitem(last=False)
            self._reorder()

    def _reorder(self) -> None:
        ordered = tuple(sorted(self._fixed.union(self._recent), key=len))
        self._by_length = (ordered, tuple(len(secret) for secret in ordered))

    def scrub(self, text: str) -> str:
        """``text`` with every known secret and secret-shaped value replaced."""
        ordered, lengths = self._by_length
        for secret in reversed(ordered[: bisect.bisect_right(lengths, len(text))]):
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _AUTH_VALUE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        return _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}:{REDACTED}@", text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            event[key] = self._clean(value)
        return event


REDACTOR = Redactor()
