"""DATABASE_URL: what is refused as bad configuration, and what never gets printed."""

from __future__ import annotations

import pytest

from adsync.errors import ConfigError
from adsync.store import SqlStore, database_secrets, schema_problem


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:p@ss@db.example/adsync", "write an @ in the password as %40"),
        ("postgresql://u:p@db.example:notaport/adsync", "invalid DATABASE_URL"),
        ("mysql://u:p@db.example/adsync", "cannot use DATABASE_URL"),
        ("postgresql+asyncpg://u:p@db.example/adsync", "cannot use DATABASE_URL"),
    ],
)
def test_an_unusable_url_is_bad_configuration(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        SqlStore.from_url(url)
    assert "p@ss" not in str(info.value)


def test_the_password_is_found_in_the_userinfo_and_in_the_query() -> None:
    assert database_secrets("postgresql://u:s3cret@db/a") == ["s3cret"]
    assert database_secrets("postgresql://u@db/a?password=qs3cret&sslmode=require") == ["qs3cret"]
    assert database_secrets("postgresql://u%40x:p%40ss@db/a") == ["p@ss"]
    assert database_secrets("sqlite:///adsync.db") == []


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2secret@127.0.0.1:1/a",
        "postgresql://u@127.0.0.1:1/a?password=hunter2secret&connect_timeout=1",
        "postgresql://u@127.0.0.1:1/a?sslpassword=hunter2secret",
    ],
)
def test_where_a_store_points_never_shows_a_password(url: str) -> None:
    store = SqlStore.from_url(url)
    try:
        assert "hunter2secret" not in store.database.where
        assert "127.0.0.1" in store.database.where
        described = store.database.describe(RuntimeError("auth failed for hunter2secret"))
        assert "hunter2secret" not in described
    finally:
        store.dispose()


def test_a_schema_is_judged_against_this_adsyncs_migrations() -> None:
    heads, known = frozenset({"0002"}), frozenset({"0001", "0002"})
    assert schema_problem(frozenset({"0002"}), heads, known) is None
    none = schema_problem(frozenset(), heads, known)
    assert none is not None
    assert "no adsync schema yet: run `adsync db upgrade`" in none
    older = schema_problem(frozenset({"0001"}), heads, known)
    assert older is not None
    assert "older than this adsync (revision 0001, needs 0002): run `adsync db upgrade`" in older
    newer = schema_problem(frozenset({"0003"}), heads, known)
    assert newer is not None
    assert "newer than this adsync: upgrade adsync" in newer
