"""The local control socket: a small JSON API on a UNIX socket in the state directory.

`meshnode status` and `meshnode ping` talk to the running node through it, so they act as that
node rather than as a second copy of its identity.
"""

import json
import os

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.web import server

from meshnode import config
from meshnode.core import ports
from meshnode.core.web import HTTPError, JSONResource, Routes
from meshnode.records import Role
from meshnode.rpc.messages import Command
from meshnode.rpc.service import CallTimeout, RPCError

SOCKET_FILE = "control.sock"


def socket_path(state_dir):
    return os.path.join(state_dir, SOCKET_FILE)


def node_status(identity_service, rpc, sections=()):
    """What `meshnode status` shows: who this node is, what its RPC has seen, and what each
    role adds (`sections`: name → callable giving that role's part)."""
    enrollment = identity_service.enrollment
    node = enrollment.node.record if enrollment.enrolled else None
    status = {
        "node_id": identity_service.identity.node_id.hex(),
        "enrolled": enrollment.enrolled,
        "name": node.name if node else None,
        "domain": node.domain if node else None,
        "domain_name": enrollment.domain_name,
        # node and device ids this node knows revoked, and whether our domain is suspended
        "revoked": len(enrollment.trust.revoked),
        "domain_suspended": bool(node and node.domain in enrollment.trust.suspended),
        "expires": node.expires if node else None,
        # a Node record that expired, kept to renew from (`meshnode join` past the grace)
        "expired": enrollment.expired.record.expires if enrollment.expired else None,
        "roles": [role.name.lower() for role in Role if rpc.roles & role],
        "rpc_port": rpc.port,
        "operators": sorted(i.hex() for i in enrollment.trust.operator_ids),
        "peers": len(rpc.peers) if rpc.peers is not None else 0,
        "accepted": {Command(command).name: count
                     for command, count in sorted(rpc.accepted.items())},
        "sent": {Command(command).name: count for command, count in sorted(rpc.sent.items())},
        "drops": dict(sorted(rpc.drops.items())),
    }
    for name, section in sections:
        status[name] = section()
    return status


def _explain_rpc_failure(failure):
    """An RPC failure as the control API's answer: 504 no answer, 502 refused or unknown."""
    if failure.check(CallTimeout):
        raise HTTPError(504, str(failure.value))
    if failure.check(RPCError, DNSLookupError):
        raise HTTPError(502, str(failure.value))
    return failure


@defer.inlineCallbacks
def ping_peer(rpc, peer, address, count=1, timeout=None):
    """Ping a known peer at `address` `count` times → a summary with the round trips."""
    rtts = []
    for _ in range(count):
        rtts.append((yield rpc.ping(peer, address, timeout=timeout)))
    node = peer.node
    return {"address": f"{address[0]}:{address[1]}", "node_id": node.node_id.hex(),
            "name": node.name, "domain": node.domain,
            "rtt_ms": [round(rtt * 1000, 3) for rtt in rtts]}


@defer.inlineCallbacks
def ping_address(rpc, host, port, count=1, timeout=None):
    """Bootstrap with whoever listens at HOST:PORT, then ping it `count` times."""
    address = yield rpc.resolve((host, port))
    peer = yield rpc.fetch_node(address, timeout)
    return (yield ping_peer(rpc, peer, address, count, timeout))


class StatusResource(JSONResource):
    def __init__(self, identity_service, rpc, sections):
        super().__init__()
        self._identity_service = identity_service
        self._rpc = rpc
        self._sections = sections

    def render_GET(self, request):
        return self.serve(request, lambda r: node_status(self._identity_service, self._rpc,
                                                          self._sections))


class PingResource(JSONResource):
    """POST {"address": "HOST:PORT" and/or "node": NAME-OR-ID, "count": N, "timeout": S}.

    With an address only, the peer is met with the GetNode bootstrap; with a node as well, its
    Node record comes from the directory (the operator); with a node only, its address comes
    from its NodeInfo in the DHT.
    """

    def __init__(self, rpc, directory):
        super().__init__()
        self._rpc = rpc
        self._directory = directory

    def render_POST(self, request):
        return self.serve(request, self._ping)

    def _ping(self, request):
        try:
            body = json.loads(request.content.read(65536) or b"{}")
            address = config.parse_host_port(body["address"]) if "address" in body else None
            node = config.parse_node_or_id(body["node"]) if "node" in body else None
            count = int(body.get("count", 1))
            timeout = float(body.get("timeout", self._rpc.call_timeout))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HTTPError(400, f"bad ping request: {e}") from None
        if address is None and node is None:
            raise HTTPError(400, "bad ping request: give an address or a node")
        if not 1 <= count <= 100 or not 0 < timeout <= 60:
            raise HTTPError(400, "count must be 1-100 and timeout 0-60 seconds")
        if node is None:
            d = ping_address(self._rpc, *address, count, timeout)
        elif address is not None:
            d = (self._directory.lookup_name(node) if isinstance(node, str)
                 else self._directory.lookup_node(node))
            d.addCallback(lambda peer: ping_peer(self._rpc, peer, address, count, timeout))
        else:
            d = self._directory.lookup_node_info(node)
            d.addCallback(self._ping_announced, count, timeout)
        d.addErrback(_explain_rpc_failure)
        return d

    def _ping_announced(self, found, count, timeout):
        info, _ = found
        if not info.addresses:
            raise HTTPError(502, "the node announced no address")
        address = info.addresses[0]
        peer = self._rpc.peers.get(info.node_id)
        return ping_peer(self._rpc, peer, (address.host, address.port), count, timeout)


class LookupResource(JSONResource):
    """POST {"node": NAME or 64-HEX-ID}: the NodeInfo the directory finds, and which replicas
    answered."""

    def __init__(self, directory):
        super().__init__()
        self._directory = directory

    def render_POST(self, request):
        return self.serve(request, self._lookup)

    def _lookup(self, request):
        try:
            body = json.loads(request.content.read(65536) or b"{}")
            node = config.parse_node_or_id(body["node"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HTTPError(400, f"bad lookup request: {e}") from None
        d = self._directory.lookup_node_info(node)
        d.addCallback(self._describe)
        d.addErrback(_explain_rpc_failure)
        return d

    @staticmethod
    def _describe(found):
        info, answered = found
        return {"node_id": info.node_id.hex(), "domain": info.domain,
                "addresses": [str(e) for e in info.addresses], "rpc_port": info.rpc_port,
                "observed": [str(e) for e in info.observed], "nat": info.nat.name.lower(),
                "locations": [location.hex() for location in info.locations],
                "roles": [role.name.lower() for role in Role if info.roles & role],
                "created": info.created, "answered_by": [i.hex() for i in answered]}


class ControlService(service.Service):
    """Serves the control API on STATE/control.sock, readable by the node's user only: the
    node's status (with each service's part, `add_status`) and each service's resources
    (`add_resource`)."""

    name = "control"

    def __init__(self, *, state_dir, identity, rpc, directory, reactor):
        self._path = socket_path(state_dir)
        self._identity_service = identity
        self._rpc = rpc
        self._directory = directory
        self._reactor = reactor
        self._port = None
        self._status_sections = []
        self._resources = {}

    def add_status(self, name, section):
        """`section()` gives the part `name` of `meshnode status`."""
        self._status_sections.append((name, section))

    def add_resource(self, name, child):
        """Serve `child` at /v1/NAME (`name`: bytes)."""
        if name in self._resources:
            raise ValueError(f"the control resource {name!r} is served already")
        self._resources[name] = child

    def startService(self):
        root = Routes()
        v1 = Routes()
        root.putChild(b"v1", v1)
        v1.putChild(b"status", StatusResource(self._identity_service, self._rpc,
                                              self._status_sections))
        v1.putChild(b"ping", PingResource(self._rpc, self._directory))
        v1.putChild(b"lookup", LookupResource(self._directory))
        for name, child in self._resources.items():
            v1.putChild(name, child)
        site = server.Site(root)
        site.displayTracebacks = False
        site.noisy = False
        site.log = lambda request: None  # status polling would flood the node's log
        self._port = ports.listen_unix(self._reactor, self._path, site)
        service.Service.startService(self)

    def stopService(self):
        service.Service.stopService(self)
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        return None
