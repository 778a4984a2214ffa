"""Tests for the operator's directory over the sealed RPC (meshnode.roles.operator.directory).

An operator RPCService answers GetOperatorNodes, GetSuperNodes, GetNode and GetEndDevices from a
real SQLite registry; user nodes enrolled in that registry ask it over tests.fakes' in-memory
network, directly and through the node-side DirectoryService.
"""

from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.core import store
from meshnode.core.directory import DirectoryError
from meshnode.core.identity import Identity
from meshnode.roles.operator import registry
from meshnode.rpc import frame
from meshnode.rpc.messages import (PAGE_BYTES, Command, EndDevices, GetEndDevices, GetNode,
                                   GetOperatorNodes, GetSuperNodes, NodeRecord, OperatorNodes,
                                   SuperNodes)
from meshnode.rpc.service import CallTimeout
from tests.mesh import NOW_MS, Mesh

# The most bytes a datagram may have (DESIGN.md §4).
MAX_DATAGRAM = 1200


class _DirectoryTestCase(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.operator = self.mesh.operator
        self.alice = self.mesh.user("alice")

    def ask(self, node, message, answer, to=None):
        return self.mesh.ask(node, message, answer, to)

    def verified(self, node, page):
        """The records of a page, each checked with `node`'s trust."""
        return [node.trust.verify(signed, NOW_MS) for signed in page.signed]


# -- the directory commands ---------------------------------------------------------------

class OperatorAndSuperNodesTests(_DirectoryTestCase):
    """GetOperatorNodes and GetSuperNodes."""

    def test_operator_nodes(self):
        """GetOperatorNodes answers the operator's own OperatorNode record, which users trust."""
        page = self.ask(self.alice, GetOperatorNodes(), OperatorNodes)
        self.assertIsInstance(page, OperatorNodes)
        self.assertEqual(page.total, 1)
        self.assertEqual(page.signed, (self.mesh.operator_record,))
        [record] = self.verified(self.alice, page)
        self.assertEqual(record.node_id, self.operator.node_id)
        self.assertEqual(self.operator.rpc.accepted[Command.GET_OPERATOR_NODES], 1)

    def test_super_nodes_none_yet(self):
        """GetSuperNodes answers an empty page while there are no super-nodes."""
        page = self.ask(self.alice, GetSuperNodes(), SuperNodes)
        self.assertEqual(page, SuperNodes(0, []))


class GetNodeTests(_DirectoryTestCase):
    """GetNode lookups, sealed and with or without `wanted`."""

    def test_same_domain_node(self):
        """GetNode(wanted=) of a node of the asker's domain answers that node's signed record."""
        bob = self.mesh.user("bob")
        answer = self.ask(self.alice, GetNode(wanted=bob.node_id), NodeRecord)
        self.assertEqual(answer.signed, bob.rpc.own_node)
        self.assertEqual(self.alice.trust.verify(answer.signed, NOW_MS).node_id, bob.node_id)

    def test_lookup_node_learns_same_domain_node(self):
        """DirectoryService.lookup_node bootstraps with the operator and learns the node."""
        bob = self.mesh.user("bob")
        service = self.mesh.directory_of(self.alice)
        d = service.lookup_node(bob.node_id)
        self.mesh.network.flush()
        peer = self.successResultOf(d)
        self.assertEqual(peer.node, bob.rpc.own_node.record)
        self.assertIs(self.alice.rpc.peers.get(bob.node_id), peer)
        cached = self.successResultOf(service._store.run(store.thd_load_nodes))
        self.assertIn(bob.rpc.own_node.encode(), cached)
        # known now: a second lookup asks nobody
        sent = len(self.alice.udp.sent)
        self.assertIs(self.successResultOf(service.lookup_node(bob.node_id)), peer)
        self.assertEqual(len(self.alice.udp.sent), sent)

    def test_other_domain_node_hidden(self):
        """A node of another domain is not shown: NodeRecord(None), and lookup_node fails."""
        carol = self.mesh.user("carol", "globex")
        answer = self.ask(self.alice, GetNode(wanted=carol.node_id), NodeRecord)
        self.assertEqual(answer, NodeRecord(None))
        d = self.mesh.directory_of(self.alice).lookup_node(carol.node_id)
        self.mesh.network.flush()
        failure = self.failureResultOf(d, DirectoryError)
        self.assertIn(carol.node_id.hex(), failure.getErrorMessage())
        self.assertIsNone(self.alice.rpc.peers.get(carol.node_id))

    def test_lookup_by_name(self):
        """GetNode(name=) finds a node of the asker's domain by overlay name, not another's."""
        bob = self.mesh.user("bob")
        self.mesh.user("carol", "globex")
        answer = self.ask(self.alice, GetNode(name="bob"), NodeRecord)
        self.assertEqual(answer.signed, bob.rpc.own_node)
        self.assertEqual(self.ask(self.alice, GetNode(name="carol"), NodeRecord),
                         NodeRecord(None))
        d = self.mesh.directory_of(self.alice).lookup_name("bob")
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d).node, bob.rpc.own_node.record)
        d = self.mesh.directory_of(self.alice).lookup_name("carol")
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)

    def test_unknown_node(self):
        """A node id the registry does not know answers NodeRecord(None)."""
        answer = self.ask(self.alice, GetNode(wanted=bytes(32)), NodeRecord)
        self.assertEqual(answer, NodeRecord(None))

    def test_revoked_node_hidden(self):
        """A revoked node's record is not handed out."""
        bob = self.mesh.user("bob")
        registry.thd_revoke_node(self.mesh.engine, self.mesh.me, bob.node_id.hex(), NOW_MS)
        answer = self.ask(self.alice, GetNode(wanted=bob.node_id), NodeRecord)
        self.assertEqual(answer, NodeRecord(None))
        d = self.mesh.directory_of(self.alice).lookup_node(bob.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)

    def test_expired_node_not_learned(self):
        """lookup_node of a node whose only record has expired fails and learns nothing."""
        old = Identity.generate()
        registry.thd_enroll(self.mesh.engine, self.mesh.me, self.mesh.token("acme"),
                            old.signing_public, old.agreement_public, "old",
                            NOW_MS - registry.NODE_LIFETIME_MS - 1)
        d = self.mesh.directory_of(self.alice).lookup_node(old.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)
        self.assertIsNone(self.alice.rpc.peers.get(old.node_id))

    def test_no_wanted_answers_own_record(self):
        """A sealed GetNode without `wanted` answers the operator's own Node record."""
        answer = self.ask(self.alice, GetNode(), NodeRecord)
        self.assertEqual(answer.signed, self.operator.rpc.own_node)
        self.assertEqual(answer.signed.record.node_id, self.operator.node_id)


class EndDeviceTests(_DirectoryTestCase):
    """GetEndDevices: only the asker's domain, paged to fit datagrams."""

    def fetch_all(self, node):
        """Every page of `node`'s end-devices, asking from offset len(so far) → pages."""
        pages, got = [], []
        while True:
            page = self.ask(node, GetEndDevices(len(got)), EndDevices)
            pages.append(page)
            if not page.signed:
                return pages
            got.extend(page.signed)
            if len(got) >= page.total:
                return pages

    def test_own_domain_only(self):
        """A user gets its own domain's end-devices and never another domain's."""
        self.mesh.add_devices("acme", ["printer", "scanner", "camera"])
        self.mesh.add_devices("globex", ["nas", "router"])
        carol = self.mesh.user("carol", "globex")
        page = self.ask(self.alice, GetEndDevices(), EndDevices)
        devices = self.verified(self.alice, page)
        self.assertEqual(page.total, 3)
        self.assertEqual([d.name for d in devices], ["camera", "printer", "scanner"])
        self.assertEqual({d.domain for d in devices}, {self.alice.rpc.domain})
        page = self.ask(carol, GetEndDevices(), EndDevices)
        devices = self.verified(carol, page)
        self.assertEqual(page.total, 2)
        self.assertEqual([d.name for d in devices], ["nas", "router"])
        self.assertEqual({d.domain for d in devices}, {carol.rpc.domain})

    def test_none(self):
        """A domain with no end-devices answers an empty page."""
        self.assertEqual(self.ask(self.alice, GetEndDevices(), EndDevices), EndDevices(0, []))

    def test_paged(self):
        """Devices that do not fit one datagram come in pages by offset, each under 1200 bytes."""
        names = [f"device-{i:02d}-" + "x" * (records.NAME_LIMIT - 10) for i in range(12)]
        self.mesh.add_devices("acme", names, address="2001:db8::1", certificate=bytes(32),
                              ports=range(1, 11))
        self.mesh.add_devices("globex", ["other"])
        pages = self.fetch_all(self.alice)
        self.assertGreater(len(pages), 1)
        self.assertEqual({page.total for page in pages}, {12})
        for page in pages:
            self.assertTrue(page.signed)
        devices = [d for page in pages for d in self.verified(self.alice, page)]
        self.assertEqual([d.name for d in devices], names)
        self.assertEqual(self.operator.rpc.drops["handler_error"], 0)
        answers = [data for data, _ in self.operator.udp.sent
                   if frame.parse(data)[3] == Command.END_DEVICES]
        self.assertEqual(len(answers), len(pages))
        sizes = [len(data) for data, _ in self.operator.udp.sent]
        self.assertLessEqual(max(sizes), MAX_DATAGRAM)
        # Pages are full: the next record would not have fitted the datagram.
        overhead = frame.HEADER_SIZE + frame.MESSAGE_ID_SIZE + 4 + frame.TAG_SIZE
        self.assertEqual(overhead + PAGE_BYTES, MAX_DATAGRAM)
        for answer, following in zip(answers, pages[1:]):
            self.assertGreater(len(answer) + 2 + len(following.signed[0].encode()),
                               MAX_DATAGRAM)

    def test_page_filled_to_the_last_byte(self):
        """Records filling PAGE_BYTES exactly make a 1200-byte datagram; the rest come next."""
        # 4 records of 266 bytes (+2 length bytes each) are exactly PAGE_BYTES.
        names = [f"edge-{i}-".ljust(29, "y") for i in range(5)]
        self.mesh.add_devices("acme", names, address="2001:db8::1", certificate=bytes(32),
                              ports=(631,))
        blobs = registry.thd_end_device_records(self.mesh.engine, self.alice.rpc.domain)
        self.assertEqual({len(blob) for blob in blobs}, {266})
        self.assertEqual(4 * (2 + 266), PAGE_BYTES)
        first = self.ask(self.alice, GetEndDevices(), EndDevices)
        self.assertEqual((first.total, len(first.signed)), (5, 4))
        rest = self.ask(self.alice, GetEndDevices(len(first.signed)), EndDevices)
        self.assertEqual((rest.total, len(rest.signed)), (5, 1))
        devices = self.verified(self.alice, first) + self.verified(self.alice, rest)
        self.assertEqual([d.name for d in devices], names)
        answers = [len(data) for data, _ in self.operator.udp.sent
                   if frame.parse(data)[3] == Command.END_DEVICES]
        self.assertEqual(answers[0], MAX_DATAGRAM)
        self.assertLessEqual(max(len(data) for data, _ in self.operator.udp.sent), MAX_DATAGRAM)

    def test_offset_past_the_end(self):
        """An offset past the last device answers an empty page with the total."""
        self.mesh.add_devices("acme", ["printer"])
        self.assertEqual(self.ask(self.alice, GetEndDevices(5), EndDevices), EndDevices(1, []))


# -- who answers --------------------------------------------------------------------------

class OnlyTheOperatorAnswersTests(_DirectoryTestCase):
    """The directory commands are registered by the operator role only."""

    def test_user_node_drops_directory_commands(self):
        """A plain user node drops every directory command as an unknown command."""
        bob = self.mesh.user("bob")
        bob.rpc.learn(self.alice.rpc.own_node)
        requests = [(GetOperatorNodes(), OperatorNodes), (GetSuperNodes(), SuperNodes),
                    (GetEndDevices(), EndDevices), (GetNode(wanted=bob.node_id), NodeRecord)]
        calls = []
        peer = self.alice.rpc.learn(bob.rpc.own_node)
        for message, answer in requests:
            calls.append(self.alice.rpc.call(peer, bob.address, message, answer))
        self.mesh.network.flush()
        self.assertEqual(bob.rpc.drops["unknown_command"], len(requests))
        self.assertEqual(sum(bob.rpc.accepted.values()), 0)
        self.assertEqual(bob.udp.sent, [])
        self.alice.reactor.advance(self.alice.rpc.call_timeout + 1)
        for d in calls:
            self.failureResultOf(d, CallTimeout)

    def test_lookup_through_a_node_that_is_not_an_operator(self):
        """lookup_node refuses a configured operator address where a plain node listens."""
        bob = self.mesh.user("bob")
        carol = self.mesh.user("carol")
        d = self.mesh.directory_of(self.alice, bob.address).lookup_node(carol.node_id)
        self.mesh.network.flush()
        failure = self.failureResultOf(d, DirectoryError)
        self.assertIn("not an operator this node trusts", failure.getErrorMessage())
        self.assertIn(f"{bob.host}:{bob.rpc.port}", failure.getErrorMessage())
        self.assertEqual(bob.rpc.drops["unknown_command"], 0)
        self.assertIsNone(self.alice.rpc.peers.get(carol.node_id))
