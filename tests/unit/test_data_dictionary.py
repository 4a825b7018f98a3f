"""docs/data-dictionary.md names every table and column the migrations make, as they make them.

``adsync.store.schema`` is held to the migrations by the schema tests; this holds
the data dictionary to it: the same tables, the same columns in each, and for
each column the same type and the same ``null``.
"""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa

from adsync.store import metadata
from adsync.store.schema import UTCDateTime

DICTIONARY = Path(__file__).resolve().parents[2] / "docs" / "data-dictionary.md"
_SECTION = re.compile(r"^## `(\w+)`$", re.MULTILINE)
_ROW = re.compile(r"^\| `(\w+)` \| ([^|]+?) \| (yes|no) \| (.+) \|$", re.MULTILINE)


def documented() -> dict[str, dict[str, tuple[str, bool]]]:
    """``{table: {column: (type, nullable)}}`` as the dictionary writes them."""
    text = DICTIONARY.read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    tables: dict[str, dict[str, tuple[str, bool]]] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        rows = _ROW.findall(body)
        assert rows, f"table {name} has no column rows"
        tables[name] = {col: (kind, null == "yes") for col, kind, null, _meaning in rows}
    return tables


def type_name(column: sa.Column[object]) -> str:
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return "timestamp (UTC)"
    if isinstance(kind, sa.Text):
        return "text"
    if isinstance(kind, sa.String):
        return f"string({kind.length})"
    if isinstance(kind, sa.BigInteger):
        return "bigint"
    if isinstance(kind, sa.Integer):
        return "integer"
    if isinstance(kind, sa.Double):
        return "double"
    if isinstance(kind, sa.Boolean):
        return "boolean"
    raise AssertionError(f"{column}: add {kind!r} to the dictionary's types")


def test_every_table_and_column_is_documented_with_its_type() -> None:
    docs = documented()
    version = docs.pop("alembic_version")
    assert version == {"version_num": ("string(32)", False)}
    actual = {
        table.name: {c.name: (type_name(c), bool(c.nullable)) for c in table.columns}
        for table in metadata.sorted_tables
    }
    assert docs == actual


def test_every_column_has_a_meaning() -> None:
    text = DICTIONARY.read_text(encoding="utf-8")
    for _col, _kind, _null, meaning in _ROW.findall(text):
        assert len(meaning.strip()) > 10
