"""An operator and user nodes on tests.fakes' in-memory network, for directory and DHT tests.

The operator answers from a real SQLite registry through a store stand-in without threads;
users are enrolled in that registry and carry what it signed for them.
"""

import sqlalchemy as sa
from twisted.internet import defer

from meshnode import records

from meshnode.core import Core, dht, store
from meshnode.core.dht import PartitionService
from meshnode.core.directory import DirectoryService
from meshnode.core.identity import Enrollment, Identity
from meshnode.records import Role
from meshnode.roles.operator import directory, registry
from meshnode.roles.operator.pending import Announcements, PendingReports, PendingSettings
from meshnode.rpc.messages import Command
from meshnode.nat.location import LAN
from meshnode.rpc.service import RPCService, any_domain
from meshnode.streams.tunnel_tls import NodeTLS
from meshnode.core.schema import dht_records
from tests.fakes import FakeNetwork, FakeReactor

EPOCH = 1_800_000_000
NOW_MS = EPOCH * 1000
DAY_MS = 86_400_000
LOCATION = bytes(range(32))
REPLICAS = 3


class IdentityStandIn:
    """What RPCService, DirectoryService and ReachabilityService need of IdentityService."""

    def __init__(self, identity, enrollment):
        self.identity = identity
        self.enrollment = enrollment
        self.observers = []


class StoreStandIn:
    """StoreService without its thread pool: `run` calls the thd_* function at once."""

    def __init__(self, testcase, engine=None):
        if engine is None:
            engine = store.open_engine(f"sqlite:///{testcase.mktemp()}.sqlite")
            testcase.addCleanup(engine.dispose)
        self.engine = engine

    def run(self, function, *args, **kwargs):
        try:
            return defer.succeed(function(self.engine, *args, **kwargs))
        except Exception:
            return defer.fail()


class MeshNode:
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


class Mesh:
    """An operator node serving its directory and the DHT, and user nodes it enrolled."""

    def __init__(self, testcase):
        self._testcase = testcase
        self._hosts = 0
        self._tokens = {}
        self.nodes = []
        self.network = FakeNetwork()
        self.store = StoreStandIn(testcase)
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
        identity_service = IdentityStandIn(identity, enrollment)
        tls = NodeTLS(identity_service, reactor)
        rpc = RPCService(identity=identity_service, reactor=reactor, interface=host, roles=roles,
                         tls=tls.context)
        rpc.startService()
        self._testcase.addCleanup(lambda: rpc.running and rpc.stopService())
        node = MeshNode(rpc, reactor, identity_service, host)
        node.tls = tls
        self.nodes.append(node)
        return node

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

    def unenrolled(self):
        """A node with keys but no Node record."""
        return self._start(Identity.generate(), Enrollment(), Role.USER)

    def partition(self, quota=dht.DEFAULT_QUOTA):
        """A started PartitionService on the operator's RPC serving every partition key (as
        the operator does before any super-node joins), kept in the mesh's store."""
        service = PartitionService(rpc=self.operator.rpc, store=self.store,
                                   clock=self.operator.reactor, quota=quota)
        service.serve([(0, 0xFFFF)])
        service.startService()
        self._testcase.addCleanup(lambda: service.running and service.stopService())
        return service

    def pending_reports(self, partition, settings=None):
        """The operator's DEVICES_SEEN handler as OperatorService wires it: reports checked
        against the NodeInfos `partition` (the operator's, see `partition()`), its store
        and the placed super-nodes hold → the PendingReports."""
        announcements = Announcements(rpc=self.operator.rpc, store=self.store,
                                      partition=partition,
                                      directory=self.directory_of(self.operator))
        reports = PendingReports(store=self.store, clock=self.operator.reactor,
                                 settings=settings or PendingSettings(),
                                 node_info=announcements.node_info)
        reports.announcements = announcements
        self.operator.rpc.register(Command.DEVICES_SEEN, reports.devices_seen, any_domain)
        return reports

    def directory_of(self, node, operator_address=None):
        """A started DirectoryService of `node`, caching Node records in a store of its own."""
        service = DirectoryService(identity=node.identity_service,
                                   store=StoreStandIn(self._testcase), rpc=node.rpc,
                                   operator_address=operator_address or self.operator.address)
        node.rpc.learned.append(service.remember_node)  # as build_node wires it
        self._testcase.addCleanup(node.rpc.learned.remove, service.remember_node)
        service.startService()
        self._testcase.addCleanup(lambda: service.running and service.stopService())
        return service

    def core_of(self, node, *, directory=None, reachability=None, lan=None, port_mapper=None,
                listen_address=None, store=None):
        """The Core a role service of `node` takes: its RPC and identity stand-in, the
        directory (a started one of its own by default) and the given stand-ins."""
        return Core(reactor=node.reactor, state_dir=self._testcase.mktemp(),
                    listen_address=node.host if listen_address is None else listen_address,
                    identity=node.identity_service, store=store or StoreStandIn(self._testcase),
                    rpc=node.rpc, directory=directory or self.directory_of(node),
                    reachability=reachability, control=None, lan=lan or LAN(),
                    tls=node.tls, port_mapper=port_mapper)

    def advance(self, seconds):
        """Move every node's clock on together, so their timestamps stay within the window."""
        for node in self.nodes:
            node.reactor.advance(seconds)

    def rows(self):
        """The operator's dht_records rows as (domain, record_type, key, created, expires)."""
        with self.engine.connect() as connection:
            return sorted(tuple(row) for row in connection.execute(sa.select(
                dht_records.c.domain, dht_records.c.record_type, dht_records.c.key,
                dht_records.c.created, dht_records.c.expires)))

    def ask(self, node, message, answer, to=None):
        """Call `to` (the operator by default) from `node`, deliver everything → the answer."""
        to = to or self.operator
        peer = node.rpc.learn(to.rpc.own_node)
        d = node.rpc.call(peer, to.address, message, answer)
        self.network.flush()
        return self._testcase.successResultOf(d)
