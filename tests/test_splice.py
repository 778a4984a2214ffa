"""Tests for meshnode.splice.Leg: two connections joined into one stream with flow control,
early data held until the join, an idle timeout, and closing carried across.

Legs run over StringTransports with a Clock for their timeouts; one test runs a whole chain
(application ↔ leg ↔ leg ↔ device) over twisted.test.iosim's in-memory connections.
"""

from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from meshnode.streams.splice import (DEFAULT_IDLE_SECONDS, EARLY_BUFFER, FRAME_HEADER, FRAME_LIMIT,
                             FramedLeg, Leg)


class _Leg(Leg):
    """A leg that forwards all it receives (as a device's side does), noting when it left."""

    def __init__(self):
        self.gone = 0

    def dataReceived(self, data):
        self.forward(data)

    def left(self):
        self.gone += 1


class SpliceTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.a, self.a_transport = self.leg()
        self.b, self.b_transport = self.leg()

    def leg(self):
        leg = _Leg()
        leg.callLater = self.clock.callLater
        transport = StringTransport()
        leg.makeConnection(transport)
        return leg, transport


class ForwardingTests(SpliceTestCase):
    """Data crosses a joined pair both ways."""

    def test_both_ways(self):
        """What one side receives is written to the other, in order."""
        self.a.join(self.b)
        self.a.dataReceived(b"hello ")
        self.a.dataReceived(b"device")
        self.b.dataReceived(b"hello app")
        self.assertEqual(self.b_transport.value(), b"hello device")
        self.assertEqual(self.a_transport.value(), b"hello app")
        self.assertEqual((self.a.bytes_forwarded, self.b.bytes_forwarded), (12, 9))

    def test_join_links_both(self):
        """join makes each leg the other's `other`, whichever side called it."""
        self.b.join(self.a)
        self.assertIs(self.a.other, self.b)
        self.assertIs(self.b.other, self.a)

    def test_producers_registered_both_ways(self):
        """Each transport is the streaming producer of the other's writes."""
        self.a.join(self.b)
        self.assertIs(self.a_transport.producer, self.b_transport)
        self.assertIs(self.b_transport.producer, self.a_transport)
        self.assertTrue(self.a_transport.streaming)
        self.assertTrue(self.b_transport.streaming)

    def test_slow_reader_pauses_writer(self):
        """A transport whose buffer fills pauses its producer: the other side's reading."""
        self.a.join(self.b)
        self.b_transport.producer.pauseProducing()
        self.assertEqual(self.a_transport.producerState, "paused")
        self.assertEqual(self.b_transport.producerState, "producing")
        self.b_transport.producer.resumeProducing()
        self.assertEqual(self.a_transport.producerState, "producing")


class EarlyDataTests(SpliceTestCase):
    """What arrives before the join is held, and paused past EARLY_BUFFER."""

    def test_held_until_join(self):
        """Early data of both sides is written nowhere, then delivered at the join."""
        self.a.dataReceived(b"early ")
        self.b.dataReceived(b"reply")
        self.assertEqual((self.a_transport.value(), self.b_transport.value()), (b"", b""))
        self.a.join(self.b)
        self.a.dataReceived(b"late")
        self.assertEqual(self.b_transport.value(), b"early late")
        self.assertEqual(self.a_transport.value(), b"reply")

    def test_not_paused_up_to_limit(self):
        """Up to EARLY_BUFFER bytes the side keeps reading."""
        self.a.dataReceived(b"x" * (EARLY_BUFFER - 1))
        self.a.dataReceived(b"x")
        self.assertEqual(self.a_transport.producerState, "producing")

    def test_paused_past_limit(self):
        """Past EARLY_BUFFER the side is paused; the join delivers all and resumes it."""
        self.a.dataReceived(b"x" * EARLY_BUFFER)
        self.a.dataReceived(b"y")
        self.assertEqual(self.a_transport.producerState, "paused")
        self.a.join(self.b)
        self.assertEqual(self.b_transport.value(), b"x" * EARLY_BUFFER + b"y")
        self.assertEqual(self.a_transport.producerState, "producing")

    def test_closed_before_join(self):
        """A side that closed before the join: what it sent is delivered, then the other
        side is closed."""
        self.a.dataReceived(b"last words")
        self.a.connectionLost(None)
        self.assertEqual(self.a.gone, 1)
        self.a.join(self.b)
        self.assertEqual(self.b_transport.value(), b"last words")
        self.assertTrue(self.b_transport.disconnecting)


class IdleTimeoutTests(SpliceTestCase):
    """A joined pair idle for idle_timeout seconds is closed."""

    def test_idle_closes(self):
        """No data for idle_timeout → the leg aborts its connection; the other follows."""
        self.a.idle_timeout = self.b.idle_timeout = 30
        self.a.join(self.b)
        self.clock.advance(29)
        self.assertFalse(self.a_transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.a_transport.disconnecting)
        self.a.connectionLost(None)
        self.assertTrue(self.b_transport.disconnecting)

    def test_default(self):
        """The default idle timeout is DEFAULT_IDLE_SECONDS."""
        self.a.join(self.b)
        self.clock.advance(DEFAULT_IDLE_SECONDS - 1)
        self.assertFalse(self.a_transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.a_transport.disconnecting)

    def test_traffic_either_way_keeps_both_open(self):
        """Data in either direction resets both legs' timers."""
        self.a.idle_timeout = self.b.idle_timeout = 30
        self.a.join(self.b)
        self.clock.advance(20)
        self.a.dataReceived(b"ping")
        self.clock.advance(20)
        self.b.dataReceived(b"pong")
        self.clock.advance(29)
        self.assertFalse(self.a_transport.disconnecting)
        self.assertFalse(self.b_transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.a_transport.disconnecting)
        self.assertTrue(self.b_transport.disconnecting)

    def test_no_timer_after_close(self):
        """A closed leg leaves no timer behind."""
        self.a.join(self.b)
        self.a.connectionLost(None)
        self.b.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CloseTests(SpliceTestCase):
    """Closing one side closes the other."""

    def test_closing_one_closes_other(self):
        """connectionLost on one side: the other loses its connection (after writing what
        it holds), its producer is unregistered, and `left` runs once per side."""
        self.a.join(self.b)
        self.a.dataReceived(b"bye")
        self.a.connectionLost(None)
        self.assertEqual(self.b_transport.value(), b"bye")
        self.assertTrue(self.b_transport.disconnecting)
        self.assertIsNone(self.b_transport.producer)
        self.assertEqual((self.a.gone, self.b.gone), (1, 0))
        self.b.connectionLost(None)
        self.assertEqual((self.a.gone, self.b.gone), (1, 1))

    def test_other_side_closes(self):
        """The same holds the other way round."""
        self.a.join(self.b)
        self.b.connectionLost(None)
        self.assertTrue(self.a_transport.disconnecting)
        self.assertFalse(self.b_transport.disconnecting)

    def test_unjoined_close(self):
        """An unjoined leg that closes touches nothing else."""
        self.a.connectionLost(None)
        self.assertEqual(self.a.gone, 1)
        self.assertFalse(self.b_transport.disconnecting)


class _Endpoint(protocol.Protocol):
    """The application or the device: collects what it receives."""

    def __init__(self):
        self.received = []
        self.lost = False

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = True


class ChainTests(SynchronousTestCase):
    """application ↔ leg ↔ leg ↔ device over iosim's in-memory connections."""

    def test_large_transfer_and_close(self):
        """A megabyte each way arrives whole and in order; closing the application closes
        the device's connection."""
        app, app_side, app_pump = iosim.connectedServerAndClient(_Leg, _Endpoint)
        device_side, device, device_pump = iosim.connectedServerAndClient(_Endpoint, _Leg)
        clock = Clock()
        app_side.callLater = device_side.callLater = clock.callLater
        app_side.join(device_side)
        up = bytes(range(256)) * 4096
        down = bytes(reversed(range(256))) * 4096
        app.transport.write(up)
        device.transport.write(down)

        def pump():
            for _ in range(1000):
                if not (app_pump.pump() | device_pump.pump()):
                    return

        pump()
        self.assertEqual(b"".join(device.received), up)
        self.assertEqual(b"".join(app.received), down)
        app.transport.loseConnection()
        pump()
        self.assertTrue(device.lost)


class _HalfClosingTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class HalfCloseTests(SynchronousTestCase):
    """A stream's end passes through: over TCP as a FIN, inside TLS as a zero-length frame."""

    def pair(self):
        plain, framed = Leg(), FramedLeg()
        clock = Clock()  # their idle timeouts run on it, never on the global reactor
        plain.callLater = framed.callLater = clock.callLater
        plain_transport, framed_transport = _HalfClosingTransport(), StringTransport()
        plain.makeConnection(plain_transport)
        framed.makeConnection(framed_transport)
        framed.dataReceived = framed.deframe
        plain.dataReceived = plain.forward
        plain.join(framed)
        return plain, plain_transport, framed, framed_transport

    def test_frames_carry_data_split_anywhere(self):
        """Frames cut at any byte are put together before they are forwarded."""
        plain, plain_transport, framed, framed_transport = self.pair()
        stream = FRAME_HEADER.pack(5) + b"hello" + FRAME_HEADER.pack(6) + b" world"
        for i in range(len(stream)):
            framed.dataReceived(stream[i:i + 1])
        self.assertEqual(plain_transport.value(), b"hello world")
        plain.dataReceived(b"answer")
        self.assertEqual(framed_transport.value(), FRAME_HEADER.pack(6) + b"answer")

    def test_tcp_end_becomes_an_end_frame_and_the_answer_still_flows(self):
        """A FIN on the plain side sends the end frame; the answer still comes back, and the
        pair closes once both directions ended."""
        plain, plain_transport, framed, framed_transport = self.pair()
        plain.readConnectionLost()
        self.assertEqual(framed_transport.value(), FRAME_HEADER.pack(0))
        self.assertFalse(framed_transport.disconnecting)
        framed.dataReceived(FRAME_HEADER.pack(5) + b"reply")
        self.assertEqual(plain_transport.value(), b"reply")
        framed.dataReceived(FRAME_HEADER.pack(0))
        self.assertTrue(plain_transport.disconnecting)
        self.assertTrue(framed_transport.disconnecting)

    def test_end_frame_half_closes_tcp(self):
        """An end frame from TLS half-closes the plain side's TCP (write side only)."""
        plain, plain_transport, framed, framed_transport = self.pair()
        framed.dataReceived(FRAME_HEADER.pack(0))
        self.assertTrue(plain_transport.write_closed)
        self.assertFalse(plain_transport.disconnecting)
        plain.dataReceived(b"late answer")
        self.assertEqual(framed_transport.value(), FRAME_HEADER.pack(len(b"late answer"))
                         + b"late answer")

    def test_oversized_frame_aborts(self):
        """A frame header over FRAME_LIMIT aborts the connection."""
        plain, plain_transport, framed, framed_transport = self.pair()
        framed.transport.abortConnection = lambda: setattr(framed, "aborted", True)
        framed.dataReceived(FRAME_HEADER.pack(FRAME_LIMIT + 1))
        self.assertTrue(getattr(framed, "aborted", False))


class _GoneTransport(StringTransport):
    """A transport that, once its connection is lost, raises on unregisterProducer (as a
    TLS transport whose connection is gone does)."""

    gone = False

    def unregisterProducer(self):
        if self.gone:
            raise RuntimeError("the connection is gone")
        super().unregisterProducer()


class BothClosedTests(SynchronousTestCase):
    """The second side of a pair to close leaves the first side's transport alone."""

    def setUp(self):
        clock = Clock()
        self.a, self.b = _Leg(), _Leg()
        self.a_transport, self.b_transport = _GoneTransport(), _GoneTransport()
        for leg, transport in ((self.a, self.a_transport), (self.b, self.b_transport)):
            leg.callLater = clock.callLater
            leg.makeConnection(transport)
        self.a.join(self.b)

    def test_other_leg_already_closed(self):
        """When the other leg's connection is already gone, closing this one neither
        unregisters nor closes the other's transport again; both legs leave once."""
        self.a.connectionLost(None)
        self.assertTrue(self.b_transport.disconnecting)
        self.assertIsNone(self.b_transport.producer)
        self.a_transport.gone = True
        self.a_transport.disconnecting = False
        self.b.connectionLost(None)
        self.assertFalse(self.a_transport.disconnecting)
        self.assertEqual((self.a.gone, self.b.gone), (1, 1))

    def test_other_leg_open(self):
        """While the other leg is open, closing this one still unregisters its producer and
        closes it."""
        self.b.connectionLost(None)
        self.assertIsNone(self.a_transport.producer)
        self.assertTrue(self.a_transport.disconnecting)
