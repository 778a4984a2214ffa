"""The user role: local listeners that third-party applications connect to, one per device.

Listeners come from the config file (`[tunnel:NAME]` sections: device, port, listen) and on
demand (`meshnode tunnel DEVICE --listen tcp:PORT`, through the control socket). Each accepted
connection finds the device's EndDevice record (operator-signed, this node's domain), the
tunnel-nodes announcing its location (GetTunnelNodes), and tries the paths their NodeInfo and
ours allow (`paths` of meshnode/nat/rules.py): direct (TunnelRequest, then the tunnel-node's
tunnel port), punched (a super-node introduces us, both sides connect at once) and relayed
through a super-node of this domain (ForwardedTunnelRequest, then its relay port). The stream
then carries TLS with the tunnel-node, checked against its Node record, and is spliced to the
application's connection.
The path that won is counted and shown in `meshnode status`.
"""

import collections
import json
import os

import attrs
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode import config
from meshnode.core import ports
from meshnode.core.web import HTTPError, JSONResource
from meshnode.errors import StartupError
from meshnode.nat import punch
from meshnode.nat.rules import (BIRTHDAY_OPENERS, BIRTHDAY_SECONDS, PunchRole, paths,
                                punch_role, same_lan)
from meshnode.core.directory import NoSuperNode, NotPassedOn
from meshnode.rpc.messages import (AUTHORIZATION_REFUSALS, ForwardedTunnelRequest, Introduce,
                                   TunnelOpened, TunnelRequest, TunnelResult)
from meshnode.rpc.service import RPCError
from meshnode.streams import gate, tunnel_tls
from meshnode.streams.splice import Leg
from meshnode.wire import Endpoint

_log = Logger()

CONNECT_TIMEOUT_SECONDS = 5.0
RELAY_ONLY_SECONDS = 60.0
DEVICES_RECHECK_SECONDS = 2.0


class TunnelFailed(Exception):
    """No path to the device worked; the message says why."""


class NotAuthorized(TunnelFailed):
    """The tunnel-node refused the device to us (AUTHORIZATION_REFUSALS): not a broken path."""


@attrs.define
class Listener:
    name: str
    device: str  # a device name of this domain, or its 64-hex-digit id
    port: int | None
    listen: str
    address: str = ""
    connections: int = 0
    failures: int = 0
    last_path: str = ""
    last_error: str = ""
    listening: object = None


@attrs.define(kw_only=True)
class UserSettings:
    listeners: tuple = ()  # Listener keyword dicts from the config's [tunnel:NAME] sections


class UserService(service.Service):
    name = "user"

    def __init__(self, core, settings):
        self._rpc = core.rpc
        self._directory = core.directory
        self._reachability = core.reachability
        self._clock = core.reactor
        self._tls = core.tls
        self.listeners = {}
        self._configured = [Listener(**spec) for spec in settings.listeners]
        self.paths = collections.Counter()
        self._devices = {}
        self._devices_read_at = float("-inf")
        self._relay_only = {}  # tunnel-node id → until when its direct path is not tried

    def resources(self):
        """The control API's resources this service serves."""
        return {b"tunnels": TunnelsResource(self)}

    def privilegedStartService(self):
        self._listen_configured()  # a configured listener may be on a port below 1024
        service.Service.privilegedStartService(self)

    def startService(self):
        self._listen_configured()
        service.Service.startService(self)

    def _listen_configured(self):
        for listener in self._configured:
            if listener.name not in self.listeners:
                self._listen(listener, f"[tunnel:{listener.name}]")

    def stopService(self):
        service.Service.stopService(self)
        listening = [listener.listening for listener in self.listeners.values()
                     if listener.listening is not None]
        self.listeners = {}
        return defer.gatherResults([defer.maybeDeferred(port.stopListening)
                                    for port in listening])

    def open_listener(self, listener):
        """Listen for `listener` (asked for through the control API) → it, with its address;
        HTTPError 409 when the name is taken or the endpoint unusable."""
        if listener.name in self.listeners:
            raise HTTPError(409, f"a listener named {listener.name!r} exists already")
        try:
            return self._listen(listener, "")
        except StartupError as e:
            raise HTTPError(409, str(e)) from None

    def _listen(self, listener, what):
        factory = protocol.Factory.forProtocol(lambda: _LocalLeg(self, listener))
        listener.listening = ports.listen_endpoint(self._clock, listener.listen, factory, what)
        host = listener.listening.getHost()
        listener.address = (f"{host.host}:{host.port}" if hasattr(host, "port")
                            else "unix:" + os.fsdecode(host.name))
        self.listeners[listener.name] = listener
        _log.info("tunnel listener {name} for {device} on {address}", name=listener.name,
                  device=listener.device, address=listener.address)
        return listener

    # -- one connection --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def device(self, spec):
        """The EndDevice record named `spec` (name or id hex) in this domain."""
        def named(devices):
            for device in devices.values():
                if device.name == spec or device.device_id.hex() == spec:
                    return device
            return None

        found = named(self._devices)
        if found is None and self._clock.seconds() - self._devices_read_at >= (
                DEVICES_RECHECK_SECONDS):
            # Registered a moment ago, perhaps: super-nodes that have not read it yet are
            # passed over for the operator (at most every DEVICES_RECHECK_SECONDS).
            self._devices_read_at = self._clock.seconds()
            self._devices = yield self._directory.end_devices(wanted=named)
            found = named(self._devices)
        if found is None:
            raise TunnelFailed(f"no device {spec!r} in this domain (`meshnode operator "
                               f"device list` on the operator shows the domain's devices)")
        return found

    @defer.inlineCallbacks
    def open_tunnel(self, listener):
        """A verified TLS leg to the device of `listener` → (leg, path)."""
        device = yield self.device(listener.device)
        port = listener.port or device.ports[0]
        nodes = yield self._directory.tunnel_nodes(device.location_id)
        if not nodes:
            raise TunnelFailed(f"no tunnel-node announces the location of {device.name}")
        errors = []
        mine = self._reachability.node_info(self._reachability.seen)
        plans = [(node, info, paths(mine, info)) for node, info in nodes]
        now = self._clock.seconds()
        refused = set()  # tunnel-nodes that refused the device itself: no other path helps
        for path in ("direct", "punched", "relayed"):
            for node, info, allowed in plans:
                if path not in allowed or node.node_id in refused or (
                        path != "relayed" and self._relay_only.get(node.node_id, 0) > now):
                    continue  # its direct paths failed a moment ago: straight to the relay
                try:
                    try:
                        leg = yield self._try[path](self, mine, node, info, device, port)
                    except NotPassedOn as e:
                        if any(reason in AUTHORIZATION_REFUSALS for reason in e.refusals):
                            raise NotAuthorized(str(e)) from None
                        raise
                    return leg, path
                except NotAuthorized as e:
                    errors.append(f"{path} to {node.name}: {e}")
                    _log.info("{path} tunnel to {node} refused: {reason}", path=path,
                              node=node.name, reason=e)
                    refused.add(node.node_id)
                except (RPCError, TunnelFailed) as e:
                    errors.append(f"{path} to {node.name}: {e}")
                    _log.info("{path} tunnel to {node} failed: {reason}", path=path,
                              node=node.name, reason=e)
                    if path != "relayed" and _tried(e):
                        # only a path that failed sends it to the relay
                        self._relay_only[node.node_id] = now + RELAY_ONLY_SECONDS
        raise TunnelFailed("; ".join(errors))

    @defer.inlineCallbacks
    def _direct(self, mine, node, info, device, port):
        # On its LAN its own address, elsewhere the one at its public IP (UPnP, or public).
        public = {e.host for e in info.observed}
        wanted = [e for e in info.addresses if (e.host in public) != same_lan(mine, info)]
        endpoint = (wanted or list(info.addresses) or list(info.observed) or [None])[0]
        if endpoint is None:
            raise TunnelFailed("it announced no address")
        peer = self._rpc.peers.get(node.node_id)
        opened = yield self._rpc.call(peer, (endpoint.host, endpoint.port),
                                      TunnelRequest(device.device_id, port), TunnelOpened)
        if opened.result != TunnelResult.OPENED:
            refusal = NotAuthorized if opened.reason in AUTHORIZATION_REFUSALS else TunnelFailed
            raise refusal(f"refused: {opened.reason}")
        return (yield self._dial(opened.endpoint, opened.token, node))

    @defer.inlineCallbacks
    def _punched(self, mine, node, info, device, port):
        """A super-node introduces us; both sides connect to each other's public endpoint
        from their punch ports at once (TCP simultaneous open). Behind a symmetric NAT, we
        open many connections and the tunnel-node probes many ports (birthday probing)."""
        many = punch_role(mine.nat, info.nat) == PunchRole.OPEN
        held = punch.reserve_port()
        try:
            public = Endpoint(mine.observed[0].host, held.getsockname()[1])
            opened = yield self._directory.through_super_nodes(
                Introduce(node.node_id, device.device_id, port, public, birthday=many))
            ready = defer.Deferred()
            target = (opened.endpoint.host, opened.endpoint.port)

            def leg():
                return _TunnelLeg(self._tls.context(), opened.token, node.signing_key, ready, many)

            if many:
                self._race(ready, target, leg)
            else:
                punch.Puncher(self._clock, public.port, target, leg).start().addErrback(
                    lambda f: ready.called or ready.errback(TunnelFailed(f.getErrorMessage())))
        finally:
            held.close()  # the puncher's own socket holds the port now
        return (yield ready)

    def _race(self, ready, target, leg):
        """Birthday probing from behind our symmetric NAT: BIRTHDAY_OPENERS connections to
        the tunnel-node (each its own mapping) while it probes our ports; `ready` fires with
        the first leg through TLS; the rest are stopped then."""
        punchers = [punch.Puncher(self._clock, 0, target, leg, BIRTHDAY_SECONDS)
                    for _ in range(BIRTHDAY_OPENERS)]
        attempts = defer.DeferredList([one.start() for one in punchers], consumeErrors=True)
        attempts.addCallback(lambda results: ready.called or any(ok for ok, _ in results)
                             or ready.errback(TunnelFailed(
                                 f"none of {len(punchers)} connections got through")))
        ready.addTimeout(BIRTHDAY_SECONDS + CONNECT_TIMEOUT_SECONDS, self._clock)

        def settled(result):
            for one in punchers:
                one.stop()
            if isinstance(result, Failure) and result.check(defer.TimeoutError):
                raise TunnelFailed("no connection through birthday probing reached TLS")
            return result

        ready.addBoth(settled)

    @defer.inlineCallbacks
    def _relayed(self, mine, node, info, device, port):
        opened = yield self._directory.through_super_nodes(
            ForwardedTunnelRequest(node.node_id, device.device_id, port))
        relay = self._rpc.transports.relay_endpoint(opened.endpoint)
        return (yield self._dial(relay, opened.token, node))

    _try = {"direct": _direct, "punched": _punched, "relayed": _relayed}

    def _dial(self, endpoint, token, node):
        """Connect, pass the gate with `token`, run TLS → Deferred[the verified leg]."""
        ready = defer.Deferred()
        d = self._rpc.transports.dial(endpoint.host, endpoint.port, lambda: _TunnelLeg(
            self._tls.context(), token, node.signing_key, ready), CONNECT_TIMEOUT_SECONDS)
        d.addErrback(lambda f: ready.called or ready.errback(
            TunnelFailed(f"cannot connect to {endpoint}: {f.getErrorMessage()}")))
        return ready

    def connected(self, local, listener):
        listener.connections += 1
        d = self.open_tunnel(listener)

        def ready(result):
            leg, path = result
            listener.last_path = path
            self.paths[path] += 1
            if local.transport.disconnected:
                leg.transport.loseConnection()
                return
            local.join(leg)
            local.transport.resumeProducing()

        def failed(failure):
            listener.failures += 1
            listener.last_error = failure.getErrorMessage()
            _log.info("tunnel for {name} failed: {reason}", name=listener.name,
                      reason=listener.last_error)
            local.transport.loseConnection()

        d.addCallbacks(ready, failed)

    def status(self):
        return {"paths": dict(self.paths), "listeners": [
            {"name": one.name, "device": one.device, "port": one.port, "address": one.address,
             "connections": one.connections, "failures": one.failures,
             "last_path": one.last_path or None, "last_error": one.last_error or None}
            for one in self.listeners.values()]}


# Super-nodes' refusals to pass an introduction on (they hold no NodeInfo of the tunnel-node,
# or have no way to it yet): the tunnel-node was never asked, so no path to it failed.
NOT_INTRODUCED = frozenset(("unknown_tunnel_node", "tunnel_node_unreachable"))


def _tried(failure):
    """Whether a path failed by trying it: not when no super-node was there to introduce us
    (none placed yet, or none knew the tunnel-node) — the next connection tries it again."""
    if isinstance(failure, NoSuperNode):
        return False
    return not (isinstance(failure, NotPassedOn) and failure.refusals
                and set(failure.refusals) <= NOT_INTRODUCED)


class _LocalLeg(Leg):
    """An application's connection to a listener; held paused until its tunnel is up."""

    def __init__(self, user, listener):
        self.user = user
        self.listener = listener

    def connectionMade(self):
        self.transport.pauseProducing()
        self.user.connected(self, self.listener)

    def dataReceived(self, data):
        self.forward(data)


class _TunnelLeg(tunnel_tls.GatedLeg):
    """The user-node's end of a tunnel: token, the gate's go-ahead, TLS as the client. It
    feeds a gate.DialingGate and performs its actions (gate.IGateActions); `ready` fires with
    the leg once the tunnel-node proved its key."""

    def __init__(self, context, token, expected_key, ready, racing=False):
        self._context = context
        self._ready = ready
        # Birthday probing: several connections may get through; each offers the token,
        # the tunnel-node takes the first, and the others' ends do not fail the tunnel.
        self._racing = racing
        self.use_gate(gate.DialingGate(token, expected_key, self))

    def connectionMade(self):
        if self._racing and self._ready.called:
            self.transport.abortConnection()  # another one won already
            return
        self.setTimeout(CONNECT_TIMEOUT_SECONDS * 2)
        self.handshake.connected()

    def left(self):
        self.handshake.lost()

    # -- what the handshake does ---------------------------------------------------------------

    def gate_opened(self, received):
        self.gate_through()
        tunnel_tls.start_tls(self, self._context, True, received)

    def tls_verified(self):
        if not self._ready.called:
            self._ready.callback(self)

    def tls_refused(self, reason):
        if not self._ready.called:
            self._ready.errback(TunnelFailed(reason))

    def handshake_lost(self):
        if not self._ready.called and not self._racing:
            self._ready.errback(TunnelFailed("the tunnel closed before TLS was up"))


class TunnelsResource(JSONResource):
    """GET: the listeners; POST {"device", "listen", "port"?, "name"?}: open one."""

    def __init__(self, user):
        super().__init__()
        self._user = user

    def render_GET(self, request):
        return self.serve(request, lambda r: self._user.status())

    def render_POST(self, request):
        return self.serve(request, self._open)

    def _open(self, request):
        try:
            body = json.loads(request.content.read(65536) or b"{}")
            device = str(body["device"])
            listen = config.parse_listen_endpoint(body["listen"])
            port = config.parse_port(str(body["port"])) if body.get("port") else None
            name = str(body.get("name") or f"{device}-{len(self._user.listeners) + 1}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HTTPError(400, f"bad tunnel request: {e}") from None
        listener = self._user.open_listener(Listener(name, device, port, listen))
        return {"name": listener.name, "device": device, "port": port,
                "address": listener.address}
