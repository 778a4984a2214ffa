"""Tests for the firewall fallback (meshnode.fallback): which transport the RPC keeps after
probing the operator by udp → tcp → tls, and RPCService.use_mode switching it.

FallbackService runs against a stand-in RPC whose GetNode probes are answered per mode, by the
operator or by another node, as each test says; silence fails a probe at its timeout on the
test's Clock. use_mode runs on a tests.mesh node, its streams over StringTransports.
"""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from meshnode.nat.fallback import CHECK_SECONDS, PROBE_TIMEOUT_SECONDS, FallbackService
from meshnode.rpc.messages import Ping, Pong
from meshnode.rpc.service import CallTimeout
from tests.mesh import Mesh

OPERATOR_ID = bytes([0x01]) * 32
OTHER_ID = bytes([0x02]) * 32
OPERATOR_ADDRESS = ("192.0.2.1", 7400)
SUPER_ADDRESS = ("192.0.2.2", 7410)
HANG = object()  # a probe that never ends


class _Trust:
    def is_operator(self, node_id):
        return node_id == OPERATOR_ID


class _Node:
    def __init__(self, node_id):
        self.node_id = node_id


class _Peer:
    def __init__(self, node_id):
        self.node = _Node(node_id)


class _Carrier:
    def streams(self):
        return ["tcp 192.0.2.1:7400"]


class _Transports:
    def __init__(self):
        self.mode = "udp"
        self.carrier = _Carrier()


class _RPC:
    """What FallbackService needs of RPCService. `answering`: mode → the node id answering a
    GetNode sent that way (HANG: nobody, and the probe never ends); other modes time out."""

    def __init__(self, clock):
        self._clock = clock
        self.transports = _Transports()
        self.heard_at = float("-inf")
        self.enrolled = True
        self.trust = _Trust()
        self.answering = {}
        self.probes = []  # (mode, address, timeout) of every GetNode sent
        self.modes = []  # what use_mode was called with

    def fetch_node(self, address, timeout=None, mode=None):
        self.probes.append((mode, address, timeout))
        node_id = self.answering.get(mode)
        if node_id is HANG:
            return defer.Deferred()
        if node_id is None:
            d = defer.Deferred()
            self._clock.callLater(timeout, d.errback,
                                  CallTimeout(f"no answer from {address[0]}:{address[1]}"))
            return d
        return defer.succeed(_Peer(node_id))

    def use_mode(self, mode):
        self.modes.append(mode)
        self.transports.mode = mode


class _Replica:
    def __init__(self, node_id, address):
        self.node_id = node_id
        self.address = address


class _SuperNodeList:
    def __init__(self):
        self.placed = {}

    def super_nodes(self):
        return self.placed


class _Directory:
    def __init__(self):
        self.operator_address = OPERATOR_ADDRESS
        self.super_node_list = _SuperNodeList()
        self.retried = 0

    def retry_operator(self):
        self.retried += 1


class FallbackTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.rpc = _RPC(self.clock)
        self.directory = _Directory()
        self.service = FallbackService(rpc=self.rpc, directory=self.directory, clock=self.clock)
        self.switches = []
        self.service.observers.append(lambda: self.switches.append(self.rpc.transports.mode))

    def check(self, mode="udp", **answering):
        """Run one check from `mode` with `answering` (mode → node id), silent probes timing
        out on the clock → the mode it keeps."""
        self.rpc.transports.mode = mode
        self.rpc.answering = answering
        d = self.service.check()
        self.clock.advance(PROBE_TIMEOUT_SECONDS)
        self.clock.advance(PROBE_TIMEOUT_SECONDS)
        self.clock.advance(PROBE_TIMEOUT_SECONDS)
        return self.successResultOf(d)

    def probed(self):
        return [mode for mode, _, _ in self.rpc.probes]


class CheckTests(FallbackTestCase):
    """check(): the first mode, in udp, tcp, tls order, whose GetNode the operator answers."""

    def test_udp_answering_stays_udp(self):
        """While the operator answers by UDP, nothing else is probed and nothing changes."""
        self.assertEqual(self.check(udp=OPERATOR_ID), "udp")
        self.assertEqual(self.rpc.probes, [("udp", OPERATOR_ADDRESS, PROBE_TIMEOUT_SECONDS)])
        self.assertEqual((self.rpc.modes, self.switches, self.directory.retried), ([], [], 0))

    def test_tcp_when_udp_silent(self):
        """UDP silent, TCP answered: the RPC moves to tcp (not waiting for TLS), observers
        hear of it once, and the directory tries the operator again at once."""
        self.rpc.answering = {"tcp": OPERATOR_ID}
        d = self.service.check()
        self.assertNoResult(d)  # the UDP probe waits for its timeout
        self.clock.advance(PROBE_TIMEOUT_SECONDS)
        self.assertEqual(self.successResultOf(d), "tcp")
        self.assertEqual(self.probed(), ["udp", "tcp"])
        self.assertEqual(self.rpc.modes, ["tcp"])
        self.assertEqual(self.switches, ["tcp"])
        self.assertEqual(self.directory.retried, 1)

    def test_tls_when_only_tls_answers(self):
        """Only TLS answered: the RPC moves to tls."""
        self.assertEqual(self.check(tls=OPERATOR_ID), "tls")
        self.assertEqual(self.probed(), ["udp", "tcp", "tls"])
        self.assertEqual(self.switches, ["tls"])

    def test_back_to_udp(self):
        """In tls mode, UDP answered again: back to udp, without probing the others."""
        self.assertEqual(self.check("tls", udp=OPERATOR_ID), "udp")
        self.assertEqual(self.probed(), ["udp"])
        self.assertEqual(self.switches, ["udp"])
        self.assertEqual(self.directory.retried, 1)

    def test_tls_to_tcp(self):
        """In tls mode, TCP answered: the better mode is taken."""
        self.assertEqual(self.check("tls", tcp=OPERATOR_ID), "tcp")
        self.assertEqual(self.switches, ["tcp"])

    def test_better_modes_silent_stays(self):
        """In tls mode, UDP and TCP silent: both are tried, and it stays on tls."""
        self.assertEqual(self.check("tls", tls=OPERATOR_ID), "tls")
        self.assertEqual(self.probed()[:2], ["udp", "tcp"])
        self.assertEqual((self.rpc.modes, self.switches), ([], []))

    def test_tcp_gone_moves_to_tls(self):
        """In tcp mode, TCP no longer answered but TLS is: the RPC moves to tls."""
        self.assertEqual(self.check("tcp", tls=OPERATOR_ID), "tls")
        self.assertEqual(self.switches, ["tls"])

    def test_other_node_does_not_count(self):
        """Another node answering at the operator's address (another service on that host's
        port) is not the operator: the next mode is tried, and status says why."""
        self.assertEqual(self.check(udp=OTHER_ID, tcp=OPERATOR_ID), "tcp")
        self.assertIn("another node answered at 192.0.2.1:7400",
                      self.service.status()["probes"]["udp"])

    def test_udp_answers_arriving_probe_nothing(self):
        """While answers to our calls arrive over UDP, a check probes nothing at all."""
        self.rpc.heard_at = self.clock.seconds() - CHECK_SECONDS / 2
        self.assertEqual(self.check(udp=OPERATOR_ID), "udp")
        self.assertEqual(self.rpc.probes, [])
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(self.check(udp=OPERATOR_ID), "udp")
        self.assertEqual(self.probed(), ["udp"])

    def test_placed_super_node_probed_not_the_operator(self):
        """With super-nodes placed, a random one of them is probed (their load grows with
        the users, the operator's stays flat), and only it counts as answering."""
        self.directory.super_node_list.placed = {OTHER_ID: (_Replica(OTHER_ID, SUPER_ADDRESS),
                                                           [(0, 0xFFFF)])}
        self.assertEqual(self.check(udp=OPERATOR_ID, tcp=OTHER_ID), "tcp")
        self.assertEqual([address for _, address, _ in self.rpc.probes],
                         [SUPER_ADDRESS, SUPER_ADDRESS])

    def test_only_another_node_answers(self):
        """Only another node answering: no change."""
        self.assertEqual(self.check(udp=OTHER_ID, tcp=OTHER_ID, tls=OTHER_ID), "udp")
        self.assertEqual((self.rpc.modes, self.switches), ([], []))

    def test_nothing_answers_stays(self):
        """Nothing answers at all: the mode stays, and nobody is told of a change."""
        self.assertEqual(self.check(), "udp")
        self.assertEqual(self.probed(), ["udp", "tcp", "tls"])
        self.assertEqual((self.rpc.modes, self.switches, self.directory.retried), ([], [], 0))

    def test_not_enrolled_or_no_operator_probes_nothing(self):
        """Without an enrollment or an operator address there is nothing to probe."""
        self.rpc.enrolled = False
        self.assertEqual(self.check(), "udp")
        self.rpc.enrolled = True
        self.directory.operator_address = None
        self.assertEqual(self.check(), "udp")
        self.assertEqual(self.rpc.probes, [])

    def test_status_shows_mode_and_probes(self):
        """status() shows the mode, each probe's outcome and the open streams."""
        self.check(tcp=OPERATOR_ID)
        self.assertEqual(self.service.status(), {
            "mode": "tcp",
            "probes": {"udp": "no answer from 192.0.2.1:7400", "tcp": "answered"},
            "streams": ["tcp 192.0.2.1:7400"]})


class PeriodicTests(FallbackTestCase):
    """The check runs when the service starts and every CHECK_SECONDS."""

    def start(self):
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_udp_taken_back_at_the_next_check(self):
        """On tls, UDP silent at first: at the check CHECK_SECONDS later, UDP answering again
        takes the RPC back to udp."""
        self.rpc.transports.mode = "tls"
        self.start()
        for _ in range(3):
            self.clock.advance(PROBE_TIMEOUT_SECONDS)
        self.assertEqual(self.probed()[:2], ["udp", "tcp"])
        self.assertEqual(self.rpc.transports.mode, "tls")
        self.rpc.answering = {"udp": OPERATOR_ID}
        self.clock.advance(CHECK_SECONDS - 3 * PROBE_TIMEOUT_SECONDS)
        self.assertEqual(self.rpc.transports.mode, "udp")
        self.assertEqual(self.switches, ["udp"])

    def test_failing_check_logged_and_retried(self):
        """A check that raises is logged, and the next one still runs."""
        self.rpc.fetch_node = lambda *args: defer.fail(ValueError("broken"))
        self.start()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_no_overlapping_checks(self):
        """While a check still waits for a probe, the next tick starts none."""
        self.rpc.answering = {"udp": HANG}
        self.start()
        self.clock.advance(CHECK_SECONDS)
        self.assertEqual(self.probed(), ["udp"])


class UseModeTests(SynchronousTestCase):
    """RPCService.use_mode: streams of other modes close, peers are reached the new way."""

    def setUp(self):
        self.mesh = Mesh(self)
        self.node = self.mesh.user("alice")
        self.operator = self.mesh.operator
        self.mesh.ask(self.node, Ping(b"hi"), Pong)  # the operator's peer has an address now
        self.peer = self.node.rpc.peers.get(self.operator.node_id)

    def connect(self, clients):
        host, port, factory = clients[-1][:3]
        built = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        built.makeConnection(transport)
        return transport

    def call(self):
        d = self.node.rpc.call(self.peer, self.operator.address, Ping(b""), Pong)
        self.addCleanup(d.addErrback, lambda failure: None)
        return d

    def test_streams_of_other_modes_closed(self):
        """use_mode("tls") closes the TCP streams and keeps the TLS ones."""
        carrier = self.node.rpc.transports.carrier
        carrier.send("tcp", b"a", self.operator.address)
        carrier.send("tls", b"b", self.operator.address)
        tcp = self.connect(self.node.reactor.tcpClients[:1])
        tls = self.connect(self.node.reactor.tcpClients)  # TLS over a TCP endpoint
        self.node.rpc.use_mode("tls")
        self.assertEqual(self.node.rpc.transports.mode, "tls")
        self.assertTrue(tcp.disconnecting)
        self.assertFalse(tls.disconnecting)
        host, port = self.operator.address
        self.assertEqual(carrier.streams(), [f"tls {host}:{port}"])

    def test_peers_reached_the_new_way(self):
        """After use_mode("tcp"), peers have no address or way back, and the next call to
        the operator goes by TCP, not UDP."""
        self.assertEqual(self.peer.address, self.operator.address)
        self.node.rpc.use_mode("tcp")
        self.assertEqual((self.peer.address, self.peer.via), (None, None))
        sent = len(self.node.udp.sent)
        self.call()
        self.assertEqual(len(self.node.udp.sent), sent)
        self.assertEqual(self.node.reactor.tcpClients[-1][:2], self.operator.address)

    def test_answers_go_back_the_way_frames_came(self):
        """In tcp mode, a peer whose request came by UDP is answered by UDP, and so are our
        calls to it at that address."""
        self.node.rpc.use_mode("tcp")
        own = self.operator.rpc.peers.get(self.node.node_id)
        d = self.operator.rpc.call(own, self.node.address, Ping(b"x"), Pong)
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d), Pong(b"x"))
        self.call()
        self.mesh.network.flush()
        self.assertEqual(self.node.reactor.tcpClients, [])
