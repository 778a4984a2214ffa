"""Which super-nodes hold which DHT partition ranges: the operator's placement (DESIGN.md §5).

Pure: an Assignment and a join or leave in, the next Assignment (and the TransferPartition work
that join implies) out. The operator signs SuperNode records from it; nothing here does I/O.

The table tiles the partition keys 0000-ffff with ranges, each held by at most K super-nodes;
a range with fewer than K holders is also served by the operator (seed §3.10.1: the operator
starts with every partition and fills in while there are too few super-nodes). The rules aim at
moving the least data, because every key a node gains is a TransferPartition it must receive:

* A node only ever holds keys inside its offer (`--partition A-B`); a range that sticks out of
  the offer is cut at the offer's edge and the node takes the inside part.
* join, step 1 (withdraw): keys the node held outside its (new) offer are dropped from it.
* join, step 2 (fill): the node joins every range inside its offer that has fewer than K holders
  and that it does not hold yet; the data comes from the operator, who serves those ranges.
* join, step 3 (split): only when the node holds nothing after the fill (a newcomer and every
  range in its offer already has K holders): the full range offering the widest half inside the
  offer (ties: the lowest keys) is cut at its middle, clipped to the offer. One part keeps its K
  holders; the other part goes to the new node and K-1 of the old holders. The old holder that
  holds the most keys (ties: the lowest id) is dropped from that part: it just stops serving it,
  no data moves for it. The new node receives that part from the lowest-id holder that keeps it
  (with K = 1 there is none: from the dropped holder, which must serve it until then).
  So a join into a full table is one transfer and nobody else gains keys.
* Idempotence: a node that already holds keys is never given a split; joining again only fills
  ranges that fell below K since (after a leave), so join(join(a, n, o), n, o) == join(a, n, o)
  with no transfers. Re-running join for live nodes is how the operator restores K after a leave.
* Bounded table: no cut ever leaves a piece narrower than MIN_WIDTH keys. A range the node
  could only take by making such a piece is skipped; if that leaves it nothing, the join
  changes nothing. Adjacent ranges with the same holders are merged after every join and leave,
  so each join adds at most two ranges and a leave adds none.
* leave: the node is removed from every range; ranges left below K are the operator's again.
"""

import bisect
from collections import defaultdict

import attrs

FIRST_KEY = 0x0000
LAST_KEY = 0xFFFF
DEFAULT_K = 3
MIN_WIDTH = 16


@attrs.frozen
class Range:
    """Partition keys low..high (inclusive) and the super-nodes (ids) that hold them."""

    low: int
    high: int
    holders: frozenset = attrs.field(default=frozenset(), converter=frozenset)

    @property
    def width(self):
        return self.high - self.low + 1


@attrs.frozen
class Transfer:
    """Keys low..high that to_node must be sent: by from_node, or by the operator when None."""

    low: int
    high: int
    to_node: bytes
    from_node: object = None


@attrs.frozen
class Assignment:
    """Ranges in key order that exactly tile 0000-ffff, each held by at most k super-nodes."""

    ranges: tuple = attrs.field(converter=tuple)
    k: int = DEFAULT_K

    def __attrs_post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, not {self.k!r}")
        if not self.ranges or self.ranges[0].low != FIRST_KEY or self.ranges[-1].high != LAST_KEY:
            raise ValueError("the ranges must cover 0000-ffff")
        for before, after in zip(self.ranges, self.ranges[1:]):
            if after.low != before.high + 1:
                raise ValueError(
                    f"ranges must be contiguous: {before.high:04x} then {after.low:04x}")
        for r in self.ranges:
            if r.low > r.high:
                raise ValueError(f"range {r.low:04x}-{r.high:04x} is reversed")
            if len(r.holders) > self.k:
                raise ValueError(f"range {r.low:04x}-{r.high:04x} has more than {self.k} holders")
            if not all(isinstance(h, bytes) for h in r.holders):
                raise ValueError("super-node ids must be bytes")

    @classmethod
    def initial(cls, k=DEFAULT_K):
        """The table before any super-node: one range 0000-ffff, held by none (the operator's)."""
        return cls((Range(FIRST_KEY, LAST_KEY),), k)

    def served_by_operator(self, range_):
        """The operator serves a range while it has fewer than k super-node holders."""
        return len(range_.holders) < self.k

    def operator_ranges(self):
        """The ranges the operator serves."""
        return tuple(r for r in self.ranges if self.served_by_operator(r))


def range_of(assignment, partition_key):
    """The range that holds partition_key."""
    if not FIRST_KEY <= partition_key <= LAST_KEY:
        raise ValueError(f"partition key {partition_key!r} is outside 0000-ffff")
    lows = [r.low for r in assignment.ranges]
    return assignment.ranges[bisect.bisect_right(lows, partition_key) - 1]


def holders_of(assignment, partition_key):
    """The super-nodes holding partition_key (fewer than k: the operator serves it too)."""
    return range_of(assignment, partition_key).holders


def ranges_of(assignment, node_id):
    """The ranges node_id holds, in key order."""
    return tuple(r for r in assignment.ranges if node_id in r.holders)


def no_conflict(node_id, holders, low, high):
    return False


def join(assignment, node_id, offer=(FIRST_KEY, LAST_KEY), conflicts=no_conflict):
    """Place super-node node_id within offer (low, high) → (new assignment, transfers).

    `conflicts(node_id, holders, low, high)`: node_id may not hold keys low..high beside
    those holders (placement.py: one organization's super-nodes hold at most one replica of
    a range that serves other organizations' domains)."""
    low, high = _checked_offer(offer)
    k = assignment.k
    ranges = _merged(assignment.ranges)
    ranges = [piece for r in ranges for piece in _withdrawn(r, node_id, low, high)]

    transfers = []
    filled = []
    for r in ranges:
        window = None
        if node_id not in r.holders and len(r.holders) < k:
            window = _window(r, low, high)
            if window is not None and conflicts(node_id, r.holders, *window):
                window = None
        if window is None:
            filled.append(r)
            continue
        x, y = window
        filled.extend(_carved(r, x, y, r.holders | {node_id}))
        transfers.append(Transfer(x, y, node_id, None))
    ranges = filled

    if not any(node_id in r.holders for r in ranges):
        split = _split(ranges, node_id, low, high, k, conflicts)
        if split is not None:
            ranges, transfer = split
            transfers.append(transfer)
    return Assignment(_merged(ranges), k), _merged_transfers(transfers)


def leave(assignment, node_id):
    """The table once node_id has left or been found dead: it holds nothing any more."""
    ranges = [Range(r.low, r.high, r.holders - {node_id}) for r in assignment.ranges]
    return Assignment(_merged(ranges), assignment.k)


# -- the cuts --------------------------------------------------------------------------------

def _checked_offer(offer):
    low, high = offer
    if not (isinstance(low, int) and isinstance(high, int)
            and FIRST_KEY <= low <= high <= LAST_KEY):
        raise ValueError(f"offer {offer!r} is not a range within 0000-ffff")
    return low, high


def _cut_ok(r, x, y):
    """Cutting x..y out of r makes a new range, and no piece narrower than MIN_WIDTH."""
    if x > y or (x, y) == (r.low, r.high) or y - x + 1 < MIN_WIDTH:
        return False
    return (x == r.low or x - r.low >= MIN_WIDTH) and (y == r.high or r.high - y >= MIN_WIDTH)


def _window(r, low, high):
    """The widest part of r inside low..high that can be taken (whole, or by a cut that
    leaves no narrow piece); None if there is none."""
    if r.high < low or r.low > high:
        return None
    x = r.low if low <= r.low else max(low, r.low + MIN_WIDTH)
    y = r.high if high >= r.high else min(high, r.high - MIN_WIDTH)
    if (x, y) == (r.low, r.high) or _cut_ok(r, x, y):
        return x, y
    return None


def _carved(r, x, y, inner, outer=None):
    """r cut into pieces: x..y held by inner, the rest (if any) by outer (r's holders)."""
    outer = r.holders if outer is None else outer
    pieces = []
    if x > r.low:
        pieces.append(Range(r.low, x - 1, outer))
    pieces.append(Range(x, y, inner))
    if y < r.high:
        pieces.append(Range(y + 1, r.high, outer))
    return pieces


def _withdrawn(r, node_id, low, high):
    """r, with node_id no longer holding any of it outside low..high."""
    if node_id not in r.holders:
        return [r]
    window = _window(r, low, high)
    if window == (r.low, r.high):
        return [r]
    if window is None:
        return [Range(r.low, r.high, r.holders - {node_id})]
    return _carved(r, *window, r.holders, r.holders - {node_id})


def _halves(r, window):
    """The lower and upper half of r, each clipped to window, that can be cut out of r."""
    wx, wy = window
    middle = r.low + r.width // 2
    for x, y in ((wx, min(middle - 1, wy)), (max(middle, wx), wy)):
        if _cut_ok(r, x, y):
            yield x, y


def _split(ranges, node_id, low, high, k, conflicts=no_conflict):
    """Give node_id half of the full range that offers the widest half inside low..high;
    → (ranges, transfer), or None if no full range in the offer can be split."""
    best = None
    load = _load(ranges)
    for i, r in enumerate(ranges):
        # (A range the fill passed over for a conflict is not full: it is not split.)
        window = _window(r, low, high) if len(r.holders) >= k else None
        if window is None:
            continue
        for x, y in _halves(r, window):
            dropped = _dropped(r, node_id, x, y, load, conflicts)
            if dropped is not None and (best is None
                                        or (y - x, -x) > (best[2] - best[1], -best[1])):
                best = (i, x, y, dropped)
    if best is None:
        return None
    i, x, y, dropped = best
    r = ranges[i]
    kept = r.holders - {dropped}
    source = min(kept) if kept else dropped
    ranges = ranges[:i] + _carved(r, x, y, kept | {node_id}) + ranges[i + 1:]
    return ranges, Transfer(x, y, node_id, source)


def _dropped(r, node_id, x, y, load, conflicts):
    """The holder of r that gives x..y up to node_id: the one holding the most keys (ties:
    the lowest id) among those whose going leaves no conflict; None if none does."""
    for holder in sorted(sorted(r.holders), key=lambda h: load[h], reverse=True):
        if not conflicts(node_id, r.holders - {holder}, x, y):
            return holder
    return None


def _load(ranges):
    keys = defaultdict(int)
    for r in ranges:
        for holder in r.holders:
            keys[holder] += r.width
    return keys


def _merged(ranges):
    """Adjacent ranges with the same holders made one: the same keys, the same holders."""
    out = []
    for r in ranges:
        if out and out[-1].holders == r.holders:
            out[-1] = Range(out[-1].low, r.high, r.holders)
        else:
            out.append(r)
    return tuple(out)


def _merged_transfers(transfers):
    """Transfers in key order, adjacent ones from the same source made one."""
    out = []
    for t in sorted(transfers, key=lambda t: t.low):
        if out and out[-1].high + 1 == t.low and out[-1].from_node == t.from_node:
            out[-1] = attrs.evolve(out[-1], high=t.high)
        else:
            out.append(t)
    return tuple(out)
