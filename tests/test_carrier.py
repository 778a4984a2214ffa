"""Tests for meshnode.rpc.carrier: RPC frames over TCP/TLS streams (StreamCarrier) and the
fallback port's listener that tells TLS from relay legs by the first byte, and on an operator
HTTP (the enrollment API) from RPC frames inside the TLS (FallbackFactory).

StreamCarrier runs on a MemoryReactorClock: its connections show up in `tcpClients` (its TLS
streams, through a stand-in dialer, in those of a reactor of their own, in the clear: TLS over
a stream is the dialer's, tests/test_proxy.py) and are completed (or failed) by the test over
StringTransports. The fallback
listener's TLS runs for real, in memory: a StringTransport whose startTLS puts Twisted's
TLSMemoryBIOProtocol in between, as a TCP transport's does, talking to a TLS client in the test.
"""

import collections
import datetime
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from meshnode.streams import tunnel_tls
from meshnode.core.identity import Identity
from meshnode.rpc.carrier import (CONNECT_SECONDS, HTTP_METHOD_BYTES, QUEUE_LIMIT,
                                  TLS_HANDSHAKE, FallbackFactory, StreamCarrier,
                                  relay_token_allowed)
from meshnode.rpc.frame import MAX_DATAGRAM
from meshnode.rpc.protocol import RPCStreamProtocol
from tests.mesh import EPOCH

PEER = ("198.51.100.20", 7400)
OTHER_PEER = ("198.51.100.21", 7400)
FALLBACK_PORT = 443
CLIENT = IPv4Address("TCP", "203.0.113.5", 40000)
NOW = datetime.datetime.fromtimestamp(EPOCH, datetime.timezone.utc)


def framed(*frames):
    """Frames as they go on a stream: each behind its u16 length."""
    return b"".join(struct.pack(">H", len(f)) + f for f in frames)


class _ClearDialer:
    """A Dialer stand-in whose TLS streams are plain TCP connections on a reactor of their
    own (`reactor.tcpClients`); `asked`: each (host, port, TLS context, timeout) asked for."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.asked = []

    def tls_endpoint(self, host, port, tls, timeout):
        self.asked.append((host, port, tls, timeout))
        return TCP4ClientEndpoint(self.reactor, host, port, timeout=timeout)


class StreamCarrierTestCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.received = []
        self.drops = collections.Counter()
        self.contexts = []
        self.dialer = _ClearDialer()
        self.tls_clients = self.dialer.reactor.tcpClients
        self.carrier = StreamCarrier(self.reactor, self.receive, self.context, FALLBACK_PORT,
                                     self.drops, self.dialer)

    def receive(self, data, source, send):
        self.received.append((data, source, send))

    def context(self):
        made = object()
        self.contexts.append(made)
        return made

    def connect(self, clients=None, index=-1):
        """Complete connection attempt `index` (of `tcpClients` by default) → (its protocol,
        the StringTransport it runs on)."""
        host, port, factory = (clients or self.reactor.tcpClients)[index][:3]
        built = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        built.makeConnection(transport)
        return built, transport

    def fail_connect(self, clients=None, index=-1):
        factory = (clients or self.reactor.tcpClients)[index][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


class StreamCarrierTests(StreamCarrierTestCase):
    """One stream per (mode, peer address), opened on demand; frames wait for it."""

    def test_tcp_connects_to_the_peer_address(self):
        """A frame by "tcp" opens one TCP connection to the peer's RPC address, bounded by
        CONNECT_SECONDS; a second frame reuses it."""
        self.carrier.send("tcp", b"one", PEER)
        self.carrier.send("tcp", b"two", PEER)
        self.assertEqual([(host, port, timeout) for host, port, _, timeout, _
                          in self.reactor.tcpClients], [(PEER[0], PEER[1], CONNECT_SECONDS)])
        self.assertEqual(self.tls_clients, [])

    def test_tls_connects_to_the_fallback_port(self):
        """A frame by "tls" asks the dialer for a TLS stream to the peer host's fallback port
        with the node's TLS context, and connects it."""
        self.carrier.send("tls", b"one", PEER)
        ((host, port, context, timeout),) = self.dialer.asked
        self.assertEqual((host, port, timeout), (PEER[0], FALLBACK_PORT, CONNECT_SECONDS))
        self.assertEqual(self.contexts, [context])
        self.assertEqual([client[:2] for client in self.tls_clients], [(PEER[0], FALLBACK_PORT)])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_frames_queued_until_connected_then_flushed_in_order(self):
        """Nothing is written before the stream connects; then the waiting frames go out
        in order, and later frames at once."""
        self.carrier.send("tcp", b"one", PEER)
        self.carrier.send("tcp", b"two", PEER)
        self.assertEqual(self.carrier.streams(), [])
        _, transport = self.connect()
        self.assertEqual(transport.value(), framed(b"one", b"two"))
        self.carrier.send("tcp", b"three", PEER)
        self.assertEqual(transport.value(), framed(b"one", b"two", b"three"))
        self.assertEqual(self.carrier.streams(), [f"tcp {PEER[0]}:{PEER[1]}"])

    def test_queue_bounded(self):
        """At most QUEUE_LIMIT frames wait for a connection: the newest are sent."""
        frames = [b"%d" % i for i in range(QUEUE_LIMIT + 5)]
        for one in frames:
            self.carrier.send("tcp", one, PEER)
        _, transport = self.connect()
        self.assertEqual(transport.value(), framed(*frames[-QUEUE_LIMIT:]))

    def test_streams_per_mode_and_address(self):
        """Each peer address and each mode has a stream of its own."""
        self.carrier.send("tcp", b"a", PEER)
        self.carrier.send("tcp", b"b", OTHER_PEER)
        self.carrier.send("tls", b"c", PEER)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(len(self.tls_clients), 1)

    def test_answers_come_from_the_peer_address(self):
        """A frame arriving on a TLS stream counts as from the peer's RPC address (not the
        fallback port), and its `send` answers on that stream."""
        self.carrier.send("tls", b"ask", PEER)
        built, transport = self.connect(self.tls_clients)
        built.dataReceived(framed(b"answer"))
        ((data, source, send),) = self.received
        self.assertEqual((data, source), (b"answer", PEER))
        transport.clear()
        send(b"more", source)
        self.assertEqual(transport.value(), framed(b"more"))

    def test_failed_connect_forgotten_and_counted(self):
        """A connection that fails drops its waiting frames, counted per mode, and the next
        frame tries again."""
        for one in (b"a", b"b", b"c"):
            self.carrier.send("tcp", one, PEER)
        self.fail_connect()
        self.assertEqual(self.drops["tcp_connect_failed"], 3)
        self.carrier.send("tcp", b"d", PEER)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        _, transport = self.connect()
        self.assertEqual(transport.value(), framed(b"d"))

    def test_failed_tls_connect_counted(self):
        """A TLS connection that fails is counted as tls_connect_failed."""
        self.carrier.send("tls", b"a", PEER)
        self.fail_connect(self.tls_clients)
        self.assertEqual(self.drops, {"tls_connect_failed": 1})

    def test_lost_stream_forgotten(self):
        """A stream that ends is forgotten: the next frame opens a new connection."""
        self.carrier.send("tcp", b"a", PEER)
        built, _ = self.connect()
        built.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.carrier.streams(), [])
        self.carrier.send("tcp", b"b", PEER)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        _, transport = self.connect()
        self.assertEqual(transport.value(), framed(b"b"))


class CloseTests(StreamCarrierTestCase):
    """close(): every stream, or all but those of one mode."""

    def test_close_keeps_one_mode(self):
        """close(keep="tls") closes the TCP streams and leaves the TLS ones."""
        self.carrier.send("tcp", b"a", PEER)
        self.carrier.send("tls", b"b", PEER)
        _, tcp = self.connect()
        _, tls = self.connect(self.tls_clients)
        self.carrier.close(keep="tls")
        self.assertTrue(tcp.disconnecting)
        self.assertFalse(tls.disconnecting)
        self.assertEqual(self.carrier.streams(), [f"tls {PEER[0]}:{PEER[1]}"])

    def test_close_all(self):
        """close() closes every stream; the next frame opens a new one."""
        self.carrier.send("tcp", b"a", PEER)
        _, tcp = self.connect()
        self.carrier.close()
        self.assertTrue(tcp.disconnecting)
        self.assertEqual(self.carrier.streams(), [])
        self.carrier.send("tcp", b"b", PEER)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_closed_while_connecting(self):
        """A stream closed before it connected is closed when it does, and its waiting
        frames are not sent."""
        self.carrier.send("tcp", b"a", PEER)
        self.carrier.close()
        _, transport = self.connect()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class _InMemoryTLSTransport(StringTransport):
    """A StringTransport whose startTLS runs real TLS in memory, as a TCP transport's does:
    what arrives goes to the TLS layer (the new `protocol`), what is written is encrypted;
    the ciphertext collects in the StringTransport."""

    tls = None

    def __init__(self, clock, **kwargs):
        super().__init__(**kwargs)
        self._clock = clock  # TLS aggregates small writes until the clock moves on

    def startTLS(self, context, normal=True):
        factory = TLSMemoryBIOFactory(context, False, None, self._clock)
        self.tls = self.protocol = factory.protocol(factory, self.protocol, False)
        self.tls.makeConnection(_Ciphertext(self))

    def write(self, data):
        if self.tls is not None:
            self.tls.write(data)
        else:
            super().write(data)

    def writeSequence(self, data):
        self.write(b"".join(data))


class _Ciphertext:
    """The TLS layer's transport: the StringTransport underneath it."""

    def __init__(self, outer):
        self._outer = outer

    def __getattr__(self, name):
        return getattr(self._outer, name)

    def write(self, data):
        StringTransport.write(self._outer, data)

    def writeSequence(self, data):
        self.write(b"".join(data))


class _Gate(Protocol):
    """A relay gate that records what it gets."""

    def __init__(self):
        self.received = []

    def dataReceived(self, data):
        self.received.append(data)


class FallbackListenerTests(SynchronousTestCase):
    """FallbackFactory: TLS (RPC frames inside) or a relay leg, told by the first byte."""

    def setUp(self):
        self.received = []
        self.gates = []
        self.gate_open = True
        identity = Identity.generate()
        self.context = tunnel_tls.TunnelContext(identity, NOW)
        self.factory = FallbackFactory(
            lambda data, source, send: self.received.append((data, source, send)),
            lambda: self.context, self.gate)
        self.clock = Clock()
        self.transport = _InMemoryTLSTransport(self.clock, peerAddress=CLIENT)
        self.transport.protocol = self.factory.buildProtocol(CLIENT)
        self.transport.protocol.makeConnection(self.transport)

    def gate(self):
        if not self.gate_open:
            return None
        gate = _Gate()
        self.gates.append(gate)
        return gate

    def tls_client(self):
        """A TLS client (with a node's context of its own) carrying RPC frames → (its frame
        protocol, the frames it received, its TLS protocol, its StringTransport)."""
        answers = []
        inner = RPCStreamProtocol(lambda data, source, send: answers.append(data), PEER)
        context = tunnel_tls.TunnelContext(Identity.generate(), NOW)
        factory = TLSMemoryBIOFactory(context, True, None, self.clock)
        tls = factory.protocol(factory, inner)
        transport = StringTransport()
        tls.makeConnection(transport)
        return inner, answers, tls, transport

    def pump(self, client_tls, client_transport):
        """Move bytes both ways until neither side has more to say."""
        for _ in range(50):
            self.clock.advance(0)
            up, down = client_transport.value(), self.transport.value()
            if not (up or down):
                return
            client_transport.clear()
            self.transport.clear()
            if up:
                self.transport.protocol.dataReceived(up)
            if down:
                client_tls.dataReceived(down)
        self.fail("the connection kept talking")

    def test_tls_carries_rpc_frames(self):
        """A connection opening with a TLS handshake gets a real TLS server with the node's
        context; frames inside reach the RPC from the client's address, and answers go
        back inside TLS; no relay gate is made."""
        inner, answers, tls, transport = self.tls_client()
        self.assertEqual(transport.value()[0], TLS_HANDSHAKE)
        inner.sendString(b"GetNode frame")
        self.pump(tls, transport)
        ((data, source, send),) = self.received
        self.assertEqual((data, source), (b"GetNode frame", (CLIENT.host, CLIENT.port)))
        send(b"Node frame", source)
        self.clock.advance(0)
        wire = self.transport.value()
        self.assertTrue(wire)
        self.assertNotIn(b"Node frame", wire)  # ciphertext only
        self.pump(tls, transport)
        self.assertEqual(answers, [b"Node frame"])
        self.assertEqual(self.gates, [])

    def test_other_bytes_go_to_the_relay_gate(self):
        """A connection opening with any other byte is handed to a new relay gate, which
        gets those very bytes and what follows; no TLS starts."""
        token = bytes([0x42]) * 32
        self.transport.protocol.dataReceived(token[:10])
        self.transport.protocol.dataReceived(token[10:])
        (gate,) = self.gates
        self.assertIs(gate.transport, self.transport)
        self.assertEqual(b"".join(gate.received), token)
        self.assertEqual(gate.received[0], token[:10])
        self.assertIsNone(self.transport.tls)

    def test_no_relay_closes(self):
        """When this node relays nothing (relay_gate() gives None), a non-TLS connection is
        aborted."""
        self.gate_open = False
        self.transport.protocol.dataReceived(b"\x01" * 32)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.received, [])


class _Hello(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        return b"hello " + request.getClientAddress().host.encode() + b" " + request.content.read()


class _Answer(Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class EnrollmentOnTheFallbackPortTests(FallbackListenerTests):
    """On an operator (web() gives its Site), HTTP inside the fallback port's TLS goes to the
    Site; RPC frames and relay legs still work as before (the tests inherited)."""

    def setUp(self):
        super().setUp()
        self.site = server.Site(_Hello(), reactor=self.clock)
        self.factory.web = lambda: self.site

    def test_http_inside_tls_reaches_the_site(self):
        """A request inside TLS is answered by the Site, which sees the client's address;
        the RPC gets nothing."""
        answer = _Answer()
        factory = TLSMemoryBIOFactory(tunnel_tls.TunnelContext(Identity.generate(), NOW), True,
                                      None, self.clock)
        tls = factory.protocol(factory, answer)
        transport = StringTransport()
        tls.makeConnection(transport)
        answer.transport.write(b"POST /v1/enroll HTTP/1.1\r\nHost: operator\r\n"
                               b"Content-Length: 2\r\n\r\n{}")
        self.pump(tls, transport)
        self.assertTrue(answer.data.startswith(b"HTTP/1.1 200 OK\r\n"), answer.data)
        self.assertTrue(answer.data.endswith(b"hello 203.0.113.5 {}"), answer.data)
        self.assertEqual(self.received, [])

    def test_http_method_bytes_never_start_a_frame(self):
        """No RPC frame's first byte (its length's high byte) is an HTTP method's."""
        self.assertEqual(HTTP_METHOD_BYTES & set(range((MAX_DATAGRAM >> 8) + 1)), set())


class RelayTokenTests(SynchronousTestCase):
    """relay_token_allowed: the first byte of a relay token never looks like TLS."""

    def test_tls_first_byte_refused(self):
        """A token starting with 0x16 is refused, and only that."""
        self.assertFalse(relay_token_allowed(bytes([TLS_HANDSHAKE]) + bytes(31)))
        self.assertEqual([b for b in range(256) if not relay_token_allowed(bytes([b]) * 32)],
                         [TLS_HANDSHAKE])
