"""The tunnel role: a node on the end-devices' LAN opens authorized tunnels to them.

It announces its location ids (meshnode/nat/location.py) in its NodeInfo, keeps the operator's
EndDevice records of its domain, and answers two requests:

* TunnelRequest (direct path): authorize, then hand out the tunnel port's endpoint and a
  one-time token that works once within TOKEN_SECONDS;
* RelayedTunnelRequest from a super-node (relayed path): authorize, dial the relay the
  super-node named with its token, and tell the super-node the outcome, which it passes on;
* Introduction from a super-node (punched path): authorize, connect from the tunnel port to
  the requester's public endpoint while it connects to ours (meshnode/nat/punch.py), and answer
  with our public endpoint and a token as for the relayed path.

Either way the stream then carries TLS with the requester, checked against the requester's
Node record, and is spliced to the device. Authorization (seed appendix C.5): same domain;
the device has an operator-signed EndDevice record at one of this node's locations; the port
is one of its allowed ports; neither side revoked; limits per requesting node, per domain and
in total. The device's address is the one the operator pinned in its record or the one its
MAC has in the neighbour table — never an address named in a request. Every refusal is logged
with its reason and counted.
"""

import collections
import os

import attrs
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode import records
from meshnode.config import unspecified
from meshnode.core import periodic, ports
from meshnode.core.reachability import outbound_address
from meshnode.nat import location, punch
from meshnode.nat.rules import spray_ports
from meshnode.rpc.messages import (DEVICES_SEEN_LIMIT, Command, DevicesSeen,
                                   ForwardedTunnelOpened, Stored, TunnelOpened, TunnelResult)
from meshnode.rpc.service import any_domain, same_domain
from meshnode.streams import gate, tunnel_tls
from meshnode.streams.splice import Leg
from meshnode.wire import Endpoint

_log = Logger()

TOKEN_SECONDS = 10.0
DEVICE_REFRESH_SECONDS = 60.0  # the last resort: news of a change (RecordsChanged) comes first
MISS_REFRESH_SECONDS = 2.0  # a request for an unknown device reads them again at most this often
MISS_WAIT_SECONDS = 1.0  # and waits this long for that read before it answers
DEVICE_REPORT_SECONDS = 300.0
KEEPALIVE_SECONDS = 25.0  # under the shortest common NAT UDP timeout
DIAL_TIMEOUT_SECONDS = 5.0


@attrs.define
class Limits:
    per_node: int = 16
    per_domain: int = 256
    total: int = 1024
    idle_timeout: float = 600.0


@attrs.define(kw_only=True)
class TunnelSettings:
    port: int = 7401  # the tunnel port (0: a free one)
    direct: bool = True  # False: no tunnel port, every tunnel goes through a relay
    limits: Limits = attrs.Factory(Limits)


class Refused(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class _Grant:
    requester: records.Node
    address: str
    port: int
    expires: float
    path: str = "direct"
    puncher: object = None  # the punched path's own connection attempts, stopped once used
    device_id: bytes = None


class TunnelCounts:
    """Open tunnels per requesting node, per domain and in total, against Limits."""

    def __init__(self, limits):
        self.limits = limits
        self.per_node = collections.Counter()
        self.per_domain = collections.Counter()
        self.total = 0

    def check(self, node):
        if self.total >= self.limits.total:
            raise Refused("limit_total")
        if self.per_domain[node.domain] >= self.limits.per_domain:
            raise Refused("limit_domain")
        if self.per_node[node.node_id] >= self.limits.per_node:
            raise Refused("limit_node")

    def opened(self, node):
        self.total += 1
        self.per_domain[node.domain] += 1
        self.per_node[node.node_id] += 1

    def closed(self, node):
        self.total -= 1
        for counter, key in ((self.per_domain, node.domain), (self.per_node, node.node_id)):
            counter[key] -= 1
            if not counter[key]:
                del counter[key]


class TunnelService(service.MultiService):
    name = "tunnel"

    def __init__(self, core, settings):
        super().__init__()
        self._identity_service = core.identity
        self._rpc = core.rpc
        self._directory = core.directory
        self._reachability = core.reachability
        self._clock = core.reactor
        self._listen_address = core.listen_address
        self._lan = core.lan
        self._tls = core.tls
        self._port_mapper = core.port_mapper
        self._requested_port = settings.port
        self.direct = settings.direct
        self.limits = settings.limits
        self.counts = TunnelCounts(self.limits)
        self.refusals = collections.Counter()
        self.opened = collections.Counter()  # by path
        self.closed_by = collections.Counter()  # open tunnels closed, by reason
        self._open = {}  # the requester's leg of each open tunnel → its grant
        self.devices = {}
        self._grants = {}
        self._last_miss_refresh = float("-inf")
        self._reading = None  # the Deferreds waiting for a read of the end-devices under way
        self._port = None
        for interval, work, what in (
                (DEVICE_REFRESH_SECONDS, self.refresh_devices, "reading the end-devices"),
                (KEEPALIVE_SECONDS, self._keep_alive, "keeping NAT mappings open"),
                (DEVICE_REPORT_SECONDS, self.report_devices, "reporting unregistered devices")):
            periodic.every(interval, work, self._clock, what).setServiceParent(self)

    # -- wiring --------------------------------------------------------------------------------

    def privilegedStartService(self):
        self._listen()
        super().privilegedStartService()

    def _listen(self):
        if self.direct and self._port is None:
            factory = protocol.Factory.forProtocol(lambda: _Gate(self))
            # punch connections leave from this port too
            self._port = ports.listen_tcp(self._clock, self._requested_port, factory,
                                          self._listen_address, "tunnel TCP", reuse_port=True)

    def startService(self):
        self._listen()
        self._rpc.register(Command.TUNNEL_REQUEST, self._once_known(self._tunnel_request),
                           same_domain)
        placed = self._directory.from_super_nodes
        self._rpc.register(Command.RELAYED_TUNNEL_REQUEST,
                           placed(self._once_known(self._forwarded_request)), any_domain)
        self._rpc.register(Command.INTRODUCTION, placed(self._once_known(self._introduction)),
                           any_domain)
        _log.info("tunnel port {port}; locations {locations}", port=self.port,
                  locations=[i.hex()[:16] for i in self.locations()])
        super().startService()

    def stopService(self):
        for command in (Command.TUNNEL_REQUEST, Command.RELAYED_TUNNEL_REQUEST,
                        Command.INTRODUCTION):
            self._rpc.unregister(command)
        stopping = super().stopService()
        port, self._port = self._port, None
        if port is not None:
            return defer.gatherResults([defer.maybeDeferred(port.stopListening),
                                        defer.maybeDeferred(lambda: stopping)])
        return stopping

    @property
    def port(self):
        return self._port.getHost().port if self._port is not None else None

    def locations(self):
        return self._lan.location_ids()

    def enrollment_changed(self, enrollment):
        self.refresh_soon()  # just enrolled: learn the devices at once

    def refresh_soon(self):
        """Learn the devices now (enrolled, or the RPC found a way out again)."""
        if self.running:
            periodic.guarded(self.refresh_devices, "reading the end-devices")

    def records_changed(self, news, told_by):
        """The operator or a super-node says our domain's end-devices or revocations changed
        (wired to the directory's news): read them from whoever told us, which has them."""
        if self.running and news.domain == self._rpc.domain:
            periodic.guarded(lambda: self.refresh_devices(first=told_by),
                             "reading the changed end-devices")

    def refresh_devices(self, first=None, wanted=None):
        """Read the domain's end-devices (from `first` when given; until a source's pass the
        test `wanted`, when given) → Deferred fired when read; callers while a read is under
        way wait for that one."""
        if self._reading is not None:
            waiting = defer.Deferred()
            self._reading.append(waiting)
            return waiting
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return defer.succeed(None)
        self._reading = []
        d = self._directory.end_devices(first=first, wanted=wanted)

        def done(result):
            if not isinstance(result, Failure) and (
                    self._rpc.domain not in self._rpc.trust.suspended):
                # (While our domain is suspended none are handed out: ours are kept.)
                gone = set(self.devices) - set(result)
                self.devices = result
                if gone:  # removed by the operator: their open tunnels close
                    self._close_where(lambda grant: grant.device_id in gone, "device_removed")
            waiting, self._reading = self._reading, None
            for one in waiting:
                one.callback(None)
            return result if isinstance(result, Failure) else None

        return d.addBoth(done)

    def _once_known(self, handler):
        """`handler` for a request naming a device, run once the device is known (_known)."""
        def handle(incoming):
            known = self._known(incoming.message.device_id)
            return known.addCallback(lambda _: handler(incoming))
        return handle

    def _known(self, device_id):
        """Fires once `device_id` is among our devices, or when reading them again (at most
        every MISS_REFRESH_SECONDS, waited for at most MISS_WAIT_SECONDS) did not find it: a
        device registered a moment ago is served on the first request for it."""
        if device_id in self.devices:
            return defer.succeed(None)
        now = self._clock.seconds()
        if self._reading is None and now - self._last_miss_refresh < MISS_REFRESH_SECONDS:
            return defer.succeed(None)
        self._last_miss_refresh = now
        waited = defer.Deferred()

        def release(_=None):
            if not waited.called:
                waited.callback(None)

        timer = self._clock.callLater(MISS_WAIT_SECONDS, release)
        periodic.guarded(lambda: self.refresh_devices(wanted=lambda found: device_id in found),
                         "reading the end-devices").addBoth(release)
        return waited.addCallback(lambda _: timer.cancel() if timer.active() else None)

    def _keep_alive(self):
        """Ping the replicas, whose NodeInfo of us names our endpoint: keeps NAT mappings."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return None
        return self._directory.ping_replicas()

    def unregistered_devices(self):
        """{location id: [(MAC, IPv4 address)]} of the neighbours on each location's interface
        that are neither its router nor a registered device (with --location given, none:
        which interface is that LAN is not known)."""
        if self._lan.override is not None:
            return {}
        known = {device.mac for device in self.devices.values()}
        table = location.neighbours(self._lan.read_neighbours())
        found = {}
        for place in self._lan.read_locations():
            seen = [(mac, ip) for ip, mac in sorted(table.get(place.interface, {}).items())
                    if mac not in known and mac != place.gateway_mac]
            if seen:  # two interfaces on one LAN share its location id
                found.setdefault(place.location_id, []).extend(seen)
        return found

    @defer.inlineCallbacks
    def report_devices(self):
        """Tell the operator of unregistered devices on our LANs (`device pending`)."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return
        found = self.unregistered_devices()
        if not found:
            return
        operator = yield self._directory.operator_replica()
        for location_id, seen in found.items():
            # In parts: the same first DEVICES_SEEN_LIMIT each time would hide the rest.
            for start in range(0, len(seen), DEVICES_SEEN_LIMIT):
                answer = yield self._directory.call(
                    operator, DevicesSeen(location_id, seen[start:start + DEVICES_SEEN_LIMIT]),
                    Stored)
                if answer.result:  # not kept: the operator says why
                    _log.info("the operator did not keep our unregistered devices: {reason}",
                              reason=answer.reason)

    # -- authorization -------------------------------------------------------------------------

    def authorize(self, requester, device_id, port):
        """(device address, port) for `requester`, or Refused with the reason."""
        trust = self._rpc.trust
        if requester.domain != self._rpc.domain:
            raise Refused("other_domain")
        if trust.is_revoked(requester.node_id) or trust.is_revoked(self._rpc.node_id):
            raise Refused("revoked")
        device = self.devices.get(device_id)
        if device is None:
            raise Refused("unregistered_device")
        if trust.is_revoked(device.device_id):
            raise Refused("revoked")
        if device.location_id not in self.locations():
            raise Refused("wrong_location")
        if port not in device.ports:
            raise Refused("port_not_allowed")
        address = device.address
        if address is None:
            address = location.mac_to_address(self._lan.read_neighbours(), device.mac)
            if address is None:
                raise Refused("device_not_found")
        self.counts.check(requester)
        return address, port

    def _refuse(self, requester, reason):
        self.refusals[reason] += 1
        _log.info("tunnel refused to {node}: {reason}", node=requester.node_id.hex()[:16],
                  reason=reason)

    # -- the direct path ---------------------------------------------------------------------

    def _tunnel_request(self, incoming):
        message, requester = incoming.message, incoming.node
        if not self.direct:
            self.refusals["direct_disabled"] += 1
            return TunnelOpened(TunnelResult.REFUSED, "direct_disabled")
        try:
            address, port = self.authorize(requester, message.device_id, message.port)
        except Refused as e:
            self._refuse(requester, e.reason)
            return TunnelOpened(TunnelResult.REFUSED, e.reason)
        endpoint = self._tunnel_endpoint(incoming.source[0])
        if endpoint is None:
            self._refuse(requester, "no_address")
            return TunnelOpened(TunnelResult.REFUSED, "no_address")
        token = os.urandom(tunnel_tls.TOKEN_SIZE)
        self._expire_grants()
        self._grants[token] = _Grant(requester, address, port,
                                     self._clock.seconds() + TOKEN_SECONDS,
                                     device_id=message.device_id)
        return TunnelOpened(TunnelResult.OPENED, "", endpoint, token)

    def _tunnel_endpoint(self, requester_host):
        """Where a requester at `requester_host` reaches the tunnel port: the gateway's UPnP
        mapping when it is beyond our router, else our own address."""
        if self._port_mapper is not None and not self._lan.on_link(requester_host):
            mapped = self._port_mapper.mapped("TCP", self.port)
            if mapped is not None:
                return Endpoint(*mapped)
        host = self._listen_address
        if unspecified(host):
            host = outbound_address((requester_host, 1))  # the address the requester reached
        return Endpoint(host, self.port) if host is not None else None

    def _expire_grants(self):
        now = self._clock.seconds()
        for token in [t for t, grant in self._grants.items() if grant.expires <= now]:
            del self._grants[token]

    def redeem(self, token):
        """The grant of a one-time token, or None (unknown, used or expired)."""
        grant = self._grants.pop(token, None)
        if grant is None or grant.expires <= self._clock.seconds():
            self.refusals["bad_token"] += 1
            return None
        if grant.puncher is not None:
            grant.puncher.stop()  # this connection won; the other attempt is not needed
        return grant

    # -- the relayed path --------------------------------------------------------------------

    def _forwarded(self, incoming, requester, request_id, device_id, port):
        """The common part of the relayed and punched paths: (requester Node, device address,
        port, answer) when `requester` (a Signed Node a super-node forwarded) may have the
        device, else None after the refusal was answered. `answer(result, reason, endpoint,
        token)` sends the outcome to the super-node, which passes it on."""
        super_node, super_address = incoming.peer, incoming.source
        back = (requester.record.node_id, request_id[0], request_id[1])

        def answer(result, reason="", endpoint=None, token=None):
            self._rpc.send(super_node, super_address,
                           ForwardedTunnelOpened(result, reason, endpoint, token, back))

        try:
            node = self._rpc.trust.verify(requester, self._rpc.now_ms())
            if not isinstance(node, records.Node):
                raise Refused("bad_requester")
            address, port = self.authorize(node, device_id, port)
        except (records.RecordError, Refused) as e:
            self._refuse(requester.record, e.reason)
            answer(TunnelResult.REFUSED, e.reason)
            return None
        return node, address, port, answer

    def _forwarded_request(self, incoming):
        message = incoming.message
        forwarding = message.forwarding
        if forwarding is None or message.tunnel_node != self._rpc.node_id:
            self._rpc.drops["malformed_forwarding"] += 1
            return None
        authorized = self._forwarded(incoming, forwarding.requester,
                                     (forwarding.requester_endpoint, forwarding.request_id),
                                     message.device_id, message.port)
        if authorized is None:
            return None
        requester, address, port, answer = authorized
        grant = _Grant(requester, address, port, self._clock.seconds() + TOKEN_SECONDS,
                       "relayed", device_id=message.device_id)
        relay = self._rpc.transports.relay_endpoint(forwarding.relay)
        d = self._rpc.transports.dial(relay.host, relay.port,
                                      lambda: _RelayLeg(self, grant, forwarding.token),
                                      DIAL_TIMEOUT_SECONDS)

        def dialled(leg):
            answer(TunnelResult.OPENED, "", relay, forwarding.token)

        def failed(failure):
            self._refuse(requester, "relay_unreachable")
            answer(TunnelResult.REFUSED, "relay_unreachable")

        d.addCallbacks(dialled, failed)
        return None

    # -- the punched path ---------------------------------------------------------------------

    def _introduction(self, incoming):
        message = incoming.message
        if message.back is None or message.tunnel_node != self._rpc.node_id:
            self._rpc.drops["malformed_forwarding"] += 1
            return None
        requester, requester_endpoint, request_id = message.back
        authorized = self._forwarded(incoming, requester, (requester_endpoint, request_id),
                                     message.device_id, message.port)
        if authorized is None:
            return None
        requester, address, port, answer = authorized
        host = self._public_host(incoming.source)
        if not self.direct or host is None:
            reason = "direct_disabled" if not self.direct else "no_address"
            self._refuse(requester, reason)
            answer(TunnelResult.REFUSED, reason)
            return None
        token = os.urandom(tunnel_tls.TOKEN_SIZE)
        self._expire_grants()
        peer = message.endpoint

        def punched_gate():  # TLS as the server, though this side connected too
            return _Gate(self, tls_normal=False)

        if message.birthday:  # behind a symmetric NAT: probe many ports of its address
            puncher = punch.Sprayer(self._clock, self.port, peer.host, spray_ports(),
                                    punched_gate, interface=self._listen_address)
        else:
            puncher = punch.Puncher(self._clock, self.port, (peer.host, peer.port),
                                    punched_gate, interface=self._listen_address)
        self._grants[token] = _Grant(requester, address, port,
                                     self._clock.seconds() + TOKEN_SECONDS, "punched", puncher,
                                     device_id=message.device_id)
        # Its failure is no error: the requester's connection may reach the tunnel port
        # instead (an endpoint-independent filter), or the requester falls back to a relay.
        puncher.start().addErrback(lambda failure: _log.info(
            "punching towards {peer} ended: {reason}", peer=peer,
            reason=failure.getErrorMessage()))
        answer(TunnelResult.OPENED, "", Endpoint(host, self.port), token)
        return None

    def _public_host(self, source):
        """The address the world sees us at: what replicas answered to WhoAmI (the NAT's
        public address), else our own address towards `source`."""
        for endpoint in self._reachability.seen:
            return endpoint.host
        return outbound_address(source)

    # -- streams -------------------------------------------------------------------------------

    def start_tls(self, leg, normal=True, received=b""):
        tunnel_tls.start_tls(leg, self._tls.context(), normal, received)

    def connect_device(self, leg, grant, path):
        """The requester proved its key: dial the device and splice the two."""
        try:
            # Again: tokens handed out together all passed authorize before any opened.
            self.counts.check(grant.requester)
        except Refused as e:
            self._refuse(grant.requester, e.reason)
            leg.transport.loseConnection()
            return
        self.counts.opened(grant.requester)
        leg.counted = True
        dialing = protocol.ClientCreator(self._clock, _DeviceLeg)
        d = dialing.connectTCP(grant.address, grant.port, timeout=DIAL_TIMEOUT_SECONDS)

        def connected(device_leg):
            device_leg.idle_timeout = leg.idle_timeout = self.limits.idle_timeout
            leg.join(device_leg)
            self.opened[path] += 1
            self._open[leg] = grant

        def failed(failure):
            self.refusals["device_unreachable"] += 1
            _log.info("device {address}:{port} unreachable: {reason}", address=grant.address,
                      port=grant.port, reason=failure.getErrorMessage())
            leg.transport.loseConnection()

        d.addCallbacks(connected, failed)

    def closed(self, leg):
        self._open.pop(leg, None)
        if getattr(leg, "counted", False):
            self.counts.closed(leg.grant.requester)

    def revoked(self, ids):
        """(Wired to the RPC's revocation observers.) Open tunnels of revoked nodes or
        devices are closed, and their unused tokens no longer work."""
        self._close_where(lambda grant: grant.requester.node_id in ids
                          or grant.device_id in ids, "revoked")
        for token in [t for t, grant in self._grants.items()
                      if grant.requester.node_id in ids or grant.device_id in ids]:
            del self._grants[token]

    def suspended(self, domain):
        """(Wired to the RPC's suspension observers.) Our own domain suspended: every open
        tunnel closes and no token works; from now on requests are dropped unread."""
        if domain == self._rpc.domain:
            self._close_where(lambda grant: True, "domain_suspended")
            self._grants.clear()

    def _close_where(self, test, reason):
        for leg, grant in list(self._open.items()):
            if test(grant):
                _log.info("closing the tunnel of {node} to {address}:{port}: {reason}",
                          node=grant.requester.name, address=grant.address, port=grant.port,
                          reason=reason)
                self.closed_by[reason] += 1
                leg.transport.abortConnection()

    def status(self):
        return {"port": self.port, "locations": [i.hex() for i in self.locations()],
                "devices": len(self.devices), "open": self.counts.total,
                "opened": dict(self.opened), "refused": dict(self.refusals),
                "closed": dict(self.closed_by)}


class _Gate(tunnel_tls.GatedLeg):
    """A connection to the tunnel port, or punched from it: the requester's one-time token,
    GATE_OPEN, TLS as the server (on a punched connection too, though this side connected:
    `tls_normal` False), then the device. It feeds a gate.ListeningGate and performs its
    actions (gate.IGateActions)."""

    grant = None

    def __init__(self, service, tls_normal=True):
        self.service = service
        self.tls_normal = tls_normal
        self.use_gate(gate.ListeningGate(self))

    def connectionMade(self):
        self.setTimeout(TOKEN_SECONDS)

    def left(self):
        self.handshake.lost()
        self.service.closed(self)

    # -- what the handshake does ---------------------------------------------------------------

    def gate_token(self, token):
        self.grant = self.service.redeem(token)
        if self.grant is None:
            self.handshake.refuse_token(gate.BAD_TOKEN)
        else:
            self.handshake.go_ahead(self.grant.requester.signing_key)

    def gate_opened(self, received):
        self.gate_through()
        self.service.start_tls(self, self.tls_normal, received)

    def gate_abort(self, reason):
        # Bad tokens are counted by redeem, wrong keys by tls_refused.
        if reason == gate.GATE_TIMEOUT:
            self.service.refusals[reason] += 1
        self.transport.abortConnection()

    def tls_verified(self):
        self.service.connect_device(self, self.grant, self.grant.path)

    def tls_refused(self, reason):
        self.service._refuse(self.grant.requester, "wrong_peer_key")


class _RelayLeg(tunnel_tls.GatedLeg):
    """The tunnel-node's connection to a relay: the token, the relay's go-ahead, then TLS
    as the server (the tunnel-node dialled, but the requester is the TLS client), then the
    device. It feeds a gate.DialingGate and performs its actions (gate.IGateActions)."""

    def __init__(self, service, grant, token):
        self.service = service
        self.grant = grant
        self.use_gate(gate.DialingGate(token, grant.requester.signing_key, self))

    def connectionMade(self):
        self.setTimeout(TOKEN_SECONDS)
        self.handshake.connected()

    def left(self):
        self.handshake.lost()
        self.service.closed(self)

    # -- what the handshake does ---------------------------------------------------------------

    def gate_opened(self, received):
        self.gate_through()
        self.service.start_tls(self, False, received)

    def tls_verified(self):
        self.service.connect_device(self, self.grant, self.grant.path)

    def tls_refused(self, reason):
        self.service._refuse(self.grant.requester, "wrong_peer_key")

    def handshake_lost(self):
        pass  # nothing waits on it: the super-node was answered once the relay was reached


class _DeviceLeg(Leg):
    def dataReceived(self, data):
        self.forward(data)
