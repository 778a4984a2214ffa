"""NodeInfo announcements: every node tells its domain's DHT replicas where it is.

A NodeInfo (addresses, RPC port, observed endpoints, NAT behaviour, locations, roles) is
signed by the node itself and put to every replica of its domain's partition every 5 minutes
and whenever it changes. The observed endpoints are what two replicas answer to WhoAmI, and
give the NAT behaviour (equal mapped endpoints: endpoint-independent; different: symmetric);
a STUN server, when configured, tells filtering too (RFC 5780); a UPnP mapping of the RPC port
is announced as the first address.
"""

import socket

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.logger import Logger

from meshnode import records
from meshnode.config import unspecified
from meshnode.core import periodic
from meshnode.core.dht import PutResult
from meshnode.nat import stun
from meshnode.nat.rules import nat_behaviour
from meshnode.rpc.messages import PutRecord, Stored, WhoAmI, YouAre
from meshnode.rpc.service import RPCError
from meshnode.wire import Endpoint

_log = Logger()

ANNOUNCE_SECONDS = 300.0
# RFC 5780 discovery opens the NAT towards the server's other address for a while; run
# closer together, a second discovery would take that for endpoint-independent filtering.
STUN_SECONDS = 240.0
RETRY_SECONDS = 15.0  # a replica asked for WhoAmI did not answer: look again this soon
# No replica took our NodeInfo (none placed where our list says, or none answered): the list
# is read again and the NodeInfo put again after this long, doubled each time up to the last.
NOT_TAKEN_RETRY_SECONDS = (2.0, 4.0, 8.0, 16.0, 32.0, 60.0)


def outbound_address(towards):
    """The local address this host would use to reach `towards` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in towards[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(towards)
        except OSError:
            return None
        return probe.getsockname()[0]


class ReachabilityService(service.MultiService):
    """Where and how this node is reached: its addresses, what two replicas see of it
    (WhoAmI), its NAT's behaviour (and STUN's report), announced as a signed NodeInfo to the
    replicas of its partition every ANNOUNCE_SECONDS and whenever something in it changes
    (`reannounce`, `enrollment_changed`). `locations()`: the location ids to announce."""

    name = "reachability"

    def __init__(self, *, identity, rpc, directory, clock, listen_address="", stun=None,
                 stun_server=None, port_mapper=None, locations=tuple):
        super().__init__()
        self._identity_service = identity
        self._rpc = rpc
        self._directory = directory
        self._clock = clock
        self._listen_address = listen_address
        self._stun = stun  # a StunClient on the RPC's own socket
        self._stun_server = stun_server
        self._stun_at = float("-inf")
        self.stun_report = None
        self.stun_error = None
        self._port_mapper = port_mapper
        self.locations = locations
        self.last_result = None
        self._retry = None
        self._unanswered = 0
        self._not_taken = 0  # announcements in a row that no replica took
        self._announced_to = frozenset()  # the replicas the last NodeInfo went to
        self.seen = []
        periodic.every(ANNOUNCE_SECONDS, self.announce, clock,
                       "NodeInfo announcement").setServiceParent(self)

    def stopService(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return super().stopService()

    def enrollment_changed(self, enrollment):
        self.reannounce()  # a new domain or Node record: announce at once

    def reannounce(self):
        """Something in our NodeInfo changed (a UPnP mapping came or went): announce now."""
        if self.running:
            periodic.guarded(self.announce, "NodeInfo announcement")

    def list_changed(self, listed):
        """The super-node list changed (wired to the directory): when our partition's
        replicas are not those our NodeInfo went to, the new ones get it now."""
        if not self._rpc.enrolled:
            return
        placed = frozenset(replica.node_id for replica
                           in listed.holders(records.partition_of(self._rpc.domain)))
        if placed and not placed <= self._announced_to:
            self.reannounce()

    def _retry_in(self, seconds):
        """Announce again in `seconds`, or sooner if a retry is due sooner already."""
        if self._retry is not None and self._retry.active():
            if self._retry.getTime() <= self._clock.seconds() + seconds:
                return
            self._retry.cancel()
        self._retry = self._clock.callLater(seconds, self.reannounce)

    def _went_nowhere(self, why):
        """No replica took our NodeInfo: read the list again and put it again soon, later
        each time (NOT_TAKEN_RETRY_SECONDS)."""
        _log.warn("no replica took our NodeInfo: {why}", why=why)
        self._retry_in(NOT_TAKEN_RETRY_SECONDS[min(self._not_taken,
                                                   len(NOT_TAKEN_RETRY_SECONDS) - 1)])
        self._not_taken += 1

    def addresses(self):
        """Where to reach our RPC port: its UPnP mapping first, then our own address."""
        address = self._listen_address
        if unspecified(address) and self._directory.operator_address is not None:
            address = outbound_address(self._directory.operator_address)
        mapped = None
        if self._port_mapper is not None:
            mapped = self._port_mapper.mapped("UDP", self._rpc.port)
        return ([Endpoint(*mapped)] if mapped else []) + (
            [Endpoint(address, self._rpc.port)] if address else [])

    def nat(self, seen):
        """Our NAT behaviour: STUN's answer when it had one, else the replicas' WhoAmI."""
        return nat_behaviour(self.addresses(), seen, self.stun_report)

    def node_info(self, seen=()):
        """This node's NodeInfo as it is now (unsigned); `seen`: the endpoints replicas
        answered to WhoAmI."""
        addresses = self.addresses()
        observed = list(dict.fromkeys(seen))[:records.NodeInfo.ENDPOINT_LIMIT]
        return records.NodeInfo(self._rpc.domain, self._rpc.node_id, addresses, self._rpc.port,
                                observed, self.nat(seen), self.locations(),
                                self._rpc.roles, self._rpc.now_ms())

    @defer.inlineCallbacks
    def _observe(self, replicas):
        """The endpoints two replicas (on different hosts when there are such; the operator
        when there is one replica) see our datagrams come from, as many as answer."""
        if len({replica.node_id for replica in replicas}) < 2:
            try:
                operator = yield self._directory.operator_replica()
            except RPCError:
                operator = None
            if operator is not None and operator.node_id not in {r.node_id for r in replicas}:
                replicas = list(replicas) + [operator]
        ordered = sorted(replicas, key=lambda r: r.address[0])
        chosen = list({replica.address[0]: replica for replica in ordered}.values())[:2]
        chosen += [r for r in ordered if r not in chosen][:2 - len(chosen)]
        answers = yield defer.DeferredList(
            [self._directory.call(replica, WhoAmI(), YouAre) for replica in chosen],
            consumeErrors=True)
        self.seen = [answer.endpoint for ok, answer in answers if ok]
        self._unanswered = len(chosen) - len(self.seen)
        return self.seen

    @defer.inlineCallbacks
    def _discover(self):
        """RFC 5780 behaviour discovery with the configured STUN server, from the RPC socket
        (at most every STUN_SECONDS)."""
        if (self._stun is None or self._stun_server is None
                or self._clock.seconds() - self._stun_at < STUN_SECONDS):
            return
        self._stun_at = self._clock.seconds()
        try:
            server = yield self._rpc.resolve(self._stun_server)
            self.stun_report = yield stun.discover(self._stun, server,
                                                   local=self.addresses())
            self.stun_error = None
        except (stun.StunError, DNSLookupError) as e:
            self.stun_report, self.stun_error = None, str(e) or type(e).__name__
            _log.info("STUN with {server} failed: {reason}", server=self._stun_server,
                      reason=self.stun_error)

    def status(self):
        """The announcer's part of `meshnode status`: what replicas see of this node."""
        status = {"observed": [str(e) for e in dict.fromkeys(self.seen)],
                  "nat": self.nat(self.seen).name.lower(),
                  "addresses": [str(e) for e in self.addresses()]}
        if self._stun_server is not None:
            report = self.stun_report
            status["stun"] = {"server": str(Endpoint(*self._stun_server)),
                              "error": self.stun_error,
                              "mapped": report and str(report.mapped),
                              "mapping": report and str(report.mapping),
                              "filtering": report and str(report.filtering)}
        return status

    @defer.inlineCallbacks
    def announce(self):
        """Sign a fresh NodeInfo and put it to every replica → {replica id: Stored or the
        failure's message}."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return None
        if self._not_taken:
            yield self._directory.recheck_list()  # the last went nowhere: the list is stale?
        try:
            replicas = yield self._directory.replicas()
        except RPCError as e:
            self._went_nowhere(e)
            raise
        observed = yield self._observe(replicas)
        yield self._discover()
        if self._unanswered:
            self._retry_in(RETRY_SECONDS)
        if all(self._rpc.trust.is_operator(replica.node_id) for replica in replicas):
            # No super-node placed when we looked, seconds ago (STUN): one placed since has
            # taken the range from the operator, which would meet our put with silence.
            yield self._directory.recheck_list()
            replicas = yield self._directory.replicas()
        signed = self._identity_service.identity.sign(self.node_info(observed))
        results = yield defer.DeferredList(
            [self._directory.call(replica, PutRecord(signed), Stored) for replica in replicas],
            consumeErrors=True)
        self.last_result = {replica.node_id.hex(): (answer if ok else answer.getErrorMessage())
                            for replica, (ok, answer) in zip(replicas, results)}
        self._announced_to = frozenset(replica.node_id for replica, (ok, answer)
                                       in zip(replicas, results)
                                       if ok and answer.result != PutResult.REFUSED)
        if self._announced_to:
            self._not_taken = 0
        else:
            self._went_nowhere(self.last_result)
        return self.last_result
