"""Tests for meshnode.roles.operator.placement: the operator places super-nodes on DHT ranges."""

import os
import threading

import sqlalchemy as sa
from hypothesis import given, strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.core import store
from meshnode.core.identity import Identity
from meshnode.roles.operator import placement, registry
from meshnode.roles.operator.assignment import holders_of as placement_holders
from meshnode.roles.operator.assignment import range_of as placement_range
from meshnode.roles.operator.assignment import (
    FIRST_KEY, LAST_KEY, Assignment, Range, join, leave, ranges_of)
from meshnode.roles.operator.placement import (
    PLACING_ANSWER_SECONDS, REACH_BACK_TIMEOUT_SECONDS, REACHED_VALID_SECONDS,
    SUPER_NODE_TIMEOUT_SECONDS, PlacementService, assignment_from_rows, thd_assignment,
    thd_expire, thd_join)
from meshnode.rpc.messages import Command, SubmitState, SubmitSuperNode, SuperNodeStatus
from meshnode.core.schema import super_node_offers, super_nodes
from meshnode.wire import Endpoint
from tests import postgres
from tests.mesh import Mesh
from tests.test_assignment import POOL, _ks, _offers, _operations

NOW = 1_800_000_000_000
MINUTE_MS = 60_000
DAY_MS = 86_400_000
DOMAIN = 0x51000001
EVERYTHING = (FIRST_KEY, LAST_KEY)


def rows_of(table):
    """One (node_id, low, high) row per holder per range, as the super_nodes table keeps them."""
    return [(holder, r.low, r.high) for r in table.ranges for holder in sorted(r.holders)]


# -- the assignment as rows ------------------------------------------------------------------

class AssignmentFromRowsTests(SynchronousTestCase):

    def check_tiles(self, table):
        """The ranges tile 0000-ffff and none has more than k holders."""
        self.assertEqual(table.ranges[0].low, FIRST_KEY)
        self.assertEqual(table.ranges[-1].high, LAST_KEY)
        for before, after in zip(table.ranges, table.ranges[1:]):
            self.assertEqual(after.low, before.high + 1)
        for r in table.ranges:
            self.assertLessEqual(r.low, r.high)
            self.assertLessEqual(len(r.holders), table.k)

    @given(_ks, st.lists(_offers, min_size=len(POOL), max_size=len(POOL)), _operations,
           st.randoms(use_true_random=False))
    def test_rows_give_back_the_assignment(self, k, offer_list, operations, random):
        """After any joins, leaves and changed offers, the table's rows (in any order) rebuild
        an equal Assignment that tiles 0000-ffff with at most K holders per range."""
        offers = dict(zip(POOL, offer_list))
        table = Assignment.initial(k)
        for operation, index, new_offer in operations:
            node = POOL[index]
            if operation == "reoffer":
                offers[node] = new_offer
            if operation == "leave":
                table = leave(table, node)
            else:
                table, _ = join(table, node, offers[node])
            rows = rows_of(table)
            random.shuffle(rows)
            rebuilt = assignment_from_rows(rows, k)
            self.assertEqual(rebuilt, table)
            self.check_tiles(rebuilt)

    def test_no_rows_is_the_initial_table(self):
        """Before any super-node every key is the operator's."""
        self.assertEqual(assignment_from_rows([], 3), Assignment.initial(3))

    def test_neighbours_with_the_same_holders_merge(self):
        """Two rows of one node that meet make one range; the keys nobody holds stay empty."""
        rows = [(POOL[0], 0x0000, 0x0FFF), (POOL[0], 0x1000, 0x7FFF), (POOL[1], 0x4000, 0x7FFF)]
        self.assertEqual(assignment_from_rows(rows, 2), Assignment((
            Range(0x0000, 0x3FFF, {POOL[0]}),
            Range(0x4000, 0x7FFF, {POOL[0], POOL[1]}),
            Range(0x8000, 0xFFFF)), 2))

    def test_a_lowered_k_keeps_the_lowest_ids(self):
        """Rows written under a larger K give a valid table: the lowest ids keep each range."""
        rows = [(node, FIRST_KEY, LAST_KEY) for node in POOL[:3]]
        self.assertEqual(assignment_from_rows(rows, 2),
                         Assignment((Range(FIRST_KEY, LAST_KEY, POOL[:2]),), 2))


# -- the assignment in the store -------------------------------------------------------------

class PlacementStoreTestsMixin:
    """thd_join and thd_expire against the database `make_url()` names (a new one per call)."""

    def make_url(self):
        raise NotImplementedError

    def setUp(self):
        self.engine = store.open_engine(self.make_url())
        self.addCleanup(self.engine.dispose)
        self.operator = Identity.generate()
        self.operator_record = self.operator.sign(records.OperatorNode(
            0, self.operator.node_id, self.operator.signing_public,
            self.operator.agreement_public, NOW))
        self.trust = records.Trust()
        self.trust.anchor(self.operator_record, NOW)
        self.endpoints = {}

    # -- helpers ---------------------------------------------------------------------------

    def nodes(self, count, domain=DOMAIN):
        """`count` Node records (as an operator signed them for enrolled nodes), by id order."""
        made = []
        for i in range(count):
            identity = Identity.generate()
            made.append(records.Node(domain, identity.node_id, identity.signing_public,
                                     identity.agreement_public, f"super{i}", NOW,
                                     NOW + 30 * DAY_MS))
        made.sort(key=lambda node: node.node_id)
        for i, node in enumerate(made):
            self.endpoints[node.node_id] = Endpoint(f"192.0.2.{i + 1}", 7000 + i)
        return made

    def join(self, node, offer=EVERYTHING, endpoint=None, now=NOW, k=3):
        return thd_join(self.engine, self.operator, node, offer,
                        endpoint or self.endpoints[node.node_id], now, k)

    def expire(self, cutoff, now, k=3):
        return thd_expire(self.engine, self.operator, cutoff, now, k)

    def stored(self):
        """The signed SuperNode records in the store, each verified against the operator."""
        verified = []
        for data in registry.thd_super_node_records(self.engine):
            signed = records.decode_signed(data)
            self.assertIsInstance(self.trust.verify(signed, NOW + DAY_MS), records.SuperNode)
            self.assertEqual(signed.signer, self.operator.node_id)
            verified.append(signed)
        return verified

    def records_of(self, node):
        return [s.record for s in self.stored() if s.record.node_id == node.node_id]

    def offers(self):
        """super_node_offers as {node_id: (domain, from, to, host, port, last_seen)}."""
        with self.engine.connect() as connection:
            return {row[0]: tuple(row[1:]) for row in connection.execute(sa.select(
                super_node_offers.c.node_id, super_node_offers.c.domain,
                super_node_offers.c.partition_from, super_node_offers.c.partition_to,
                super_node_offers.c.host, super_node_offers.c.port,
                super_node_offers.c.last_seen))}

    def assert_records_match(self, table):
        """The store holds exactly one SuperNode record per (node, range) of `table`, with the
        node's endpoint and domain, and the assignment read back is `table`."""
        expected = sorted((holder, r.low, r.high) for r in table.ranges for holder in r.holders)
        stored = [s.record for s in self.stored()]
        self.assertEqual([(r.node_id, r.partition_from, r.partition_to) for r in stored],
                         expected)
        for record in stored:
            self.assertEqual(record.endpoint, self.endpoints[record.node_id])
            self.assertEqual(record.domain, DOMAIN)
        self.assertEqual(thd_assignment(self.engine, table.k), table)

    # -- joins -----------------------------------------------------------------------------

    def test_join_signs_one_record_per_node_and_range(self):
        """Four nodes in K=3: each (node, range) has one operator-signed SuperNode record
        carrying the endpoint it offered and its domain."""
        nodes = self.nodes(4)
        for node in nodes:
            table = self.join(node)
        self.assertEqual([len(r.holders) for r in table.ranges], [3, 3])
        self.assert_records_match(table)
        self.assertEqual({s.record.created for s in self.stored()}, {NOW})
        self.assertEqual(set(self.offers()), {node.node_id for node in nodes})

    def test_heartbeat_changes_no_record(self):
        """The same offer and endpoint again changes no record but moves last_seen on."""
        nodes = self.nodes(4)
        for node in nodes:
            table = self.join(node)
        before = [s.encode() for s in self.stored()]
        for node in nodes:
            self.assertEqual(self.join(node, now=NOW + MINUTE_MS), table)
        self.assertEqual([s.encode() for s in self.stored()], before)
        self.assertEqual({offer[5] for offer in self.offers().values()}, {NOW + MINUTE_MS})

    def test_changed_endpoint_resigns_that_nodes_records(self):
        """A node heard on a new endpoint gets its records signed anew; the others keep theirs."""
        nodes = self.nodes(4)
        for node in nodes:
            table = self.join(node)
        moved, other = nodes[0], nodes[1]
        others_before = self.records_of(other)
        self.endpoints[moved.node_id] = Endpoint("198.51.100.7", 7777)
        self.assertEqual(self.join(moved, now=NOW + MINUTE_MS), table)
        self.assert_records_match(table)
        self.assertEqual({r.created for r in self.records_of(moved)}, {NOW + MINUTE_MS})
        self.assertEqual(self.records_of(other), others_before)
        self.assertEqual(self.offers()[moved.node_id][3:5], ("198.51.100.7", 7777))

    def test_operator_ranges_empty_once_k_nodes_offered_everything(self):
        """K=3: a half offer and two full ones leave the upper half to the operator; the third
        full offer takes the rest and the operator serves nothing."""
        half, *full = self.nodes(4)
        table = self.join(half, (0x0000, 0x7FFF))
        self.assertEqual(table.operator_ranges(), (Range(0x0000, 0x7FFF, {half.node_id}),
                                                   Range(0x8000, 0xFFFF)))
        table = self.join(full[0])
        self.assertEqual([(r.low, r.high) for r in table.operator_ranges()],
                         [(0x0000, 0x7FFF), (0x8000, 0xFFFF)])
        table = self.join(full[1])
        self.assertEqual([(r.low, r.high) for r in table.operator_ranges()], [(0x8000, 0xFFFF)])
        table = self.join(full[2])
        self.assertEqual(table.operator_ranges(), ())
        self.assert_records_match(table)

    def test_changed_offer_moves_the_records(self):
        """A node that narrows its offer keeps records only inside it."""
        (node,) = self.nodes(1)
        self.join(node)
        table = self.join(node, (0x8000, 0xFFFF), now=NOW + MINUTE_MS)
        self.assertEqual([(r.partition_from, r.partition_to) for r in self.records_of(node)],
                         [(0x8000, 0xFFFF)])
        self.assertEqual(self.offers()[node.node_id][1:3], (0x8000, 0xFFFF))
        self.assert_records_match(table)

    def test_super_node_records_ordered_by_node_and_range(self):
        """thd_super_node_records lists by node id, then partition_from."""
        nodes = self.nodes(5)
        for node in reversed(nodes):
            self.join(node)
        listed = [(s.record.node_id, s.record.partition_from) for s in self.stored()]
        self.assertGreater(len(listed), len(nodes))
        self.assertEqual(listed, sorted(listed))

    # -- expiry ----------------------------------------------------------------------------

    def test_expire_removes_silent_nodes_and_refills(self):
        """The node not heard since the cutoff loses its records and offer; the three live
        ones re-join and hold every key again."""
        nodes = self.nodes(4)
        for node in nodes:
            self.join(node)
        silent, live = nodes[0], nodes[1:]
        for node in live:
            self.join(node, now=NOW + 10 * MINUTE_MS)
        table, gone = self.expire(NOW + 5 * MINUTE_MS, NOW + 10 * MINUTE_MS)
        self.assertEqual(gone, [silent.node_id])
        self.assertEqual(table.ranges,
                         (Range(FIRST_KEY, LAST_KEY, {node.node_id for node in live}),))
        self.assertEqual(table.operator_ranges(), ())
        self.assertEqual(self.records_of(silent), [])
        self.assertEqual(set(self.offers()), {node.node_id for node in live})
        self.assert_records_match(table)

    def test_expire_refills_only_where_offers_allow(self):
        """Live nodes offering the lower half refill it; the upper half is left to the operator."""
        full, *halves = self.nodes(3)
        for node in halves:
            self.join(node, (0x0000, 0x7FFF))
        self.join(full)
        for node in halves:
            self.join(node, (0x0000, 0x7FFF), now=NOW + 10 * MINUTE_MS)
        table, gone = self.expire(NOW + 5 * MINUTE_MS, NOW + 10 * MINUTE_MS)
        self.assertEqual(gone, [full.node_id])
        self.assertEqual(table.ranges, (
            Range(0x0000, 0x7FFF, {node.node_id for node in halves}),
            Range(0x8000, 0xFFFF)))
        self.assertEqual(table.operator_ranges(), table.ranges)
        self.assert_records_match(table)

    def test_expire_with_everyone_live_changes_nothing(self):
        """Nobody silent: no node removed and no record signed anew."""
        for node in self.nodes(4):
            table = self.join(node)
        before = [s.encode() for s in self.stored()]
        self.assertEqual(self.expire(NOW - 1, NOW + MINUTE_MS), (table, []))
        self.assertEqual([s.encode() for s in self.stored()], before)

    def test_expire_removes_a_holder_without_an_offer(self):
        """Records whose offer is missing (a write lost mid-way) belong to nobody reachable."""
        nodes = self.nodes(3)
        for node in nodes:
            self.join(node)
        with self.engine.begin() as connection:
            connection.execute(super_node_offers.delete().where(
                super_node_offers.c.node_id == nodes[1].node_id))
        table, gone = self.expire(NOW - 1, NOW + MINUTE_MS)
        self.assertEqual(gone, [nodes[1].node_id])
        self.assertEqual(ranges_of(table, nodes[1].node_id), ())
        self.assertEqual(self.records_of(nodes[1]), [])
        self.assert_records_match(table)

    def test_lowered_k_leaves_no_extra_records(self):
        """After K is lowered, the first heartbeat leaves records for at most K holders."""
        nodes = self.nodes(3)
        for node in nodes:
            self.join(node)
        table = self.join(nodes[0], now=NOW + MINUTE_MS, k=2)
        self.assertEqual(table.ranges, (Range(FIRST_KEY, LAST_KEY,
                                              {n.node_id for n in nodes[:2]}),))
        self.assert_records_match(table)

    def test_records_carry_k_under_the_signature(self):
        """Every SuperNode record carries the K it was placed with, inside the signed bytes."""
        for node in self.nodes(4):
            table = self.join(node)
        self.assertEqual({s.record.replicas for s in self.stored()}, {3})
        self.assert_records_match(table)

    def test_changed_k_signs_every_record_anew(self):
        """K raised from 2 to 3 changes no range, yet the first heartbeat signs every record
        again with the new K: no node keeps reading the old one."""
        nodes = self.nodes(2)
        for node in nodes:
            self.join(node, k=2)
        self.assertEqual({s.record.replicas for s in self.stored()}, {2})
        table = self.join(nodes[0], now=NOW + MINUTE_MS, k=3)
        self.assertEqual({(s.record.replicas, s.record.created) for s in self.stored()},
                         {(3, NOW + MINUTE_MS)})
        self.assert_records_match(table)

    def test_unreadable_record_signed_anew(self):
        """A stored record this code cannot read (an older format) is replaced at the next
        heartbeat, though the ranges did not change."""
        nodes = self.nodes(2)
        for node in nodes:
            table = self.join(node)
        with self.engine.begin() as connection:
            connection.execute(super_nodes.update().where(
                super_nodes.c.node_id == nodes[0].node_id).values(record=b"old"))
        self.assertEqual(self.join(nodes[1], now=NOW + MINUTE_MS), table)
        self.assertEqual({r.created for r in self.records_of(nodes[0])}, {NOW + MINUTE_MS})
        self.assert_records_match(table)

    def test_lowered_k_expire_places_the_extra_node_anew(self):
        """After K is lowered, the sweep re-joins the holder that was cut off: it takes a split."""
        nodes = self.nodes(3)
        for node in nodes:
            self.join(node)
        table, gone = self.expire(NOW - 1, NOW + MINUTE_MS, k=2)
        self.assertEqual(gone, [])
        self.assertEqual([len(r.holders) for r in table.ranges], [2, 2])
        self.assertTrue(ranges_of(table, nodes[2].node_id))
        self.assert_records_match(table)


class _OnSQLite:
    """make_url: a SQLite file of its own per test."""

    def make_url(self):
        directory = self.mktemp()
        os.makedirs(directory)
        return store.sqlite_url(directory)


class _OnPostgres:
    """make_url: a fresh database of the throwaway PostgreSQL cluster."""

    skip = postgres.skip_reason()

    def make_url(self):
        return postgres.fresh_database()


class SQLitePlacementStoreTests(_OnSQLite, PlacementStoreTestsMixin, SynchronousTestCase):
    """Placement on a SQLite file of its own per test."""


class PostgresPlacementStoreTests(_OnPostgres, PlacementStoreTestsMixin, SynchronousTestCase):
    """Placement on a fresh database of the throwaway PostgreSQL cluster."""


# -- two operators deciding at once ----------------------------------------------------------

WAIT_SECONDS = 10  # a bound on every wait below; nothing takes that long unless broken
BLOCKED_SECONDS = 0.5  # how long the second decision is watched for waiting on the first


class _HeldAtFirstWrite:
    """Holds the first thd_ function that writes through `engine` at its first INSERT, UPDATE
    or DELETE (it has read the assignment by then) until `release()`."""

    def __init__(self, engine):
        self.writing = threading.Event()
        self._released = threading.Event()
        sa.event.listen(engine, "before_cursor_execute", self._before)

    def _before(self, connection, cursor, statement, parameters, context, executemany):
        if (statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
                and not self.writing.is_set()):
            self.writing.set()
            self._released.wait(WAIT_SECONDS)

    def release(self):
        self._released.set()


class _Running(threading.Thread):
    """`function(*args)` in a thread of its own; `result()` once it is done."""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self._call = function, args
        self._outcome = None

    def run(self):
        function, args = self._call
        try:
            self._outcome = (True, function(*args))
        except BaseException as e:
            self._outcome = (False, e)

    def result(self):
        self.join(WAIT_SECONDS)
        if self.is_alive():
            raise AssertionError(f"still running after {WAIT_SECONDS} s")
        done, value = self._outcome
        if not done:
            raise value
        return value


class ConcurrentPlacementTestsMixin:
    """Two operators, each with its own engine on one database (`make_url()`), join a super-node
    each at the same moment: the first has read the assignment and is about to write it when
    the second starts."""

    def make_url(self):
        raise NotImplementedError

    def setUp(self):
        url = self.make_url()
        self.first, self.second = store.open_engine(url), store.open_engine(url)
        for engine in (self.first, self.second):
            self.addCleanup(engine.dispose)
        self.operators = Identity.generate(), Identity.generate()
        self.nodes = sorted((Identity.generate() for _ in range(5)),
                            key=lambda identity: identity.node_id)

    def join(self, engine, operator, identity, port):
        node = records.Node(DOMAIN, identity.node_id, identity.signing_public,
                            identity.agreement_public, f"super{port}", NOW, NOW + DAY_MS)
        return thd_join(engine, operator, node, EVERYTHING, Endpoint("192.0.2.1", port), NOW, 3)

    def stored(self):
        """(node id, low, high) of the SuperNode records the database holds."""
        return sorted((s.record.node_id, s.record.partition_from, s.record.partition_to)
                      for s in map(records.decode_signed,
                                   registry.thd_super_node_records(self.first)))

    def race(self):
        """Three nodes hold everything (K=3); the fourth joins through the first operator,
        held after its read, and the fifth through the second → (first's Assignment,
        second's Assignment, whether the second was still waiting when the first went on)."""
        for port, identity in enumerate(self.nodes[:3]):
            self.join(self.first, self.operators[0], identity, port)
        held = _HeldAtFirstWrite(self.first)
        one = _Running(self.join, self.first, self.operators[0], self.nodes[3], 3)
        one.start()
        self.assertTrue(held.writing.wait(WAIT_SECONDS))
        other = _Running(self.join, self.second, self.operators[1], self.nodes[4], 4)
        other.start()
        other.join(BLOCKED_SECONDS)
        waited = other.is_alive()
        held.release()
        return one.result(), other.result(), waited

    def test_without_the_lock_the_second_join_is_lost(self):
        """(The race, shown.) Without the placement lock the second join is committed, then
        overwritten by the first from what it read before: the fifth node was told it holds
        keys that no record gives it."""
        self.patch(placement, "take_placement_lock", lambda connection: None)
        first, second, waited = self.race()
        self.assertFalse(waited)
        lost = self.nodes[4].node_id
        self.assertTrue(ranges_of(second, lost))
        self.assertNotIn(lost, {node_id for node_id, _, _ in self.stored()})

    def test_with_the_lock_decisions_happen_one_after_another(self):
        """With the lock the second decision waits for the first to commit, reads what it
        wrote and places the fifth node on it: both newcomers hold keys, every key has exactly
        K holders, and what the second returned is what the database holds."""
        first, second, waited = self.race()
        self.assertTrue(waited)
        self.assertTrue(ranges_of(first, self.nodes[3].node_id))
        for identity in self.nodes[3:]:
            self.assertTrue(ranges_of(second, identity.node_id))
        self.assertEqual([len(r.holders) for r in second.ranges], [3] * len(second.ranges))
        self.assertEqual(self.stored(), sorted(rows_of(second)))
        self.assertEqual(thd_assignment(self.first, 3), second)


class SQLiteConcurrentPlacementTests(_OnSQLite, ConcurrentPlacementTestsMixin,
                                     SynchronousTestCase):
    """Two engines on one SQLite file (two processes would each have their own)."""


class PostgresConcurrentPlacementTests(_OnPostgres, ConcurrentPlacementTestsMixin,
                                       SynchronousTestCase):
    """Two engines, each with its own connection pool, on one PostgreSQL database."""


# -- the service on the fake mesh ------------------------------------------------------------

class PlacementServiceTests(SynchronousTestCase):

    def start(self, replicas=3, store=None):
        self.mesh = Mesh(self)
        self.partition = self.mesh.partition()
        self.service = PlacementService(rpc=self.mesh.operator.rpc,
                                        store=store(self.mesh.store) if store else self.mesh.store,
                                        clock=self.mesh.operator.reactor,
                                        partition=self.partition, replicas=replicas)
        self.service.operator = self.mesh.me
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.trust = records.Trust()
        self.trust.anchor(self.mesh.operator_record, self.now_ms())

    def now_ms(self):
        return self.mesh.operator.rpc.now_ms()

    def submit(self, node, offer=EVERYTHING, endpoint=None):
        endpoint = endpoint or Endpoint(node.host, node.rpc.port)
        return self.mesh.ask(node, SubmitSuperNode(*offer, endpoint), SuperNodeStatus)

    def place(self, node, offer=EVERYTHING):
        """Submit until placed: checking first, assigned once the reach-back was answered."""
        self.assertEqual(self.submit(node, offer).state, SubmitState.CHECKING)
        self.mesh.network.flush()
        status = self.submit(node, offer)
        self.assertEqual(status, SuperNodeStatus(SubmitState.ASSIGNED, ""))
        return status

    def stored(self):
        """The SuperNode records in the operator's store, each verified against it."""
        return [self.trust.verify(records.decode_signed(data), self.now_ms())
                for data in registry.thd_super_node_records(self.mesh.engine)]

    def test_first_submit_checks_then_assigns(self):
        """The operator pings the offered endpoint first; once answered the node is placed,
        its SuperNode record carrying that endpoint."""
        self.start()
        user = self.mesh.user("super1")
        status = self.submit(user)
        self.assertEqual(status.state, SubmitState.CHECKING)
        self.assertIn(f"{user.host}:{user.rpc.port}", status.reason)
        self.assertEqual(self.stored(), [])
        self.mesh.network.flush()
        self.assertEqual(user.rpc.accepted[Command.PING], 1)
        self.assertEqual(self.submit(user), SuperNodeStatus(SubmitState.ASSIGNED, ""))
        (record,) = self.stored()
        self.assertEqual((record.node_id, record.domain, record.partition_from,
                          record.partition_to, record.endpoint),
                         (user.node_id, user.identity_service.enrollment.node.record.domain,
                          FIRST_KEY, LAST_KEY, Endpoint(user.host, user.rpc.port)))

    def test_unanswered_endpoint_refused_then_rechecked(self):
        """Nobody answers on the endpoint within the reach-back timeout: the next submit is
        refused with the reason, the one after checks again."""
        self.start()
        user = self.mesh.user("super1")
        nowhere = Endpoint("10.0.0.99", 4000)
        self.assertEqual(self.submit(user, endpoint=nowhere).state, SubmitState.CHECKING)
        self.mesh.network.flush()
        self.assertEqual(self.submit(user, endpoint=nowhere).state, SubmitState.CHECKING)
        self.mesh.advance(REACH_BACK_TIMEOUT_SECONDS + 0.5)
        status = self.submit(user, endpoint=nowhere)
        self.assertEqual(status.state, SubmitState.REFUSED)
        self.assertEqual("not reachable from the operator: no answer from 10.0.0.99:4000",
                         status.reason)
        self.assertEqual(self.submit(user, endpoint=nowhere).state, SubmitState.CHECKING)
        self.assertEqual(self.stored(), [])
        self.assertFalse(self.service.may_transfer(user.node_id, FIRST_KEY, LAST_KEY))

    def test_another_nodes_endpoint_refused(self):
        """A node that names another node's endpoint is not answered there: refused."""
        self.start()
        user, other = self.mesh.user("super1"), self.mesh.user("super2")
        claimed = Endpoint(other.host, other.rpc.port)
        self.assertEqual(self.submit(user, endpoint=claimed).state, SubmitState.CHECKING)
        self.mesh.advance(REACH_BACK_TIMEOUT_SECONDS + 0.5)
        status = self.submit(user, endpoint=claimed)
        self.assertEqual(status.state, SubmitState.REFUSED)
        self.assertIn(f"not reachable from the operator: no answer from {claimed}",
                      status.reason)
        self.assertEqual(self.stored(), [])

    def test_unspecified_endpoint_refused_at_once(self):
        """0.0.0.0, :: or port 0 cannot be reached back: refused without a ping."""
        self.start()
        user = self.mesh.user("super1")
        for endpoint in (Endpoint("0.0.0.0", user.rpc.port), Endpoint("::", user.rpc.port),
                         Endpoint(user.host, 0)):
            status = self.submit(user, endpoint=endpoint)
            self.assertEqual(status.state, SubmitState.REFUSED, endpoint)
            self.assertTrue(status.reason)
        self.mesh.network.flush()
        self.assertEqual(user.rpc.accepted[Command.PING], 0)
        self.assertEqual(self.stored(), [])

    def test_placed_nodes_shrink_the_operators_ranges(self):
        """The operator serves what has fewer than K holders: all of it until K nodes offered
        everything, then nothing; only placed nodes may pull partitions."""
        self.start(replicas=3)
        half, *full = [self.mesh.user(f"super{i}") for i in range(4)]
        self.assertEqual(self.partition.ranges, ((FIRST_KEY, LAST_KEY),))
        self.place(half, (0x0000, 0x7FFF))
        self.place(full[0])
        self.assertEqual(self.partition.ranges, ((0x0000, 0x7FFF), (0x8000, 0xFFFF)))
        self.assertTrue(self.service.may_transfer(half.node_id, 0x0000, 0x0010))
        self.assertFalse(self.service.may_transfer(half.node_id, 0x8000, 0xFFFF))
        self.assertFalse(self.service.may_transfer(full[1].node_id, FIRST_KEY, LAST_KEY))
        self.place(full[1])
        self.assertEqual(self.partition.ranges, ((0x8000, 0xFFFF),))
        self.place(full[2])
        self.assertEqual(self.partition.ranges, ())
        self.assertEqual(self.service.assignment.operator_ranges(), ())
        for node in full:
            self.assertTrue(self.service.may_transfer(node.node_id, 0xFFF0, 0xFFFF))
        self.assertFalse(self.service.may_transfer(self.mesh.user("plain").node_id,
                                                   FIRST_KEY, LAST_KEY))

    def test_operator_ranges_follow_the_services_k(self):
        """With K=1 one node's half offer leaves the operator only the other half."""
        self.start(replicas=1)
        self.place(self.mesh.user("super1"), (0x0000, 0x7FFF))
        self.assertEqual(self.partition.ranges, ((0x8000, 0xFFFF),))

    def test_silent_node_expires_and_the_operator_serves_again(self):
        """A node that stopped submitting is removed after SUPER_NODE_TIMEOUT_SECONDS; one that
        kept submitting stays placed; the operator serves what is left below K."""
        self.start(replicas=2)
        silent, live = self.mesh.user("super1"), self.mesh.user("super2")
        self.place(silent)
        self.place(live)
        self.assertEqual(self.partition.ranges, ())
        elapsed = 0
        while elapsed <= SUPER_NODE_TIMEOUT_SECONDS:
            self.mesh.advance(60)
            elapsed += 60
            self.assertEqual(self.submit(live).state, SubmitState.ASSIGNED)
            self.service.expire()
            if elapsed <= SUPER_NODE_TIMEOUT_SECONDS:
                self.assertTrue(self.service.may_transfer(silent.node_id, FIRST_KEY, LAST_KEY))
        self.assertFalse(self.service.may_transfer(silent.node_id, FIRST_KEY, LAST_KEY))
        self.assertTrue(self.service.may_transfer(live.node_id, FIRST_KEY, LAST_KEY))
        self.assertEqual([r.node_id for r in self.stored()], [live.node_id])
        self.assertEqual(self.partition.ranges, ((FIRST_KEY, LAST_KEY),))

    def test_sweep_expires_without_being_called(self):
        """The periodic sweep removes a silent node on its own."""
        self.start(replicas=1)
        user = self.mesh.user("super1")
        self.place(user)
        self.assertEqual(self.partition.ranges, ())
        for _ in range(int(SUPER_NODE_TIMEOUT_SECONDS // 60) + 2):
            self.mesh.advance(60)
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.partition.ranges, ((FIRST_KEY, LAST_KEY),))

    def test_reach_back_is_repeated_after_it_grows_old(self):
        """A node heard every minute is checked again once its reach-back is older than
        REACHED_VALID_SECONDS, and stays placed meanwhile."""
        self.start(replicas=1)
        user = self.mesh.user("super1")
        self.place(user)
        pings = user.rpc.accepted[Command.PING]
        for _ in range(int(REACHED_VALID_SECONDS // 60)):
            self.mesh.advance(60)
            self.assertEqual(self.submit(user).state, SubmitState.ASSIGNED)
        self.assertEqual(user.rpc.accepted[Command.PING], pings)
        self.mesh.advance(60)
        self.assertEqual(self.submit(user).state, SubmitState.CHECKING)
        self.assertEqual(user.rpc.accepted[Command.PING], pings + 1)
        self.assertTrue(self.service.may_transfer(user.node_id, FIRST_KEY, LAST_KEY))
        self.assertEqual(self.submit(user).state, SubmitState.ASSIGNED)

    def test_join_waiting_its_turn_is_answered_checking_then_assigned(self):
        """A join not committed within PLACING_ANSWER_SECONDS (waiting for the placement
        lock) is answered CHECKING, so the node's call does not time out; asking again
        meanwhile starts no second join; once it committed, the next ask is answered with
        its outcome."""
        held = []

        class HeldJoins:
            """The mesh's store, with thd_join held until the test lets it run."""

            def __init__(self, store):
                self.store = store

            def run(self, function, *args):
                if function is not thd_join:
                    return self.store.run(function, *args)
                held.append((defer.Deferred(), args))
                return held[-1][0]

        self.start(store=HeldJoins)
        user = self.mesh.user("super1")
        self.assertEqual(self.submit(user).state, SubmitState.CHECKING)  # reaching back
        self.mesh.network.flush()

        def asking():
            peer = user.rpc.learn(self.mesh.operator.rpc.own_node)
            d = user.rpc.call(peer, self.mesh.operator.address, SubmitSuperNode(
                *EVERYTHING, Endpoint(user.host, user.rpc.port)), SuperNodeStatus)
            self.mesh.network.flush()
            return d

        d = asking()
        self.assertNoResult(d)
        self.mesh.advance(PLACING_ANSWER_SECONDS)
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d),
                         SuperNodeStatus(SubmitState.CHECKING, "waiting to be placed"))
        self.assertEqual(self.submit(user),
                         SuperNodeStatus(SubmitState.CHECKING, "waiting to be placed"))
        self.assertEqual(len(held), 1)
        (waiting, args), = held
        self.mesh.store.run(thd_join, *args).chainDeferred(waiting)
        self.assertEqual([r.node_id for r in self.stored()], [user.node_id])
        self.assertEqual(self.submit(user), SuperNodeStatus(SubmitState.ASSIGNED, ""))
        self.assertEqual(len(held), 1)
        self.assertTrue(self.service.may_transfer(user.node_id, FIRST_KEY, LAST_KEY))
        heartbeat = asking()  # a join again, committed in time: answered with its outcome
        self.assertEqual(len(held), 2)
        waiting, args = held[1]
        self.mesh.store.run(thd_join, *args).chainDeferred(waiting)
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(heartbeat),
                         SuperNodeStatus(SubmitState.ASSIGNED, ""))

    def test_restarted_service_loads_the_assignment(self):
        """A new placement service on the same store serves only what the store leaves it."""
        self.start(replicas=1)
        self.place(self.mesh.user("super1"), (0x0000, 0x7FFF))
        self.service.stopService()
        served = []

        class Partition:
            def serve(self, ranges):
                served.append(ranges)

        again = PlacementService(rpc=self.mesh.operator.rpc, store=self.mesh.store,
                                 clock=self.mesh.operator.reactor, partition=Partition(),
                                 replicas=1)
        again.operator = self.mesh.me
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(served[-1], [(0x8000, 0xFFFF)])
        self.assertEqual(again.assignment, self.service.assignment)


class PlacementOrderTests(SynchronousTestCase):
    """The service's decisions, one at a time, each outcome used before the next starts."""

    def test_in_memory_assignment_is_the_last_one_committed(self):
        """While one decision is in the store, the next waits; the assignment in memory (and
        the ranges the operator serves) is each decision's outcome in turn, never an older
        one that finished later."""
        held = []

        class Store:
            def run(self, function, *args):
                held.append((function, defer.Deferred()))
                return held[-1][1]

        class RPC:
            def register(self, *args):
                pass

            def unregister(self, *args):
                pass

            def now_ms(self):
                return NOW

        served = []

        class Partition:
            def serve(self, ranges):
                served.append(ranges)

        service = PlacementService(rpc=RPC(), store=Store(), clock=task.Clock(),
                                   partition=Partition(), replicas=1)
        service.startService()  # loads the assignment, then the first sweep
        self.addCleanup(service.stopService)
        service.expire()
        self.assertEqual([function for function, _ in held], [thd_assignment])
        loaded = Assignment((Range(FIRST_KEY, 0x7FFF, {POOL[0]}), Range(0x8000, LAST_KEY)), 1)
        held[0][1].callback(loaded)
        self.assertEqual(service.assignment, loaded)
        self.assertEqual([function for function, _ in held], [thd_assignment, thd_expire])
        swept = Assignment((Range(FIRST_KEY, LAST_KEY, {POOL[0]}),), 1)
        held[1][1].callback((swept, []))
        self.assertEqual(service.assignment, swept)
        self.assertEqual(len(held), 3)
        held[2][1].callback((Assignment.initial(1), [POOL[0]]))
        self.assertEqual(service.assignment, Assignment.initial(1))
        self.assertEqual(served[1:], [[(0x8000, LAST_KEY)], [], [(FIRST_KEY, LAST_KEY)]])


class OneReplicaPerOrganizationTests(SynchronousTestCase):
    """Colluding super-nodes of one organization, aimed at another's partition key, hold at
    most one replica of it; where only their own domain lives, K of them may hold it."""

    def setUp(self):
        self.mesh = Mesh(self)
        self.partition = self.mesh.partition()
        self.service = PlacementService(rpc=self.mesh.operator.rpc, store=self.mesh.store,
                                        clock=self.mesh.operator.reactor,
                                        partition=self.partition, replicas=3)
        self.service.operator = self.mesh.me
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def place(self, node, offer):
        endpoint = Endpoint(node.host, node.rpc.port)
        self.mesh.ask(node, SubmitSuperNode(*offer, endpoint), SuperNodeStatus)
        self.mesh.network.flush()
        return self.mesh.ask(node, SubmitSuperNode(*offer, endpoint), SuperNodeStatus)

    def holders_of(self, key):
        return set(placement_holders(self.service.assignment, key))

    def test_colluders_get_one_replica_of_the_victims_range(self):
        victim = self.mesh.user("alice", "victim")
        key = records.partition_of(victim.rpc.domain)
        aimed = (max(0, key - 8), min(0xFFFF, key + 8))
        colluders = [self.mesh.user(f"evil{i}", "evil") for i in range(3)]
        for node in colluders:
            self.assertEqual(self.place(node, aimed).state, SubmitState.ASSIGNED)
        held = self.holders_of(key) & {node.node_id for node in colluders}
        self.assertEqual(len(held), 1, "colluders of one organization on one range")
        # Others' super-nodes fill the range up to K; the operator serves it meanwhile.
        for i in range(2):
            self.place(self.mesh.user(f"other{i}", f"org{i}"), aimed)
        self.assertEqual(len(self.holders_of(key)), 3)
        self.assertEqual(len(self.holders_of(key) & {n.node_id for n in colluders}), 1)
        self.assertFalse(self.service.assignment.served_by_operator(
            placement_range(self.service.assignment, key)))

    def test_an_organization_serving_only_itself_holds_k(self):
        own = [self.mesh.user(f"s{i}", "solo") for i in range(3)]
        key = records.partition_of(own[0].rpc.domain)
        # Its own domain and the operators' are the only ones: nothing else to protect.
        offer = (max(0, key - 8), min(0xFFFF, key + 8))
        for node in own:
            self.place(node, offer)
        self.assertEqual(self.holders_of(key), {node.node_id for node in own})
