"""Text from outside made safe to show: control characters escaped, length bounded.

A terminal obeys what it is sent: an ESC sequence sets the window title, clears
the screen or repaints a line, BEL rings, CR rewinds the line, and a bidi
override reorders what the reader sees. Campaign ids and error messages come
from the platform, and exception messages quote them, so every human-readable
output passes them through :func:`visible` first. JSON output does not: its
encoder escapes control characters already, and a machine wants the text as it came.
"""

from __future__ import annotations

import re
from typing import Final

# Longest text shown or kept from outside; an error body of megabytes says no more.
MAX_TEXT: Final = 2000

# C0 controls, DEL and C1 controls; the bidi embeddings, overrides, isolates and
# marks; the Unicode line and paragraph separators.
_BIDI_AND_SEPARATORS: Final = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROLS: Final = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_CONTROLS_BUT_NEWLINE: Final = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{_BIDI_AND_SEPARATORS}]")
_SHORT: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def visible(text: str, *, limit: int | None = MAX_TEXT, newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``).

    Cut to ``limit`` characters first (None: no limit). With ``newlines``, line
    breaks stay line breaks, for multi-line text of our own such as a traceback.
    """
    if limit is not None:
        text = shorten(text, limit)
    return (_CONTROLS_BUT_NEWLINE if newlines else _CONTROLS).sub(_escape, text)
