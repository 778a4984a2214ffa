"""RPC frames over TCP or TLS streams when UDP gets no answers (DESIGN.md §4, seed 001 §5.5):
the client side (one stream per peer address, opened on demand) and the fallback port's
listener, which tells TLS (RPC frames inside) from a relay leg by the first byte; on an
operator, TLS whose first bytes are an HTTP request is the enrollment API."""

import collections

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from meshnode.core import ports
from meshnode.errors import StartupError
from meshnode.rpc.protocol import RPCStreamProtocol
from meshnode.streams import tunnel_tls
from meshnode.streams.proxy import Dialer, hand_over

_log = Logger()

TLS_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello record
# Inside TLS, the first byte of an HTTP request is its method's; an RPC frame's is the high
# byte of its u16 length, at most frame.MAX_DATAGRAM >> 8 (4).
HTTP_METHOD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
CONNECT_SECONDS = 3.0
QUEUE_LIMIT = 64  # frames waiting for a stream to connect; more are dropped, as UDP would


def relay_token_allowed(token):
    """A relay token must not look like TLS, so the fallback port can carry both."""
    return token[0] != TLS_HANDSHAKE


class _Stream:
    __slots__ = ("protocol", "queue")

    def __init__(self):
        self.protocol = None
        self.queue = collections.deque(maxlen=QUEUE_LIMIT)


class StreamCarrier:
    """The client side: sends frames to a peer address over TCP to that address ("tcp") or
    over TLS to its host's fallback port ("tls"); answers come back on the same stream."""

    def __init__(self, reactor, receive, tls_context, fallback_port, drops, dialer=None):
        self._reactor = reactor
        self.dialer = Dialer(reactor) if dialer is None else dialer  # TLS: maybe by proxy
        self._receive = receive
        self._tls_context = tls_context  # → a context factory (made when first needed)
        self.fallback_port = fallback_port
        self._drops = drops
        self._streams = {}  # (mode, address) → _Stream

    def send(self, mode, datagram, address):
        key = (mode, address)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream()
            self._open(mode, address, stream)
        if stream.protocol is not None:
            stream.protocol.sendString(datagram)
        else:
            if len(stream.queue) == QUEUE_LIMIT:
                self._drops[f"{mode}_queue_full"] += 1  # the oldest goes, as UDP would lose it
            stream.queue.append(datagram)

    def _open(self, mode, address, stream):
        host, port = address
        if mode == "tls":
            where = self.dialer.tls_endpoint(host, self.fallback_port, self._tls_context(),
                                             CONNECT_SECONDS)
        else:
            where = endpoints.TCP4ClientEndpoint(self._reactor, host, port,
                                                 timeout=CONNECT_SECONDS)
        factory = protocol.Factory.forProtocol(
            lambda: RPCStreamProtocol(self._receive, address, self._lost))
        d = where.connect(factory)

        def connected(built):
            if self._streams.get((mode, address)) is not stream:
                built.transport.loseConnection()  # closed meanwhile
                return
            stream.protocol = built
            built.key = (mode, address)
            while stream.queue:
                built.sendString(stream.queue.popleft())

        def failed(failure):
            if self._streams.get((mode, address)) is stream:
                del self._streams[(mode, address)]
            self._drops[f"{mode}_connect_failed"] += len(stream.queue) or 1

        d.addCallbacks(connected, failed)

    def _lost(self, built):
        key = getattr(built, "key", None)
        stream = self._streams.get(key)
        if stream is not None and stream.protocol is built:
            del self._streams[key]

    def close(self, keep=None):
        """Close every stream (but those of mode `keep`)."""
        for key, stream in list(self._streams.items()):
            if key[0] != keep:
                del self._streams[key]
                if stream.protocol is not None:
                    stream.protocol.transport.loseConnection()

    def streams(self):
        return sorted(f"{mode} {host}:{port}" for (mode, (host, port)), stream
                      in self._streams.items() if stream.protocol is not None)


class FallbackFactory(protocol.Factory):
    """The fallback port's listener (443 by default, on super-nodes and operators): TLS
    carries RPC frames, or on an operator (`web()` → its enrollment Site) the enrollment API
    when what comes inside is HTTP; anything else is a relay leg, handed to
    `relay_gate()` (a protocol) when this node relays, else closed."""

    def __init__(self, receive, tls_context, relay_gate, web=lambda: None):
        self.receive = receive
        self.tls_context = tls_context
        self.relay_gate = relay_gate  # → a new gate protocol, or None
        self.web = web  # → the Site served to HTTP inside TLS, or None

    def buildProtocol(self, address):
        sniffer = _Sniffer()
        sniffer.factory = self
        return sniffer


class _Sniffer(protocol.Protocol):
    """Reads the first byte, then hands the connection to the protocol it belongs to."""

    def dataReceived(self, data):
        if data[0] == TLS_HANDSHAKE:
            site = self.factory.web()
            inner = (RPCStreamProtocol(self.factory.receive) if site is None
                     else _HTTPOrFrames(site, self.factory.receive))
            hand_over(self.transport, inner)
            tunnel_tls.start_tls(inner, self.factory.tls_context(), True, data)
            return
        gate = self.factory.relay_gate()
        if gate is None:
            self.transport.abortConnection()
            return
        hand_over(self.transport, gate, data)


class _HTTPOrFrames(protocol.Protocol):
    """Inside TLS on an operator's fallback port: by the first byte, an HTTP request for the
    enrollment `site`, or RPC frames for `receive`; that protocol gets the stream from then
    on."""

    def __init__(self, site, receive):
        self._site = site
        self._receive = receive
        self._inner = None

    def dataReceived(self, data):
        if self._inner is None:
            if data[0] in HTTP_METHOD_BYTES:
                self._inner = self._site.buildProtocol(self.transport.getPeer())
            else:
                self._inner = RPCStreamProtocol(self._receive)
            self._inner.makeConnection(self.transport)
        self._inner.dataReceived(data)

    def connectionLost(self, reason):
        if self._inner is not None:
            self._inner.connectionLost(reason)


class FallbackListener(service.Service):
    """The fallback port of super-nodes and operators, for nodes behind firewalls that pass
    only TLS on 443: RPC frames (to `receive`), relay legs (`relay_leg()` → a protocol, or
    None when this node relays nothing) and, on an operator, its enrollment API (`web()` → its
    Site, with `tls` its certificate's context). A port we may not bind only costs those nodes
    the fallback, so it is a warning, not a start-up failure."""

    name = "fallback-listener"

    def __init__(self, *, reactor, port, interface, receive, tls, relay_leg=lambda: None,
                 web=lambda: None):
        self._reactor = reactor
        self._requested_port = port
        self._interface = interface
        self._factory = FallbackFactory(receive, tls, relay_leg, web)
        self._listening = None
        self._tried = False

    @property
    def port(self):
        return self._listening.getHost().port if self._listening is not None else None

    def privilegedStartService(self):
        self._listen()  # before twistd drops privileges: 443 needs them
        service.Service.privilegedStartService(self)

    def startService(self):
        self._listen()
        service.Service.startService(self)

    def _listen(self):
        if self._tried:
            return
        self._tried = True
        try:
            self._listening = ports.listen_tcp(self._reactor, self._requested_port,
                                               self._factory, self._interface, "fallback TLS")
        except StartupError as e:
            _log.warn("no TLS fallback: {reason}", reason=e)
        else:
            _log.info("RPC over TLS{web} and relay legs on fallback port {port}",
                      port=self.port, web=", enrollment" if self._factory.web() else "")

    def stopService(self):
        service.Service.stopService(self)
        listening, self._listening, self._tried = self._listening, None, False
        if listening is not None:
            return defer.maybeDeferred(listening.stopListening)
        return None

