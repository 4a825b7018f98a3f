"""Structured logs (structlog) with a redaction step as the second line of defence.

The first line of defence is that secrets are ``SecretStr`` and never passed to a
logger. The redaction step catches what slips through anyway: any registered
secret value, and anything shaped like an Authorization header value. On a
console, what a log line quotes from outside is shown with its control
characters escaped (:func:`adsync.printable.visible`).
"""

from __future__ import annotations

import bisect
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from adsync.printable import visible

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


class _Escaped(str):
    """Text that went through :func:`visible` already.

    The console renderer prints short strings as they are and ``repr()``s the
    others; ``repr()`` would escape the escapes a second time (``\\\\x1b``), so
    this one only adds the quotes.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        quote = '"' if "'" in self and '"' not in self else "'"
        return f"{quote}{self}{quote}"


# Multi-line text of our own (tracebacks): its line breaks are kept.
_MULTI_LINE = frozenset({"exception", "stack"})


def _console_safe(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Only strings need it: the renderer repr()s everything else, and repr()
    # escapes control characters itself.
    for key, value in list(event.items()):
        if isinstance(value, str):
            multi = key in _MULTI_LINE
            event[key] = _Escaped(
                visible(value, newlines=True, limit=None) if multi else visible(value)
            )
    return event


def configure_logging(
    level: str = "INFO",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    extra_secrets: Iterable[str] = (),
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr) as JSON or console lines."""
    stream = stream or sys.stderr
    REDACTOR.register(*extra_secrets)
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # A terminal (or a file later paged on one) obeys control characters.
    last: list[Any] = [REDACTOR, renderer] if use_json else [REDACTOR, _console_safe, renderer]
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            *last,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through stdlib (httpx, alembic, uvicorn) get the same
    # redaction and format; httpx logs URLs at INFO, which we keep to DEBUG.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # A library's traceback as text, so the redaction sees it (and a
                # console renderer never shows a frame's local variables).
                structlog.processors.format_exc_info,
                *last,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
