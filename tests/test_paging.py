"""Reading a paged list: pages asked from each offset until empty, the total, or the limit."""

import attrs
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from meshnode.rpc.paging import read_pages


@attrs.frozen
class _Page:
    total: int
    items: tuple


class ReadPagesTests(SynchronousTestCase):
    def setUp(self):
        self.asked = []
        self.taken = []

    def server(self, items, per_page, total=None):
        """An `ask` serving `items` `per_page` at a time, claiming `total` (default: all)."""
        def ask(offset):
            self.asked.append(offset)
            return defer.succeed(_Page(len(items) if total is None else total,
                                       tuple(items[offset:offset + per_page])))
        return ask

    def test_reads_every_page_up_to_the_total(self):
        """Each page is asked from where the last ended, and reading stops at the total."""
        last = self.successResultOf(read_pages(self.server(list(range(7)), 3), "items",
                                               self.taken.extend))
        self.assertEqual(self.taken, list(range(7)))
        self.assertEqual(self.asked, [0, 3, 6])
        self.assertEqual(last.items, (6,))

    def test_an_empty_page_ends_the_list(self):
        """A server claiming more than it has is read until its first empty page."""
        self.successResultOf(read_pages(self.server([1, 2], 2, total=10), "items",
                                        self.taken.extend))
        self.assertEqual(self.taken, [1, 2])
        self.assertEqual(self.asked, [0, 2])

    def test_no_more_than_the_limit(self):
        """A list longer than `limit` pages is read only that far."""
        self.successResultOf(read_pages(self.server(list(range(10)), 1), "items",
                                        self.taken.extend, limit=4))
        self.assertEqual(self.taken, [0, 1, 2, 3])

    def test_a_failed_page_fails_the_reading(self):
        """A page that cannot be had fails the whole reading; earlier pages were taken."""
        def ask(offset):
            return defer.succeed(_Page(4, (offset,))) if offset == 0 else defer.fail(
                ValueError("gone"))
        self.failureResultOf(read_pages(ask, "items", self.taken.extend), ValueError)
        self.assertEqual(self.taken, [0])
