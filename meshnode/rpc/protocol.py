"""Transports for RPC frames: UDP datagrams, and the same frames u16-length-prefixed over TCP.

These classes only move bytes: each received frame goes to `receive(data, source, send)`,
where `send(data, address)` answers on the transport the frame came from.
"""

from twisted.internet import protocol
from twisted.protocols.basic import Int16StringReceiver

from meshnode.rpc.frame import MAX_DATAGRAM


class RPCDatagramProtocol(protocol.DatagramProtocol):
    """Datagrams in and out; a datagram the kernel will not send is counted and dropped.
    Datagrams that cannot be RPC frames (those start with 'M') are offered to `side_channel`
    first (STUN shares the socket), when there is one."""

    def __init__(self, receive, drops, side_channel=None):
        self._receive = receive
        self._drops = drops
        self._side_channel = side_channel
        self._sendto = None

    def startProtocol(self):
        # Straight to the socket when there is one: Twisted's write re-validates the address
        # three times per datagram, a fifth of the RPC's per-message cost.
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else self.transport.write

    def datagramReceived(self, data, address):
        if (data[:1] < b"\x40" and self._side_channel is not None
                and self._side_channel.receive(data, address)):
            return
        self._receive(data, address, self.send)

    def send(self, data, address):
        try:
            self._sendto(data, address)
        except OSError:
            # full socket buffer, unreachable or refused peer: UDP loses it, so do we
            self._drops["send_error"] += 1


class RPCStreamProtocol(Int16StringReceiver):
    """One TCP (or TLS) connection carrying length-prefixed frames both ways. `address`: what
    its frames count as coming from (a connection we made: the peer's RPC address; default:
    the connection's far end); `lost`: called with it when the connection ends."""

    MAX_LENGTH = MAX_DATAGRAM

    def __init__(self, receive, address=None, lost=None):
        self._receive = receive
        self._address = address
        self._lost = lost

    def connectionMade(self):
        if self._address is None:
            peer = self.transport.getPeer()
            self._address = (peer.host, peer.port)

    def connectionLost(self, reason):
        if self._lost is not None:
            self._lost(self)

    def stringReceived(self, data):
        self._receive(data, self._address, self.send)

    def lengthLimitExceeded(self, length):
        self.transport.loseConnection()

    def send(self, data, address):
        self.sendString(data)


class RPCStreamFactory(protocol.Factory):
    def __init__(self, receive):
        self._receive = receive

    def buildProtocol(self, address):
        return RPCStreamProtocol(self._receive)
