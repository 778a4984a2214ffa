"""Tests for meshnode.tunnel_tls: certificates bound to node keys, and real TLS handshakes over
loopback between two TunnelContexts, the peer's key checked by gate.peer_verified.

The handshakes use the global reactor on 127.0.0.1; every wait is bounded by the test's
timeout and every connection and port is closed before the test ends.
"""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from meshnode.streams import gate, tunnel_tls
from meshnode.core.identity import Identity

NOW = datetime.datetime(2027, 1, 15, 8, 0, tzinfo=datetime.timezone.utc)


def raw(public_key):
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class CertificateTests(SynchronousTestCase):
    """certificate_for: a self-signed certificate of the node's own Ed25519 key."""

    def setUp(self):
        self.identity = Identity.generate()
        self.certificate = tunnel_tls.certificate_for(self.identity, NOW)

    def test_binds_node_key(self):
        """The certificate's public key is the node's signing key."""
        self.assertEqual(raw(self.certificate.public_key()), self.identity.signing_public)

    def test_names_node(self):
        """Subject and issuer are the node id (self-signed)."""
        name = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(name, self.identity.node_id.hex())
        self.assertEqual(self.certificate.issuer, self.certificate.subject)

    def test_signed_by_node_key(self):
        """The signature verifies with the node's key (it proves possession)."""
        self.certificate.public_key().verify(self.certificate.signature,
                                             self.certificate.tbs_certificate_bytes)

    def test_valid_now(self):
        """`now` lies within the validity period, with a day's slack for skewed clocks."""
        self.assertEqual(self.certificate.not_valid_before_utc, NOW - datetime.timedelta(days=1))
        self.assertGreater(self.certificate.not_valid_after_utc,
                           NOW + datetime.timedelta(days=365))

    def test_fresh_serials(self):
        """Two certificates of one key differ in serial number."""
        other = tunnel_tls.certificate_for(self.identity, NOW)
        self.assertNotEqual(other.serial_number, self.certificate.serial_number)
        self.assertEqual(raw(other.public_key()), self.identity.signing_public)


class _CertificateTransport:
    def __init__(self, certificate):
        self.certificate = certificate

    def getPeerCertificate(self):
        return self.certificate


class PeerKeyTests(SynchronousTestCase):
    """peer_key: the raw Ed25519 key of the peer's certificate, or None."""

    def test_ed25519(self):
        """An Ed25519 certificate → its raw key."""
        identity = Identity.generate()
        certificate = crypto.X509.from_cryptography(tunnel_tls.certificate_for(identity, NOW))
        self.assertEqual(tunnel_tls.peer_key(_CertificateTransport(certificate)),
                         identity.signing_public)

    def test_no_certificate(self):
        """No peer certificate → None."""
        self.assertIsNone(tunnel_tls.peer_key(_CertificateTransport(None)))

    def test_other_key_type(self):
        """A certificate of another key type (EC) → None."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(key.public_key()).serial_number(1)
                       .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1))
                       .sign(key, hashes.SHA256()))
        self.assertIsNone(tunnel_tls.peer_key(
            _CertificateTransport(crypto.X509.from_cryptography(certificate))))


@implementer(IHandshakeListener)
class _Watched(protocol.Protocol):
    """One end of a tunnel stream: optionally a gate byte, then TLS checked against
    `expected_key` as the gate machines check it (a refused peer is aborted). `outcome` fires
    with ("verified", TLS version) or ("refused", reason); `lost` fires when the connection is
    gone."""

    def __init__(self, context, expected_key, normal=True, gate=None):
        self.context = context
        self.expected_key = expected_key
        self.normal = normal
        self.gate = gate  # "send": write GATE_OPEN first; "await": wait for it
        self.outcome = defer.Deferred()
        self.lost = defer.Deferred()
        self.gate_read = None
        self.received = b""
        self.expect = None  # (size, Deferred fired once that many bytes came)

    def connectionMade(self):
        if self.gate == "send":
            self.transport.write(tunnel_tls.GATE_OPEN)
        if self.gate != "await":
            tunnel_tls.start_tls(self, self.context, self.normal)

    def dataReceived(self, data):
        if self.gate == "await" and self.gate_read is None:
            self.gate_read = data
            tunnel_tls.start_tls(self, self.context, self.normal, data[1:])
            return
        self.received += data
        if self.expect is not None and len(self.received) >= self.expect[0]:
            self.expect[1].callback(self.received)
            self.expect = None

    def handshakeCompleted(self):
        if not gate.peer_verified(tunnel_tls.peer_key(self.transport), self.expected_key):
            self.tls_refused(gate.PEER_KEY_MISMATCH)
            self.transport.abortConnection()
            return
        self.tls_verified()

    def tls_verified(self):
        self.outcome.callback(("verified",
                               self.transport.getHandle().get_protocol_version_name()))

    def tls_refused(self, reason):
        self.outcome.callback(("refused", reason))

    def connectionLost(self, reason):
        if not self.outcome.called:
            self.outcome.callback(("lost", reason.getErrorMessage()))
        self.lost.callback(None)


class HandshakeTests(TestCase):
    """Real TLS handshakes over loopback between two nodes' TunnelContexts."""

    timeout = 30

    def setUp(self):
        self.alice, self.bob, self.mallory = (Identity.generate() for _ in range(3))
        self.alice_context = tunnel_tls.TunnelContext(self.alice, NOW)
        self.bob_context = tunnel_tls.TunnelContext(self.bob, NOW)

    @defer.inlineCallbacks
    def connect(self, server, client):
        """Connect `client` to a listener serving `server` over 127.0.0.1."""
        factory = protocol.Factory.forProtocol(lambda: server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port)
        self.addCleanup(self.close, server, client)

    @defer.inlineCallbacks
    def close(self, *ends):
        for end in ends:
            if not end.lost.called:
                end.transport.loseConnection()
        yield defer.gatherResults([end.lost for end in ends])

    @defer.inlineCallbacks
    def test_expected_keys_verified(self):
        """Each side finds the key it expected: both verified, over TLS 1.3."""
        server = _Watched(self.bob_context, self.alice.signing_public)
        client = _Watched(self.alice_context, self.bob.signing_public)
        yield self.connect(server, client)
        outcomes = yield defer.gatherResults([server.outcome, client.outcome])
        self.assertEqual(outcomes, [("verified", "TLSv1.3")] * 2)
        server.expect = (18, defer.Deferred())
        got = server.expect[1]
        client.transport.write(b"through the tunnel")
        self.assertEqual((yield got), b"through the tunnel")

    @defer.inlineCallbacks
    def test_server_refuses_wrong_key(self):
        """A client with another node's certificate: the server calls tls_refused and
        aborts, so the client loses its connection; the server never verifies."""
        server = _Watched(self.bob_context, self.mallory.signing_public)
        client = _Watched(self.alice_context, self.bob.signing_public)
        yield self.connect(server, client)
        outcome = yield server.outcome
        self.assertEqual(outcome[0], "refused")
        yield defer.gatherResults([server.lost, client.lost])

    @defer.inlineCallbacks
    def test_client_refuses_wrong_key(self):
        """A server with another node's certificate: the client refuses and aborts."""
        server = _Watched(self.bob_context, self.alice.signing_public)
        client = _Watched(self.alice_context, self.mallory.signing_public)
        yield self.connect(server, client)
        outcome = yield client.outcome
        self.assertEqual(outcome[0], "refused")
        yield defer.gatherResults([server.lost, client.lost])
        self.assertNotEqual((yield server.outcome)[0], "verified")

    @defer.inlineCallbacks
    def test_no_expected_key_never_verifies(self):
        """A side that expects no key (None) refuses every peer."""
        server = _Watched(self.bob_context, None)
        client = _Watched(self.alice_context, self.bob.signing_public)
        yield self.connect(server, client)
        self.assertEqual((yield server.outcome)[0], "refused")
        yield defer.gatherResults([server.lost, client.lost])

    @defer.inlineCallbacks
    def test_relay_roles_with_gate(self):
        """As on the relayed path: the dialling side waits for GATE_OPEN and is the TLS
        server; the listening side is the TLS client. TLS bytes read together with the gate
        byte are handed to TLS, and both sides verify."""
        listening = _Watched(self.alice_context, self.bob.signing_public, normal=False,
                             gate="send")
        dialling = _Watched(self.bob_context, self.alice.signing_public, normal=False,
                            gate="await")
        yield self.connect(listening, dialling)
        outcomes = yield defer.gatherResults([listening.outcome, dialling.outcome])
        self.assertEqual(outcomes, [("verified", "TLSv1.3")] * 2)
        self.assertEqual(dialling.gate_read[:1], tunnel_tls.GATE_OPEN)
        self.assertGreater(len(dialling.gate_read), 1)  # the ClientHello came with it
