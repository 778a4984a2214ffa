"""The user-node's end of a tunnel (meshnode.roles.user._TunnelLeg) over a StringTransport that
records startTLS: the token, the gate's go-ahead, TLS as the client checked against the
tunnel-node's key, and what its Deferred tells the path that dialled."""

import datetime

from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from meshnode.core.identity import Identity
from meshnode.roles.user import CONNECT_TIMEOUT_SECONDS, TunnelFailed, _TunnelLeg
from meshnode.streams import tunnel_tls
from meshnode.streams.splice import FRAME_HEADER, Leg

NOW = datetime.datetime(2027, 1, 15, 8, 0, tzinfo=datetime.timezone.utc)
TOKEN = bytes([3]) * tunnel_tls.TOKEN_SIZE
CONTEXT = object()  # what the leg hands startTLS


class _TLSLayer:
    """Stands for the TLS layer startTLS puts under the leg: notes the bytes handed to it."""

    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class _TLSTransport(StringTransport):
    """Records startTLS; the peer's certificate is `certificate` once TLS ran."""

    tls = None
    certificate = None

    def startTLS(self, context, normal=True):
        self.tls = (context, normal)
        self.protocol = _TLSLayer()

    def getPeerCertificate(self):
        return self.certificate


class _Other(Leg):
    """The application's side, spliced to the tunnel."""

    def __init__(self):
        self.makeConnection(StringTransport())


class TunnelLegTests(SynchronousTestCase):
    """_TunnelLeg: token, go-ahead, TLS as the client, then the verified leg."""

    def setUp(self):
        self.tunnel_node = Identity.generate()
        self.clock = Clock()
        self.ready = defer.Deferred()
        self.leg, self.transport = self.connect(self.ready)

    def connect(self, ready, racing=False):
        leg = _TunnelLeg(CONTEXT, TOKEN, self.tunnel_node.signing_public, ready, racing)
        leg.callLater = self.clock.callLater
        transport = _TLSTransport()
        leg.makeConnection(transport)
        return leg, transport

    def through_tls(self, identity):
        """The gate opens; TLS ends with `identity`'s certificate."""
        self.leg.dataReceived(tunnel_tls.GATE_OPEN)
        self.transport.certificate = crypto.X509.from_cryptography(
            tunnel_tls.certificate_for(identity, NOW))
        self.leg.handshakeCompleted()

    def test_token_then_tls_as_client(self):
        """Connected, the leg sends its token; GATE_OPEN starts TLS as the client and the
        ClientHello's answer read with it goes to TLS."""
        self.assertEqual(self.transport.value(), TOKEN)
        self.assertIsNone(self.transport.tls)
        self.leg.dataReceived(tunnel_tls.GATE_OPEN + b"server hello")
        self.assertEqual(self.transport.tls, (CONTEXT, True))
        self.assertEqual(self.transport.protocol.received, b"server hello")
        self.assertNoResult(self.ready)

    def test_no_go_ahead_fails_the_path(self):
        """A gate that answers anything but GATE_OPEN is aborted, and the path fails once the
        connection is gone."""
        self.leg.dataReceived(b"\x01")
        self.assertTrue(self.transport.disconnected)
        self.assertIsNone(self.transport.tls)
        self.assertNoResult(self.ready)
        self.leg.connectionLost(None)
        self.assertEqual(self.failureResultOf(self.ready, TunnelFailed).getErrorMessage(),
                         "the tunnel closed before TLS was up")

    def test_timeout_before_tls(self):
        """TLS not verified within twice the connect timeout: aborted, and the path fails
        once the connection is gone."""
        self.leg.dataReceived(tunnel_tls.GATE_OPEN)
        self.clock.advance(CONNECT_TIMEOUT_SECONDS * 2 - 0.01)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.01)
        self.assertTrue(self.transport.disconnected)
        self.leg.connectionLost(None)
        self.failureResultOf(self.ready, TunnelFailed)

    def test_wrong_key_fails_at_once(self):
        """The peer proves another key: the path fails with the mismatch, aborted."""
        self.through_tls(Identity.generate())
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.failureResultOf(self.ready, TunnelFailed).getErrorMessage(),
                         "the peer's certificate is not its Node record's key")
        self.leg.connectionLost(None)  # no second outcome

    def test_verified_leg_carries_frames(self):
        """The tunnel-node proves its key: `ready` fires with the leg, whose frames reach
        the application's side straight through the splice."""
        self.through_tls(self.tunnel_node)
        self.assertIs(self.successResultOf(self.ready), self.leg)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.leg.dataReceived, self.leg.deframe)  # not the handshake's
        other = _Other()
        other.callLater = self.clock.callLater  # its idle timeout on the test's clock
        other.join(self.leg)
        self.leg.dataReceived(FRAME_HEADER.pack(5) + b"hello")
        self.assertEqual(other.transport.value(), b"hello")

    def test_racing_leg_after_a_win(self):
        """Birthday probing: a connection made after another got through is aborted at once,
        sends no token, and its loss fails nothing."""
        self.ready.callback("won")
        leg, transport = self.connect(self.ready, racing=True)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        leg.connectionLost(None)
        self.assertEqual(self.successResultOf(self.ready), "won")

    def test_racing_leg_lost_fails_nothing(self):
        """A racing connection lost before TLS leaves `ready` to the others."""
        ready = defer.Deferred()
        leg, transport = self.connect(ready, racing=True)
        self.assertEqual(transport.value(), TOKEN)
        leg.connectionLost(None)
        self.assertNoResult(ready)
