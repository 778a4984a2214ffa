"""Tests for the operator's directory over the sealed RPC (meshnode.roles.operator.directory).

An operator RPCService answers GetOperatorNodes, GetSuperNodes, GetNode and GetEndDevices from a
real SQLite registry; user nodes enrolled in that registry ask it over tests.fakes' in-memory
network, directly and through the node-side DirectoryService.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records, store
from meshnode.directory import DirectoryError, DirectoryService
from meshnode.identity import Enrollment, Identity
from meshnode.records import Role
from meshnode.roles.operator import directory, registry
from meshnode.rpc import frame
from meshnode.rpc.messages import (PAGE_BYTES, Command, EndDevices, GetEndDevices, GetNode,
                                   GetOperatorNodes, GetSuperNodes, NodeRecord, OperatorNodes,
                                   SuperNodes)
from meshnode.rpc.service import CallTimeout, RPCService
from tests.fakes import FakeNetwork, FakeReactor

EPOCH = 1_800_000_000
NOW_MS = EPOCH * 1000
DAY_MS = 86_400_000
LOCATION = bytes(range(32))
# The most bytes a datagram may have (DESIGN.md §4).
MAX_DATAGRAM = 1200


# -- helpers (after tests/test_rpc.py) ----------------------------------------------------

class _IdentityStandIn:
    """What RPCService and DirectoryService need of IdentityService: keys and enrollment."""

    def __init__(self, identity, enrollment):
        self.identity = identity
        self.enrollment = enrollment
        self.observers = []


class _StoreStandIn:
    """StoreService without its thread pool: `run` calls the thd_* function at once."""

    def __init__(self, testcase):
        self.engine = store.open_engine(f"sqlite:///{testcase.mktemp()}.sqlite")
        testcase.addCleanup(self.engine.dispose)

    def run(self, function, *args, **kwargs):
        try:
            return defer.succeed(function(self.engine, *args, **kwargs))
        except Exception:
            return defer.fail()


class _Node:
    """One started RPCService with its reactor, address, fake UDP port and identity stand-in."""

    def __init__(self, rpc, reactor, identity_service, host):
        self.rpc = rpc
        self.reactor = reactor
        self.identity_service = identity_service
        self.identity = identity_service.identity
        self.host = host
        self.address = (host, rpc.port)
        self.udp = reactor.network.ports[self.address]

    @property
    def node_id(self):
        return self.identity.node_id

    @property
    def trust(self):
        return self.identity_service.enrollment.trust


class _Mesh:
    """An operator node serving its directory from a registry, and user nodes it enrolled."""

    def __init__(self, testcase):
        self._testcase = testcase
        self._hosts = 0
        self._tokens = {}
        self.network = FakeNetwork()
        self.store = _StoreStandIn(testcase)
        self.engine = self.store.engine
        me = self.me = Identity.generate()
        domain = registry.thd_create_domain(self.engine, "operators", NOW_MS)
        self.operator_record = me.sign(records.OperatorNode(
            domain, me.node_id, me.signing_public, me.agreement_public, NOW_MS))
        registry.thd_publish_operator(self.engine, self.operator_record)
        own = me.sign(records.Node(domain, me.node_id, me.signing_public, me.agreement_public,
                                   "operator", NOW_MS, NOW_MS + 30 * DAY_MS))
        self.operator = self._start(
            me, Enrollment.from_bundle(me, [own, self.operator_record], NOW_MS),
            Role.OPERATOR | Role.USER)
        directory.register(self.operator.rpc, self.store)

    def _start(self, identity, enrollment, roles):
        self._hosts += 1
        host = f"10.0.0.{self._hosts}"
        reactor = FakeReactor(self.network, host)
        reactor.advance(EPOCH)
        identity_service = _IdentityStandIn(identity, enrollment)
        rpc = RPCService(identity_service, reactor, interface=host, roles=roles)
        rpc.startService()
        self._testcase.addCleanup(lambda: rpc.running and rpc.stopService())
        return _Node(rpc, reactor, identity_service, host)

    def token(self, domain_name):
        """A many-use enrollment token of `domain_name`, creating the domain on first use."""
        if domain_name not in self._tokens:
            registry.thd_create_domain(self.engine, domain_name, NOW_MS)
            self._tokens[domain_name] = registry.thd_create_token(
                self.engine, domain_name, 100, NOW_MS + DAY_MS, NOW_MS)["token"]
        return self._tokens[domain_name]

    def user(self, name, domain_name="acme"):
        """A user node enrolled in the registry, its enrollment built from what it returned."""
        identity = Identity.generate()
        signed = registry.thd_enroll(self.engine, self.me, self.token(domain_name),
                                     identity.signing_public, identity.agreement_public, name,
                                     NOW_MS)
        enrollment = Enrollment.from_bundle(identity, [signed, self.operator_record], NOW_MS)
        return self._start(identity, enrollment, Role.USER)

    def add_devices(self, domain_name, names, address=None, certificate=None, ports=(631,)):
        self.token(domain_name)
        for i, name in enumerate(names):
            mac = bytes([2, 0, 0, 0, len(self._tokens), i])
            registry.thd_add_device(self.engine, self.me, domain_name, name, mac, address,
                                    certificate, LOCATION, list(ports), NOW_MS)

    def directory_of(self, node, operator_address=None):
        """A started DirectoryService of `node`, caching Node records in a store of its own."""
        service = DirectoryService(node.identity_service, _StoreStandIn(self._testcase),
                                   node.rpc, operator_address or self.operator.address)
        service.startService()
        self._testcase.addCleanup(lambda: service.running and service.stopService())
        return service


class _DirectoryTestCase(SynchronousTestCase):

    def setUp(self):
        self.mesh = _Mesh(self)
        self.operator = self.mesh.operator
        self.alice = self.mesh.user("alice")

    def ask(self, node, message, answer, to=None):
        """Call `to` (the operator by default) from `node`, deliver everything → the answer."""
        to = to or self.operator
        peer = node.rpc.learn(to.rpc.own_node)
        d = node.rpc.call(peer, to.address, message, answer)
        self.mesh.network.flush()
        return self.successResultOf(d)

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
