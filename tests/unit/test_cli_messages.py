"""What the command line says about what it did, decided from data alone."""

from __future__ import annotations

from adsync.cli.db import upgrade_message


def test_db_upgrade_says_created_upgraded_or_up_to_date() -> None:
    head = frozenset({"0004"})
    assert upgrade_message(frozenset(), head) == "created the database schema (revision 0004)"
    assert (
        upgrade_message(frozenset({"0002"}), head)
        == "upgraded the database schema from revision 0002 to 0004"
    )
    assert upgrade_message(head, head) == "the database schema is up to date (revision 0004)"
