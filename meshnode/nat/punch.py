"""TCP hole punching for tunnels (DESIGN.md §7): both sides connect to each other's public
endpoint from a port they also listen or connected on, so their SYNs cross and each NAT lets
the other's in (TCP simultaneous open, measured in NATLAB.md). Against a symmetric NAT, whose
ports cannot be known, birthday probing: its side opens many connections (many mappings),
the other side's SYNs go to many ports of its address until one meets a mapping."""

import itertools
import socket

from twisted.internet import defer, error, protocol, task, tcp

from meshnode.nat.rules import (BIRTHDAY_SECONDS, PUNCH_SECONDS, SPRAY_PER_TICK,
                                TCP_ATTEMPT_LIMIT, TCP_RECONNECT_SECONDS,
                                TCP_SPRAY_ATTEMPT_SECONDS, TICK_SECONDS, PunchFailed)


def reserve_port(interface=""):
    """A TCP socket bound (both reuse options) to a free port: holds the number until a
    Puncher binds it too; close it then."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((interface, 0))
    return held


class Puncher(protocol.ClientFactory):
    """Connects from local port `local_port` to `peer` (host, port) until a connection
    stands, `budget` seconds pass, or `stop()`. One attempt is kept open (the kernel's own
    SYN retransmissions carry it); a refused one is repeated at once, at most TCP_ATTEMPT_LIMIT
    times. `build()` makes the connection's protocol. `done` fires with the protocol as it
    is built (before its connectionMade), or fails with PunchFailed."""

    def __init__(self, reactor, local_port, peer, build, budget=PUNCH_SECONDS, interface=""):
        self._reactor = reactor
        self._local_port = local_port
        self._binding = tcp.makeBinding(interface, local_port, True, True)
        self._peer = peer
        self._build = build
        self._deadline = reactor.seconds() + budget
        self._connector = None
        self._retry = None
        self.attempts = 0
        self.done = defer.Deferred()

    def start(self):
        self._attempt()
        return self.done

    def _attempt(self):
        self._retry = None
        left = self._deadline - self._reactor.seconds()
        if left <= 0 or self.attempts >= TCP_ATTEMPT_LIMIT:
            return self._fail(f"no connection to {self._peer[0]}:{self._peer[1]} after "
                              f"{self.attempts} attempts")
        self.attempts += 1
        self._connector = tcp.Connector(self._peer[0], self._peer[1], self, left,
                                        self._binding, self._reactor)
        self._connector.connect()

    def buildProtocol(self, address):
        built = self._build()
        built.factory = self
        if not self.done.called:
            self.done.callback(built)
        return built

    def clientConnectionFailed(self, connector, reason):
        if self.done.called:
            return
        if reason.check(error.TimeoutError, error.UserError):  # budget spent, or stop()
            return self._fail(f"no connection to {self._peer[0]}:{self._peer[1]}")
        if reason.check(error.ConnectBindError):
            return self._fail(f"cannot bind port {self._local_port}: "
                              f"{reason.getErrorMessage()}")
        self._retry = self._reactor.callLater(TCP_RECONNECT_SECONDS, self._attempt)

    def stop(self):
        """Give up (another connection won): the pending attempt is cancelled."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._fail("stopped")
        if self._connector is not None and self._connector.state == "connecting":
            self._connector.stopConnecting()

    def _fail(self, reason):
        if not self.done.called:
            self.done.errback(PunchFailed(reason))


class Sprayer(protocol.ClientFactory):
    """Birthday probing's other side: from `local_port`, connects to many `ports` of `host`
    (SPRAY_PER_TICK each TICK_SECONDS, each attempt kept TCP_SPRAY_ATTEMPT_SECONDS) until
    one meets a connection the far side opened, or `budget` seconds pass. `done` as for
    Puncher. Attempts under way when one connects are left to end by themselves: cancelling
    one the kernel has just connected would reset the far side's end of it, which the far
    side may have taken for the winner."""

    def __init__(self, reactor, local_port, host, ports, build, budget=BIRTHDAY_SECONDS,
                 interface=""):
        self._reactor = reactor
        self._binding = tcp.makeBinding(interface, local_port, True, True)
        self._host = host
        self._ports = iter(ports)
        self._build = build
        self._budget = budget
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor
        self._timeout = None
        self.attempts = 0
        self.done = defer.Deferred()

    def start(self):
        self._loop.start(TICK_SECONDS)
        self._timeout = self._reactor.callLater(self._budget, self._fail,
                                                "no probe met a connection of the far side")
        return self.done

    def _tick(self):
        for port in itertools.islice(self._ports, SPRAY_PER_TICK):
            self.attempts += 1
            tcp.Connector(self._host, port, self, TCP_SPRAY_ATTEMPT_SECONDS, self._binding,
                          self._reactor).connect()

    def buildProtocol(self, address):
        built = self._build()
        built.factory = self
        if not self.done.called:
            self.done.callback(built)
            self.stop()
        return built

    def stop(self):
        """No more probes (those under way end within TCP_SPRAY_ATTEMPT_SECONDS)."""
        if self._loop.running:
            self._loop.stop()
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._fail("stopped")

    def _fail(self, reason):
        if not self.done.called:
            self.done.errback(PunchFailed(f"{reason} ({self.attempts} ports of "
                                          f"{self._host} probed)"))
            self.stop()
