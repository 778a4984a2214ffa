"""TLS inside every tunnel, with certificates bound to node keys (DESIGN.md §6.4).

Each node makes a self-signed X.509 certificate for its own Ed25519 node key when it starts.
Both ends of a tunnel present theirs (TLS 1.3, mutual); a certificate is taken for what it
proves — possession of a key — and after the handshake each side checks that the peer's key is
the signing key of the operator-signed Node record it expected. A relaying super-node sees
only ciphertext.

A tunnel stream starts in the clear with a gate: the dialling side sends its 32-byte one-time
token, the listening side (tunnel-node or relay) answers one byte, GATE_OPEN, once the token
holds, and only then does TLS start — so no TLS byte is ever read by the gate.
"""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLContextFactory
from zope.interface import implementer

TOKEN_SIZE = 32
GATE_OPEN = b"\x00"


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
        # handshake against the peer's operator-signed Node record (peer_key_matches).
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


class GateListener:
    """The listening side of a gate (tunnel port, relay port): gathers the dialler's token."""

    _gathered = b""

    def read_token(self, data):
        """The token once it is whole, None until then; anything after it before our answer
        breaks the protocol and aborts the connection."""
        self._gathered += data
        if len(self._gathered) < TOKEN_SIZE:
            return None
        if len(self._gathered) > TOKEN_SIZE:
            self.transport.abortConnection()
            return None
        return self._gathered


class GateDialer:
    """The dialling side of a gate: sends `gate_token` once connected, and after the one-byte
    go-ahead calls `gate_opened(rest)` (rest: TLS bytes that came with it); what comes after
    that is TLS plaintext, deframed."""

    gate_token = None
    gate_seconds = 10.0
    _through = False

    def connectionMade(self):
        self.setTimeout(self.gate_seconds)
        self.transport.write(self.gate_token)

    def dataReceived(self, data):
        if self._through:
            return self.deframe(data)
        if data[:1] != GATE_OPEN:
            return self.transport.abortConnection()
        self._through = True
        self.gate_opened(data[1:])


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
class HandshakeWatch:
    """Mixed into a protocol that runs TLS: calls `tls_verified()` once the peer proved the
    key in `self.expected_key`, else aborts the connection and calls `tls_refused(reason)`."""

    expected_key = None

    def handshakeCompleted(self):
        if peer_key(self.transport) != self.expected_key:
            self.tls_refused("the peer's certificate is not its Node record's key")
            self.transport.abortConnection()
            return
        self.tls_verified()

    def tls_verified(self):
        raise NotImplementedError

    def tls_refused(self, reason):
        raise NotImplementedError
