"""Super-node placement: the operator turns SubmitSuperNode offers into signed SuperNode records.

A node started with `--super [--partition A-B]` asks the operator's RPC with SubmitSuperNode
(its offer and the endpoint it can be reached on) and repeats that every minute as its
heartbeat. The operator first reaches back: it pings the node on that endpoint, from its own
socket, so a node behind a NAT or firewall that cannot be reached is never placed. Handlers
never wait on another node (DESIGN.md §4), so the first answer is CHECKING and the node asks
again shortly; once reached, SubmitSuperNode runs `assignment.join` in one database
transaction, and every node whose ranges changed gets its SuperNode records signed anew.
A join still waiting its turn (see below) after PLACING_ANSWER_SECONDS is answered CHECKING
too, so that the node's call does not time out; its outcome is the answer to the next ask.

A super-node not heard from for SUPER_NODE_TIMEOUT_SECONDS has left: it is removed, and joins
are run again for the others so each range is back to K holders where offers allow. The
operator serves every range with fewer than K holders itself.

Several operators may share one database: every decision (a join, an expiry sweep) runs in a
transaction that first takes the database's placement lock, then reads the assignment from
the rows, changes it and writes it, so decisions happen one after another, each on what the
one before wrote. K is signed into every SuperNode record.
"""

import bisect
import contextlib

import sqlalchemy as sa
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure

from meshnode import records
from meshnode.config import unspecified
from meshnode.core import periodic
from meshnode.core.schema import domains, operator_nodes, super_node_offers, super_nodes
from meshnode.roles.operator import assignment
from meshnode.rpc.messages import Command, SubmitState, SuperNodeStatus
from meshnode.rpc.service import RPCError, any_domain
from meshnode.wire import Endpoint

_log = Logger()

SUPER_NODE_TIMEOUT_SECONDS = 300.0
SWEEP_SECONDS = 60.0
REACH_BACK_TIMEOUT_SECONDS = 2.0
REACHED_VALID_SECONDS = 600.0
# A join not committed by then is answered CHECKING (under the nodes' 2 s call timeout), and
# its outcome kept this long for the node's next ask (it asks every 0.5 s while checking).
PLACING_ANSWER_SECONDS = 1.0
PLACED_KEPT_SECONDS = 10.0
# The key of PostgreSQL's advisory lock that serializes placement: the same in every operator
# process sharing the database ("mn-place" in ASCII).
PLACEMENT_LOCK_KEY = int.from_bytes(b"mn-place", "big")


# -- the assignment in the database (run in the store's thread pool) -------------------------

def take_placement_lock(connection):
    """Make `connection`'s transaction, before it reads anything, the only one placing:
    PostgreSQL's transaction-level advisory lock (released at commit or rollback); on SQLite a
    write transaction from the start (BEGIN IMMEDIATE), so that a second process waits
    rather than reading what the first is about to change."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                           {"key": PLACEMENT_LOCK_KEY})
    elif dialect == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        raise RuntimeError(f"placement needs PostgreSQL or SQLite, not {dialect}")


@contextlib.contextmanager
def _placing(engine):
    """A transaction holding the placement lock → its connection; commits on leaving."""
    with engine.begin() as connection:
        take_placement_lock(connection)
        yield connection


def assignment_from_rows(rows, k):
    """Rebuild the Assignment from (node_id, low, high) rows: cut at every range edge, give
    each piece the nodes whose rows cover it, merge neighbours with the same holders."""
    edges = {assignment.FIRST_KEY, assignment.LAST_KEY + 1}
    for _, low, high in rows:
        edges.update((low, high + 1))
    edges = sorted(edges)
    ranges = []
    for low, after in zip(edges, edges[1:]):
        holders = frozenset(node_id for node_id, a, b in rows if a <= low and after - 1 <= b)
        if len(holders) > k:  # K was lowered since: keep the lowest ids
            holders = frozenset(sorted(holders)[:k])
        ranges.append(assignment.Range(low, after - 1, holders))
    return assignment.Assignment(assignment._merged(ranges), k)


def _load(connection, k):
    rows = [(row.node_id, row.partition_from, row.partition_to) for row in connection.execute(
        sa.select(super_nodes.c.node_id, super_nodes.c.partition_from,
                  super_nodes.c.partition_to))]
    offers = {row.node_id: row for row in connection.execute(sa.select(super_node_offers))}
    return assignment_from_rows(rows, k), offers


def _one_replica_per_organization(connection, offers):
    """assignment.join's `conflicts`: a super-node may not hold keys beside another of its
    own organization (domain) where those keys serve another organization's domain — so
    colluding super-nodes of one organization, whatever they offer, hold at most one of the
    K replicas of any other organization's records. Where only the organization's own
    domain lives (a company's own super-nodes serving itself), K of them may hold it."""
    operators = {row.domain for row in connection.execute(sa.select(operator_nodes.c.domain))}
    keys = sorted((records.partition_of(row.domain), row.domain)
                  for row in connection.execute(sa.select(domains.c.domain))
                  if row.domain not in operators)  # the operators' own: not an organization

    def conflicts(node_id, holders, low, high):
        offer = offers.get(node_id)
        if offer is None:
            return False
        organization = offer.domain
        if not any(holder in offers and offers[holder].domain == organization
                   for holder in holders):
            return False
        start = bisect.bisect_left(keys, (low, -1))
        return any(domain != organization for key, domain in keys[start:]
                   if key <= high)
    return conflicts


def thd_assignment(engine, k):
    with engine.connect() as connection:
        return _load(connection, k)[0]


def _ranges_by_node(table):
    by_node = {}
    for r in table.ranges:
        for holder in r.holders:
            by_node.setdefault(holder, []).append((r.low, r.high))
    return by_node


def _signed_replicas(blob):
    """The K a stored SuperNode record carries; None for one this code cannot read."""
    try:
        return records.decode_signed(blob).record.replicas
    except (ValueError, AttributeError):
        return None


def _write(connection, operator, after, offers, resign, now):
    """Sign SuperNode records anew for every node whose ranges or K changed (and those in
    `resign`: a new endpoint), and delete the records of nodes that hold nothing now."""
    new = {node_id: [(low, high, after.k) for low, high in ranges]
           for node_id, ranges in _ranges_by_node(after).items()}
    # Compared with the rows, not the table they were read into: a lowered K cuts holders
    # off in assignment_from_rows, and their rows must go too.
    stored = {}
    for row in connection.execute(sa.select(
            super_nodes.c.node_id, super_nodes.c.partition_from, super_nodes.c.partition_to,
            super_nodes.c.record).order_by(super_nodes.c.partition_from)):
        stored.setdefault(row.node_id, []).append((row.partition_from, row.partition_to,
                                                   _signed_replicas(row.record)))
    for node_id in set(new) | set(stored) | set(resign):
        if stored.get(node_id) == new.get(node_id) and node_id not in resign:
            continue
        connection.execute(super_nodes.delete().where(super_nodes.c.node_id == node_id))
        offer = offers.get(node_id)
        if offer is None:
            continue
        endpoint = Endpoint(offer.host, offer.port)
        for low, high, k in new.get(node_id, ()):
            signed = operator.sign(records.SuperNode(offer.domain, node_id, low, high, k,
                                                     endpoint, now))
            connection.execute(super_nodes.insert().values(
                node_id=node_id, partition_from=low, partition_to=high, domain=offer.domain,
                record=signed.encode(), created=now))


def thd_join(engine, operator, node, offer, endpoint, now, k):
    """Record `node`'s offer and heartbeat, place it → the new Assignment, as committed."""
    low, high = offer
    with _placing(engine) as connection:
        table, offers = _load(connection, k)
        held = offers.get(node.node_id)
        values = dict(domain=node.domain, partition_from=low, partition_to=high,
                      host=endpoint.host, port=endpoint.port, last_seen=now)
        if held is None:
            connection.execute(super_node_offers.insert().values(node_id=node.node_id,
                                                                 **values))
        else:
            connection.execute(super_node_offers.update().where(
                super_node_offers.c.node_id == node.node_id).values(**values))
        moved = held is not None and ((held.host, held.port) != (endpoint.host, endpoint.port)
                                      or held.domain != node.domain)
        offers = {row.node_id: row for row in connection.execute(
            sa.select(super_node_offers))}
        if _removed(offers[node.node_id], now):
            return table  # kept out by an audit: its heartbeat is all that is kept
        after, _ = assignment.join(table, node.node_id, offer,
                                   _one_replica_per_organization(connection, offers))
        _write(connection, operator, after, offers, {node.node_id} if moved else set(), now)
    return after


def _removed(offer, now):
    return offer.removed_until is not None and offer.removed_until > now


def thd_remove(engine, operator, node_id, until, now, k):
    """Take every placement from super-node `node_id` and keep it out until `until` (ms);
    the others' joins are run again so its ranges get K holders → the Assignment."""
    with _placing(engine) as connection:
        table, offers = _load(connection, k)
        connection.execute(super_node_offers.update().where(
            super_node_offers.c.node_id == node_id).values(removed_until=until))
        after = _rejoin(connection, assignment.leave(table, node_id),
                        {n: offer for n, offer in offers.items() if n != node_id}, now)
        _write(connection, operator, after, offers, set(), now)
    return after


def _rejoin(connection, table, offers, now):
    """The joins of these offers run again (oldest id first), those kept out skipped."""
    conflicts = _one_replica_per_organization(connection, offers)
    for node_id in sorted(offers):
        offer = offers[node_id]
        if not _removed(offer, now):
            table, _ = assignment.join(table, node_id, (offer.partition_from,
                                                        offer.partition_to), conflicts)
    return table


def thd_expire(engine, operator, cutoff, now, k):
    """Remove super-nodes last heard before `cutoff`, then re-run the others' joins (oldest
    id first) so the ranges they left get K holders again → (Assignment as committed, ids
    removed)."""
    with _placing(engine) as connection:
        table, offers = _load(connection, k)
        gone = [node_id for node_id, offer in offers.items()
                if offer.last_seen < cutoff and not _removed(offer, now)]
        # Holders without an offer (lost to a crash mid-write) cannot be reached either.
        gone += [node_id for node_id in _ranges_by_node(table) if node_id not in offers]
        after = table
        for node_id in gone:
            after = assignment.leave(after, node_id)
            connection.execute(super_node_offers.delete().where(
                super_node_offers.c.node_id == node_id))
        offers = {node_id: offer for node_id, offer in offers.items() if node_id not in gone}
        after = _rejoin(connection, after, offers, now)
        _write(connection, operator, after, offers, set(), now)
    return after, gone


# -- the service ---------------------------------------------------------------------------

def _unspecified(endpoint):
    return unspecified(endpoint.host) or endpoint.port == 0


class PlacementService(service.MultiService):
    """Answers SubmitSuperNode, keeps the assignment, and tells the operator's own partition
    service which ranges are still the operator's to serve."""

    name = "placement"

    def __init__(self, *, rpc, store, clock, partition, replicas=assignment.DEFAULT_K):
        super().__init__()
        self._rpc = rpc
        self._store = store
        self._clock = clock
        self._partition = partition
        self.replicas = replicas
        self.operator = None  # the operator's Identity, set before start
        self.assignment = assignment.Assignment.initial(replicas)
        self._reached = {}  # node id → (endpoint, when) of the last successful reach-back
        self._unreachable = {}  # node id → (endpoint, reason) of the last failed reach-back
        self._checking = set()
        self._joining = set()  # node ids whose join is under way
        self._joined = {}  # node id → (offer, endpoint, status, when) of a join answered late
        # One decision of ours at a time, its outcome used before the next starts: the
        # assignment in memory is always the one this operator committed last.
        self._deciding = defer.DeferredLock()
        periodic.every(SWEEP_SECONDS, self.expire, clock,
                       "expiring silent super-nodes").setServiceParent(self)

    def startService(self):
        self._rpc.register(Command.SUBMIT_SUPER_NODE, self._submit, any_domain)
        self._use(self.assignment)
        d = self._decide(lambda table: table, thd_assignment, self.replicas)
        d.addErrback(lambda f: _log.failure("could not load the partition assignment", f))
        super().startService()

    def stopService(self):
        self._rpc.unregister(Command.SUBMIT_SUPER_NODE)
        return super().stopService()

    def _use(self, table):
        self.assignment = table
        self._partition.serve([(r.low, r.high) for r in table.operator_ranges()])
        return table

    @defer.inlineCallbacks
    def _decide(self, table_of, thd, *args):
        """Run `thd(engine, *args)` in the store after our decisions before it, and use the
        assignment `table_of(its result)` before the next starts → Deferred[its result]."""
        yield self._deciding.acquire()
        try:
            result = yield self._store.run(thd, *args)
            self._use(table_of(result))
        finally:
            self._deciding.release()
        return result

    def may_transfer(self, node_id, low, high):
        """Whether node_id is placed on any of keys low..high (and may pull them)."""
        return any(node_id in r.holders for r in self.assignment.ranges
                   if r.low <= high and low <= r.high)

    def _submit(self, incoming):
        node, message = incoming.node, incoming.message
        node_id, endpoint = node.node_id, message.endpoint
        if _unspecified(endpoint):
            return SuperNodeStatus(SubmitState.REFUSED, "the endpoint is not a reachable address")
        now = self._clock.seconds()
        reached = self._reached.get(node_id)
        if reached is None or reached[0] != endpoint or now - reached[1] > REACHED_VALID_SECONDS:
            refused = self._unreachable.pop(node_id, None)
            if refused is not None and refused[0] == endpoint:
                return SuperNodeStatus(SubmitState.REFUSED, refused[1])
            self._reach_back(incoming.peer, endpoint)
            return SuperNodeStatus(SubmitState.CHECKING, "reaching back to " + str(endpoint))
        offer = (message.low, message.high)
        late = self._joined.pop(node_id, None)
        if late is not None and late[:2] == (offer, endpoint) and (
                now - late[3] <= PLACED_KEPT_SECONDS):
            return late[2]
        if node_id in self._joining:
            return SuperNodeStatus(SubmitState.CHECKING, "waiting to be placed")
        return self._join(node, offer, endpoint)

    def _join(self, node, offer, endpoint):
        """Place `node` → Deferred[SuperNodeStatus] within PLACING_ANSWER_SECONDS: CHECKING
        if the join has not committed by then (its outcome is kept for the next ask)."""
        node_id = node.node_id
        self._joining.add(node_id)
        d = self._decide(lambda table: table, thd_join, self.operator, node, offer, endpoint,
                         self._rpc.now_ms(), self.replicas)
        d.addCallback(lambda table: SuperNodeStatus(
            SubmitState.ASSIGNED, "" if assignment.ranges_of(table, node_id)
            else "no range of the offer can be given now"))
        answer = defer.Deferred()
        timer = self._clock.callLater(PLACING_ANSWER_SECONDS, answer.callback, SuperNodeStatus(
            SubmitState.CHECKING, "waiting to be placed"))

        def finished(result):
            self._joining.discard(node_id)
            if timer.active():
                timer.cancel()
                if isinstance(result, failure.Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
            elif isinstance(result, SuperNodeStatus):
                self._joined[node_id] = (offer, endpoint, result, self._clock.seconds())
            else:
                _log.failure("could not place super-node {node_id}", result,
                             node_id=node_id.hex())

        d.addBoth(finished)
        return answer

    def _reach_back(self, peer, endpoint):
        node_id = peer.node.node_id
        if node_id in self._checking:
            return
        self._checking.add(node_id)

        def reached(rtt):
            self._reached[node_id] = (endpoint, self._clock.seconds())
            _log.info("reached super-node {node_id} at {endpoint}", node_id=node_id.hex(),
                      endpoint=str(endpoint))

        def failed(failure):
            failure.trap(RPCError)
            self._unreachable[node_id] = (endpoint, "not reachable from the operator: "
                                                    + failure.getErrorMessage())

        d = self._rpc.ping(peer, (endpoint.host, endpoint.port),
                           timeout=REACH_BACK_TIMEOUT_SECONDS)
        d.addCallbacks(reached, failed)
        d.addBoth(lambda _: self._checking.discard(node_id))

    @defer.inlineCallbacks
    def expire(self):
        cutoff = self._rpc.now_ms() - int(SUPER_NODE_TIMEOUT_SECONDS * 1000)
        _, gone = yield self._decide(lambda result: result[0], thd_expire, self.operator,
                                     cutoff, self._rpc.now_ms(), self.replicas)
        for node_id in gone:
            _log.info("super-node {node_id} left (not heard from)", node_id=node_id.hex())
            self._reached.pop(node_id, None)
            self._joined.pop(node_id, None)

    def remove(self, node_id, until_ms):
        """Take super-node `node_id`'s placements (found lying) and keep it out until
        `until_ms`; it is not told why: its next heartbeat hears "no range can be given"."""
        return self._decide(lambda table: table, thd_remove, self.operator, node_id,
                            until_ms, self._rpc.now_ms(), self.replicas)

    def status(self):
        return [{"node_id": node_id.hex(),
                 "ranges": [f"{low:04x}-{high:04x}" for low, high in ranges]}
                for node_id, ranges in sorted(_ranges_by_node(self.assignment).items())]
