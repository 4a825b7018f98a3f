"""DATABASE_URL: reading it, the secrets it carries, and how it is shown without them.

A URL that cannot be used is a :class:`~adsync.errors.ConfigError` (exit 2),
never a database outage to retry, and its password appears in no message.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from adsync.config import sqlalchemy_url
from adsync.errors import ConfigError

__all__ = ["database_secrets", "location", "parse_database_url", "read_only_sqlite_url", "scrub"]

# Query parameters of a database URL that carry a secret (libpq's names).
_SECRET_QUERY_KEYS = ("password", "sslpassword")


def parse_database_url(database_url: str) -> sa.URL:
    """The SQLAlchemy URL of a DATABASE_URL; a :class:`ConfigError` that never echoes it."""
    netloc = database_url.partition("://")[2].partition("/")[0]
    if netloc.count("@") > 1:
        # user:p@ss@host parses as host "ss@host": the password would be
        # half taken for a host name, and printed with it.
        raise ConfigError("invalid DATABASE_URL: write an @ in the password as %40")
    try:
        url = sa.make_url(sqlalchemy_url(database_url))
        url.port  # noqa: B018 - a non-numeric port only fails when read
    except (ArgumentError, ValueError):
        raise ConfigError(
            "invalid DATABASE_URL: expected sqlite:///PATH or postgresql://USER@HOST/DB"
        ) from None
    return url


def database_secrets(database_url: str | sa.URL) -> list[str]:
    """The secrets a database URL carries: its password, also as a query parameter."""
    try:
        url = sa.make_url(database_url) if isinstance(database_url, str) else database_url
    except (ArgumentError, ValueError):
        return []
    found = [str(url.password)] if url.password else []
    for key in _SECRET_QUERY_KEYS:
        value = url.query.get(key)
        values = [value] if isinstance(value, str) else list(value or ())
        found.extend(v for v in values if v)
    return found


def scrub(text: str, url: sa.URL) -> str:
    """``text`` with every secret of ``url`` replaced by ``***``."""
    for secret in database_secrets(url):
        text = text.replace(secret, "***")
    return text


def location(url: sa.URL, *, read_only: bool = False) -> str:
    """Where ``url`` points, for messages: no password, in the userinfo or the query.

    A SQLite file opened ``read_only`` is shown as the user named it, not as its
    percent-encoded read-only URI (:func:`read_only_sqlite_url`).
    """
    if read_only and url.get_backend_name() == "sqlite":
        return f"sqlite:///{unquote((url.database or '').removeprefix('file:'))}"
    return url.difference_update_query(_SECRET_QUERY_KEYS).render_as_string(hide_password=True)


def read_only_sqlite_url(url: sa.URL) -> sa.URL:
    """The same SQLite file as a read-only URI (``mode=ro``), which never creates it."""
    if url.database in (None, "", ":memory:"):
        raise ConfigError(
            "DATABASE_URL names an in-memory SQLite database: there is nothing to read"
        )
    path = Path(url.database)
    if not path.exists():
        raise ConfigError(
            f"no database at {path} (DATABASE_URL): point DATABASE_URL at the database "
            "adsync sync writes, or create one with `adsync db upgrade`"
        )
    return url.set(
        database="file:" + quote(str(path.absolute())),
        query={**url.query, "mode": "ro", "uri": "true"},
    )
