"""Tests for TCP hole punching (meshnode.nat.punch): Puncher's attempts, retries, budget and stop.

Puncher makes its connection attempts through `tcp.Connector(...).connect()` itself, not
through `reactor.connectTCP`, so a MemoryReactorClock neither records them in `tcpClients`
nor completes them (the real tcp.Client it builds opens and binds a real socket, and its
connect is never polled). The unit tests therefore keep the real tcp.Connector but give it a
transport that makes no socket (`ConnectAttempts`); what a connection attempt of the kernel
does — connect, be refused, fail to bind — the test says. A few tests at the end run real
sockets on 127.0.0.1 under the real reactor, bounded by a trial timeout.
"""

import socket
import types

from twisted.internet import defer, error, protocol, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshnode.core import ports
from meshnode.nat import punch
from meshnode.nat.punch import Puncher
from meshnode.nat.rules import (PUNCH_SECONDS, TCP_ATTEMPT_LIMIT, TCP_RECONNECT_SECONDS,
                                PunchFailed)

LOCAL_PORT = 7401
PEER = ("198.51.100.20", 40100)


class _Attempt:
    """A connection attempt as tcp.Client makes it for its Connector, without a socket."""

    def __init__(self, connector):
        self.connector = connector
        self.connected = False
        self.failed_with = None  # the error the attempt ended with (UserError: stopped)

    @property
    def peer(self):
        return (self.connector.host, self.connector.port)

    @property
    def binding(self):
        return self.connector.bindAddress

    def failIfNotConnected(self, err):
        # tcp.Client's: a timeout, stopConnecting() or a refusal ends a pending attempt.
        if self.connected or self.failed_with is not None:
            return
        self.failed_with = err
        self.connector.connectionFailed(Failure(err))

    def refuse(self):
        """The peer answered the SYN with a RST."""
        self.failIfNotConnected(error.ConnectionRefusedError())

    def succeed(self, transport=None):
        """The connection stands: the protocol is built and connected (over `transport`, a
        StringTransport by default) → the protocol."""
        self.connected = True
        built = self.connector.buildProtocol(IPv4Address("TCP", *self.peer))
        # Timeouts (TimeoutMixin) run on the Puncher's reactor, never on the global one.
        built.callLater = self.connector.reactor.callLater
        built.makeConnection(transport or StringTransport())
        return built


class ConnectAttempts:
    """Puncher's tcp.Connector, with `_Attempt`s for transports; `made`: every attempt."""

    def __init__(self, testcase):
        self.made = []
        made = self.made

        class Connector(tcp.Connector):
            def _makeTransport(self):
                attempt = _Attempt(self)
                made.append(attempt)
                return attempt

        testcase.patch(punch, "tcp", types.SimpleNamespace(Connector=Connector,
                                                           makeBinding=tcp.makeBinding))

    @property
    def last(self):
        return self.made[-1]


class _Built(protocol.Protocol):
    """The protocol a Puncher's `build` makes."""


class PuncherTests(SynchronousTestCase):
    """A Puncher on a MemoryReactorClock, its attempts ended as the test says."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.attempts = ConnectAttempts(self)

    def puncher(self, budget=PUNCH_SECONDS, interface=""):
        puncher = Puncher(self.reactor, LOCAL_PORT, PEER, _Built, budget=budget,
                          interface=interface)
        self.done = puncher.start()
        return puncher

    def refuse_all(self, limit=1000):
        """Refuse every attempt as it is made, running the retries → the attempts made."""
        for _ in range(limit):
            if self.done.called:
                break
            attempt = self.attempts.last
            if attempt.failed_with is None and not attempt.connected:
                attempt.refuse()
            self.reactor.advance(TCP_RECONNECT_SECONDS)
        return len(self.attempts.made)

    def test_connects_from_local_port_to_peer(self):
        """start() makes one attempt to the peer, bound to the local port with both reuse
        options (the listener on that port holds it too); `done` waits for it."""
        self.puncher(interface="192.0.2.7")
        (attempt,) = self.attempts.made
        self.assertEqual(attempt.peer, PEER)
        self.assertEqual(attempt.binding, tcp.makeBinding("192.0.2.7", LOCAL_PORT,
                                                          reuseAddress=True, reusePort=True))
        self.assertNoResult(self.done)

    def test_connection_fires_done_with_built_protocol(self):
        """The connection's protocol is what `build` made, its factory the Puncher, and
        `done` fires with it."""
        puncher = self.puncher()
        built = self.attempts.last.succeed()
        self.assertIsInstance(built, _Built)
        self.assertIs(built.factory, puncher)
        self.assertIs(self.successResultOf(self.done), built)
        self.assertEqual(puncher.attempts, 1)

    def test_refused_attempt_retried_after_retry_seconds(self):
        """A refused attempt is made again TCP_RECONNECT_SECONDS later, not before, from the same
        local port to the same peer."""
        self.puncher()
        self.attempts.last.refuse()
        self.assertEqual(len(self.attempts.made), 1)
        self.reactor.advance(TCP_RECONNECT_SECONDS / 2)
        self.assertEqual(len(self.attempts.made), 1)
        self.reactor.advance(TCP_RECONNECT_SECONDS / 2)
        self.assertEqual(len(self.attempts.made), 2)
        first, second = self.attempts.made
        self.assertEqual((second.peer, second.binding), (first.peer, first.binding))
        self.assertNoResult(self.done)
        second.succeed()
        self.assertIsInstance(self.successResultOf(self.done), _Built)

    def test_at_most_attempt_limit_attempts(self):
        """Refused again and again, the Puncher gives up after TCP_ATTEMPT_LIMIT attempts (well
        within its budget) with PunchFailed, and makes no more."""
        self.assertLess(TCP_ATTEMPT_LIMIT * TCP_RECONNECT_SECONDS, PUNCH_SECONDS)
        puncher = self.puncher()
        self.assertEqual(self.refuse_all(), TCP_ATTEMPT_LIMIT)
        failure = self.failureResultOf(self.done, PunchFailed)
        self.assertIn(f"after {TCP_ATTEMPT_LIMIT} attempts", failure.getErrorMessage())
        self.assertEqual(puncher.attempts, TCP_ATTEMPT_LIMIT)
        self.reactor.advance(PUNCH_SECONDS)
        self.assertEqual(len(self.attempts.made), TCP_ATTEMPT_LIMIT)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_budget_spent_between_attempts(self):
        """A budget that runs out while waiting to retry ends the punch with PunchFailed."""
        self.puncher(budget=TCP_RECONNECT_SECONDS * 1.5)
        self.assertEqual(self.refuse_all(), 2)
        failure = self.failureResultOf(self.done, PunchFailed)
        self.assertIn(f"{PEER[0]}:{PEER[1]} after 2 attempts", failure.getErrorMessage())

    def test_pending_attempt_times_out_at_budget(self):
        """An attempt left unanswered (the kernel retransmitting its SYN) is given up when the
        budget is spent: PunchFailed, no retry."""
        self.puncher(budget=3.0)
        self.reactor.advance(1.0)
        self.assertNoResult(self.done)
        self.reactor.advance(2.0)
        self.assertIsInstance(self.attempts.last.failed_with, error.TimeoutError)
        self.failureResultOf(self.done, PunchFailed)
        self.reactor.advance(TCP_RECONNECT_SECONDS)
        self.assertEqual(len(self.attempts.made), 1)

    def test_retry_gets_what_is_left_of_the_budget(self):
        """A retried attempt times out at the budget's end, not a whole budget later."""
        self.puncher(budget=1.0)
        self.reactor.advance(0.5)
        self.attempts.last.refuse()
        self.reactor.advance(TCP_RECONNECT_SECONDS)
        self.assertEqual(len(self.attempts.made), 2)
        self.reactor.advance(0.5 - TCP_RECONNECT_SECONDS)
        self.assertIsInstance(self.attempts.last.failed_with, error.TimeoutError)
        self.failureResultOf(self.done, PunchFailed)

    def test_bind_error_fails_at_once(self):
        """An attempt that cannot bind the local port fails the punch at once, saying so."""
        self.puncher()
        self.attempts.last.failIfNotConnected(error.ConnectBindError(98, "in use"))
        failure = self.failureResultOf(self.done, PunchFailed)
        self.assertIn(f"cannot bind port {LOCAL_PORT}", failure.getErrorMessage())
        self.reactor.advance(TCP_RECONNECT_SECONDS)
        self.assertEqual(len(self.attempts.made), 1)

    def test_stop_cancels_pending_retry(self):
        """stop() while waiting to retry: no more attempts, `done` fails PunchFailed
        ("stopped")."""
        puncher = self.puncher()
        self.attempts.last.refuse()
        puncher.stop()
        failure = self.failureResultOf(self.done, PunchFailed)
        self.assertEqual(failure.getErrorMessage(), "stopped")
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(PUNCH_SECONDS)
        self.assertEqual(len(self.attempts.made), 1)

    def test_stop_abandons_pending_attempt(self):
        """stop() during an attempt stops connecting; `done` fails "stopped", not as a
        failed connection, and nothing is retried."""
        puncher = self.puncher()
        attempt = self.attempts.last
        puncher.stop()
        self.assertIsInstance(attempt.failed_with, error.UserError)
        self.assertEqual(attempt.connector.state, "disconnected")
        self.assertEqual(self.failureResultOf(self.done, PunchFailed).getErrorMessage(),
                         "stopped")
        self.reactor.advance(PUNCH_SECONDS)
        self.assertEqual(len(self.attempts.made), 1)

    def test_stop_after_connection_leaves_it(self):
        """stop() once connected (another path's token redeemed it) leaves the connection
        and `done`'s result alone."""
        puncher = self.puncher()
        built = self.attempts.last.succeed()
        puncher.stop()
        self.assertIs(self.successResultOf(self.done), built)
        self.assertEqual(self.attempts.last.connector.state, "connected")
        self.assertFalse(built.transport.disconnecting)

    def test_second_connection_does_not_fire_done_again(self):
        """A second connection after `done` fired gets a protocol of its own; `done` keeps
        the first."""
        puncher = self.puncher()
        first = self.attempts.last.succeed()
        second = puncher.buildProtocol(IPv4Address("TCP", *PEER))
        self.assertIsInstance(second, _Built)
        self.assertIsNot(second, first)
        self.assertIs(self.successResultOf(self.done), first)

    def test_refusal_after_done_is_not_retried(self):
        """A failed attempt reported after `done` fired is not retried."""
        puncher = self.puncher()
        self.attempts.last.succeed()
        puncher.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.reactor.advance(TCP_RECONNECT_SECONDS)
        self.assertEqual(len(self.attempts.made), 1)


class ListenReusableTests(SynchronousTestCase):
    """ports.listen_tcp(reuse_port=True) on a reactor whose ports have no socket."""

    def test_listen_reusable_on_memory_reactor(self):
        """It just listens (there is no socket to set the option on)."""
        reactor = MemoryReactorClock()
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        ports.listen_tcp(reactor, 7401, factory, "192.0.2.7", reuse_port=True)
        self.assertEqual(reactor.tcpServers, [(7401, factory, 50, "192.0.2.7")])


class _Ends(protocol.Protocol):
    """One end of a loopback connection: `made` and `lost` fire with it."""

    def __init__(self):
        self.made = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def connectionLost(self, reason):
        self.lost.callback(None)


class _Accepting(protocol.Factory):
    """Builds `_Ends`; `accepted` fires with the first."""

    def __init__(self):
        self.accepted = defer.Deferred()

    def buildProtocol(self, address):
        ends = _Ends()
        ends.factory = self
        ends.made.addCallback(lambda e: self.accepted.called or self.accepted.callback(e))
        return ends


class LoopbackPunchTests(TestCase):
    """Punchers with real sockets on 127.0.0.1 (no SYN leaves the host)."""

    timeout = 10

    def setUp(self):
        from twisted.internet import reactor
        self.reactor = reactor

    def listen(self, reusable=False):
        """A listening port on 127.0.0.1 → (port, its factory)."""
        factory = _Accepting()
        if reusable:
            port = ports.listen_tcp(self.reactor, 0, factory, "127.0.0.1", reuse_port=True)
        else:
            port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, factory

    @defer.inlineCallbacks
    def connected(self, puncher, factory):
        """Wait for `puncher`'s connection and its accepted end → (ours, theirs); both are
        closed (and waited for) at cleanup."""
        ours = yield puncher.start()
        yield ours.made  # `done` fires from buildProtocol: the transport comes just after
        theirs = yield factory.accepted

        def close():
            ours.transport.loseConnection()
            return defer.gatherResults([ours.lost, theirs.lost])

        self.addCleanup(close)
        return ours, theirs

    def test_holds_a_port_a_puncher_may_bind_too(self):
        """The socket is bound to a free port of the interface with both reuse options, so
        a second socket with them binds the same port while it is held."""
        held = punch.reserve_port("127.0.0.1")
        self.addCleanup(held.close)
        host, port = held.getsockname()
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
            self.assertTrue(held.getsockopt(socket.SOL_SOCKET, option))
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(second.close)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        second.bind(("127.0.0.1", port))
        self.assertEqual(second.getsockname()[1], port)

    @defer.inlineCallbacks
    def test_connects_from_reserved_port(self):
        """A Puncher from a reserved port reaches a listening port: `done` fires with the
        built protocol, and the connection leaves from the reserved port."""
        port, factory = self.listen()
        held = punch.reserve_port("127.0.0.1")
        local = held.getsockname()[1]
        puncher = Puncher(self.reactor, local, ("127.0.0.1", port.getHost().port), _Ends,
                          interface="127.0.0.1")
        d = self.connected(puncher, factory)
        held.close()  # the Puncher's socket holds the port now
        ours, theirs = yield d
        self.assertIs(ours.factory, puncher)
        self.assertEqual(ours.transport.getHost().port, local)
        self.assertEqual(theirs.transport.getPeer().port, local)
        self.assertEqual(puncher.attempts, 1)

    @defer.inlineCallbacks
    def test_connects_from_reusable_listeners_port(self):
        """A port listened on with reuse_port lets a Puncher connect out from the listener's own port while it
        listens (as the tunnel port does for punched tunnels)."""
        own, _ = self.listen(reusable=True)
        peer, factory = self.listen()
        puncher = Puncher(self.reactor, own.getHost().port,
                          ("127.0.0.1", peer.getHost().port), _Ends, interface="127.0.0.1")
        ours, theirs = yield self.connected(puncher, factory)
        self.assertEqual(ours.transport.getHost().port, own.getHost().port)
        self.assertEqual(theirs.transport.getPeer().port, own.getHost().port)

    @defer.inlineCallbacks
    def test_plain_listeners_port_cannot_be_bound(self):
        """Without reuse_port the listener's port cannot be bound by a Puncher: it
        fails at once, saying so."""
        own, _ = self.listen()
        peer, _ = self.listen()
        puncher = Puncher(self.reactor, own.getHost().port,
                          ("127.0.0.1", peer.getHost().port), _Ends, interface="127.0.0.1")
        e = yield self.assertFailure(puncher.start(), PunchFailed)
        self.assertIn(f"cannot bind port {own.getHost().port}", str(e))
        self.assertEqual(puncher.attempts, 1)

    @defer.inlineCallbacks
    def test_real_refusals_are_retried_up_to_the_limit(self):
        """A peer port where nothing listens refuses each attempt; the Puncher tries again
        until TCP_ATTEMPT_LIMIT (here 3) and then fails."""
        self.patch(punch, "TCP_ATTEMPT_LIMIT", 3)
        closed = punch.reserve_port("127.0.0.1")
        peer_port = closed.getsockname()[1]
        closed.close()  # a free port nobody listens on
        held = punch.reserve_port("127.0.0.1")
        puncher = Puncher(self.reactor, held.getsockname()[1], ("127.0.0.1", peer_port),
                          _Ends, interface="127.0.0.1")
        d = puncher.start()
        held.close()
        e = yield self.assertFailure(d, PunchFailed)
        self.assertIn("after 3 attempts", str(e))
        self.assertEqual(puncher.attempts, 3)



class SprayerTests(TestCase):
    """Birthday probing's spraying side with real sockets on 127.0.0.1."""

    timeout = 10
    setUp, listen, connected = (LoopbackPunchTests.setUp, LoopbackPunchTests.listen,
                                LoopbackPunchTests.connected)

    def free_ports(self, count):
        """`count` ports nothing listens on (bound, read, released)."""
        ports = []
        for _ in range(count):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        return ports

    @defer.inlineCallbacks
    def test_finds_the_one_port_that_answers(self):
        """Among many ports that refuse, the one with a listener gets the connection, from
        the sprayer's local port; `done` fires with the built protocol."""
        own, _ = self.listen(reusable=True)
        peer, factory = self.listen()
        ports = self.free_ports(60) + [peer.getHost().port]
        sprayer = punch.Sprayer(self.reactor, own.getHost().port, "127.0.0.1", ports, _Ends,
                                budget=5, interface="127.0.0.1")
        ours, theirs = yield self.connected(sprayer, factory)
        self.assertIs(ours.factory, sprayer)
        self.assertEqual(theirs.transport.getPeer().port, own.getHost().port)
        self.assertEqual(sprayer.attempts, 61)  # SPRAY_PER_TICK a tick: the last in tick 3

    @defer.inlineCallbacks
    def test_budget_spent_without_a_hit(self):
        """No port answers: PunchFailed once the budget is spent, naming how many were
        probed."""
        own, _ = self.listen(reusable=True)
        sprayer = punch.Sprayer(self.reactor, own.getHost().port, "127.0.0.1",
                                self.free_ports(30), _Ends, budget=0.3, interface="127.0.0.1")
        failure = yield self.assertFailure(sprayer.start(), PunchFailed)
        self.assertIn("30 ports of 127.0.0.1 probed", str(failure))
