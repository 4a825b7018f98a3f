"""Log lines: no secret in them, and on a console nothing a terminal would obey."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from adsync.observability import configure_logging

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[32mALL GOOD\x1b[0m\u202e"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)


def fail(message: str) -> None:
    raise RuntimeError(message)


def log_everything(secret: str = "") -> None:
    log = structlog.get_logger("adsync.test")
    log.warning(f"event {HOSTILE}", campaign_id=f"c{HOSTILE}", nested={"reason": HOSTILE})
    try:
        fail(f"boom {HOSTILE} {secret}")
    except RuntimeError:
        log.exception("it failed")
    library = logging.getLogger("some.library")
    library.warning("library says %s %s", HOSTILE, secret)
    try:
        fail(f"library boom {HOSTILE} {secret}")
    except RuntimeError:
        library.exception("library failed")


def test_console_logs_show_control_characters_as_escapes(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "console", stream=stream)
    log_everything()
    text = stream.getvalue()
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in text, text
    assert r"event \x1b]0;pwned\x07\x1b[2J" in text
    assert r"library says \x1b]0;pwned\x07" in text
    assert r"library boom \x1b]0;pwned\x07" in text
    # Our own line breaks (between lines, in tracebacks) stay line breaks.
    assert "Traceback (most recent call last):\n" in text
