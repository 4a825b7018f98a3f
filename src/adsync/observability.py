"""Structured logs (structlog) with a redaction step as the second line of defence.

The first line of defence is that secrets are ``SecretStr`` and never passed to a
logger. The redaction step (:mod:`adsync.redact`, re-exported here) catches what
slips through anyway: any registered secret value, and anything shaped like an
Authorization header value. On a console, what a log line quotes from outside
is shown with its control characters escaped (:func:`adsync.printable.visible`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from adsync.printable import visible
from adsync.redact import REDACTED, REDACTOR, Redactor

__all__ = ["REDACTED", "REDACTOR", "Redactor", "configure_logging"]


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


def _exception_in_one_line(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """An error's type and message instead of its traceback (below DEBUG).

    Libraries log some errors with their traceback (a connection pool, for
    every connection it could not close during a database outage); in a cron
    or container log that is dozens of lines per event. Outside DEBUG the
    line says what failed; ``--verbose`` shows where.
    """
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if isinstance(exc_info, BaseException):
        exc: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = sys.exc_info()[1]
    if exc is not None:
        message = " ".join(str(exc).split())
        # Not "exception": a console renderer puts that on lines of its own.
        event["exc"] = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
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
    exceptions: Any = (
        structlog.processors.format_exc_info if numeric <= logging.DEBUG else _exception_in_one_line
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            exceptions,
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
                exceptions,
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
