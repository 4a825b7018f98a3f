"""What is left of a run, for its ETA."""

from __future__ import annotations

from adsync.progress import requests_left


def test_nothing_is_known_before_the_platform_says_how_many() -> None:
    left = requests_left(
        None, synced=0, failed=0, page_size=10, pages_fetched=1, listing_done=False
    )
    assert left is None


def test_the_unlisted_pages_and_the_campaigns_not_done_are_left() -> None:
    # 95 campaigns are 10 pages; 3 listed, 20 synced, 2 failed.
    left = requests_left(95, synced=20, failed=2, page_size=10, pages_fetched=3, listing_done=False)
    assert left == 7 + 73


def test_a_finished_listing_leaves_only_sync_calls() -> None:
    left = requests_left(95, synced=20, failed=2, page_size=10, pages_fetched=3, listing_done=True)
    assert left == 73


def test_more_done_than_announced_leaves_nothing() -> None:
    # The platform's total may lie low; the ETA never goes negative.
    left = requests_left(5, synced=9, failed=1, page_size=10, pages_fetched=4, listing_done=False)
    assert left == 0
