"""Reading a list another node serves a page at a time: each request names the offset to start
from, each page carries its part of the list and the list's total length."""

from twisted.internet import defer

PAGE_LIMIT = 256  # pages one reading of a list may take


@defer.inlineCallbacks
def read_pages(ask, field, take, limit=PAGE_LIMIT):
    """Ask for pages with `ask(offset)` → Deferred[page] and hand each page's items (its
    attribute `field`) to `take(items)` as it comes, until a page is empty, the page's
    `total` is reached, or `limit` pages were read → Deferred[the last page]."""
    offset = 0
    for _ in range(limit):
        page = yield ask(offset)
        items = getattr(page, field)
        take(items)
        offset += len(items)
        if not items or offset >= page.total:
            break
    return page
