"""Throwaway PostgreSQL databases on the shared test server.

The server comes from ``ADSYNC_TEST_POSTGRES_URL`` (default: the local server with
trust auth). A module of its own, not the conftest, so that tests that make a
database of their own can import it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get(
    "ADSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


def _url_for(database: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def create_postgres_database() -> str:
    """Create an empty database ``adsync_test_<hex>``; return its URL."""
    name = f"adsync_test_{uuid.uuid4().hex[:12]}"
    with admin_connection() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _url_for(name)


def drop_postgres_database(url: str) -> None:
    """Drop a database made by :func:`create_postgres_database`, even if still in use."""
    name = url.rpartition("/")[2]
    with admin_connection() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A database of :func:`create_postgres_database`, dropped on the way out."""
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)
