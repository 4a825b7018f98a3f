"""What pydantic refused, said in one line: each problem by where it is, never by its value.

The value refused may be a secret (a password, a DSN), so the message names the
field or the environment variable and says what is wrong with it, never what it was.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

__all__ = ["describe_problems"]


def describe_problems(
    exc: ValidationError, *, whole: str = "item", env_names: Mapping[str, str] | None = None
) -> str:
    """Each problem of ``exc``, joined by ``"; "``.

    A problem reads ``field: message`` (``outer.inner`` for a nested field, ``whole``
    for the object as a whole). With ``env_names`` (settings read from the
    environment: field name -> variable), it reads as someone who sets variables
    does: ``VARIABLE message`` with the message in lower case, and a missing one
    ``VARIABLE is not set``.
    """
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or whole
        if env_names is None:
            parts.append(f"{where}: {err['msg']}")
            continue
        message = "is not set" if err["type"] == "missing" else str(err["msg"]).lower()
        parts.append(f"{env_names.get(where, where)} {message}")
    return "; ".join(parts)
