"""Tests for meshnode.directory: the super-node list (SuperNodeList) on its own, and
DirectoryService end to end over tests.mesh — the list refreshed from super-nodes and the
operator, checked, kept and restored; the replicas of a partition; the peer check; and
lookup_node_info, whose forged or foreign answers never win.
"""

import random

import sqlalchemy as sa
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records
from meshnode.core.dht import PartitionService
from meshnode.core.directory import (SUPER_NODE_REFRESH_SECONDS, DirectoryError, DirectoryService,
                                FanOut, Replica, SuperNodeList, thd_keep_list)
from meshnode.core.identity import Identity
from meshnode.roles.operator import directory as operator_directory
from meshnode.rpc.messages import Command, NodeInfoRecord, SuperNodes
from meshnode.rpc.service import CallTimeout, any_domain
from meshnode.core.schema import kept_lists, super_nodes
from meshnode.wire import DecodeError, Endpoint
from tests.mesh import DAY_MS, NOW_MS, REPLICAS, Mesh, StoreStandIn
from tests.test_dht import entry_of, node_info, partition, revoke, user_of_another_partition

# Past the RPC call timeout (2 s), so that unanswered calls fail.
PAST_CALL_TIMEOUT = 3


# -- SuperNodeList -------------------------------------------------------------------------

_OPERATOR = Identity.generate()
_DOMAIN = 0x12340001


def _super_node(number, low, high, port=None, replicas=3, created=NOW_MS):
    """An operator-signed SuperNode record of node `number` (SuperNodeList does not verify)."""
    return _OPERATOR.sign(records.SuperNode(
        _DOMAIN, bytes([number]) * 32, low, high, replicas,
        Endpoint(f"192.0.2.{number}", port or 4000 + number), created))


def _replica(number, port=None):
    return Replica(bytes([number]) * 32, (f"192.0.2.{number}", port or 4000 + number))


class SuperNodeListTests(SynchronousTestCase):
    """Who holds which partition keys, by the operator's SuperNode records."""

    def setUp(self):
        self.listed = SuperNodeList([
            _super_node(1, 0x2000, 0x2FFF),
            _super_node(2, 0x0800, 0x1FFF),
            _super_node(1, 0x0000, 0x0FFF),
            _super_node(3, 0x3000, 0x3000),
        ])

    def test_holders_of_a_key(self):
        """Every node whose range holds the key, bounds included, one Replica each."""
        self.assertEqual(self.listed.holders(0x0900), [_replica(2), _replica(1)])
        self.assertEqual(self.listed.holders(0x0FFF), [_replica(2), _replica(1)])
        self.assertEqual(self.listed.holders(0x1000), [_replica(2)])
        self.assertEqual(self.listed.holders(0x3000), [_replica(3)])
        self.assertEqual(self.listed.holders(0x3001), [])

    def test_holders_of_a_range(self):
        """A node holding any key of low..high is a holder, listed once however many of its
        ranges overlap."""
        self.assertEqual(self.listed.holders(0x1FFF, 0x2000), [_replica(1), _replica(2)])
        self.assertEqual(self.listed.holders(0x0000, 0xFFFF),
                         [_replica(1), _replica(2), _replica(3)])
        self.assertEqual(self.listed.holders(0x3001, 0xFFFF), [])

    def test_ranges_of(self):
        """A node's ranges, sorted; none for a node not listed."""
        self.assertEqual(self.listed.ranges_of(bytes([1]) * 32),
                         [(0x0000, 0x0FFF), (0x2000, 0x2FFF)])
        self.assertEqual(self.listed.ranges_of(bytes([3]) * 32), [(0x3000, 0x3000)])
        self.assertEqual(self.listed.ranges_of(bytes([9]) * 32), [])

    def test_super_nodes(self):
        """Each listed node once, with where it listens and all its ranges."""
        listed = {node_id: (replica, sorted(ranges))
                  for node_id, (replica, ranges) in self.listed.super_nodes().items()}
        self.assertEqual(listed, {
            bytes([1]) * 32: (_replica(1), [(0x0000, 0x0FFF), (0x2000, 0x2FFF)]),
            bytes([2]) * 32: (_replica(2), [(0x0800, 0x1FFF)]),
            bytes([3]) * 32: (_replica(3), [(0x3000, 0x3000)]),
        })
        self.assertEqual(len(self.listed), 4)

    def test_round_trip(self):
        """decode(encode()) gives the same records, in order, and the same K."""
        decoded = SuperNodeList.decode(self.listed.encode())
        self.assertEqual(decoded.signed, self.listed.signed)
        self.assertEqual(decoded.replicas, 3)
        empty = SuperNodeList.decode(SuperNodeList().encode())
        self.assertEqual((empty.signed, empty.replicas), ((), 1))

    def test_k_is_the_one_signed_in_the_newest_record(self):
        """K comes from the records' signed bytes: the newest record's (the operator signs
        every record anew when K changes); with no record it is 1 (the operator alone)."""
        self.assertEqual(SuperNodeList([_super_node(1, 0, 0xFFFF, replicas=5)]).replicas, 5)
        mixed = SuperNodeList([_super_node(1, 0, 0x7FFF, replicas=2, created=NOW_MS + 1),
                               _super_node(2, 0x8000, 0xFFFF, replicas=4)])
        self.assertEqual(mixed.replicas, 2)
        self.assertEqual(SuperNodeList().replicas, 1)

    def test_bad_bytes_rejected(self):
        """Truncated, padded or empty bytes are a DecodeError (a ValueError)."""
        data = self.listed.encode()
        for bad in (data[:-1], data + b"\x00", b""):
            self.assertRaises(DecodeError, SuperNodeList.decode, bad)


# -- DirectoryService ----------------------------------------------------------------------

def place(mesh, node, low, high, node_id=None, signer=None, created=None, endpoint=None,
          add=True, replicas=REPLICAS):
    """Sign a SuperNode record placing `node` (or `node_id` at `node`'s endpoint) on low..high
    with K = `replicas` and (with `add`) add it to the operator's super_nodes table → the
    signed record."""
    signed = (signer or mesh.me).sign(records.SuperNode(
        node.rpc.domain, node_id or node.node_id, low, high, replicas,
        endpoint or Endpoint(*node.address),
        mesh.operator.rpc.now_ms() if created is None else created))
    if add:
        add_row(mesh, signed, signed.record.node_id, low, high)
    return signed


def add_row(mesh, signed, node_id, low, high):
    with mesh.engine.begin() as connection:
        connection.execute(super_nodes.insert().values(
            node_id=node_id, partition_from=low, partition_to=high, domain=0,
            record=signed.encode(), created=0))


def clear_rows(mesh):
    with mesh.engine.begin() as connection:
        connection.execute(super_nodes.delete())


def kept_list(store):
    """The SuperNodeList kept in `store`, or None."""
    with store.engine.connect() as connection:
        data = connection.execute(sa.select(kept_lists.c.data).where(
            kept_lists.c.name == "super_nodes")).scalar()
    return None if data is None else SuperNodeList.decode(data)


def answer_super_nodes(node, signed):
    """Make `node` answer GetSuperNodes with `signed`, as a super-node answers from its list."""
    blobs = [s.encode() for s in signed]
    node.rpc.register(Command.GET_SUPER_NODES,
                      lambda incoming: SuperNodes.fill(blobs, incoming.message.offset),
                      any_domain)


def answer_node_info(node, answer):
    """Make `node` answer every GetNodeInfo with `answer` (a replica that lies)."""
    node.rpc.register(Command.GET_NODE_INFO, lambda incoming: answer, any_domain)


class _DirectoryTestCase(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.operator = self.mesh.operator
        self.alice = self.mesh.user("alice")
        self.key = partition(self.alice)

    def directory(self, store=None, clock=None, operator_address=None):
        """A started DirectoryService of alice (over `store`, or one of its own)."""
        service = DirectoryService(identity=self.alice.identity_service,
                                   store=store or StoreStandIn(self), rpc=self.alice.rpc,
                                   operator_address=operator_address or self.operator.address,
                                   clock=clock, rng=random.Random(1))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def settle(self, d):
        """Deliver everything → the Deferred's result."""
        self.mesh.network.flush()
        return self.successResultOf(d)

    def super_node(self, name, ranges=None, entries=()):
        """A node of the infrastructure domain serving `ranges` (alice's partition by
        default) with a PartitionService holding `entries`."""
        node = self.mesh.user(name, "infra")
        service = PartitionService(rpc=node.rpc, store=StoreStandIn(self), clock=node.reactor)
        service.serve(ranges or [(self.key, self.key)])
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        for entry in entries:
            service.records.put(entry, node.rpc.now_ms())
        return node

    def silent(self, name):
        """A node that answers GetNode (as every node does) but not GetSuperNodes or
        GetNodeInfo: a super-node gone from its ranges, or down."""
        return self.mesh.user(name, "infra")

    def asked(self, node, command=Command.GET_SUPER_NODES):
        return node.rpc.accepted[command]


class RefreshTests(_DirectoryTestCase):
    """refresh_super_nodes: where the list comes from, what is kept, who hears of it."""

    def test_from_the_operator_when_none_is_listed(self):
        """With no list yet, the operator's SuperNode records and K are the new list."""
        s1, s2 = self.silent("s1"), self.silent("s2")
        placed = [place(self.mesh, s1, 0, 0x7FFF), place(self.mesh, s2, 0x8000, 0xFFFF)]
        listed = self.settle(self.directory().refresh_super_nodes())
        self.assertEqual(sorted(listed.signed, key=placed.index), placed)
        self.assertEqual(listed.replicas, REPLICAS)
        self.assertEqual(self.asked(self.operator), 1)

    def test_observers_hear_and_the_store_keeps_the_list(self):
        """After a refresh the observers get the new list and the store keeps it."""
        place(self.mesh, self.silent("s1"), 0, 0xFFFF)
        store = StoreStandIn(self)
        directory = self.directory(store)
        heard = []
        directory.list_observers.append(heard.append)
        listed = self.settle(directory.refresh_super_nodes())
        self.assertEqual(heard, [listed])
        self.assertIs(directory.super_node_list, listed)
        kept = kept_list(store)
        self.assertEqual((kept.signed, kept.replicas), (listed.signed, REPLICAS))

    def test_many_pages(self):
        """A list longer than one datagram is read page by page, all of it."""
        nodes = [self.silent(f"s{i}") for i in range(25)]
        placed = [place(self.mesh, node, i, i) for i, node in enumerate(nodes)]
        listed = self.settle(self.directory().refresh_super_nodes())
        self.assertEqual(sorted(listed.signed, key=placed.index), placed)
        self.assertGreater(self.asked(self.operator), 2)

    def test_from_a_listed_super_node_first(self):
        """Once there is a list, a refresh asks a super-node of it, not the operator."""
        s1 = self.silent("s1")
        place(self.mesh, s1, 0, 0xFFFF)
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        s2 = self.silent("s2")
        theirs = [place(self.mesh, s1, 0, 0x7FFF, add=False, replicas=2),
                  place(self.mesh, s2, 0x8000, 0xFFFF, add=False, replicas=2)]
        clear_rows(self.mesh)  # the operator would now answer an empty list
        answer_super_nodes(s1, theirs)
        listed = self.settle(directory.refresh_super_nodes())
        self.assertEqual(list(listed.signed), theirs)
        self.assertEqual(listed.replicas, 2)
        self.assertEqual((self.asked(s1), self.asked(self.operator)), (1, 1))

    def test_older_list_from_a_super_node_is_refused_and_counted(self):
        """A super-node answering with a list older than ours (replayed): not used, counted
        against it as old_list, and the operator's list is read instead."""
        s1 = self.silent("s1")
        old = place(self.mesh, s1, 0, 0xFFFF, add=False, created=NOW_MS - 60_000)
        place(self.mesh, s1, 0, 0xFFFF)
        directory = self.directory()
        current = self.settle(directory.refresh_super_nodes()).signed
        answer_super_nodes(s1, [old])
        listed = self.settle(directory.refresh_super_nodes())
        self.assertEqual(listed.signed, current)
        self.assertEqual((self.asked(s1), self.asked(self.operator)), (1, 2))
        self.assertEqual(directory.status()["lies"], {"old_list": 1})
        self.assertEqual(directory.status()["suspects"], [s1.node_id.hex()[:16]])

    def test_from_the_operator_first_when_asked(self):
        """With from_operator, the operator is asked even though a super-node is listed."""
        s1 = self.silent("s1")
        place(self.mesh, s1, 0, 0xFFFF)
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        answer_super_nodes(s1, [])
        s2 = self.silent("s2")
        added = place(self.mesh, s2, 0, 0xFFFF)
        listed = self.settle(directory.refresh_super_nodes(from_operator=True))
        self.assertIn(added, listed.signed)
        self.assertEqual((self.asked(s1), self.asked(self.operator)), (0, 2))

    def test_operator_after_a_silent_super_node(self):
        """A listed super-node that does not answer: after the call timeout, the operator."""
        s1 = self.silent("s1")
        place(self.mesh, s1, 0, 0xFFFF)
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        added = place(self.mesh, self.silent("s2"), 0, 0xFFFF)
        d = directory.refresh_super_nodes()
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.assertEqual(s1.rpc.drops["unknown_command"], 1)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.assertIn(added, self.settle(d).signed)
        self.assertEqual(self.asked(self.operator), 2)

    def test_operator_after_an_impostor(self):
        """A node at a listed endpoint that is not the node placed there is not asked."""
        bob = self.mesh.user("bob")
        answer_super_nodes(bob, [])
        placed = place(self.mesh, bob, 0, 0xFFFF, node_id=Identity.generate().node_id)
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        listed = self.settle(directory.refresh_super_nodes())
        self.assertEqual(list(listed.signed), [placed])
        self.assertEqual((self.asked(bob), self.asked(self.operator)), (0, 2))

    def test_never_from_itself(self):
        """A node listed as a super-node does not ask itself for the list."""
        place(self.mesh, self.alice, 0, 0xFFFF)
        answer_super_nodes(self.alice, [])
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        listed = self.settle(directory.refresh_super_nodes())
        self.assertEqual(len(listed), 1)
        self.assertEqual((self.asked(self.alice), self.asked(self.operator)), (0, 2))

    def test_nobody_answers(self):
        """When the super-node and the operator both stay silent, the refresh fails with the
        RPC error and the list is left as it was."""
        s1 = self.silent("s1")
        store = StoreStandIn(self)
        kept = [place(self.mesh, s1, 0, 0xFFFF)]
        store.run(thd_keep_list, "super_nodes", SuperNodeList(kept).encode())
        directory = self.directory(store, operator_address=("10.0.0.99", 4000))
        d = directory.refresh_super_nodes()
        self.mesh.network.flush()
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.failureResultOf(d, CallTimeout)
        self.assertEqual(list(directory.super_node_list.signed), kept)

    def test_periodic_refresh(self):
        """With a clock, the list is fetched at start and every SUPER_NODE_REFRESH_SECONDS,
        even after a refresh failed."""
        directory = self.directory(clock=self.alice.reactor)
        self.mesh.network.flush()
        self.assertEqual(self.asked(self.operator), 1)
        self.operator.rpc.unregister(Command.GET_SUPER_NODES)
        self.mesh.advance(SUPER_NODE_REFRESH_SECONDS)
        self.mesh.network.flush()
        self.mesh.advance(PAST_CALL_TIMEOUT)  # the refresh fails, quietly
        self.assertEqual(self.operator.rpc.drops["unknown_command"], 1)
        operator_directory.register(self.operator.rpc, self.mesh.store)
        added = place(self.mesh, self.silent("s1"), 0, 0xFFFF)
        self.mesh.advance(SUPER_NODE_REFRESH_SECONDS - PAST_CALL_TIMEOUT)
        self.mesh.network.flush()
        self.assertEqual(list(directory.super_node_list.signed), [added])


class TrustTests(_DirectoryTestCase):
    """Only SuperNode records signed by an operator this node trusts make the list."""

    def refresh(self):
        return list(self.settle(self.directory().refresh_super_nodes()).signed)

    def test_signed_by_a_node_not_an_operator(self):
        """A SuperNode record signed by a node's own key is dropped, the operator's kept."""
        s1, s2 = self.silent("s1"), self.silent("s2")
        genuine = place(self.mesh, s1, 0, 0xFFFF)
        place(self.mesh, s2, 0, 0xFFFF, signer=s2.identity)
        place(self.mesh, s2, 0x10, 0x10, signer=self.alice.identity)
        self.assertEqual(self.refresh(), [genuine])

    def test_signed_by_a_revoked_operator(self):
        """A second operator's records count while it is trusted, not once it is revoked."""
        other = Identity.generate()
        domain = self.mesh.operator_record.record.domain
        now = self.alice.rpc.now_ms()
        self.alice.trust.add_operator(self.mesh.me.sign(records.OperatorNode(
            domain, other.node_id, other.signing_public, other.agreement_public, now)), now)
        s1, s2 = self.silent("s1"), self.silent("s2")
        genuine = place(self.mesh, s1, 0, 0xFFFF)
        theirs = place(self.mesh, s2, 0, 0xFFFF, signer=other)
        self.assertEqual(sorted(self.refresh(), key=[genuine, theirs].index), [genuine, theirs])
        self.alice.trust.add_revocation(self.mesh.me.sign(records.Revocation(
            domain, [other.node_id], [], now)), now)
        self.assertEqual(self.refresh(), [genuine])

    def test_revoked_super_node(self):
        """The record of a super-node the operator revoked is dropped."""
        s1, s2 = self.silent("s1"), self.silent("s2")
        genuine = place(self.mesh, s1, 0, 0xFFFF)
        place(self.mesh, s2, 0, 0xFFFF)
        revoke(self.mesh, self.alice, s2)
        self.assertEqual(self.refresh(), [genuine])

    def test_other_records_and_future_ones(self):
        """An operator-signed record of another type, or a SuperNode record dated in the
        future, is dropped."""
        s1, s2 = self.silent("s1"), self.silent("s2")
        genuine = place(self.mesh, s1, 0, 0xFFFF)
        add_row(self.mesh, s2.rpc.own_node, s2.node_id, 0, 0xFFFF)
        place(self.mesh, s2, 1, 1, created=self.operator.rpc.now_ms() + DAY_MS)
        self.assertEqual(self.refresh(), [genuine])


class KeptListTests(_DirectoryTestCase):
    """The list kept in the store: restored on start, without asking anyone."""

    def test_restored_without_the_network(self):
        """A new DirectoryService over the same store knows the list and the replicas of
        alice's partition without sending a datagram."""
        holders = [self.silent(f"s{i}") for i in range(REPLICAS)]
        placed = [place(self.mesh, node, self.key, self.key) for node in holders]
        store = StoreStandIn(self)
        listed = self.settle(self.directory(store).refresh_super_nodes())
        sent = len(self.alice.udp.sent)
        restarted = self.directory(store)
        self.assertEqual(restarted.super_node_list.signed, listed.signed)
        self.assertEqual(restarted.super_node_list.replicas, REPLICAS)
        replicas = self.successResultOf(restarted.replicas())
        self.assertEqual(set(replicas), {Replica(s.record.node_id, (
            s.record.endpoint.host, s.record.endpoint.port)) for s in placed})
        self.assertEqual(len(replicas), REPLICAS)
        self.assertEqual(len(self.alice.udp.sent), sent)

    def test_restored_records_checked_again(self):
        """Records kept before their super-node was revoked, or signed by a non-operator,
        are not used after a restart."""
        s1, s2, s3 = self.silent("s1"), self.silent("s2"), self.silent("s3")
        genuine = place(self.mesh, s1, 0, 0xFFFF)
        revoked = place(self.mesh, s2, 0, 0xFFFF)
        forged = place(self.mesh, s3, 0, 0xFFFF, signer=s3.identity)
        store = StoreStandIn(self)
        store.run(thd_keep_list, "super_nodes",
                  SuperNodeList([genuine, revoked, forged]).encode())
        revoke(self.mesh, self.alice, s2)
        self.assertEqual(list(self.directory(store).super_node_list.signed), [genuine])

    def test_unreadable_list_ignored(self):
        """Kept bytes that do not decode are ignored: the list is fetched when first needed."""
        for data in (b"\x03\xff\xff", b""):
            store = StoreStandIn(self)
            store.run(thd_keep_list, "super_nodes", data)
            directory = self.directory(store)
            self.assertEqual(len(directory.super_node_list), 0)
            replicas = self.settle(directory.replicas())
            self.assertEqual(replicas, [Replica(self.operator.node_id, self.operator.address)])
        self.assertEqual(self.asked(self.operator), 2)


class ReplicasTests(_DirectoryTestCase):
    """replicas(): the holders of a domain's partition, and the operator while too few."""

    def replica_of(self, node):
        return Replica(node.node_id, node.address)

    def test_operator_alone(self):
        """With no super-node placed, the operator is the only replica (the list is fetched
        from it first)."""
        directory = self.directory()
        self.assertEqual(self.settle(directory.replicas()),
                         [Replica(self.operator.node_id, self.operator.address)])
        self.assertEqual(self.asked(self.operator), 1)

    def test_operator_fills_in_below_k(self):
        """Fewer than K holders: they and the operator."""
        s1 = self.silent("s1")
        place(self.mesh, s1, self.key, self.key)
        self.assertEqual(self.settle(self.directory().replicas()),
                         [self.replica_of(s1), Replica(self.operator.node_id,
                                                       self.operator.address)])

    def test_k_holders_without_the_operator(self):
        """K holders: only they."""
        holders = [self.silent(f"s{i}") for i in range(REPLICAS)]
        for node in holders:
            place(self.mesh, node, 0, 0xFFFF)
        replicas = self.settle(self.directory().replicas())
        self.assertEqual(len(replicas), REPLICAS)
        self.assertEqual(set(replicas), {self.replica_of(node) for node in holders})

    def test_by_domain(self):
        """Holders of another partition are not alice's replicas, but those of a domain of
        that partition."""
        carol = user_of_another_partition(self.mesh, "carol", self.alice)
        s1 = self.silent("s1")
        place(self.mesh, s1, partition(carol), partition(carol))
        directory = self.directory()
        operator = Replica(self.operator.node_id, self.operator.address)
        self.assertEqual(self.settle(directory.replicas()), [operator])
        self.assertEqual(self.settle(directory.replicas(carol.rpc.domain)),
                         [self.replica_of(s1), operator])


class PeerForTests(_DirectoryTestCase):
    """peer_for: the node at a replica's endpoint must be the node placed there."""

    def test_the_node_placed_there(self):
        """The node the record names, met at its endpoint, is the peer."""
        bob = self.mesh.user("bob")
        peer = self.settle(self.directory().peer_for(Replica(bob.node_id, bob.address)))
        self.assertEqual(peer.node, bob.rpc.own_node.record)

    def test_another_node_refused(self):
        """A node at the endpoint whose id is not the record's is refused: DirectoryError."""
        bob = self.mesh.user("bob")
        d = self.directory().peer_for(Replica(Identity.generate().node_id, bob.address))
        self.mesh.network.flush()
        failure = self.failureResultOf(d, DirectoryError)
        self.assertIn(f"{bob.host}:{bob.rpc.port}", failure.getErrorMessage())


class LookupTests(_DirectoryTestCase):
    """lookup_node_info: the newest valid answer of the partition's replicas."""

    def setUp(self):
        super().setUp()
        self.dave = self.mesh.user("dave")
        self.eve = self.mesh.user("eve")
        self.operator_partition = self.mesh.partition()

    def entry(self, node, age_ms):
        """A genuine Entry of `node`, its NodeInfo made `age_ms` ago."""
        return entry_of(node, created=node.rpc.now_ms() - age_ms)

    def hold(self, entry):
        """The operator's replica holds `entry`."""
        self.operator_partition.records.put(entry, self.operator.rpc.now_ms())

    def lookup(self, node, directory=None):
        return self.settle((directory or self.directory()).lookup_node_info(node))

    def test_newest_answer_wins(self):
        """A super-node and the operator both answer; the newer NodeInfo wins, both are
        named as having answered."""
        self.hold(self.entry(self.dave, 5000))
        newer = self.entry(self.dave, 1000)
        s1 = self.super_node("s1", entries=[newer])
        place(self.mesh, s1, self.key, self.key)
        info, answered = self.lookup(self.dave.node_id)
        self.assertEqual(info, newer.info.record)
        self.assertEqual(sorted(answered), sorted([s1.node_id, self.operator.node_id]))
        self.assertEqual(len(answered), 2)

    def forged(self, answer, by_name=False):
        """A lying replica answers `answer`, newer than the operator's genuine entry: the
        lookup gets the genuine one, and only the operator counts as having answered."""
        genuine = self.entry(self.dave, 5000)
        self.hold(genuine)
        liar = self.silent("liar")
        answer_node_info(liar, answer)
        place(self.mesh, liar, self.key, self.key)
        info, answered = self.lookup("dave" if by_name else self.dave.node_id)
        self.assertEqual(liar.rpc.accepted[Command.GET_NODE_INFO], 1)
        self.assertEqual((info, answered), (genuine.info.record, [self.operator.node_id]))
        self.assertEqual(self.alice.rpc.peers.get(self.dave.node_id).signed,
                         self.dave.rpc.own_node)

    def test_node_record_of_another_domain(self):
        """An operator-signed Node record of dave's id in another domain, with a NodeInfo
        dave signed for that domain, does not win."""
        carol = user_of_another_partition(self.mesh, "carol", self.alice)
        old = self.dave.rpc.own_node.record
        foreign = self.mesh.me.sign(records.Node(
            carol.rpc.domain, old.node_id, old.signing_key, old.agreement_key, old.name,
            old.issued, old.expires))
        info = self.dave.identity.sign(node_info(self.dave, domain=carol.rpc.domain))
        self.forged(NodeInfoRecord(foreign, info))

    def test_another_node_by_id(self):
        """eve's genuine records in answer to a lookup of dave's id do not win."""
        self.forged(NodeInfoRecord(self.eve.rpc.own_node, self.entry(self.eve, 0).info))

    def test_another_node_by_name(self):
        """eve's genuine records in answer to a lookup of the name "dave" do not win."""
        self.forged(NodeInfoRecord(self.eve.rpc.own_node, self.entry(self.eve, 0).info),
                    by_name=True)

    def test_node_info_with_a_bad_signature(self):
        """dave's Node record with a NodeInfo of dave signed by eve's key does not win."""
        info = records.sign(node_info(self.dave), self.dave.node_id,
                            self.eve.identity.signing_key)
        self.forged(NodeInfoRecord(self.dave.rpc.own_node, info))

    def test_node_info_from_the_future(self):
        """A NodeInfo dave signed dated an hour ahead (newest of all) does not win."""
        info = self.dave.identity.sign(node_info(
            self.dave, created=self.dave.rpc.now_ms() + 3_600_000))
        self.forged(NodeInfoRecord(self.dave.rpc.own_node, info))

    def test_operator_signed_record_of_another_type(self):
        """An operator-signed record that is not a NodeInfo (the liar's own SuperNode record,
        newer than dave's NodeInfo) in the NodeInfo's place does not win."""
        liar_record = place(self.mesh, self.dave, self.key, self.key, add=False)
        self.forged(NodeInfoRecord(self.dave.rpc.own_node, liar_record))

    def test_forged_answers_alone_fail(self):
        """With only a forged answer to be had, the lookup fails with DirectoryError."""
        liar = self.silent("liar")
        info = records.sign(node_info(self.dave), self.dave.node_id,
                            self.eve.identity.signing_key)
        answer_node_info(liar, NodeInfoRecord(self.dave.rpc.own_node, info))
        place(self.mesh, liar, self.key, self.key)
        d = self.directory().lookup_node_info(self.dave.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)
        self.assertIsNone(self.alice.rpc.peers.get(self.dave.node_id))

    def test_known_peer_revoked_since_is_not_found(self):
        """dave, learned by a first lookup and revoked since, is not found again from the
        very Node record alice already verified: the lookup fails with DirectoryError."""
        self.hold(self.entry(self.dave, 0))
        directory = self.directory()
        info, _ = self.lookup(self.dave.node_id, directory)
        self.assertEqual(info.node_id, self.dave.node_id)
        self.assertEqual(self.alice.rpc.peers.get(self.dave.node_id).signed,
                         self.dave.rpc.own_node)  # the replica's answer is the known record
        revoke(self.mesh, self.alice, self.dave)
        d = directory.lookup_node_info(self.dave.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)

    def test_kept_holder_answers_while_the_operator_is_away(self):
        """A restarted node whose kept list has fewer than K holders of its partition finds
        a NodeInfo a holder has, though the operator does not answer."""
        entry = self.entry(self.dave, 0)
        s1 = self.super_node("s1", entries=[entry])
        store = StoreStandIn(self)
        store.run(thd_keep_list, "super_nodes", SuperNodeList(
            [place(self.mesh, s1, self.key, self.key, add=False)]).encode())
        directory = self.directory(store, operator_address=("10.0.0.99", 4000))
        d = directory.lookup_node_info(self.dave.node_id)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.assertEqual(self.settle(d), (entry.info.record, [s1.node_id]))

    def test_stale_list_refreshed_once_from_the_operator(self):
        """When no replica of the list answers, the list is fetched again from the operator
        and the new replicas are asked."""
        stale = [self.silent(f"s{i}") for i in range(REPLICAS)]
        for node in stale:
            place(self.mesh, node, self.key, self.key)
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        clear_rows(self.mesh)
        newer = self.entry(self.dave, 0)
        s4 = self.super_node("s4", entries=[newer])
        place(self.mesh, s4, self.key, self.key)
        d = directory.lookup_node_info(self.dave.node_id)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        info, answered = self.settle(d)
        self.assertEqual((info, answered), (newer.info.record, [s4.node_id]))
        self.assertEqual(self.asked(self.operator), 2)
        self.assertEqual([node.rpc.drops["unknown_command"] for node in stale], [1, 1, 1])

    def test_refreshed_only_once(self):
        """When the refreshed list does not help either, the lookup fails after asking the
        operator for the list once more, and each replica twice."""
        stale = [self.silent(f"s{i}") for i in range(REPLICAS)]
        for node in stale:
            place(self.mesh, node, self.key, self.key)
        directory = self.directory()
        self.settle(directory.refresh_super_nodes())
        d = directory.lookup_node_info(self.dave.node_id)
        for _ in range(2):
            self.mesh.network.flush()
            self.assertNoResult(d)
            self.mesh.advance(PAST_CALL_TIMEOUT)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)
        self.assertEqual(self.asked(self.operator), 2)
        self.assertEqual([node.rpc.drops["unknown_command"] for node in stale], [2, 2, 2])

    def test_dead_replica_does_not_hold_the_lookup(self):
        """With a clock, a silent replica of the first wave delays the lookup by the grace
        only, not by the call timeout."""
        genuine = self.entry(self.dave, 0)
        self.hold(genuine)
        place(self.mesh, self.silent("dead"), self.key, self.key)
        directory = self.directory(clock=self.alice.reactor)
        self.mesh.network.flush()  # the refresh at start
        d = directory.lookup_node_info(self.dave.node_id)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(FanOut().grace)
        self.assertEqual(self.successResultOf(d), (genuine.info.record,
                                                   [self.operator.node_id]))
