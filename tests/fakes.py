"""Fakes for unit tests: an in-memory datagram network and a reactor that can listen on it.

Twisted's MemoryReactorClock has no listenUDP; FakeReactor adds one whose ports deliver to each
other through a FakeNetwork when the test calls `network.flush()`.
"""

import collections

from twisted.internet import address
from twisted.internet.testing import MemoryReactorClock


class FakeUDPPort:
    def __init__(self, network, host, port, protocol):
        self.network = network
        self.host = host
        self.port = port
        self.protocol = protocol
        self.sent = []

    def write(self, data, destination):
        self.sent.append((data, destination))
        self.network.queue.append(((self.host, self.port), destination, data))

    def getHost(self):
        return address.IPv4Address("UDP", self.host, self.port)

    def stopListening(self):
        self.network.ports.pop((self.host, self.port), None)
        self.protocol.doStop()


class FakeNetwork:
    """Datagrams queued by fake ports, delivered in order by `flush`."""

    def __init__(self):
        self.ports = {}
        self.queue = collections.deque()
        self.delivered = 0
        self._next_port = 40000

    def bind(self, host, port, protocol):
        if port == 0:
            self._next_port += 1
            port = self._next_port
        udp = FakeUDPPort(self, host, port, protocol)
        self.ports[(host, port)] = udp
        protocol.makeConnection(udp)
        return udp

    def flush(self, limit=10000):
        """Deliver queued datagrams (and those their delivery causes); returns the count."""
        count = 0
        while self.queue and count < limit:
            source, destination, data = self.queue.popleft()
            port = self.ports.get(tuple(destination))
            if port is not None:
                port.protocol.datagramReceived(data, source)
            count += 1
        self.delivered += count
        return count


class FakeReactor(MemoryReactorClock):
    """A MemoryReactorClock whose listenUDP binds on a FakeNetwork at `host`."""

    def __init__(self, network, host="127.0.0.1"):
        super().__init__()
        self.network = network
        self.host = host

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        return self.network.bind(interface or self.host, port, protocol)
