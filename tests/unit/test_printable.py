"""Untrusted text made visible: control characters escaped, length bounded."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adsync.printable import shorten, visible

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b]0;pwned\x07", r"\x1b]0;pwned\x07"),
        ("\x1b[2J\x1b[32mALL GOOD\x1b[0m", r"\x1b[2J\x1b[32mALL GOOD\x1b[0m"),
        ("a\rb\nc\td\x00e\x7f", r"a\rb\nc\td\x00e\x7f"),
        ("\x9b31m \x85 \x90", r"\x9b31m \x85 \x90"),
        ("abc\u202edcba", r"abc\u202edcba"),
        ("\u2066x\u2069 \u2028", r"\u2066x\u2069 \u2028"),
    ],
)
def test_control_characters_are_shown_as_escapes(raw: str, shown: str) -> None:
    assert visible(raw) == shown


def test_ordinary_text_is_left_alone() -> None:
    text = "Campaign «Été» 日本語 👩‍👩‍👧 [bold]x[/] 100% \\x1b"
    assert visible(text) == text


def test_newlines_can_be_kept_for_multi_line_text() -> None:
    assert visible("line 1\nline\x1b 2\r\n", newlines=True) == "line 1\nline\\x1b 2\\r\n"


def test_long_text_is_bounded_and_says_how_much_was_cut() -> None:
    assert shorten("x" * 10, 10) == "x" * 10
    cut = shorten("x" * 1_000_000, 100)
    assert cut.startswith("x" * 100)
    assert cut.endswith("(999900 more characters)")
    assert len(cut) < 130
    assert visible("\x07" * 5000, limit=50).count("\\x07") == 50


@given(st.text())
def test_nothing_a_terminal_obeys_survives(text: str) -> None:
    shown = visible(text)
    escaped = BIDI + "\u2028\u2029"
    for char in shown:
        assert unicodedata.category(char) != "Cc"
        assert char not in escaped
    # Only control characters change: the rest of the text is all there.
    kept = "".join(c for c in text if unicodedata.category(c) != "Cc" and c not in escaped)
    assert all(c in shown for c in kept)
