"""Guards over a paginated listing: no endless loop, no silent loss, no id twice.

Pure bookkeeping: the pipeline fetches pages and feeds them here; this module
decides which pages to fetch next and what each page adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adsync.models import ListedItem, Page


@dataclass(frozen=True, slots=True)
class Accepted:
    """What one page adds to the listing."""

    items: tuple[ListedItem, ...]
    duplicates: tuple[str, ...]
    problems: tuple[str, ...]


@dataclass(slots=True)
class Listing:
    """The state of one account's listing, page by page."""

    max_pages: int
    seen_ids: set[str] = field(default_factory=set)
    pages_fetched: set[int] = field(default_factory=set)
    signatures: dict[tuple[str, ...], int] = field(default_factory=dict)
    total: int | None = None
    items_without_id: int = 0
    problems: list[str] = field(default_factory=list)
    stopped: bool = False
    # The first page known to be the listing's last (short, empty or without
    # has_more): the pages after it are not fetched, whatever ``total`` says.
    end: int | None = None

    def planned_pages(self, first: Page) -> list[int]:
        """After page 1: every other page its ``total`` implies, capped at ``max_pages``.

        Knowing them up front lets them be fetched side by side instead of one
        round trip after another. A first page that is already the last plans
        nothing, however large its ``total``.
        """
        if _is_last(first):
            return []
        count = math.ceil(first.total / first.limit) if first.limit else 1
        if count > self.max_pages:
            self._problem(
                f"listing has {count} pages by its total, more than the limit of "
                f"{self.max_pages} (AD_PLATFORM_MAX_PAGES): the rest are not fetched"
            )
            count = self.max_pages
        return list(range(2, count + 1))

    def accept(self, requested: int, page: Page) -> Accepted:
        """Take one page: drop ids already seen, note anything inconsistent."""
        problems: list[str] = []
        if page.number != requested:
            problems.append(f"asked for page {requested}, got page {page.number}")
        if self.total is None:
            self.total = page.total
        elif page.total != self.total:
            problems.append(f"page {requested} says total {page.total}, earlier pages {self.total}")
            self.total = max(self.total, page.total)
        ids = tuple(i.campaign_id or "" for i in page.items)
        if ids and ids in self.signatures:
            problems.append(f"page {requested} repeats page {self.signatures[ids]}")
        elif ids:
            self.signatures[ids] = requested
        self.pages_fetched.add(requested)
        fresh: list[ListedItem] = []
        duplicates: list[str] = []
        for item in page.items:
            if item.campaign_id is None:
                self.items_without_id += 1
                fresh.append(item)
            elif item.campaign_id in self.seen_ids:
                duplicates.append(item.campaign_id)
            else:
                self.seen_ids.add(item.campaign_id)
                fresh.append(item)
        if duplicates:
            problems.append(f"page {requested} repeats {len(duplicates)} id(s) already listed")
        for p in problems:
            self._problem(p)
        if _is_last(page) and (self.end is None or requested < self.end):
            self.end = requested
        return Accepted(tuple(fresh), tuple(duplicates), tuple(problems))

    def beyond_end(self, pages: list[int]) -> list[int]:
        """Which of ``pages`` come after the page that ended the listing: not to be fetched."""
        if self.end is None:
            return []
        return [n for n in pages if n > self.end]

    def next_page(self, last_number: int, last: Page, accepted: Accepted) -> int | None:
        """Whether to fetch another page past the planned ones, and which."""
        if not last.has_more or self.stopped:
            return None
        if not last.items or (accepted.problems and not accepted.items):
            self._problem(f"page {last_number} says has_more but brought nothing new: stopping")
            self.stopped = True
            return None
        if len(last.items) < last.limit:
            # Only the last page is short; a platform whose has_more (or total)
            # says otherwise would have every further page fetched empty.
            self._problem(
                f"page {last_number} says has_more but is short "
                f"({len(last.items)} of {last.limit}): stopping"
            )
            self.stopped = True
            return None
        nxt = last_number + 1
        if len(self.pages_fetched) >= self.max_pages:
            self._problem(
                f"stopped after {self.max_pages} pages (AD_PLATFORM_MAX_PAGES) "
                "while the platform still said has_more"
            )
            self.stopped = True
            return None
        return nxt

    def shortfall(self) -> int:
        """How many campaigns the platform's ``total`` promised that the listing did not bring."""
        listed = len(self.seen_ids) + self.items_without_id
        return max(0, (self.total or 0) - listed)

    def finish(self) -> None:
        """Record the final consistency check."""
        missing = self.shortfall()
        if missing:
            self._problem(
                f"listing brought {missing} campaign(s) fewer than its total {self.total}"
            )

    def _problem(self, text: str) -> None:
        self.problems.append(text)


def _is_last(page: Page) -> bool:
    """Whether ``page`` ends the listing: it says so, or it is short (empty included)."""
    return not page.has_more or len(page.items) < page.limit
