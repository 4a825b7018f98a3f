"""Where adsync keeps its runs, campaigns and history.

One noun per module:

- :mod:`~adsync.store.protocol`: :class:`Store`, what the rest of adsync calls;
- :mod:`~adsync.store.store`: :class:`SqlStore`, SQLite and PostgreSQL;
- :mod:`~adsync.store.memory`: :class:`InMemoryStore`, the same promises in memory;
- :mod:`~adsync.store.sendlog`: :class:`SqlSendLog`, the shared rate log's table;
- :mod:`~adsync.store.schema`: the tables, as the migrations leave them;
- :mod:`~adsync.store.database`: the engine, its retried transactions and its clock;
- :mod:`~adsync.store.faults`: which database failures are transient;
- :mod:`~adsync.store.urls`: DATABASE_URL and its secrets;
- :mod:`~adsync.store.rules`: what every store keeps the same way.

The names below are importable from ``adsync.store`` itself. They are loaded when
first used, so that importing the package (for :class:`Store` or
:class:`InMemoryStore`) does not load SQLAlchemy and Alembic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adsync.owner import host_identity, local_owner_is_dead, make_owner
    from adsync.store.database import Database
    from adsync.store.faults import is_transient_db_error
    from adsync.store.memory import InMemoryStore
    from adsync.store.protocol import Store
    from adsync.store.schema import (
        MIGRATIONS_DIR,
        UTCDateTime,
        metadata,
        schema_problem,
        sync_runs,
    )
    from adsync.store.sendlog import SqlSendLog, rate_lock_key
    from adsync.store.store import SqlStore
    from adsync.store.urls import database_secrets

__all__ = [
    "MIGRATIONS_DIR",
    "Database",
    "InMemoryStore",
    "SqlSendLog",
    "SqlStore",
    "Store",
    "UTCDateTime",
    "database_secrets",
    "host_identity",
    "is_transient_db_error",
    "local_owner_is_dead",
    "make_owner",
    "metadata",
    "rate_lock_key",
    "schema_problem",
    "sync_runs",
]

# name -> the module that defines it
_HOMES = {
    "MIGRATIONS_DIR": "adsync.store.schema",
    "Database": "adsync.store.database",
    "InMemoryStore": "adsync.store.memory",
    "SqlSendLog": "adsync.store.sendlog",
    "SqlStore": "adsync.store.store",
    "Store": "adsync.store.protocol",
    "UTCDateTime": "adsync.store.schema",
    "database_secrets": "adsync.store.urls",
    # Lease owners are the owner module's; callers have long found them here.
    "host_identity": "adsync.owner",
    "is_transient_db_error": "adsync.store.faults",
    "local_owner_is_dead": "adsync.owner",
    "make_owner": "adsync.owner",
    "metadata": "adsync.store.schema",
    "rate_lock_key": "adsync.store.sendlog",
    "schema_problem": "adsync.store.schema",
    "sync_runs": "adsync.store.schema",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
