"""TLS inside every tunnel, with certificates bound to node keys (DESIGN.md §6.4).

Each node makes a self-signed X.509 certificate for its own Ed25519 node key when it starts.
Both ends of a tunnel present theirs (TLS 1.3, mutual); a certificate is taken for what it
proves — possession of a key — and after the handshake each side checks that the peer's key is
the signing key of the operator-signed Node record it expected. A relaying super-node sees
only ciphertext.

A tunnel stream starts in the clear with a gate (meshnode/streams/gate.py, which also checks the
peer's key once TLS is done); this module holds what TLS needs: the context, starting it and
the peer's key.
"""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLContextFactory
from zope.interface import implementer

# The gate's wire, as tunnel streams and their tests know it.
from meshnode.streams.gate import GATE_OPEN, TOKEN_SIZE  # noqa: F401
from meshnode.streams.splice import FramedLeg


def certificate_for(identity, now):
    """A self-signed certificate of the node's Ed25519 key (`now`: a datetime)."""
    key = identity.signing_key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id.hex())])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, None))


@implementer(IOpenSSLContextFactory)
class TunnelContext:
    """The TLS context of one node for its tunnels (both client and server side)."""

    def __init__(self, identity, now):
        certificate = certificate_for(identity, now)
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        # Idle tunnels hold no read/write buffers: thousands of them stay small.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.use_certificate(crypto.X509.from_cryptography(certificate))
        context.use_privatekey(crypto.PKey.from_cryptography_key(identity.signing_key))
        context.check_privatekey()
        # Any certificate passes OpenSSL: which key it must carry is checked after the
        # handshake against the peer's operator-signed Node record (gate.peer_verified).
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                           lambda connection, cert, errno, depth, ok: True)
        self._context = context

    def getContext(self):
        return self._context


class NodeTLS:
    """A node's one TunnelContext, for its tunnels and its TLS streams: made on first use,
    after the identity service has loaded the keys."""

    def __init__(self, identity_service, clock):
        self._identity_service = identity_service
        self._clock = clock
        self._context = None

    def context(self):
        if self._context is None:
            now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.timezone.utc)
            self._context = TunnelContext(self._identity_service.identity, now)
        return self._context


def start_tls(protocol, context, normal=True, received=b""):
    """Start TLS on `protocol`'s transport; `received`: TLS bytes that came in the same read
    as the gate's last clear byte, handed to the new TLS layer."""
    protocol.transport.startTLS(context, normal)
    if received:
        protocol.transport.protocol.dataReceived(received)


def peer_key(transport):
    """The raw Ed25519 public key of the peer's certificate, or None."""
    certificate = transport.getPeerCertificate()
    if certificate is None:
        return None
    key = certificate.to_cryptography().public_key()
    try:
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    except ValueError:
        return None  # not an Ed25519 key


@implementer(IHandshakeListener)
class GatedLeg(FramedLeg):
    """A tunnel leg that starts with a gate and then carries TLS: the adapter between its
    transport and the gate's machine (`use_gate`: a gate.DialingGate or ListeningGate, whose
    actions, gate.IGateActions, this leg performs). Once the gate opens, reads go straight to
    the framed stream; subclasses say what an open gate and a verified peer mean."""

    dataReceived = FramedLeg.deframe  # once through the gate; until then the handshake's
    handshake = None

    def use_gate(self, handshake):
        self.handshake = handshake
        self.dataReceived = handshake.received

    @property
    def expected_key(self):
        return self.handshake.expected_key

    def handshakeCompleted(self):
        self.handshake.tls_done(peer_key(self.transport))

    def timeoutConnection(self):
        self.handshake.timed_out()

    def gate_write(self, data):
        self.transport.write(data)

    def gate_through(self):
        """Called by subclasses as their gate opens: reads go to the stream from now on."""
        del self.dataReceived

    def gate_abort(self, reason):
        self.transport.abortConnection()

