"""The RPC service: acceptance of datagrams, dispatch to handlers, calls with timeouts.

Protocol classes only move bytes; everything a datagram must pass before a handler sees it is
here, in the order of DESIGN.md §4, and every datagram that fails is counted by reason.
"""

import collections
import ipaddress

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode import records
from meshnode.core import ports
from meshnode.errors import StartupError
from meshnode.records import Role
from meshnode.rpc import carrier, frame
from meshnode.rpc.calls import PendingCalls
from meshnode.rpc.frame import PLAIN, RESPONSE, FrameError
from meshnode.rpc.messages import (MESSAGES, NODE_ANSWER_SIZE, Command, GetNode, NodeRecord,
                                   Ping, Pong, YouAre)
from meshnode.rpc.peers import PeerTable
from meshnode.rpc.protocol import RPCDatagramProtocol, RPCStreamFactory
from meshnode.rpc.ratelimit import RateLimiter
from meshnode.rpc.transports import Transports
from meshnode.wire import DecodeError, Endpoint

_log = Logger()

TIMESTAMP_WINDOW_MS = 60_000
# A restarted node holds no replay window for anyone: it takes no sealed datagram stamped
# more than this before its own start (by the sender's clock, the header's authenticated
# timestamp), so what was captured before the restart cannot be replayed to it. The margin is
# the clock skew tolerated meanwhile: a peer whose clock lags further is refused for that much
# longer after a restart, and a datagram captured in the margin's last moments before a
# restart stays replayable once.
RESTART_SKEW_MS = 2_000
# What the nodes of a suspended domain may still ask: their end-devices, answered with the
# DomainState record that says they are suspended (and, once resumed, with everything).
READ_WHILE_SUSPENDED = frozenset({Command.GET_END_DEVICES})
# Plain commands that may be sent to "whoever listens here" (receiver zeros).
_ANONYMOUS_COMMANDS = frozenset({Command.GET_NODE})


PORT_ATTEMPTS = 20


class RPCError(Exception):
    """A call that could not be completed."""


class CallTimeout(RPCError, defer.TimeoutError):
    """No valid answer came within the call's timeout."""


class Stopped(RPCError):
    """The RPC service stopped while the call was pending."""


def _timed_out(call):
    return CallTimeout(f"no answer from {call.source[0]}:{call.source[1]}")


class NotEnrolled(RPCError):
    """This node has no operator-signed Node record, so no peer can authenticate it."""


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


class Incoming:
    """An authenticated request as a handler sees it."""

    __slots__ = ("peer", "source", "message", "message_id")

    def __init__(self, peer, source, message, message_id=None):
        self.peer = peer
        self.source = source
        self.message = message
        self.message_id = message_id

    @property
    def node(self):
        return self.peer.node


class RPCService(service.Service):
    """Seals, sends, receives and dispatches RPC frames for one node identity.

    Handlers are registered by services with `register(command, handler, policy)`; a handler
    takes an Incoming and returns the response message, None, or a Deferred of either.
    """

    name = "rpc"

    def __init__(self, *, identity, reactor, interface="", port=0, roles=Role.USER,
                 call_timeout=2.0, rate=2000, burst=4000, fallback_port=0, tls=None,
                 side_channel=None, drops=None, dialer=None):
        """`tls`: → the node's TLS context (for streams to fallback ports); `dialer`: how those
        streams connect (meshnode.streams.proxy.Dialer: maybe through a proxy); `side_channel`:
        an object whose `receive(data, source)` takes the UDP socket's datagrams that are not
        RPC frames (STUN's, nat/stun.py) and says whether it consumed them; `drops`: the
        counter of dropped datagrams by reason, when shared with the side channel."""
        self._identity_service = identity
        self._reactor = reactor
        self._clock = reactor
        self._interface = interface
        self._requested_port = port
        self.port = None
        self.roles = Role(roles)
        self.call_timeout = call_timeout
        self._rate_limiter = RateLimiter(reactor, rate, burst)
        self._handlers = {}
        self._pending = PendingCalls(reactor, _timed_out)
        self.drops = collections.Counter() if drops is None else drops
        self.accepted = collections.Counter()
        self.sent = collections.Counter()  # sealed datagrams made, by command
        self.learned = []  # called with each new or renewed Node record learned
        self.revocation_observers = []  # called with the ids each Revocation newly revokes
        self.suspension_observers = []  # called with each domain newly suspended
        self.peers = None
        self.fallback_port = fallback_port
        self._tls = tls
        self._side_channel = side_channel
        self._dialer = dialer
        self.heard_at = float("-inf")  # when the last answer to one of our calls came
        self.transports = None  # made at start, once the UDP socket is there
        self._udp_port = self._tcp_port = None
        self.register(Command.PING, self._answer_ping, infrastructure_or_same_domain)
        self.register(Command.WHO_AM_I, self._answer_who_am_i, any_domain)

    # -- wiring -------------------------------------------------------------------------

    def register(self, command, handler, policy=same_domain):
        """Route requests of `command` to `handler` when `policy(rpc, sender_node)` holds."""
        if command not in MESSAGES:
            raise ValueError(f"no message codec for {Command(command).name}")
        self._handlers[Command(command)] = (handler, policy)

    def handles(self, command):
        """Whether a handler answers `command` already."""
        return Command(command) in self._handlers

    def unregister(self, command):
        """Stop answering `command` (its requests are dropped as unknown from now on)."""
        self._handlers.pop(Command(command), None)

    def privilegedStartService(self):
        self._listen()  # before twistd drops privileges (--uid): the port may be below 1024
        service.Service.privilegedStartService(self)

    def startService(self):
        if self._udp_port is None:
            self._listen()
        identity = self._identity_service.identity
        self.node_id = identity.node_id
        self.peers = PeerTable(identity)
        self.use_enrollment(self._identity_service.enrollment)
        self._ids = frame.MessageIds(self._clock)
        self.started_ms = records.now_ms(self._clock)
        self._replay_floor = self.started_ms - RESTART_SKEW_MS
        self.transports = Transports(
            self._send, carrier.StreamCarrier(self._reactor, self.receive, self._tls,
                                              self.fallback_port, self.drops, self._dialer))
        service.Service.startService(self)
        if not self.enrolled:
            _log.warn("not enrolled: datagrams from peers cannot be authenticated and are dropped")
        _log.info("RPC listening on UDP and TCP port {port}", port=self.port)

    def use_enrollment(self, enrollment):
        """Speak as the node this enrollment makes us (on start, enrollment and renewal)."""
        known = getattr(self, "trust", None)
        if known is not None and known is not enrollment.trust:
            enrollment.trust.learned_from(known)  # revoked or suspended since: still so
        self.trust = enrollment.trust
        self.own_node = enrollment.node
        self.domain = enrollment.node.record.domain if enrollment.enrolled else 0

    def _listen(self):
        """UDP and TCP on one port; with port 0, the first free UDP port whose TCP twin is
        free too (another process's TCP connection may hold the number)."""
        for attempt in range(1 if self._requested_port else PORT_ATTEMPTS):
            udp = RPCDatagramProtocol(self.receive, self.drops, self._side_channel)
            self._udp_port = ports.listen_udp(self._reactor, self._requested_port, udp,
                                              self._interface)
            self.port = self._udp_port.getHost().port
            try:
                self._tcp_port = ports.listen_tcp(self._reactor, self.port,
                                                  RPCStreamFactory(self.receive),
                                                  self._interface)
                break
            except StartupError as e:
                self._udp_port.stopListening()
                self._udp_port, error = None, e
        else:
            raise error
        self._send = udp.send

    def send_datagram(self, data, address):
        """Send raw bytes from the RPC's UDP socket (STUN shares it: what it learns is the RPC
        port's own NAT mapping)."""
        self._send(data, address)

    def stopService(self):
        # Not running first: a call started from one of the errbacks below must fail too.
        service.Service.stopService(self)
        self.transports.close()
        self._pending.fail_all(Stopped("the RPC service stopped"))
        listeners = [self._udp_port, self._tcp_port]
        self._udp_port = self._tcp_port = None
        return defer.gatherResults([defer.maybeDeferred(listener.stopListening)
                                    for listener in listeners if listener is not None])

    @property
    def enrolled(self):
        return self.own_node is not None

    def now_ms(self):
        return records.now_ms(self._clock)

    # -- receiving ----------------------------------------------------------------------

    def receive(self, data, source, send):
        """Accept or drop one datagram from `source`; answers go out through `send`.

        The checks run in DESIGN.md §4's order; this is the hot path, written for speed.
        """
        drops = self.drops
        try:
            fields = frame.parse(data)
        except FrameError as e:
            drops[e.reason] += 1
            return
        (_, _, flags, command, receiver_domain, receiver_id, sender_domain, sender_id,
         timestamp, message_id) = fields
        if receiver_id != self.node_id or receiver_domain != self.domain:
            if not (receiver_id == frame.ZERO_ID and receiver_domain == 0 and flags & PLAIN
                    and command in _ANONYMOUS_COMMANDS):
                drops["receiver"] += 1
                return
        now = records.now_ms(self._clock)
        if not -TIMESTAMP_WINDOW_MS <= timestamp - now <= TIMESTAMP_WINDOW_MS:
            drops["timestamp"] += 1
            return
        if flags & PLAIN:
            self._receive_plain(frame.Frame(fields, data), len(data), source, send, now)
            return
        if timestamp < self._replay_floor:  # sent before we started: maybe a replay
            if now < self._replay_floor:  # our clock was set back since we started
                self._replay_floor = now - RESTART_SKEW_MS
            if timestamp < self._replay_floor:
                drops["replay"] += 1
                return
        peer = self.peers.get(sender_id)
        if peer is None:
            drops["unknown_sender"] += 1
            self._ask_for_node(frame.Frame(fields, data), len(data), source, send, now)
            return
        counter = frame.COUNTER.unpack_from(message_id)[0]
        window = peer.window
        if not window.fresh(counter):
            drops["replay"] += 1
            return
        payload = frame.open_sealed(peer.open_key, message_id, data)
        if payload is None:
            drops["decrypt"] += 1
            return
        window.commit(counter)
        node = peer.node
        if node.domain != sender_domain or now >= node.expires or sender_id in self.trust.revoked:
            drops["sender_invalid"] += 1
            return
        if sender_domain in self.trust.suspended and (
                flags & RESPONSE or command not in READ_WHILE_SUSPENDED):
            drops["domain_suspended"] += 1
            return
        if flags & RESPONSE:
            self._receive_response(command, payload, peer, source, send)
            return
        entry = self._handlers.get(command)
        if entry is None:
            drops["unknown_command"] += 1
            return
        handler, policy = entry
        if not policy(self, node):
            drops["not_allowed"] += 1
            return
        if not self._rate_limiter.allow(source[0]):
            drops["rate_limited"] += 1
            return
        try:
            message = MESSAGES[command].decode(payload)
        except DecodeError:
            drops["malformed_payload"] += 1
            return
        # Requests to it (answers, introductions) go back the way it last came from.
        peer.address, peer.via = source, send
        try:
            result = handler(Incoming(peer, source, message, message_id))
        except Exception:
            _log.failure("handler for {command} failed", command=Command(command).name)
            drops["handler_error"] += 1
            return
        self.accepted[command] += 1
        if isinstance(result, defer.Deferred):
            result.addCallback(self._respond, message_id, peer, source, send)
            result.addErrback(self._handler_failed, Command(command))
        elif result is not None:
            self._respond(result, message_id, peer, source, send)

    def _handler_failed(self, failure, command):
        _log.failure("handler for {command} failed", failure, command=command.name)
        self.drops["handler_error"] += 1

    def _respond(self, message, request_id, peer, source, send):
        if message is None or not self.running:
            return
        send(self._seal(peer, message.COMMAND, RESPONSE, request_id + message.encode())[1],
             source)

    def _receive_response(self, command, payload, peer, source, send):
        request_id = payload[:frame.MESSAGE_ID_SIZE]
        call = self._pending.get(request_id)
        if call is None or call.peer_id != peer.node.node_id or call.answer.COMMAND != command:
            self.drops["unexpected_response"] += 1
            return
        try:
            message = call.answer.decode(payload[frame.MESSAGE_ID_SIZE:])
        except DecodeError:
            self.drops["malformed_payload"] += 1
            return
        self._pending.pop(request_id)
        self.accepted[command] += 1
        peer.address, peer.via = source, send
        self.heard_at = self._clock.seconds()
        call.deferred.callback(message)

    # -- the plain bootstrap commands ---------------------------------------------------

    def _receive_plain(self, received, size, source, send, now):
        if not self._rate_limiter.allow(source[0]):
            self.drops["rate_limited"] += 1
            return
        try:
            payload = frame.plain_payload(received.body)
            if received.command == Command.GET_NODE and not received.flags & RESPONSE:
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
        # Solicited: the peer could not open a call of ours to it. Answered once per call.
        solicited = (call is not None and call.datagram is not None and call.source == source
                     and call.peer_id == received.sender_id)
        answer = frame.plain(
            self._header(PLAIN | RESPONSE, Command.NODE, received.sender_domain,
                         received.sender_id, now),
            received.message_id + NodeRecord(self.own_node).encode())
        if len(answer) > size and not solicited:
            # No amplification: a plain answer is never larger than the datagram asking for it.
            self.drops["amplification"] += 1
            return
        self.accepted[Command.GET_NODE] += 1
        send(answer, source)
        if solicited:
            # The peer could not open our request: resend the very same bytes now it knows us.
            send(call.datagram, source)
            call.datagram = None

    def _receive_node(self, received, payload, source, now):
        if received.flags & RESPONSE:
            request_id, payload = payload[:frame.MESSAGE_ID_SIZE], payload[frame.MESSAGE_ID_SIZE:]
        signed = NodeRecord.decode(payload).signed
        node = signed.record if signed is not None else None
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
        if received.flags & RESPONSE:
            call = self._pending.get(request_id)
            # only a first-contact fetch_node (no peer yet) takes a plain Node answer
            if (call is not None and call.peer_id is None and call.answer is NodeRecord
                    and call.source == source):
                self._pending.pop(request_id)
                call.deferred.callback(peer)

    def _ask_for_node(self, received, size, source, send, now):
        """A sealed datagram from an unknown sender: ask it for its Node record."""
        if not self.enrolled or not self._rate_limiter.allow(source[0]):
            return
        datagram = frame.plain(
            self._header(PLAIN, Command.GET_NODE, received.sender_domain,
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
        head = frame.header(flags, command, node.domain, node.node_id, self.domain, self.node_id,
                            records.now_ms(self._clock), self._ids.next())
        datagram = frame.seal(peer.seal_key, head, payload)
        if len(datagram) > frame.MAX_DATAGRAM:
            raise ValueError(f"a {len(datagram)}-byte datagram is over {frame.MAX_DATAGRAM}")
        self.sent[command] += 1
        return head[84:96], datagram

    def learn(self, signed, announce=True):
        """Verify an operator-signed Node record and keep its node as a peer.

        Observers in `learned` hear of new and renewed records (the directory caches them).
        """
        self.trust.verify(signed, self.now_ms())
        peer, changed = self.peers.learn(signed)
        if changed and announce:
            for observer in self.learned:
                observer(signed)
        return peer

    def add_revocation(self, signed, now=None):
        """Apply an operator's Revocation record (RecordError if it fails the checks): from
        now on the revoked nodes' datagrams are dropped (sender_invalid); the ids it newly
        revokes are told to revocation_observers (wired by build_node: open tunnels and
        relayed legs are closed, DHT records dropped) → those ids."""
        new = self.trust.add_revocation(signed, self.now_ms() if now is None else now)
        if new:
            for observer in list(self.revocation_observers):
                observer(new)
        return new

    def set_domain_state(self, signed, now=None):
        """Apply an operator's DomainState record (RecordError if it fails the checks): while
        a domain is suspended its nodes' datagrams are dropped (domain_suspended), except
        their GetEndDevices, answered with the record that says why; a domain newly
        suspended is told to suspension_observers (open tunnels and relayed legs close)
        → whether the domain's state changed."""
        changed = self.trust.set_domain_state(signed, self.now_ms() if now is None else now)
        if changed and signed.record.suspended:
            for observer in list(self.suspension_observers):
                observer(signed.record.domain)
        return changed

    def apply_trust_records(self, signed_records, now=None):
        """Apply the Revocation and DomainState records among `signed_records` (as an
        operator's GetEndDevices answer carries them); unusable ones are logged and skipped
        → the records that are neither."""
        now = self.now_ms() if now is None else now
        others = []
        for signed in signed_records:
            record = signed.record
            try:
                if isinstance(record, records.Revocation):
                    self.add_revocation(signed, now)
                elif isinstance(record, records.DomainState):
                    self.set_domain_state(signed, now)
                else:
                    others.append(signed)
            except records.RecordError as e:
                _log.info("an operator's {kind} record is unusable: {reason}",
                          kind=type(record).__name__, reason=e)
        return others

    def _track(self, message_id, peer_id, answer, address, datagram, timeout):
        return self._pending.track(message_id, peer_id, answer, address, datagram,
                                   self.call_timeout if timeout is None else timeout)

    def use_mode(self, mode):
        """Carry our frames by `mode` from now on ("udp", or "tcp"/"tls" streams)."""
        self.transports.use(mode, self.peers)

    def call(self, peer, address, message, answer, timeout=None, mode=None):
        """Send `message` sealed to `peer` at `address`; a Deferred fires with the answer.
        `mode` ("udp", "tcp", "tls") forces a transport, for probes."""
        if not self.running:
            return defer.fail(Stopped("the RPC service is not running"))
        if not self.enrolled:
            return defer.fail(NotEnrolled("this node is not enrolled"))
        message_id, datagram = self._seal(peer, message.COMMAND, 0, message.encode())
        d = self._track(message_id, peer.node.node_id, answer, address, datagram, timeout)
        self.transports.sender(peer, address, mode)(datagram, address)
        return d

    def send(self, peer, address, message):
        """Send a request that expects no answer (a forwarded request: its answer comes back
        to whoever asked first by another way)."""
        if self.running and self.enrolled:
            datagram = self._seal(peer, message.COMMAND, 0, message.encode())[1]
            self.transports.sender(peer, address)(datagram, address)

    def respond(self, peer, address, request_id, message):
        """Answer request `request_id` of `peer` later, from outside its handler (a
        super-node passing a tunnel-node's answer on)."""
        if self.running and self.enrolled:
            self._respond(message, request_id, peer, address,
                          self.transports.sender(peer, address))

    def fetch_node(self, address, timeout=None, mode=None):
        """First contact: ask whoever listens at `address` for its Node record → Peer."""
        if not self.running:
            return defer.fail(Stopped("the RPC service is not running"))
        head = self._header(PLAIN, Command.GET_NODE, 0, frame.ZERO_ID, self.now_ms())
        # Padded to the largest possible answer, so the answer never amplifies.
        datagram = frame.plain(head, GetNode().encode(), pad_to=NODE_ANSWER_SIZE)
        d = self._track(head[84:96], None, NodeRecord, address, None, timeout)
        self.transports.sender(None, address, mode)(datagram, address)
        return d

    def ping(self, peer, address, data=b"", timeout=None, mode=None):
        """Ping `peer`; fires with the round-trip time in seconds."""
        started = self._clock.seconds()
        d = self.call(peer, address, Ping(data), Pong, timeout, mode)
        d.addCallback(lambda pong: self._clock.seconds() - started)
        return d

    def resolve(self, address):
        """(host, port) with the host name resolved without blocking → Deferred[(ip, port)].

        Datagrams go out with sendto, which would resolve a name on the reactor thread."""
        host, port = address
        if _is_ip(host):
            return defer.succeed((host, port))
        return self._reactor.resolve(host).addCallback(lambda ip: (ip, port))

    def _answer_ping(self, incoming):
        return Pong(incoming.message.data)

    def _answer_who_am_i(self, incoming):
        """Reflexive discovery: the endpoint the request came from, as seen here."""
        return YouAre(Endpoint(incoming.source[0], incoming.source[1]))
