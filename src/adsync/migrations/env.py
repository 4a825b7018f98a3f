"""Alembic environment for adsync.

adsync runs Alembic programmatically (:meth:`adsync.store.store.SqlStore.upgrade`) and
hands over an open connection in ``config.attributes["connection"]``, so that the
caller controls the engine, the transaction and the lock around it. There is no
``alembic.ini`` and no URL here. The tables these migrations make are described,
for the code that uses them, in :mod:`adsync.store.schema` (a test compares the two).
"""

from __future__ import annotations

from alembic import context

_connection = context.config.attributes.get("connection")
if _connection is None:
    raise RuntimeError(
        "adsync migrations run through `adsync db upgrade` (SqlStore.upgrade), "
        "which passes a connection; they are not meant for the alembic CLI"
    )

context.configure(
    connection=_connection,
    target_metadata=None,
    # SQLite cannot ALTER most things; batch mode copies the table instead.
    render_as_batch=_connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
