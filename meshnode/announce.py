"""NodeInfo announcements: every node tells its domain's DHT replicas where it is.

A NodeInfo (addresses, RPC port, observed endpoints, NAT behaviour, locations, roles) is
signed by the node itself and put to the replicas every 5 minutes and whenever it changes.
Built so far: addresses and roles, put to the operator (which serves every partition until
super-nodes exist); observed endpoints, NAT behaviour and locations come with later issues.
"""

import socket

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode import records
from meshnode.records import NatBehaviour
from meshnode.rpc.messages import PutRecord, Stored
from meshnode.wire import Endpoint

_log = Logger()

ANNOUNCE_SECONDS = 300.0


def outbound_address(towards):
    """The local address this host would use to reach `towards` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in towards[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(towards)
        except OSError:
            return None
        return probe.getsockname()[0]


class AnnouncerService(service.MultiService):
    name = "announcer"

    def __init__(self, identity_service, rpc, directory, clock, listen_address):
        super().__init__()
        self._identity_service = identity_service
        self._rpc = rpc
        self._directory = directory
        self._listen_address = listen_address
        self.last_result = None
        timer = internet.TimerService(ANNOUNCE_SECONDS, self._guarded)
        timer.clock = clock
        timer.setServiceParent(self)

    def startService(self):
        self._identity_service.observers.append(self._enrollment_changed)
        super().startService()

    def stopService(self):
        if self._enrollment_changed in self._identity_service.observers:
            self._identity_service.observers.remove(self._enrollment_changed)
        return super().stopService()

    def _enrollment_changed(self, enrollment):
        self._guarded()  # a new domain or Node record: announce at once

    def _guarded(self):
        d = defer.maybeDeferred(self.announce)
        d.addErrback(lambda f: _log.warn("NodeInfo announcement failed: {reason}",
                                         reason=f.getErrorMessage()))
        return d

    def node_info(self):
        """This node's NodeInfo as it is now (unsigned)."""
        address = self._listen_address
        if not address and self._directory.operator_address is not None:
            address = outbound_address(self._directory.operator_address)
        addresses = [Endpoint(address, self._rpc.port)] if address else []
        return records.NodeInfo(self._rpc.domain, self._rpc.node_id, addresses, self._rpc.port,
                                (), NatBehaviour.UNKNOWN, (), self._rpc.roles,
                                self._rpc.now_ms())

    @defer.inlineCallbacks
    def announce(self):
        """Sign a fresh NodeInfo and put it to every replica → their Stored answers."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return None
        replicas = yield self._directory.replicas()  # resolves the operator's address first
        signed = self._identity_service.identity.sign(self.node_info())
        results = []
        for peer, address in replicas:
            results.append((yield self._rpc.call(peer, address, PutRecord(signed), Stored)))
        self.last_result = results
        return results
