"""Log lines: no secret in them, and on a console nothing a terminal would obey."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from adsync.observability import REDACTOR, Redactor, configure_logging

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


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_known_token_is_scrubbed_from_every_line_and_traceback(
    restore_logging: None, fmt: str
) -> None:
    token = "tok-5f1e0c9a7b3d2e8f"
    REDACTOR.register_recent(token)
    stream = io.StringIO()
    configure_logging("DEBUG", fmt, stream=stream)  # type: ignore[arg-type]
    log_everything(token)
    text = stream.getvalue()
    assert "library boom" in text
    assert token not in text
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert any("library boom" in line.get("exception", "") for line in lines)


def test_recent_secrets_are_bounded_and_fixed_ones_kept() -> None:
    redactor = Redactor(recent=3)
    redactor.register("the-password")
    for i in range(5):
        redactor.register_recent(f"token-{i}")
    text = " ".join(f"token-{i}" for i in range(5)) + " the-password"
    # The oldest tokens are forgotten; the password never is.
    assert redactor.scrub(text) == "token-0 token-1 *** *** *** ***"
    redactor.register_recent("token-2")  # seen again: the most recent now
    redactor.register_recent("token-5")
    assert redactor.scrub("token-2 token-3") == "*** token-3"


def test_a_secret_inside_a_longer_one_does_not_leave_a_piece_behind() -> None:
    redactor = Redactor()
    redactor.register_recent("abcd")
    redactor.register_recent("xxabcdxx")
    assert redactor.scrub("[xxabcdxx] [abcd]") == "[***] [***]"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_below_debug_a_library_error_is_one_line_without_its_traceback(
    restore_logging: None, fmt: str
) -> None:
    # A connection pool logs every connection it could not close with its
    # traceback; during a database outage that floods a cron log. Outside
    # --verbose the error is one line; the traceback is for DEBUG.
    stream = io.StringIO()
    configure_logging("INFO", fmt, stream=stream)  # type: ignore[arg-type]
    log_everything()
    text = stream.getvalue()
    assert "Traceback" not in text
    assert "library failed" in text
    assert "RuntimeError: library boom" in text
    assert "RuntimeError: boom" in text
    assert len(text.splitlines()) == 4, text


def test_at_debug_a_library_error_keeps_its_traceback(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    log_everything()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sum("Traceback" in line.get("exception", "") for line in lines) == 2
