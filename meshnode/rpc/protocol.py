"""Transports for RPC frames: UDP datagrams, and the same frames u16-length-prefixed over TCP.

These classes only move bytes: each received frame goes to `receive(data, source, send)`,
where `send(data, address)` answers on the transport the frame came from.
"""

from twisted.internet import protocol
from twisted.protocols.basic import Int16StringReceiver

from meshnode.rpc.frame import MAX_DATAGRAM


class RPCDatagramProtocol(protocol.DatagramProtocol):
    def __init__(self, receive):
        self._receive = receive

    def datagramReceived(self, data, address):
        self._receive(data, address, self.send)

    def send(self, data, address):
        self.transport.write(data, address)


class RPCStreamProtocol(Int16StringReceiver):
    """One TCP (or TLS) connection carrying length-prefixed frames both ways."""

    MAX_LENGTH = MAX_DATAGRAM

    def __init__(self, receive):
        self._receive = receive

    def connectionMade(self):
        peer = self.transport.getPeer()
        self._address = (peer.host, peer.port)

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
