"""Tests for meshnode.roles.operator.assignment: which super-nodes hold which partition ranges."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshnode.roles.operator.assignment import (
    FIRST_KEY, LAST_KEY, MIN_WIDTH, Assignment, Range, Transfer, holders_of, join, leave,
    range_of, ranges_of)

POOL = tuple(bytes([i]) * 32 for i in range(1, 13))
EVERYTHING = (FIRST_KEY, LAST_KEY)


# -- strategies ------------------------------------------------------------------------------

_keys = st.integers(FIRST_KEY, LAST_KEY)
_offers = st.one_of(
    st.just(EVERYTHING),
    st.sampled_from([(0x0000, 0x7FFF), (0x8000, 0xFFFF), (0x4000, 0xBFFF), (0x0000, 0x3FFF)]),
    st.tuples(_keys, _keys).map(sorted).map(tuple))
_ks = st.integers(1, 4)
# Mostly joins, so tables fill up and split; leaves, rejoins and changed offers in between.
_operations = st.lists(st.tuples(st.sampled_from(["join", "join", "join", "leave", "reoffer"]),
                                 st.integers(0, 11), _offers),
                       max_size=40)


@st.composite
def _full_tables(draw):
    """A table where every range has exactly k holders (from POOL[:11]), ranges >= MIN_WIDTH."""
    k = draw(_ks)
    cuts = draw(st.lists(st.integers(1, (LAST_KEY + 1) // MIN_WIDTH - 1), unique=True,
                         max_size=8))
    bounds = [FIRST_KEY] + sorted(c * MIN_WIDTH for c in cuts) + [LAST_KEY + 1]
    ranges = []
    for low, end in zip(bounds, bounds[1:]):
        holders = draw(st.sets(st.sampled_from(POOL[:11]), min_size=k, max_size=k))
        ranges.append(Range(low, end - 1, holders))
    return Assignment(ranges, k)


# -- what every table and every step must satisfy ----------------------------------------------

def _segments(*assignments, transfers=()):
    """The common refinement of the assignments' ranges and the transfers: (low, high) pieces
    on which every one of them is constant."""
    starts = {FIRST_KEY}
    for a in assignments:
        starts.update(r.low for r in a.ranges)
    for t in transfers:
        starts.update((t.low, t.high + 1))
    starts = sorted(s for s in starts if s <= LAST_KEY)
    return list(zip(starts, [s - 1 for s in starts[1:]] + [LAST_KEY]))


def _covering(transfers, low, high):
    return [t for t in transfers if t.low <= low and high <= t.high]


class _Checks:
    """Assertions shared by the property tests."""

    def check_table(self, assignment, offers):
        """The ranges tile 0000-ffff, hold at most k, stay in offers, and stay bounded."""
        ranges = assignment.ranges
        self.assertEqual(ranges[0].low, FIRST_KEY)
        self.assertEqual(ranges[-1].high, LAST_KEY)
        for before, after in zip(ranges, ranges[1:]):
            self.assertEqual(after.low, before.high + 1)
            self.assertNotEqual(after.holders, before.holders)
        for r in ranges:
            self.assertLessEqual(r.low, r.high)
            self.assertGreaterEqual(r.width, MIN_WIDTH)
            self.assertLessEqual(len(r.holders), assignment.k)
            # Every range has k super-nodes or the operator serves it.
            self.assertEqual(assignment.served_by_operator(r), len(r.holders) != assignment.k)
            self.assertEqual(r in assignment.operator_ranges(), len(r.holders) < assignment.k)
            for holder in r.holders:
                low, high = offers[holder]
                self.assertTrue(low <= r.low and r.high <= high,
                                f"{holder[:1].hex()} holds {r.low:04x}-{r.high:04x} "
                                f"outside its offer {low:04x}-{high:04x}")

    def check_join(self, before, after, transfers, node, offer):
        """Only the joiner gains keys, from a former holder or the operator; a key loses at most
        one holder (a split drop) and never its last one, unless the joiner withdrew from a range
        that reached outside its offer."""
        k = before.k
        for t in transfers:
            self.assertEqual(t.to_node, node)
        for low, high in _segments(before, after, transfers=transfers):
            old, new = holders_of(before, low), holders_of(after, low)
            self.assertLessEqual(new - old, {node})
            lost = old - new
            if node in lost:
                was = range_of(before, low)
                self.assertFalse(offer[0] <= was.low and was.high <= offer[1])
                self.assertEqual(lost, {node})
                continue
            if lost:
                # A split drop: one holder of a full range, replaced by the joiner.
                self.assertEqual(len(lost), 1)
                self.assertEqual(len(old), k)
                self.assertNotIn(node, old)
                self.assertIn(node, new)
            if old:
                self.assertTrue(new, f"{low:04x}-{high:04x} lost its last holder")
            covering = _covering(transfers, low, high)
            if node in new and node not in old:
                self.assertEqual(len(covering), 1, f"{low:04x}-{high:04x} gained without transfer")
                source = covering[0].from_node
                if source is None:
                    self.assertLess(len(old), k)
                else:
                    self.assertIn(source, old)
            else:
                self.assertEqual(covering, [])

    def check_leave(self, before, after, node):
        """Every key keeps exactly its holders but the one that left (merges lose nothing)."""
        self.assertEqual(ranges_of(after, node), ())
        for low, high in _segments(before, after):
            self.assertEqual(holders_of(after, low), holders_of(before, low) - {node})
            self.assertEqual(holders_of(after, high), holders_of(before, high) - {node})


# -- property tests --------------------------------------------------------------------------

class AssignmentPropertyTests(_Checks, SynchronousTestCase):

    @given(_ks, st.lists(_offers, min_size=len(POOL), max_size=len(POOL)), _operations)
    def test_every_operation_keeps_the_invariants(self, k, offer_list, operations):
        """Any joins, leaves and changed offers keep the table valid and move only allowed data."""
        offers = dict(zip(POOL, offer_list))
        assignment = Assignment.initial(k)
        for operation, index, new_offer in operations:
            node = POOL[index]
            before = assignment
            if operation == "reoffer":
                offers[node] = new_offer
            if operation in ("join", "reoffer"):
                assignment, transfers = join(before, node, offers[node])
                self.check_join(before, assignment, transfers, node, offers[node])
                self.assertEqual(join(assignment, node, offers[node]), (assignment, ()))
            else:
                assignment = leave(before, node)
                self.check_leave(before, assignment, node)
            self.check_table(assignment, offers)

    @given(_full_tables(), _offers)
    def test_a_join_into_a_full_table_moves_one_range_part(self, full, offer):
        """Into a full table a newcomer takes one part of one range, and nobody else gains keys."""
        newcomer = POOL[11]
        after, transfers = join(full, newcomer, offer)
        self.check_join(full, after, transfers, newcomer, offer)
        self.assertLessEqual(len(transfers), 1)
        splittable = any(offer[0] <= r.low and r.high <= offer[1] and r.width >= 2 * MIN_WIDTH
                         for r in full.ranges)
        if splittable:
            self.assertEqual(len(transfers), 1)
        changed = [(low, high) for low, high in _segments(full, after)
                   if holders_of(full, low) != holders_of(after, low)]
        moved = [(t.low, t.high) for t in transfers]
        self.assertEqual((min(changed)[0], max(changed)[1]) if changed else None,
                         moved[0] if moved else None)
        for r in after.ranges:
            self.assertEqual(len(r.holders), full.k)

    @settings(max_examples=10)
    @given(_ks, st.lists(_offers, min_size=200, max_size=200))
    def test_range_count_stays_bounded(self, k, offer_list):
        """200 joins add at most two ranges each and never cut a range below MIN_WIDTH."""
        assignment = Assignment.initial(k)
        for i, offer in enumerate(offer_list):
            assignment, _ = join(assignment, i.to_bytes(32, "big"), offer)
        self.assertLessEqual(len(assignment.ranges), 1 + 2 * len(offer_list))
        self.assertGreaterEqual(min(r.width for r in assignment.ranges), MIN_WIDTH)

    @given(_full_tables(), _keys)
    def test_holders_of_is_the_range_containing_the_key(self, full, key):
        """holders_of answers from the one range whose bounds contain the key."""
        (containing,) = [r for r in full.ranges if r.low <= key <= r.high]
        self.assertEqual(range_of(full, key), containing)
        self.assertEqual(holders_of(full, key), containing.holders)


# -- examples --------------------------------------------------------------------------------

class JoinExampleTests(SynchronousTestCase):

    def test_first_k_joins_hold_everything(self):
        """The first K super-nodes each get 0000-ffff from the operator, who stops serving at K."""
        for k in range(1, 5):
            assignment = Assignment.initial(k)
            self.assertEqual(assignment.operator_ranges(), (Range(FIRST_KEY, LAST_KEY),))
            for i, node in enumerate(POOL[:k]):
                self.assertTrue(assignment.operator_ranges())
                assignment, transfers = join(assignment, node)
                self.assertEqual(transfers, (Transfer(FIRST_KEY, LAST_KEY, node, None),))
                self.assertEqual(assignment.ranges,
                                 (Range(FIRST_KEY, LAST_KEY, POOL[:i + 1]),))
            self.assertEqual(assignment.operator_ranges(), ())

    def test_join_after_k_splits_in_the_middle(self):
        """The (K+1)th super-node takes half of the keys; one old holder drops just that half."""
        assignment = Assignment.initial(3)
        for node in POOL[:3]:
            assignment, _ = join(assignment, node)
        assignment, transfers = join(assignment, POOL[3])
        self.assertEqual(assignment.ranges, (
            Range(0x0000, 0x7FFF, {POOL[1], POOL[2], POOL[3]}),
            Range(0x8000, 0xFFFF, {POOL[0], POOL[1], POOL[2]})))
        self.assertEqual(transfers, (Transfer(0x0000, 0x7FFF, POOL[3], POOL[1]),))
        self.assertEqual(assignment.operator_ranges(), ())

    def test_next_split_drops_the_busiest_holder(self):
        """The next newcomer splits the other half and drops a holder that serves the most keys."""
        assignment = Assignment.initial(3)
        for node in POOL[:4]:
            assignment, _ = join(assignment, node)
        assignment, transfers = join(assignment, POOL[4])
        # Four halves tie, the lowest is taken; of its holders POOL[1] and POOL[2] hold
        # 0000-ffff and POOL[3] only half, so POOL[3] is not the one dropped.
        self.assertEqual(assignment.ranges, (
            Range(0x0000, 0x3FFF, {POOL[2], POOL[3], POOL[4]}),
            Range(0x4000, 0x7FFF, {POOL[1], POOL[2], POOL[3]}),
            Range(0x8000, 0xFFFF, {POOL[0], POOL[1], POOL[2]})))
        self.assertEqual(transfers, (Transfer(0x0000, 0x3FFF, POOL[4], POOL[2]),))

    def test_with_k_1_the_dropped_holder_sends_the_part(self):
        """With one replica the only old holder hands over the part it stops serving."""
        assignment, _ = join(Assignment.initial(1), POOL[0])
        assignment, transfers = join(assignment, POOL[1])
        self.assertEqual(assignment.ranges, (Range(0x0000, 0x7FFF, {POOL[1]}),
                                             Range(0x8000, 0xFFFF, {POOL[0]})))
        self.assertEqual(transfers, (Transfer(0x0000, 0x7FFF, POOL[1], POOL[0]),))

    def test_half_offer_never_holds_the_other_half(self):
        """A super-node offering 0-7fff holds none of 8000-ffff, empty or full table alike."""
        assignment, transfers = join(Assignment.initial(3), POOL[0], (0x0000, 0x7FFF))
        self.assertEqual(assignment.ranges, (Range(0x0000, 0x7FFF, {POOL[0]}),
                                             Range(0x8000, 0xFFFF)))
        self.assertEqual(transfers, (Transfer(0x0000, 0x7FFF, POOL[0], None),))
        self.assertEqual(holders_of(assignment, 0x8000), frozenset())
        self.assertTrue(assignment.served_by_operator(range_of(assignment, 0x8000)))

        full = Assignment((Range(FIRST_KEY, LAST_KEY, POOL[:3]),), 3)
        after, transfers = join(full, POOL[3], (0x0000, 0x7FFF))
        # The middle of 0000-ffff clipped to the offer: the newcomer takes its whole offer.
        self.assertEqual(after.ranges, (Range(0x0000, 0x7FFF, POOL[1:4]),
                                        Range(0x8000, 0xFFFF, POOL[:3])))
        self.assertEqual(transfers, (Transfer(0x0000, 0x7FFF, POOL[3], POOL[1]),))

    def test_offer_straddling_a_range_cuts_at_the_offer(self):
        """A range below K partly outside the offer is cut at the offer's edge first."""
        assignment, _ = join(Assignment.initial(2), POOL[0])
        assignment, transfers = join(assignment, POOL[1], (0x1000, 0x1FFF))
        self.assertEqual(assignment.ranges, (Range(0x0000, 0x0FFF, {POOL[0]}),
                                             Range(0x1000, 0x1FFF, {POOL[0], POOL[1]}),
                                             Range(0x2000, 0xFFFF, {POOL[0]})))
        self.assertEqual(transfers, (Transfer(0x1000, 0x1FFF, POOL[1], None),))

    def test_newcomer_fills_operator_ranges_before_splitting(self):
        """A range below K in the offer is filled from the operator; nothing is split."""
        assignment = Assignment((Range(0x0000, 0x7FFF, POOL[:3]),
                                 Range(0x8000, 0xFFFF, POOL[:2])), 3)
        after, transfers = join(assignment, POOL[3])
        self.assertEqual(after.ranges, (Range(0x0000, 0x7FFF, POOL[:3]),
                                        Range(0x8000, 0xFFFF, POOL[:2] + (POOL[3],))))
        self.assertEqual(transfers, (Transfer(0x8000, 0xFFFF, POOL[3], None),))

    def test_joining_again_changes_nothing(self):
        """A second join of a node that holds keys adds no split and no transfer."""
        assignment = Assignment.initial(3)
        for node in POOL[:4]:
            assignment, _ = join(assignment, node)
        for node in POOL[:4]:
            self.assertEqual(join(assignment, node), (assignment, ()))

    def test_rejoin_refills_what_a_leave_left_below_k(self):
        """After a leave, joining a live node again makes it take the ranges left below K."""
        assignment = Assignment.initial(3)
        for node in POOL[:4]:
            assignment, _ = join(assignment, node)
        # POOL[3] holds 0000-7fff with POOL[1], POOL[2]; POOL[0] was dropped from it.
        assignment = leave(assignment, POOL[3])
        after, transfers = join(assignment, POOL[0])
        self.assertEqual(after.ranges, (Range(FIRST_KEY, LAST_KEY, POOL[:3]),))
        self.assertEqual(transfers, (Transfer(0x0000, 0x7FFF, POOL[0], None),))

    def test_narrower_offer_withdraws_the_rest(self):
        """Joining again with a narrower offer gives up the keys outside it, with no transfer."""
        assignment = Assignment.initial(3)
        for node in POOL[:3]:
            assignment, _ = join(assignment, node)
        after, transfers = join(assignment, POOL[0], (0x0000, 0x7FFF))
        self.assertEqual(after.ranges, (Range(0x0000, 0x7FFF, POOL[:3]),
                                        Range(0x8000, 0xFFFF, POOL[1:3])))
        self.assertEqual(transfers, ())
        self.assertEqual(after.operator_ranges(), (Range(0x8000, 0xFFFF, POOL[1:3]),))

    def test_no_cut_below_the_minimum_width(self):
        """An offer narrower than MIN_WIDTH inside a wider range gets nothing at all."""
        tiny = (0x1000, 0x1000 + MIN_WIDTH - 2)
        empty = Assignment.initial(3)
        self.assertEqual(join(empty, POOL[0], tiny), (empty, ()))
        full = Assignment((Range(FIRST_KEY, LAST_KEY, POOL[:3]),), 3)
        self.assertEqual(join(full, POOL[3], tiny), (full, ()))

    def test_join_rejects_an_offer_outside_the_keyspace(self):
        """An offer that is reversed or beyond ffff is refused."""
        for offer in [(0x10, 0x0F), (-1, 0x10), (0, 0x10000)]:
            self.assertRaises(ValueError, join, Assignment.initial(), POOL[0], offer)


class LeaveExampleTests(SynchronousTestCase):

    def test_leave_hands_ranges_below_k_to_the_operator(self):
        """A range that drops below K holders is served by the operator again."""
        assignment = Assignment.initial(3)
        for node in POOL[:3]:
            assignment, _ = join(assignment, node)
        self.assertEqual(assignment.operator_ranges(), ())
        assignment = leave(assignment, POOL[1])
        self.assertEqual(assignment.ranges, (Range(FIRST_KEY, LAST_KEY, {POOL[0], POOL[2]}),))
        self.assertEqual(assignment.operator_ranges(), assignment.ranges)

    def test_leave_merges_ranges_with_the_same_holders(self):
        """Once two neighbours have the same holders they become one range, keys and all."""
        assignment = Assignment.initial(2)
        for node in POOL[:3]:
            assignment, _ = join(assignment, node)
        self.assertEqual(assignment.ranges, (Range(0x0000, 0x7FFF, {POOL[1], POOL[2]}),
                                             Range(0x8000, 0xFFFF, {POOL[0], POOL[1]})))
        assignment = leave(leave(assignment, POOL[2]), POOL[0])
        self.assertEqual(assignment.ranges, (Range(FIRST_KEY, LAST_KEY, {POOL[1]}),))

    def test_leave_of_an_unknown_node_changes_nothing(self):
        """Removing a node that holds nothing leaves the table as it was."""
        assignment, _ = join(Assignment.initial(), POOL[0])
        self.assertEqual(leave(assignment, POOL[5]), assignment)


class AssignmentValidationTests(SynchronousTestCase):

    def test_rejects_gaps_overlaps_and_too_many_holders(self):
        """A table that does not tile 0000-ffff, or holds a range more than k times, is refused."""
        bad = [
            ((Range(0x0000, 0x7FFF), Range(0x8001, 0xFFFF)), 3),
            ((Range(0x0000, 0x8000), Range(0x8000, 0xFFFF)), 3),
            ((Range(0x0000, 0xFFFE),), 3),
            ((Range(0x0001, 0xFFFF),), 3),
            ((Range(0x0000, 0xFFFF, POOL[:4]),), 3),
            ((Range(0x0000, 0xFFFF),), 0),
            ((), 3),
        ]
        for ranges, k in bad:
            self.assertRaises(ValueError, Assignment, ranges, k)


class ConflictTests(SynchronousTestCase):
    """join's `conflicts`: a node never joins holders it conflicts with, in a fill or a
    split."""

    def test_fill_and_split_skip_conflicting_holders(self):
        a, b, c, d = (bytes([i]) * 32 for i in range(1, 5))
        same_side = {a, b}

        def conflicts(node_id, holders, low, high):
            return node_id in same_side and bool(holders & same_side - {node_id})

        table = Assignment.initial(2)
        table, _ = join(table, a, conflicts=conflicts)
        table, _ = join(table, b, conflicts=conflicts)
        self.assertEqual(ranges_of(table, b), ())  # the one range has a: b would conflict
        table, _ = join(table, c, conflicts=conflicts)
        self.assertEqual(holders_of(table, 0), {a, c})
        table, _ = join(table, d)  # another full range: 0000-ffff held by a and c … split
        table, _ = join(table, b, conflicts=conflicts)
        # The split drops c, not a, for b (a and b never share a range).
        for r in table.ranges:
            self.assertFalse({a, b} <= r.holders, r)
        self.assertTrue(ranges_of(table, b))
