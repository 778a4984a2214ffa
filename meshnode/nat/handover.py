"""`meshnode punch PEER --exec CMD` (seed 002, plexus): punch a UDP path to a node of our
domain through both NATs, then hand it to a command with the local, public and peer
endpoints and a secret only the two nodes know."""

import collections
import hashlib
import hmac
import itertools
import json
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from meshnode.nat import stun
from meshnode.nat.rules import (BIRTHDAY_OPENERS, BIRTHDAY_SECONDS, PUNCH_SECONDS,
                                SPRAY_PER_TICK, TICK_SECONDS, UDP_OPENER_PROBE_SECONDS,
                                PunchFailed, PunchRole, punch_role, spray_ports)
from meshnode.core.reachability import outbound_address
from meshnode.core.directory import NotPassedOn
from meshnode.core.web import HTTPError, JSONResource
from meshnode.rpc.messages import (Command, ForwardedTunnelOpened, PunchRequest,
                                   TunnelResult)
from meshnode.rpc.service import RPCError, any_domain
from meshnode.wire import Endpoint

_log = Logger()

FINAL_PROBES = 3  # sent once done, so the peer sees our "seen you" even if it lags
ACCEPT_SECONDS_LIMIT = 600.0
KEEPALIVE_SECONDS = 20.0  # while accepting: keep our mapping towards the super-nodes open
RETRY_SECONDS = 1.0  # the initiator asks again while the peer does not wait for it yet
NONCE_SIZE = 32
MAGIC = b"MNPUNCH1"
TAG_SIZE = 16


def shared_secret(identity, peer_node, initiator_nonce, acceptor_nonce):
    """The path's secret: HKDF of the two nodes' X25519 agreement and both nonces, so a
    super-node passing the nonces on cannot know it."""
    agreed = identity.agreement_key.exchange(
        X25519PublicKey.from_public_bytes(peer_node.agreement_key))
    return HKDF(hashes.SHA256(), 32, initiator_nonce + acceptor_nonce,
                b"meshnode/punch").derive(agreed)


def probe(secret, sender_id, seen):
    """A punch probe: MAGIC, whether the sender has seen the peer's probes, and a tag."""
    head = MAGIC + bytes([seen])
    return head + hmac.new(secret, head + sender_id, hashlib.sha256).digest()[:TAG_SIZE]


def read_probe(secret, sender_id, data):
    """The sender's `seen` flag of a valid probe from `sender_id`, else None."""
    if len(data) != len(MAGIC) + 1 + TAG_SIZE or not data.startswith(MAGIC):
        return None
    seen = data[len(MAGIC)]
    if seen > 1 or not hmac.compare_digest(data, probe(secret, sender_id, seen)):
        return None
    return seen


class _PunchSocket(protocol.DatagramProtocol):
    """One punch socket: learns its public endpoint (STUN, when configured), then probes the
    peer until both sides have seen each other (a probe saying "seen" received after we
    sent ours), answering at once, and where the peer's probes really come from."""

    def __init__(self, clock):
        self._clock = clock
        self.stun = None
        self.drops = collections.Counter()
        self._loop = None
        self._timeout = None
        self.done = None
        self.sprayed = 0

    def startProtocol(self):
        self.stun = stun.StunClient(self.transport.write, self._clock, drops=self.drops)

    def run(self, secret, own_id, peer_id, target, budget=PUNCH_SECONDS,
            interval=TICK_SECONDS, spray=()):
        """Probe `target` every `interval` → Deferred[the peer's endpoint as its probes
        came], or PunchFailed after `budget` seconds. `spray`: ports of the target's host to
        probe instead, SPRAY_PER_TICK each TICK_SECONDS, until the peer is heard (birthday
        probing); a birthday opener probes slowly (`interval`), only to keep its mapping."""
        self._secret, self._own_id, self._peer_id = secret, own_id, peer_id
        self.target = target
        self._spray = iter(spray)
        self.seen = self.said_seen = False
        self.done = defer.Deferred()
        self._loop = task.LoopingCall(self._probe)
        self._loop.clock = self._clock
        self._loop.start(TICK_SECONDS if spray else interval)
        self._timeout = self._clock.callLater(budget, self._give_up)
        self.done.addBoth(lambda result: (self._cancel_timeout(), result)[1])
        return self.done

    def _cancel_timeout(self):
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()

    def _probe(self):
        message = probe(self._secret, self._own_id, self.seen)
        if not self.seen:
            ports = list(itertools.islice(self._spray, SPRAY_PER_TICK))
            self.sprayed += len(ports)
            for port in ports:
                self.transport.write(message, (self.target[0], port))
            if ports:
                return
        self.transport.write(message, self.target)
        self.said_seen = self.said_seen or self.seen

    def _give_up(self):
        self.stop()
        if not self.done.called:
            sprayed = f", {self.sprayed} ports of its address probed" if self.sprayed else ""
            self.done.errback(PunchFailed(f"no probe from the peer within the budget (sent "
                                          f"to {self.target[0]}:{self.target[1]}{sprayed})"))

    def stop(self):
        """No more probes (an attempt that lost stays unfired: nobody waits for it)."""
        self._stop_probing()
        self._cancel_timeout()

    def _stop_probing(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def datagramReceived(self, data, address):
        if self.stun is not None and self.stun.receive(data, address):
            return
        if self.done is None or self.done.called:
            return
        seen = read_probe(self._secret, self._peer_id, data)
        if seen is None:
            self.drops["not_a_probe"] += 1
            return
        self.target = address  # peer-reflexive: answer where its probes really come from
        if not self.seen:
            self.seen = True
            self._stop_probing()
            self._probe()  # at once: a birthday hit's mapping is waiting for it
            self._loop.start(TICK_SECONDS, now=False)
        if seen and self.said_seen:
            self.stop()
            for _ in range(FINAL_PROBES):
                self._probe()
            self.done.callback(address)


class _Prepared:
    """A punch socket, its public endpoint and our nonce, before the peer is known."""

    def __init__(self, port, punch_socket, public):
        self.port = port
        self.socket = punch_socket
        self.public = public
        self.nonce = os.urandom(NONCE_SIZE)


class PunchService(service.Service):
    name = "punch"

    def __init__(self, core, *, stun_server=None):
        self._identity_service = core.identity
        self._rpc = core.rpc
        self._directory = core.directory
        self._reachability = core.reachability
        self._clock = core.reactor
        self._listen_address = core.listen_address
        self._stun_server = stun_server
        self._accepting = {}  # peer node id → (prepared, Deferred of (nonce, endpoint))
        self.punched = collections.Counter()

    def resources(self):
        """The control API's resources this service serves."""
        return {b"punch": PunchResource(self)}

    def startService(self):
        service.Service.startService(self)
        self._rpc.register(Command.PUNCH_INTRODUCTION,
                           self._directory.from_super_nodes(self._introduction), any_domain)

    def stopService(self):
        service.Service.stopService(self)
        self._rpc.unregister(Command.PUNCH_INTRODUCTION)
        for prepared, waiting in list(self._accepting.values()):
            waiting.cancel()  # punch() closes the socket

    def status(self):
        return {"accepting": [peer.hex() for peer in self._accepting],
                "punched": dict(self.punched)}

    @defer.inlineCallbacks
    def _prepare(self):
        """A fresh UDP socket and the endpoint the world sees it at: STUN's answer when a
        server is configured, else the NAT's public address and our port (a NAT that
        keeps ports, as endpoint-independent ones mostly do)."""
        punch_socket = _PunchSocket(self._clock)
        port = self._clock.listenUDP(0, punch_socket, interface=self._listen_address)
        try:
            local_port = port.getHost().port
            if self._stun_server is not None:
                server = yield self._rpc.resolve(self._stun_server)
                answer = yield punch_socket.stun.binding(server)
                public = answer.mapped
            elif self._reachability.seen:
                public = Endpoint(self._reachability.seen[0].host, local_port)
            else:
                raise PunchFailed("our public address is not known yet (no replica answered "
                                  "WhoAmI, no STUN server configured)")
        except (stun.StunError, PunchFailed, OSError) as e:
            port.stopListening()
            raise PunchFailed(f"cannot learn the punch socket's public endpoint: {e}")
        return _Prepared(port, punch_socket, public)

    @defer.inlineCallbacks
    def punch(self, peer_spec, accept=False, wait=60.0):
        """Punch a UDP path to node `peer_spec` (name or id hex) of our domain → what the
        command gets: {local, public, peer, secret}. With `accept`, wait up to `wait`
        seconds for the peer's own `meshnode punch` to ask for us."""
        try:
            info, _ = yield self._directory.lookup_node_info(
                bytes.fromhex(peer_spec) if _is_id(peer_spec) else peer_spec)
        except RPCError as e:
            raise PunchFailed(f"no node {peer_spec!r} found: {e}")
        peer = self._rpc.peers.get(info.node_id)
        if peer is None or info.node_id == self._rpc.node_id:
            raise PunchFailed(f"{peer_spec!r} is not another node of this domain")
        prepared = yield self._prepare()
        sockets = [prepared]
        try:
            if accept:
                initiator_nonce, target = yield self._accept(info.node_id, prepared, wait)
                secret = shared_secret(self._identity_service.identity, peer.node,
                                       initiator_nonce, prepared.nonce)
            else:
                opened = yield self._introduced(info.node_id, peer_spec, prepared, wait)
                target = opened.endpoint
                secret = shared_secret(self._identity_service.identity, peer.node,
                                       prepared.nonce, opened.token)
            role = punch_role(self._reachability.nat(self._reachability.seen), info.nat)
            run = (secret, self._rpc.node_id, info.node_id, (target.host, target.port))
            if role == PunchRole.SPRAY:
                reached = yield prepared.socket.run(*run, BIRTHDAY_SECONDS, spray=spray_ports())
            elif role == PunchRole.OPEN:
                sockets += [self._opener() for _ in range(BIRTHDAY_OPENERS - 1)]
                reached, prepared = yield self._first_through(sockets, run)
            else:
                reached = yield prepared.socket.run(*run)
            local_port = prepared.port.getHost().port
        finally:
            for one in sockets:
                one.socket.stop()
                one.port.stopListening()  # the command binds the winner's port next
        self.punched[role.value] += 1
        local = outbound_address(reached) or self._listen_address
        return {"local": f"{local}:{local_port}", "public": str(prepared.public),
                "peer": f"{reached[0]}:{reached[1]}", "secret": secret.hex(), "how": role.value}

    def _opener(self):
        """One more socket for birthday probing (its public endpoint is never known)."""
        punch_socket = _PunchSocket(self._clock)
        port = self._clock.listenUDP(0, punch_socket, interface=self._listen_address)
        return _Prepared(port, punch_socket, None)

    @defer.inlineCallbacks
    def _first_through(self, sockets, run):
        """Every socket opens a mapping towards the peer (our symmetric NAT gives each its
        own port) → (peer endpoint, socket) of the first the peer's probes reach."""
        attempts = [one.socket.run(*run, BIRTHDAY_SECONDS, interval=UDP_OPENER_PROBE_SECONDS)
                    for one in sockets]
        first = yield defer.DeferredList(attempts, fireOnOneCallback=True, consumeErrors=True)
        if isinstance(first, list):  # every attempt failed: the list of their failures
            raise PunchFailed(f"none of our {len(sockets)} sockets was reached")
        reached, index = first
        winner = sockets[index]
        winner.public = Endpoint(sockets[0].public.host, winner.port.getHost().port)
        return reached, winner

    @defer.inlineCallbacks
    def _introduced(self, peer_id, peer_spec, prepared, wait):
        """Ask to be introduced to the peer, again every RETRY_SECONDS while it does not
        wait for us yet (either side may start first) → its answer."""
        deadline = self._clock.seconds() + wait
        while True:
            try:
                return (yield self._directory.through_super_nodes(
                    PunchRequest(peer_id, prepared.public, prepared.nonce)))
            except NotPassedOn as e:
                if "not_accepting" not in e.refusals or self._clock.seconds() >= deadline:
                    raise PunchFailed(f"no introduction to {peer_spec!r}: {e}")
            except RPCError as e:
                raise PunchFailed(f"no introduction to {peer_spec!r}: {e}")
            yield task.deferLater(self._clock, RETRY_SECONDS, lambda: None)

    @defer.inlineCallbacks
    def _accept(self, peer_id, prepared, wait):
        if peer_id in self._accepting:
            raise PunchFailed("already waiting for that peer")
        waiting = defer.Deferred()
        self._accepting[peer_id] = (prepared, waiting)
        keepalive = task.LoopingCall(self._keep_alive)
        keepalive.clock = self._clock
        keepalive.start(KEEPALIVE_SECONDS)
        waiting.addTimeout(min(wait, ACCEPT_SECONDS_LIMIT), self._clock)
        try:
            return (yield waiting)
        except defer.TimeoutError:
            raise PunchFailed(f"the peer did not ask within {wait:g} s")
        finally:
            if keepalive.running:
                keepalive.stop()
            self._accepting.pop(peer_id, None)

    @defer.inlineCallbacks
    def _keep_alive(self):
        """Ping our super-nodes, so their introduction can reach us through our NAT."""
        try:
            yield self._directory.ping_replicas()
        except RPCError as e:
            _log.info("no super-node to keep a mapping to: {reason}", reason=e)

    def _introduction(self, incoming):
        """A super-node passes a peer's PunchRequest on: answer with our punch socket's
        endpoint and nonce when we wait for that peer (`meshnode punch --accept`)."""
        message = incoming.message
        if message.back is None or message.peer != self._rpc.node_id:
            self._rpc.drops["malformed_forwarding"] += 1
            return None
        requester, _, _ = message.back
        back = (requester.record.node_id,) + message.back[1:]

        def answer(result, reason="", endpoint=None, token=None):
            self._rpc.send(incoming.peer, incoming.source,
                           ForwardedTunnelOpened(result, reason, endpoint, token, back))

        accepting = self._accepting.get(requester.record.node_id)
        if accepting is None or requester.record.domain != self._rpc.domain:
            answer(TunnelResult.REFUSED, "not_accepting")
            return None
        prepared, waiting = accepting
        answer(TunnelResult.OPENED, "", prepared.public, prepared.nonce)
        if not waiting.called:
            waiting.callback((message.nonce, message.endpoint))
        return None


def _is_id(spec):
    return len(spec) == 64 and all(c in "0123456789abcdef" for c in spec.lower())


class PunchResource(JSONResource):
    """POST /v1/punch {"peer", "accept", "wait"} → {local, public, peer, secret}."""

    def __init__(self, punch):
        super().__init__()
        self._punch = punch

    def render_POST(self, request):
        return self.serve(request, self._run)

    def _run(self, request):
        try:
            body = json.loads(request.content.read())
            peer = body["peer"]
            accept = body.get("accept", False)
            if not isinstance(accept, bool):
                raise ValueError("accept must be true or false")
            wait = float(body.get("wait", 60.0))
            if not isinstance(peer, str) or not 0 < wait <= ACCEPT_SECONDS_LIMIT:
                raise ValueError("peer must be a name or id, wait 0-600 seconds")
        except (ValueError, KeyError, TypeError) as e:
            raise HTTPError(400, f"bad punch request: {e}") from None
        d = self._punch.punch(peer, accept, wait)

        def failed(failure):
            failure.trap(PunchFailed)
            raise HTTPError(409, failure.getErrorMessage())

        return d.addErrback(failed)

