"""Pagination guards: page limit, repeated page, id seen twice, a total that disagrees."""

from __future__ import annotations

from adsync.models import Campaign, ListedItem, Page
from adsync.pagination import Listing


def item(cid: str | None) -> ListedItem:
    if cid is None:
        return ListedItem(None, None, "no id")
    return ListedItem(cid, Campaign(cid, cid, "active", 1.0, 0, 0, 0, None))


def page(
    n: int, ids: list[str | None], *, total: int = 25, limit: int = 10, more: bool = True
) -> Page:
    return Page(n, limit, total, more, tuple(item(i) for i in ids))


def ids(prefix: str, a: int, b: int) -> list[str | None]:
    return [f"{prefix}{i}" for i in range(a, b)]


def test_plans_the_pages_that_total_implies() -> None:
    listing = Listing(max_pages=100)
    first = page(1, ids("c", 0, 10), total=25)
    assert listing.planned_pages(first) == [2, 3]
    assert listing.planned_pages(page(1, ids("c", 0, 5), total=5, more=False)) == []


def test_caps_the_plan_at_max_pages_and_says_so() -> None:
    listing = Listing(max_pages=3)
    assert listing.planned_pages(page(1, ids("c", 0, 10), total=1000)) == [2, 3]
    assert any("AD_PLATFORM_MAX_PAGES" in p for p in listing.problems)


def test_a_clean_listing_has_no_problems() -> None:
    listing = Listing(max_pages=100)
    for n, (a, b) in enumerate([(0, 10), (10, 20), (20, 25)], start=1):
        acc = listing.accept(n, page(n, ids("c", a, b), more=n < 3))
        assert len(acc.items) == b - a
    listing.finish()
    assert listing.problems == []
    assert listing.shortfall() == 0


def test_an_id_seen_twice_is_synced_once_and_reported() -> None:
    listing = Listing(max_pages=100)
    listing.accept(1, page(1, ids("c", 0, 10)))
    acc = listing.accept(2, page(2, ids("c", 8, 18)))
    assert acc.duplicates == ("c8", "c9")
    assert [i.campaign_id for i in acc.items] == [f"c{i}" for i in range(10, 18)]
    assert any("repeats 2 id" in p for p in listing.problems)


def test_a_repeated_page_is_reported_and_ends_the_listing() -> None:
    listing = Listing(max_pages=100)
    first = page(1, ids("c", 0, 10))
    listing.accept(1, first)
    again = page(2, ids("c", 0, 10))
    acc = listing.accept(2, again)
    assert any("repeats page 1" in p for p in acc.problems)
    assert acc.items == ()
    assert listing.next_page(2, again, acc) is None
    assert listing.stopped


def test_has_more_with_an_empty_page_stops_instead_of_looping() -> None:
    listing = Listing(max_pages=100)
    empty = page(4, [], more=True)
    acc = listing.accept(4, empty)
    assert listing.next_page(4, empty, acc) is None


def test_the_page_limit_stops_an_endless_has_more() -> None:
    listing = Listing(max_pages=5)
    n, nxt = 1, 1
    while nxt is not None:
        current = page(n, ids(f"p{n}-", 0, 10), total=10_000)
        acc = listing.accept(n, current)
        nxt = listing.next_page(n, current, acc)
        if nxt is not None:
            n = nxt
    assert n == 5
    assert any("stopped after 5 pages" in p for p in listing.problems)


def test_a_total_that_disagrees_and_a_shortfall_are_reported() -> None:
    listing = Listing(max_pages=100)
    listing.accept(1, page(1, ids("c", 0, 10), total=25))
    listing.accept(2, page(2, ids("c", 10, 20), total=30))
    listing.accept(3, page(3, ids("c", 20, 25), total=30, more=False))
    listing.finish()
    assert any("total 30" in p for p in listing.problems)
    assert listing.shortfall() == 5
    assert any("5 campaign(s) fewer" in p for p in listing.problems)


def test_a_wrong_page_number_is_reported() -> None:
    listing = Listing(max_pages=100)
    acc = listing.accept(2, page(1, ids("c", 0, 10)))
    assert any("asked for page 2, got page 1" in p for p in acc.problems)


def test_items_without_id_count_toward_the_total() -> None:
    listing = Listing(max_pages=100)
    acc = listing.accept(1, page(1, [*ids("c", 0, 9), None], total=10, more=False))
    assert len(acc.items) == 10
    listing.finish()
    assert listing.shortfall() == 0


# A `total` that lies: the pages it implies are not fetched past the real end.


def test_a_short_first_page_plans_nothing_whatever_the_total() -> None:
    listing = Listing(max_pages=10_000)
    first = page(1, ids("c", 0, 5), total=500, more=True)
    acc = listing.accept(1, first)
    assert listing.planned_pages(first) == []
    assert listing.next_page(1, first, acc) is None
    listing.finish()
    assert any("495 campaign(s) fewer than its total 500" in p for p in listing.problems)


def test_a_short_page_ends_the_listing_even_when_it_says_has_more() -> None:
    listing = Listing(max_pages=100)
    listing.accept(1, page(1, ids("c", 0, 10), total=100))
    short = page(2, ids("c", 10, 13), total=100, more=True)
    acc = listing.accept(2, short)
    assert listing.next_page(2, short, acc) is None


def test_a_short_page_among_the_planned_ones_cancels_those_after_it() -> None:
    listing = Listing(max_pages=10_000)
    first = page(1, ids("c", 0, 10), total=500)
    listing.accept(1, first)
    planned = listing.planned_pages(first)
    assert planned == list(range(2, 51))
    assert listing.beyond_end(planned) == []
    listing.accept(3, page(3, ids("c", 20, 25), total=500))
    assert listing.beyond_end(planned) == list(range(4, 51))
    # An empty page further on (one already in flight) moves nothing back.
    listing.accept(5, page(5, [], total=500))
    assert listing.beyond_end(planned) == list(range(4, 51))


def test_an_empty_page_or_the_last_one_ends_the_listing_too() -> None:
    empty = Listing(max_pages=100)
    empty.accept(4, page(4, [], total=100))
    assert empty.beyond_end([5, 6]) == [5, 6]
    last = Listing(max_pages=100)
    last.accept(2, page(2, ids("c", 10, 20), total=100, more=False))
    assert last.beyond_end([3, 4]) == [3, 4]
    full = Listing(max_pages=100)
    full.accept(2, page(2, ids("c", 10, 20), total=100, more=True))
    assert full.beyond_end([3, 4]) == []
