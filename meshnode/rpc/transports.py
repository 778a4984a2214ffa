"""How the RPC's frames travel: UDP datagrams from the RPC socket, or TCP or TLS streams (the
stream carrier) while the firewall fallback (nat/fallback.py) finds UDP unanswered."""

from twisted.internet import endpoints, protocol

from meshnode.wire import Endpoint

MODES = ("udp", "tcp", "tls")


class Transports:
    """The node's current mode and the way to send a frame to a peer: back the way its frames
    last came (UDP, or a stream it opened to us), else by the mode."""

    def __init__(self, send_udp, carrier):
        self._send_udp = send_udp
        self.carrier = carrier
        self.mode = "udp"

    def use(self, mode, peers):
        """Carry our frames by `mode` from now on: the streams of other modes close, and
        `peers` are reached the new way until they answer."""
        self.mode = mode
        self.carrier.close(keep=mode)
        for peer in peers:
            peer.address = peer.via = None

    def sender(self, peer, address, mode=None):
        """→ `send(datagram, address)` reaching `peer` (or None: first contact) at `address`;
        `mode` forces a transport (probes)."""
        if mode is None:
            if peer is not None and peer.via is not None and peer.address == address:
                return peer.via
            mode = self.mode
        if mode == "udp":
            return self._send_udp
        carrier = self.carrier
        return lambda datagram, address: carrier.send(mode, datagram, address)

    def relay_endpoint(self, relay):
        """Where this node reaches a relay announced at `relay`: there, or at its host's
        fallback port while only TLS there passes the firewall."""
        if self.mode == "tls":
            return Endpoint(relay.host, self.carrier.fallback_port)
        return relay

    def dial(self, host, port, make_protocol, timeout):
        """A TCP stream to host:port (a relay, a tunnel-node) for `make_protocol()` → Deferred
        firing with that protocol once connected: through the HTTP proxy, when there is one,
        while only TLS on the fallback port passes (mode "tls"), else straight."""
        dialer = self.carrier.dialer
        if self.mode == "tls" and dialer.proxied(host):
            return endpoints.connectProtocol(dialer.endpoint(host, port, timeout),
                                             make_protocol())
        return protocol.ClientCreator(dialer.reactor, make_protocol).connectTCP(
            host, port, timeout=timeout)

    def close(self):
        self.carrier.close()
