"""The RPC service: acceptance of datagrams, dispatch to handlers, calls with timeouts.

Protocol classes only move bytes; everything a datagram must pass before a handler sees it is
here, in the order of DESIGN.md §4, and every datagram that fails is counted by reason.
"""

import collections
import ipaddress

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from meshnode import records
from meshnode.records import Role
from meshnode.rpc import frame
from meshnode.rpc.frame import Flag, FrameError
from meshnode.rpc.messages import (MESSAGES, NODE_ANSWER_SIZE, Command, GetNode, NodeRecord,
                                   Ping, Pong)
from meshnode.rpc.peers import PeerTable
from meshnode.rpc.protocol import RPCDatagramProtocol, RPCStreamFactory
from meshnode.rpc.ratelimit import RateLimiter
from meshnode.wire import DecodeError

_log = Logger()

TIMESTAMP_WINDOW_MS = 60_000
# Plain commands that may be sent to "whoever listens here" (receiver zeros).
_ANONYMOUS_COMMANDS = frozenset({Command.GET_NODE})


class RPCError(Exception):
    """A call that could not be completed."""


class CallTimeout(RPCError, defer.TimeoutError):
    """No valid answer came within the call's timeout."""


class Stopped(RPCError):
    """The RPC service stopped while the call was pending."""


class NotEnrolled(RPCError):
    """This node has no operator-signed Node record, so no peer can authenticate it."""


class StartupError(Exception):
    """The node cannot start; the message is the one line an operator needs."""


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def same_domain(rpc, node):
    return node.domain == rpc.domain


def any_domain(rpc, node):
    return True


def infrastructure_or_same_domain(rpc, node):
    """Same domain, or either side is an operator or super-node (they serve every domain)."""
    return (node.domain == rpc.domain or rpc.roles & (Role.OPERATOR | Role.SUPER)
            or rpc.trust.is_operator(node.node_id))


@attrs.frozen
class Incoming:
    """An authenticated request as a handler sees it."""

    peer: object
    source: tuple
    message: object

    @property
    def node(self):
        return self.peer.node


class _Call:
    __slots__ = ("deferred", "peer_id", "answer", "source", "datagram", "timer")

    def __init__(self, deferred, peer_id, answer, source, datagram):
        self.deferred = deferred
        self.peer_id = peer_id
        self.answer = answer
        self.source = source
        self.datagram = datagram
        self.timer = None


class RPCService(service.Service):
    """Seals, sends, receives and dispatches RPC frames for one node identity.

    Handlers are registered by services with `register(command, handler, policy)`; a handler
    takes an Incoming and returns the response message, None, or a Deferred of either.
    """

    name = "rpc"

    def __init__(self, identity_service, reactor, interface="", port=0, roles=Role.USER,
                 call_timeout=2.0, rate=2000, burst=4000):
        self._identity_service = identity_service
        self._reactor = reactor
        self._clock = reactor
        self._interface = interface
        self._requested_port = port
        self.port = None
        self.roles = Role(roles)
        self.call_timeout = call_timeout
        self._rate_limiter = RateLimiter(reactor, rate, burst)
        self._handlers = {}
        self._pending = {}
        self._transports = []
        self.drops = collections.Counter()
        self.accepted = collections.Counter()
        self.learned = []
        self.peers = None
        self.register(Command.PING, self._answer_ping, infrastructure_or_same_domain)

    # -- wiring -------------------------------------------------------------------------

    def register(self, command, handler, policy=same_domain):
        """Route requests of `command` to `handler` when `policy(rpc, sender_node)` holds."""
        self._handlers[Command(command)] = (handler, policy)

    def startService(self):
        identity = self._identity_service.identity
        enrollment = self._identity_service.enrollment
        self._identity = identity
        self.trust = enrollment.trust
        self.own_node = enrollment.node
        self.node_id = identity.node_id
        self.domain = enrollment.node.record.domain if enrollment.enrolled else 0
        self.peers = PeerTable(identity)
        self._ids = frame.MessageIds(self._clock)
        self._listen()
        service.Service.startService(self)
        if not self.enrolled:
            _log.warn("not enrolled: datagrams from peers cannot be authenticated and are dropped")
        _log.info("RPC listening on UDP and TCP port {port}", port=self.port)

    def _listen(self):
        udp = RPCDatagramProtocol(self.receive)
        where = f"{self._interface or '*'}:{self._requested_port}"
        try:
            self._udp_port = self._reactor.listenUDP(self._requested_port, udp,
                                                     interface=self._interface)
        except CannotListenError as e:
            raise StartupError(f"cannot listen on UDP {where}: {e.socketError}") from None
        self._send = udp.send
        self.port = self._udp_port.getHost().port
        try:
            self._tcp_port = self._reactor.listenTCP(self.port, RPCStreamFactory(self.receive),
                                                     interface=self._interface)
        except CannotListenError as e:
            self._udp_port.stopListening()
            raise StartupError(f"cannot listen on TCP {where}: {e.socketError}") from None

    def stopService(self):
        pending, self._pending = self._pending, {}
        for call in pending.values():
            if call.timer.active():
                call.timer.cancel()
            call.deferred.errback(Stopped("the RPC service stopped"))
        service.Service.stopService(self)
        return defer.gatherResults([defer.maybeDeferred(self._udp_port.stopListening),
                                    defer.maybeDeferred(self._tcp_port.stopListening)])

    @property
    def enrolled(self):
        return self.own_node is not None

    def _now_ms(self):
        return int(self._clock.seconds() * 1000)

    # -- receiving ----------------------------------------------------------------------

    def _drop(self, reason):
        self.drops[reason] += 1

    def receive(self, data, source, send):
        """Accept or drop one datagram from `source`; answers go out through `send`."""
        try:
            received = frame.parse(data)
        except FrameError as e:
            self.drops[e.reason] += 1
            return
        if received.receiver_id != self.node_id or received.receiver_domain != self.domain:
            if not (received.receiver_id == frame.ZERO_ID and received.receiver_domain == 0
                    and received.flags & Flag.PLAIN
                    and received.command in _ANONYMOUS_COMMANDS):
                self.drops["receiver"] += 1
                return
        now = self._now_ms()
        if abs(received.timestamp - now) > TIMESTAMP_WINDOW_MS:
            self.drops["timestamp"] += 1
            return
        if received.flags & Flag.PLAIN:
            self._receive_plain(received, len(data), source, send, now)
            return
        peer = self.peers.get(received.sender_id)
        if peer is None:
            self.drops["unknown_sender"] += 1
            self._ask_for_node(received, len(data), source, send, now)
            return
        counter = received.counter
        if not peer.window.fresh(counter):
            self.drops["replay"] += 1
            return
        payload = frame.open_sealed(peer.open_key, received)
        if payload is None:
            self.drops["decrypt"] += 1
            return
        peer.window.commit(counter)
        node = peer.node
        if (node.domain != received.sender_domain or now >= node.expires
                or self.trust.is_revoked(node.node_id)):
            self.drops["sender_invalid"] += 1
            return
        if received.flags & Flag.RESPONSE:
            self._receive_response(received, payload, peer)
        else:
            self._receive_request(received, payload, peer, source, send)

    def _receive_request(self, received, payload, peer, source, send):
        try:
            command = Command(received.command)
            handler, policy = self._handlers[command]
        except (ValueError, KeyError):
            self.drops["unknown_command"] += 1
            return
        if not policy(self, peer.node):
            self.drops["not_allowed"] += 1
            return
        if not self._rate_limiter.allow(source[0]):
            self.drops["rate_limited"] += 1
            return
        try:
            message = MESSAGES[command].decode(payload)
        except (DecodeError, KeyError):
            self.drops["malformed_payload"] += 1
            return
        self.accepted[command] += 1
        try:
            result = handler(Incoming(peer, source, message))
        except Exception:
            _log.failure("handler for {command} failed", command=command.name)
            self.drops["handler_error"] += 1
            return
        if isinstance(result, defer.Deferred):
            result.addCallback(self._respond, received, peer, source, send)
            result.addErrback(self._handler_failed, command)
        else:
            self._respond(result, received, peer, source, send)

    def _handler_failed(self, failure, command):
        _log.failure("handler for {command} failed", failure, command=command.name)
        self.drops["handler_error"] += 1

    def _respond(self, message, received, peer, source, send):
        if message is None or not self.running:
            return
        payload = received.message_id + message.encode()
        send(self._seal(peer, message.COMMAND, Flag.RESPONSE, payload)[1], source)

    def _receive_response(self, received, payload, peer):
        call = self._pending.get(payload[:frame.MESSAGE_ID_SIZE])
        if (call is None or call.peer_id != peer.node.node_id
                or call.answer.COMMAND != received.command):
            self.drops["unexpected_response"] += 1
            return
        try:
            message = call.answer.decode(payload[frame.MESSAGE_ID_SIZE:])
        except DecodeError:
            self.drops["malformed_payload"] += 1
            return
        del self._pending[payload[:frame.MESSAGE_ID_SIZE]]
        call.timer.cancel()
        self.accepted[call.answer.COMMAND] += 1
        call.deferred.callback(message)

    # -- the plain bootstrap commands ---------------------------------------------------

    def _receive_plain(self, received, size, source, send, now):
        if not self._rate_limiter.allow(source[0]):
            self.drops["rate_limited"] += 1
            return
        try:
            payload = frame.plain_payload(received)
            if received.command == Command.GET_NODE and not received.flags & Flag.RESPONSE:
                self._answer_get_node(received, GetNode.decode(payload), size, source, send, now)
            elif received.command == Command.NODE:
                self._receive_node(received, payload, source, now)
            else:
                self.drops["not_plain"] += 1
        except (FrameError, DecodeError):
            self.drops["malformed_payload"] += 1

    def _answer_get_node(self, received, request, size, source, send, now):
        if not self.enrolled:
            self.drops["not_enrolled"] += 1
            return
        call = self._pending.get(request.cause)
        solicited = call is not None and call.source == source and (
            call.peer_id == received.sender_id)
        answer = frame.plain(
            self._header(Flag.PLAIN | Flag.RESPONSE, Command.NODE, received.sender_domain,
                         received.sender_id, now),
            received.message_id + NodeRecord(self.own_node).encode())
        if len(answer) > size and not solicited:
            # No amplification: a plain answer is never larger than the datagram asking for it.
            self.drops["amplification"] += 1
            return
        self.accepted[Command.GET_NODE] += 1
        send(answer, source)
        if solicited and call.datagram is not None:
            # The peer could not open our request: resend the very same bytes now it knows us.
            send(call.datagram, source)

    def _receive_node(self, received, payload, source, now):
        if received.flags & Flag.RESPONSE:
            request_id, payload = payload[:frame.MESSAGE_ID_SIZE], payload[frame.MESSAGE_ID_SIZE:]
        signed = NodeRecord.decode(payload).signed
        node = signed.record
        if not isinstance(node, records.Node) or (node.node_id != received.sender_id
                                                  or node.domain != received.sender_domain):
            self.drops["sender_invalid"] += 1
            return
        try:
            peer = self.learn(signed)
        except records.RecordError as e:
            self.drops["sender_" + e.reason] += 1
            return
        self.accepted[Command.NODE] += 1
        if received.flags & Flag.RESPONSE:
            call = self._pending.get(request_id)
            if call is not None and call.answer is NodeRecord and call.source == source:
                del self._pending[request_id]
                call.timer.cancel()
                call.deferred.callback(peer)

    def _ask_for_node(self, received, size, source, send, now):
        """A sealed datagram from an unknown sender: ask it for its Node record."""
        if not self.enrolled or not self._rate_limiter.allow(source[0]):
            return
        datagram = frame.plain(
            self._header(Flag.PLAIN, Command.GET_NODE, received.sender_domain,
                         received.sender_id, now),
            GetNode(received.message_id).encode())
        if len(datagram) <= size:
            send(datagram, source)

    # -- sending ------------------------------------------------------------------------

    def _header(self, flags, command, receiver_domain, receiver_id, now):
        return frame.header(flags, command, receiver_domain, receiver_id, self.domain,
                            self.node_id, now, self._ids.next())

    def _seal(self, peer, command, flags, payload):
        node = peer.node
        head = self._header(flags, command, node.domain, node.node_id, self._now_ms())
        datagram = frame.seal(peer.seal_key, head, payload)
        if len(datagram) > frame.MAX_DATAGRAM:
            raise ValueError(f"a {len(datagram)}-byte datagram is over {frame.MAX_DATAGRAM}")
        return head[84:96], datagram

    def learn(self, signed, announce=True):
        """Verify an operator-signed Node record and keep its node as a peer.

        Observers in `learned` hear of new and renewed records (the directory caches them).
        """
        self.trust.verify(signed, self._now_ms())
        peer, changed = self.peers.learn(signed)
        if changed and announce:
            for observer in self.learned:
                observer(signed)
        return peer

    def _track(self, message_id, peer_id, answer, address, datagram, timeout):
        d = defer.Deferred(lambda d: self._pending.pop(message_id, None))
        call = _Call(d, peer_id, answer, address, datagram)
        call.timer = self._clock.callLater(
            self.call_timeout if timeout is None else timeout, self._expire, message_id)
        self._pending[message_id] = call
        return d

    def _expire(self, message_id):
        call = self._pending.pop(message_id, None)
        if call is not None:
            call.deferred.errback(CallTimeout(f"no answer from {call.source[0]}:{call.source[1]}"))

    def call(self, peer, address, message, answer, timeout=None):
        """Send `message` sealed to `peer` at `address`; a Deferred fires with the answer."""
        if not self.running:
            return defer.fail(Stopped("the RPC service is not running"))
        if not self.enrolled:
            return defer.fail(NotEnrolled("this node is not enrolled"))
        message_id, datagram = self._seal(peer, message.COMMAND, 0, message.encode())
        d = self._track(message_id, peer.node.node_id, answer, address, datagram, timeout)
        self._send(datagram, address)
        return d

    def fetch_node(self, address, timeout=None):
        """First contact: ask whoever listens at `address` for its Node record → Peer."""
        if not self.running:
            return defer.fail(Stopped("the RPC service is not running"))
        head = self._header(Flag.PLAIN, Command.GET_NODE, 0, frame.ZERO_ID, self._now_ms())
        # Padded to the largest possible answer, so the answer never amplifies.
        datagram = frame.plain(head, GetNode().encode(), pad_to=NODE_ANSWER_SIZE)
        d = self._track(head[84:96], None, NodeRecord, address, None, timeout)
        self._send(datagram, address)
        return d

    def ping(self, peer, address, data=b"", timeout=None):
        """Ping `peer`; fires with the round-trip time in seconds."""
        started = self._clock.seconds()
        d = self.call(peer, address, Ping(data), Pong, timeout)
        d.addCallback(lambda pong: self._clock.seconds() - started)
        return d

    @defer.inlineCallbacks
    def ping_address(self, host, port, count=1, timeout=None):
        """Bootstrap with whoever listens at HOST:PORT, then ping it `count` times."""
        address = (host, port) if _is_ip(host) else ((yield self._reactor.resolve(host)), port)
        peer = yield self.fetch_node(address, timeout)
        rtts = []
        for _ in range(count):
            rtts.append((yield self.ping(peer, address, timeout=timeout)))
        node = peer.node
        return {"address": f"{address[0]}:{port}", "node_id": node.node_id.hex(),
                "name": node.name, "domain": node.domain,
                "rtt_ms": [round(rtt * 1000, 3) for rtt in rtts]}

    def _answer_ping(self, incoming):
        return Pong(incoming.message.data)
