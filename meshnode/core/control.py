"""The local control socket: a small JSON API on a UNIX socket in the state directory.

`meshnode status` and `meshnode ping` talk to the running node through it, so they act as that
node rather than as a second copy of its identity.
"""

import json
import os

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError, DNSLookupError
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.error import UnsupportedMethod

from meshnode import config
from meshnode.records import Role
from meshnode.rpc.messages import Command
from meshnode.rpc.service import CallTimeout, RPCError

_log = Logger()

SOCKET_FILE = "control.sock"


def socket_path(state_dir):
    return os.path.join(state_dir, SOCKET_FILE)


class ControlError(Exception):
    """A request the control API refuses; becomes a JSON error with `status`."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


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
        "expires": node.expires if node else None,
        "roles": [role.name.lower() for role in Role if rpc.roles & role],
        "rpc_port": rpc.port,
        "operators": sorted(i.hex() for i in enrollment.trust.operator_ids),
        "peers": len(rpc.peers) if rpc.peers is not None else 0,
        "accepted": {Command(command).name: count
                     for command, count in sorted(rpc.accepted.items())},
        "drops": dict(sorted(rpc.drops.items())),
    }
    for name, section in sections:
        status[name] = section()
    return status


def _explain_rpc_failure(failure):
    """An RPC failure as the control API's answer: 504 no answer, 502 refused or unknown."""
    if failure.check(CallTimeout):
        raise ControlError(504, str(failure.value))
    if failure.check(RPCError, DNSLookupError):
        raise ControlError(502, str(failure.value))
    return failure


def _json_error(request, status, reason):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": reason}).encode() + b"\n"


class _Routes(resource.Resource):
    """A directory of the API: unknown paths get a JSON 404."""

    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _json_error(request, 404, "no such resource")


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return _json_error(request, 404, "no such resource")


class _JSONResource(resource.Resource):
    isLeaf = True

    def render(self, request):
        try:
            return super().render(request)
        except UnsupportedMethod as e:
            request.setHeader(b"allow", b", ".join(e.allowedMethods))
            return _json_error(request, 405, "method not allowed")

    def _reply(self, request, status, body):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode() + b"\n")
        request.finish()

    def _fail(self, failure, request):
        if failure.check(ControlError):
            self._reply(request, failure.value.status, {"error": failure.value.reason})
        else:
            _log.failure("control request failed", failure)
            self._reply(request, 500, {"error": str(failure.value) or failure.type.__name__})

    def _serve(self, request, handler):
        d = defer.maybeDeferred(handler, request)
        d.addCallbacks(lambda body: self._reply(request, 200, body), self._fail,
                       errbackArgs=(request,))
        return server.NOT_DONE_YET


class StatusResource(_JSONResource):
    def __init__(self, identity_service, rpc, sections):
        super().__init__()
        self._identity_service = identity_service
        self._rpc = rpc
        self._sections = sections

    def render_GET(self, request):
        return self._serve(request, lambda r: node_status(self._identity_service, self._rpc,
                                                          self._sections))


class PingResource(_JSONResource):
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
        return self._serve(request, self._ping)

    def _ping(self, request):
        try:
            body = json.loads(request.content.read(65536) or b"{}")
            address = config.parse_host_port(body["address"]) if "address" in body else None
            node = config.parse_node_or_id(body["node"]) if "node" in body else None
            count = int(body.get("count", 1))
            timeout = float(body.get("timeout", self._rpc.call_timeout))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ControlError(400, f"bad ping request: {e}") from None
        if address is None and node is None:
            raise ControlError(400, "bad ping request: give an address or a node")
        if not 1 <= count <= 100 or not 0 < timeout <= 60:
            raise ControlError(400, "count must be 1-100 and timeout 0-60 seconds")
        if node is None:
            d = self._rpc.ping_address(*address, count, timeout)
        elif address is not None:
            d = (self._directory.lookup_name(node) if isinstance(node, str)
                 else self._directory.lookup_node(node))
            d.addCallback(lambda peer: self._rpc.ping_peer(peer, address, count, timeout))
        else:
            d = self._directory.lookup_node_info(node)
            d.addCallback(self._ping_announced, count, timeout)
        d.addErrback(_explain_rpc_failure)
        return d

    def _ping_announced(self, found, count, timeout):
        info, _ = found
        if not info.addresses:
            raise ControlError(502, "the node announced no address")
        address = info.addresses[0]
        peer = self._rpc.peers.get(info.node_id)
        return self._rpc.ping_peer(peer, (address.host, address.port), count, timeout)


class LookupResource(_JSONResource):
    """POST {"node": NAME or 64-HEX-ID}: the NodeInfo the directory finds, and which replicas
    answered."""

    def __init__(self, directory):
        super().__init__()
        self._directory = directory

    def render_POST(self, request):
        return self._serve(request, self._lookup)

    def _lookup(self, request):
        try:
            body = json.loads(request.content.read(65536) or b"{}")
            node = config.parse_node_or_id(body["node"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ControlError(400, f"bad lookup request: {e}") from None
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
    """Serves the control API on STATE/control.sock, readable by the node's user only."""

    name = "control"

    def __init__(self, state_dir, identity_service, rpc, directory, reactor):
        self._path = socket_path(state_dir)
        self._identity_service = identity_service
        self._rpc = rpc
        self._directory = directory
        self._reactor = reactor
        self._port = None
        self.status_sections = []  # roles add (name, callable) for `meshnode status`
        self.resources = {}  # roles add their own /v1/NAME resources

    def startService(self):
        root = _Routes()
        v1 = _Routes()
        root.putChild(b"v1", v1)
        v1.putChild(b"status", StatusResource(self._identity_service, self._rpc,
                                              self.status_sections))
        v1.putChild(b"ping", PingResource(self._rpc, self._directory))
        v1.putChild(b"lookup", LookupResource(self._directory))
        for name, child in self.resources.items():
            v1.putChild(name, child)
        site = server.Site(root)
        site.displayTracebacks = False
        site.noisy = False
        site.log = lambda request: None  # status polling would flood the node's log
        try:
            self._port = self._reactor.listenUNIX(self._path, site, mode=0o600, wantPID=True)
        except CannotListenError as e:
            _log.error("no control socket at {path}: {error}", path=self._path,
                       error=e.socketError)
        service.Service.startService(self)

    def stopService(self):
        service.Service.stopService(self)
        if self._port is not None:
            return self._port.stopListening()
