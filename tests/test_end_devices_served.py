"""Tests for end-devices served by super-nodes: GetEndDevices naming a domain (its codec, and the
operator answering it only to a super-node placed on that domain's partition key),
DirectoryService.end_devices reading a super-node first and the operator after an empty or
silent one, and SuperService.refresh_end_devices with its GET_END_DEVICES handler — all over
tests.mesh's in-memory network, on the fake reactors' clocks.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from meshnode.core.directory import DirectoryService, Replica
from meshnode.records import Role
from meshnode.roles import super as super_role
from meshnode.roles.operator import directory as operator_directory
from meshnode.roles.operator import registry
from meshnode.roles.super import SuperService, SuperSettings
from meshnode.rpc.messages import (MESSAGES, Command, EndDevices, GetEndDevices,
                                   RecordsChanged, Stored)
from meshnode.rpc.service import CallTimeout, any_domain
from meshnode.wire import DecodeError
from tests.mesh import NOW_MS, Mesh, StoreStandIn
from tests.test_dht import entry_of, partition
from tests.test_directory import place

# Past the RPC call timeout (2 s), so that unanswered calls fail.
PAST_CALL_TIMEOUT = 3


def names(page_or_signed):
    signed = getattr(page_or_signed, "signed", page_or_signed)
    return sorted(one.record.name for one in signed)


class _Base(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.operator = self.mesh.operator
        self.alice = self.mesh.user("alice")
        self.mesh.add_devices("acme", ["printer", "scanner", "camera"])
        self.sup = self.mesh.user("sup", "infra")
        self.placed = set()  # (node id, partition key) the operator's placement accepts
        self.asked_places = []
        operator_directory.register(self.operator.rpc, self.mesh.store, self.places)

    def places(self, node_id, key):
        self.asked_places.append((node_id, key))
        if key is None:
            return any(node == node_id for node, _ in self.placed)
        return (node_id, key) in self.placed

    def call(self, node, message, answer, to=None):
        """Call `to` (the operator by default) from `node` and deliver everything → the
        Deferred (which may not have fired)."""
        to = to or self.operator
        d = node.rpc.call(node.rpc.learn(to.rpc.own_node), to.address, message, answer)
        self.mesh.network.flush()
        return d

    def settle(self, d):
        self.mesh.network.flush()
        return self.successResultOf(d)

    def blobs(self, node):
        return registry.thd_end_device_records(self.mesh.engine, node.rpc.domain)


# -- GetEndDevices --------------------------------------------------------------------------

class CodecTests(SynchronousTestCase):

    def round_trip(self, message):
        payload = message.encode()
        decoded = MESSAGES[Command.GET_END_DEVICES].decode(payload)
        self.assertEqual(decoded, message)
        self.assertEqual((decoded.offset, decoded.domain), (message.offset, message.domain))
        return payload

    def test_without_domain(self):
        """No domain: the 2-byte page request it always was; decodes with domain None."""
        self.assertEqual(self.round_trip(GetEndDevices()), b"\x00\x00")
        self.assertEqual(len(self.round_trip(GetEndDevices(517))), 2)
        self.assertIsNone(GetEndDevices.decode(b"\x00\x07").domain)

    def test_with_domain(self):
        """A domain: offset then the 32-bit domain, 6 bytes; 0 and 0xFFFFFFFF included."""
        self.assertEqual(self.round_trip(GetEndDevices(3, 0x12345678)),
                         b"\x00\x03\x12\x34\x56\x78")
        for domain in (0, 1, 0xFFFFFFFF):
            self.assertEqual(len(self.round_trip(GetEndDevices(0xFFFF, domain))), 6)

    def test_domain_matters_for_equality(self):
        self.assertNotEqual(GetEndDevices(0, 5), GetEndDevices(0, 6))
        self.assertNotEqual(GetEndDevices(0, 5), GetEndDevices(0))
        self.assertEqual(GetEndDevices(0, 5), GetEndDevices(0, 5))

    def test_other_lengths_rejected(self):
        for payload in (b"", b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00",
                        b"\x00" * 7):
            self.assertRaises(DecodeError, GetEndDevices.decode, payload)


# -- the operator ---------------------------------------------------------------------------

class OperatorTests(_Base):
    """The operator answers GetEndDevices(domain=X) only to a node placed on X's partition."""

    def test_placed_super_node_gets_the_domain(self):
        key = partition(self.alice)
        self.placed.add((self.sup.node_id, key))
        page = self.settle(self.call(self.sup, GetEndDevices(0, self.alice.rpc.domain),
                                     EndDevices))
        self.assertEqual(page.total, 3)
        self.assertEqual(names(page), ["camera", "printer", "scanner"])
        self.assertEqual({one.record.domain for one in page.signed}, {self.alice.rpc.domain})
        self.assertEqual(self.asked_places, [(self.sup.node_id, key)])
        self.assertEqual(self.operator.rpc.drops["not_replica"], 0)

    def test_super_node_placed_elsewhere_gets_trust_records_only(self):
        """A super-node placed on another key gets the domain's revocations and suspension
        (it may meet the domain's nodes), never its end-devices."""
        self.placed.add((self.sup.node_id, partition(self.alice) ^ 1))  # another key only
        registry.thd_revoke_node(self.mesh.engine, self.mesh.me,
                                 self.mesh.user("bob", "acme").node_id.hex(), NOW_MS)
        registry.thd_set_suspended(self.mesh.engine, self.mesh.me, "acme", True, NOW_MS)
        page = self.settle(self.call(self.sup, GetEndDevices(0, self.alice.rpc.domain),
                                     EndDevices))
        self.assertEqual(sorted(type(one.record).__name__ for one in page.signed),
                         ["DomainState", "Revocation"])
        self.assertEqual(self.asked_places, [(self.sup.node_id, partition(self.alice)),
                                             (self.sup.node_id, None)])
        self.assertEqual(self.operator.rpc.drops["not_replica"], 0)

    def test_unplaced_super_node_dropped_and_counted(self):
        """Placed nowhere: no answer (the call times out), drops["not_replica"] counts it."""
        d = self.call(self.sup, GetEndDevices(0, self.alice.rpc.domain), EndDevices)
        self.assertNoResult(d)
        self.assertEqual(self.operator.rpc.drops["not_replica"], 1)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.failureResultOf(d, CallTimeout)

    def test_user_of_another_domain_dropped(self):
        """Not only super-nodes: any node naming a foreign domain, unplaced, is refused."""
        carol = self.mesh.user("carol", "globex")
        d = self.call(carol, GetEndDevices(0, self.alice.rpc.domain), EndDevices)
        self.assertNoResult(d)
        self.assertEqual(self.operator.rpc.drops["not_replica"], 1)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.failureResultOf(d, CallTimeout)

    def test_own_domain_without_domain(self):
        """Without `domain` (and naming its own) a node gets its own domain's, unplaced."""
        self.mesh.add_devices("infra", ["rack"])
        self.assertEqual(names(self.settle(self.call(self.sup, GetEndDevices(), EndDevices))),
                         ["rack"])
        self.assertEqual(names(self.settle(self.call(self.alice, GetEndDevices(), EndDevices))),
                         ["camera", "printer", "scanner"])
        page = self.settle(self.call(self.alice, GetEndDevices(0, self.alice.rpc.domain),
                                     EndDevices))
        self.assertEqual(names(page), ["camera", "printer", "scanner"])
        self.assertEqual(self.asked_places, [])
        self.assertEqual(self.operator.rpc.drops["not_replica"], 0)

    def test_placed_super_node_paged(self):
        """A domain named by a placed super-node is paged by offset like its own."""
        self.placed.add((self.sup.node_id, partition(self.alice)))
        page = self.settle(self.call(self.sup, GetEndDevices(2, self.alice.rpc.domain),
                                     EndDevices))
        self.assertEqual((page.total, names(page)), (3, ["scanner"]))


# -- DirectoryService.end_devices -----------------------------------------------------------

class DirectoryEndDevicesTests(_Base):
    """A node reads its end-devices from a super-node of its partition, else the operator."""

    def directory(self):
        service = DirectoryService(identity=self.alice.identity_service,
                                   store=StoreStandIn(self), rpc=self.alice.rpc,
                                   operator_address=self.operator.address, rng=random.Random(1))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def listed(self, *nodes):
        """`nodes` placed on alice's partition key, and alice's directory listing them."""
        key = partition(self.alice)
        for node in nodes:
            place(self.mesh, node, key, key)
        directory = self.directory()
        listed = self.settle(directory.refresh_super_nodes(from_operator=True))
        self.assertEqual({r.node_id for r in listed.holders(key)},
                         {node.node_id for node in nodes})
        return directory

    def answers(self, node, blobs):
        node.rpc.register(Command.GET_END_DEVICES,
                          lambda incoming: EndDevices.fill(blobs, incoming.message.offset),
                          any_domain)

    def asked(self, node):
        return node.rpc.accepted[Command.GET_END_DEVICES]

    def test_from_the_super_node(self):
        """The super-node's page is used (here only two of the three) and the operator is
        never asked."""
        self.answers(self.sup, self.blobs(self.alice)[:2])
        directory = self.listed(self.sup)
        devices = self.settle(directory.end_devices())
        self.assertEqual(sorted(d.name for d in devices.values()), ["camera", "printer"])
        self.assertEqual(self.asked(self.sup), 1)
        self.assertEqual(self.asked(self.operator), 0)

    def test_from_the_super_node_many_pages(self):
        self.mesh.add_devices("acme", [f"device-{n:02}" for n in range(40)])
        self.answers(self.sup, self.blobs(self.alice))
        directory = self.listed(self.sup)
        devices = self.settle(directory.end_devices())
        self.assertEqual(len(devices), 43)
        self.assertGreater(self.asked(self.sup), 1)
        self.assertEqual(self.asked(self.operator), 0)

    def test_operator_after_an_empty_super_node(self):
        self.answers(self.sup, [])
        directory = self.listed(self.sup)
        devices = self.settle(directory.end_devices())
        self.assertEqual(sorted(d.name for d in devices.values()),
                         ["camera", "printer", "scanner"])
        self.assertEqual(self.asked(self.sup), 1)
        self.assertEqual(self.asked(self.operator), 1)

    def test_operator_after_a_silent_super_node(self):
        """A super-node that does not answer GET_END_DEVICES: after the call timeout, the
        operator."""
        directory = self.listed(self.sup)
        d = directory.end_devices()
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.asked(self.operator), 0)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        devices = self.settle(d)
        self.assertEqual(sorted(d.name for d in devices.values()),
                         ["camera", "printer", "scanner"])
        self.assertEqual(self.sup.rpc.drops["unknown_command"], 1)
        self.assertEqual(self.asked(self.operator), 1)

    def test_nobody_answers_is_an_error(self):
        """A silent super-node and a silent operator fail the read (a tunnel-node then keeps
        the devices it has) rather than answering "no devices"."""
        directory = self.listed(self.sup)
        self.operator.rpc.unregister(Command.GET_END_DEVICES)
        d = directory.end_devices()
        for _ in range(2):
            self.mesh.network.flush()
            self.assertNoResult(d)
            self.mesh.advance(PAST_CALL_TIMEOUT)
        self.mesh.network.flush()
        self.failureResultOf(d, CallTimeout)

    def test_empty_super_node_then_silent_operator_is_an_error(self):
        self.answers(self.sup, [])
        directory = self.listed(self.sup)
        self.operator.rpc.unregister(Command.GET_END_DEVICES)
        d = directory.end_devices()
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.mesh.network.flush()
        self.failureResultOf(d, CallTimeout)

    def test_second_super_node_before_the_operator(self):
        """Of two super-nodes, one empty and one answering, the answering one wins whichever
        is asked first; the operator is not asked."""
        other = self.mesh.user("other", "infra")
        self.answers(self.sup, [])
        self.answers(other, self.blobs(self.alice)[:1])
        directory = self.listed(self.sup, other)
        devices = self.settle(directory.end_devices())
        self.assertEqual([d.name for d in devices.values()], ["camera"])
        self.assertEqual(self.asked(other), 1)
        self.assertEqual(self.asked(self.operator), 0)

    def test_foreign_records_from_a_super_node_ignored(self):
        """A super-node handing out another domain's records gives alice none of them: with
        no usable record in its answer, the operator is asked instead."""
        self.mesh.add_devices("globex", ["nas"])
        carol = self.mesh.user("carol", "globex")
        self.answers(self.sup, self.blobs(carol))
        directory = self.listed(self.sup)
        devices = self.settle(directory.end_devices())
        self.assertEqual(sorted(d.name for d in devices.values()), ["camera", "printer", "scanner"])
        self.assertEqual({d.domain for d in devices.values()}, {self.alice.rpc.domain})
        self.assertEqual(self.asked(self.operator), 1)


# -- SuperService ----------------------------------------------------------------------------

class SuperServiceTests(_Base):
    """refresh_end_devices and the GET_END_DEVICES handler, on a SuperService not started
    (no timers, no submission), its handler registered as startService does."""

    def setUp(self):
        super().setUp()
        self.super = SuperService(self.mesh.core_of(self.sup), SuperSettings())
        self.sup.rpc.register(Command.GET_END_DEVICES, self.super._end_devices, any_domain)

    def hold(self, *nodes, ranges=((0, 0xFFFF),)):
        self.super.partition.serve(list(ranges))
        for node in nodes:
            self.super.partition.records.put(entry_of(node), self.sup.rpc.now_ms())
            self.placed.add((self.sup.node_id, partition(node)))

    def refreshes(self):
        """The GetEndDevices the operator answered (each refresh asks it once per domain
        here: every domain has under a page)."""
        return self.operator.rpc.accepted[Command.GET_END_DEVICES]

    def test_refresh_fetches_each_domain_held(self):
        self.mesh.add_devices("globex", ["nas", "router"])
        carol = self.mesh.user("carol", "globex")
        self.hold(self.alice, carol)
        self.settle(self.super.refresh_end_devices())
        self.assertEqual(set(self.super.end_devices), {self.alice.rpc.domain, carol.rpc.domain})
        self.assertEqual(self.super.end_devices[self.alice.rpc.domain], self.blobs(self.alice))
        self.assertEqual(self.super.end_devices[carol.rpc.domain], self.blobs(carol))

    def test_refresh_nothing_without_ranges(self):
        self.settle(self.super.refresh_end_devices())
        self.assertEqual((self.super.end_devices, self.refreshes()), ({}, 0))

    def test_refresh_many_pages(self):
        self.mesh.add_devices("acme", [f"device-{n:02}" for n in range(40)])
        self.hold(self.alice)
        self.settle(self.super.refresh_end_devices())
        self.assertEqual(len(self.super.end_devices[self.alice.rpc.domain]), 43)
        self.assertGreater(self.refreshes(), 1)

    def test_cached_page_served(self):
        self.hold(self.alice)
        self.settle(self.super.refresh_end_devices())
        before = self.refreshes()
        page = self.settle(self.call(self.alice, GetEndDevices(), EndDevices, to=self.sup))
        self.assertEqual((page.total, names(page)), (3, ["camera", "printer", "scanner"]))
        page = self.settle(self.call(self.alice, GetEndDevices(1), EndDevices, to=self.sup))
        self.assertEqual((page.total, names(page)), (3, ["printer", "scanner"]))
        self.assertEqual(self.refreshes(), before)

    def test_not_fetched_yet_empty_then_refreshed(self):
        """A served domain not fetched yet: an empty page, and a refresh in the background
        after which the next request is answered from the cache."""
        self.hold(self.alice)
        page = self.settle(self.call(self.alice, GetEndDevices(), EndDevices, to=self.sup))
        self.assertEqual(page, EndDevices(0, ()))
        self.assertEqual(self.refreshes(), 1)
        self.assertEqual(self.super.end_devices[self.alice.rpc.domain], self.blobs(self.alice))
        page = self.settle(self.call(self.alice, GetEndDevices(), EndDevices, to=self.sup))
        self.assertEqual(page.total, 3)

    def test_miss_refresh_at_most_every_five_seconds(self):
        """A domain that stays unfetched (no entries of it held) triggers a refresh at most
        every MISS_REFRESH_SECONDS."""
        self.hold(self.sup)  # served range covers alice's key, but only infra is held
        for _ in range(3):
            page = self.settle(self.call(self.alice, GetEndDevices(), EndDevices, to=self.sup))
            self.assertEqual(page, EndDevices(0, ()))
        self.assertEqual(self.refreshes(), 1)
        self.mesh.advance(super_role.MISS_REFRESH_SECONDS + 1)
        self.settle(self.call(self.alice, GetEndDevices(), EndDevices, to=self.sup))
        self.assertEqual(self.refreshes(), 2)

    def test_unserved_partition_silent(self):
        key = partition(self.alice)
        ranges = [(0, key - 1)] if key else [(1, 0xFFFF)]
        self.hold(ranges=ranges)
        d = self.call(self.alice, GetEndDevices(), EndDevices, to=self.sup)
        self.assertNoResult(d)
        self.assertEqual(self.sup.rpc.accepted[Command.GET_END_DEVICES], 1)
        self.assertEqual(self.refreshes(), 0)
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.failureResultOf(d, CallTimeout)

    def test_news_from_the_operator_refreshes_and_tells_tunnel_nodes(self):
        """RecordsChanged from the operator: the domain's end-devices are read again at
        once, then the domain's tunnel-nodes held here are told (its user-nodes are not);
        news from anyone but an operator changes nothing."""
        bob = self.mesh.user("bob")
        self.hold(self.alice)
        self.super.partition.records.put(entry_of(bob, roles=Role.USER | Role.TUNNEL),
                                         self.sup.rpc.now_ms())
        self.settle(self.super.refresh_end_devices())
        self.mesh.add_devices("acme", ["camera-2"])
        told = {}

        def hears(name):
            def handler(incoming):
                told[name] = incoming.message
                return Stored(0)
            return handler

        self.alice.rpc.register(Command.RECORDS_CHANGED, hears("alice"), any_domain)
        bob.rpc.register(Command.RECORDS_CHANGED, hears("bob"), any_domain)
        news = RecordsChanged(self.alice.rpc.domain, 9)
        self.settle(self.super.records_changed(news, Replica(self.sup.node_id,
                                                             self.sup.address)))
        self.assertEqual(len(self.super.end_devices[self.alice.rpc.domain]), 3)
        self.assertEqual(told, {})
        operator = Replica(self.operator.node_id, self.operator.address)
        self.settle(self.super.records_changed(news, operator))
        self.assertEqual(len(self.super.end_devices[self.alice.rpc.domain]), 4)
        self.assertEqual(told, {"bob": news})

    def test_directory_reads_from_the_super_service(self):
        """End to end: alice's DirectoryService reads the SuperService's cache, not the
        operator."""
        self.hold(self.alice)
        self.settle(self.super.refresh_end_devices())
        key = partition(self.alice)
        place(self.mesh, self.sup, key, key)
        directory = DirectoryService(identity=self.alice.identity_service,
                                     store=StoreStandIn(self), rpc=self.alice.rpc,
                                     operator_address=self.operator.address)
        directory.startService()
        self.addCleanup(directory.stopService)
        self.settle(directory.refresh_super_nodes(from_operator=True))
        before = self.refreshes()
        devices = self.settle(directory.end_devices())
        self.assertEqual(sorted(d.name for d in devices.values()),
                         ["camera", "printer", "scanner"])
        self.assertEqual(self.refreshes(), before)
