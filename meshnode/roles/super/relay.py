"""The relay of a super-node: splices a user-node's and a tunnel-node's outbound connections.

A user-node that cannot reach a tunnel-node directly sends ForwardedTunnelRequest to a
super-node that holds the tunnel-node's NodeInfo (a replica of their domain: the tunnel-node
keeps its NAT mapping to it alive). The super-node makes a one-time token, passes the request
on as RelayedTunnelRequest — with the requester's Node record, endpoint and request id, the
relay endpoint and the token — and keeps nothing about it but the token. The tunnel-node
answers with ForwardedTunnelOpened, which the super-node sends on as the answer to the
requester's request. Both ends then dial the relay port and send the token; the relay pairs
them, answers each with GATE_OPEN and splices the two streams. They run TLS end to end, so the
relay sees only ciphertext. A token works once and expires after TOKEN_SECONDS; past a limit
(per domain, in total, or near the process's open-file limit) a request is refused at once.
Introductions for punched tunnels (Introduce → Introduction) pass through the same way.
"""

import collections
import os
import resource

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from meshnode import records
from meshnode.config import unspecified
from meshnode.core import ports
from meshnode.rpc.messages import (Command, Forwarding, ForwardedTunnelOpened, Introduce,
                                   Introduction, PunchIntroduction, RelayedTunnelRequest,
                                   TunnelResult)
from meshnode.rpc import carrier
from meshnode.rpc.service import any_domain
from meshnode.streams import gate, tunnel_tls
from meshnode.streams.splice import Leg
from meshnode.wire import Endpoint

_log = Logger()

TOKEN_SECONDS = 10.0
FILES_PER_TUNNEL = 2
FILE_MARGIN = 64  # descriptors kept free for the node's own sockets, database and logs


class RelayService(service.Service):
    name = "relay"

    def __init__(self, *, rpc, partition, clock, listen_address="", port=7402,
                 per_domain=256, total=4096, advertised=None):
        self._rpc = rpc
        self._partition = partition
        self._clock = clock
        self._listen_address = listen_address
        self._requested_port = port
        self.per_domain = per_domain
        self.total = total
        self._advertised = advertised  # → the host others reach this node on, or None
        self._tokens = {}
        self._ends = {}  # RelayToken → the ids of the two nodes it joins, until both left
        self._open = {}  # RelayToken → its two spliced legs
        self._port = None
        self.open_per_domain = collections.Counter()
        self.open = 0
        self.relayed = 0
        self.introduced = 0
        self.refusals = collections.Counter()
        self.bytes_relayed = 0
        self._files_counted_at = float("-inf")
        self._files_left_then = 0
        self._tokens_then = 0

    def privilegedStartService(self):
        self._listen()
        service.Service.privilegedStartService(self)

    def _listen(self):
        if self._port is None:
            self._port = ports.listen_tcp(self._clock, self._requested_port,
                                          protocol.Factory.forProtocol(self.leg),
                                          self._listen_address, "relay TCP", backlog=1024)

    def leg(self):
        """A new relay leg's protocol (for the relay port and the fallback port)."""
        return _RelayGate(self)

    def startService(self):
        self._listen()
        self._rpc.register(Command.FORWARDED_TUNNEL_REQUEST, self._request, any_domain)
        self._rpc.register(Command.FORWARDED_TUNNEL_OPENED, self._opened, any_domain)
        self._rpc.register(Command.INTRODUCE, self._introduce, any_domain)
        self._rpc.register(Command.PUNCH_REQUEST, self._introduce, any_domain)
        _log.info("relay port {port}", port=self.port)
        service.Service.startService(self)

    def stopService(self):
        service.Service.stopService(self)
        for command in (Command.FORWARDED_TUNNEL_REQUEST, Command.FORWARDED_TUNNEL_OPENED,
                        Command.INTRODUCE, Command.PUNCH_REQUEST):
            self._rpc.unregister(command)
        port, self._port = self._port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None

    @property
    def port(self):
        return self._port.getHost().port if self._port is not None else None

    def _files_left(self):
        """Descriptors left under the soft limit; counted at most once a second (listing
        /proc/self/fd costs milliseconds with thousands open)."""
        now = self._clock.seconds()
        if now - self._files_counted_at >= 1.0:
            self._files_counted_at = now
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            try:
                used = len(os.listdir("/proc/self/fd"))
            except OSError:
                used = FILES_PER_TUNNEL * self.open
            self._files_left_then = soft - used - FILE_MARGIN
            self._tokens_then = len(self._tokens) + self.open
        # Tunnels (and tokens) since the count each take FILES_PER_TUNNEL more.
        since = len(self._tokens) + self.open - self._tokens_then
        return self._files_left_then - FILES_PER_TUNNEL * since

    def _refuse(self, incoming, reason):
        self.refusals[reason] += 1
        _log.info("relay refused for {node}: {reason}", node=incoming.node.node_id.hex()[:16],
                  reason=reason)
        return ForwardedTunnelOpened(TunnelResult.REFUSED, reason)

    def _request(self, incoming):
        """A user-node's request: pass it on to the tunnel-node, answer only with refusals."""
        message, requester = incoming.message, incoming.node
        if message.forwarding is not None:
            return self._refuse(incoming, "malformed_request")
        now = self._rpc.now_ms()
        entry = self._partition.records.get(requester.domain, message.tunnel_node, now)
        if entry is None or not entry.info.record.roles & records.Role.TUNNEL:
            return self._refuse(incoming, "unknown_tunnel_node")
        self._expire()
        if self.open + len(self._tokens) >= self.total:
            return self._refuse(incoming, "limit_total")
        # Outstanding tokens count, as for the total: each may become an open tunnel.
        waiting = sum(1 for held in self._tokens.values() if held.domain == requester.domain)
        if self.open_per_domain[requester.domain] + waiting >= self.per_domain:
            return self._refuse(incoming, "limit_domain")
        if self._files_left() < FILES_PER_TUNNEL * (len(self._tokens) + 1):
            return self._refuse(incoming, "limit_files")
        peer, target = self._reach(entry)
        if target is None:
            return self._refuse(incoming, "tunnel_node_unreachable")
        host = (self._advertised() if self._advertised else None) or self._listen_address
        if unspecified(host):
            return self._refuse(incoming, "relay_address_unknown")
        token = os.urandom(tunnel_tls.TOKEN_SIZE)
        while not carrier.relay_token_allowed(token):
            token = os.urandom(tunnel_tls.TOKEN_SIZE)
        held = self._tokens[token] = gate.RelayToken(requester.domain,
                                                     self._clock.seconds() + TOKEN_SECONDS, self)
        self._ends[held] = frozenset((requester.node_id, message.tunnel_node))
        forwarding = Forwarding(incoming.peer.signed, Endpoint(*incoming.source[:2]),
                                incoming.message_id, Endpoint(host, self.port), token)
        self._rpc.send(peer, target,
                       RelayedTunnelRequest(message.tunnel_node, message.device_id,
                                            message.port, forwarding))
        return None  # the tunnel-node's ForwardedTunnelOpened is the answer

    def _reach(self, entry):
        """(peer, address) to reach the node of a DHT entry: where its datagrams last came
        from (its keepalives keep that mapping open, even through a symmetric NAT), else the
        endpoint its NodeInfo reports; (None, None) when it is not known here."""
        info = entry.info.record
        peer = self._rpc.peers.get(info.node_id)
        if peer is None:
            return None, None
        if peer.address is not None:
            return peer, peer.address
        target = (info.observed or info.addresses or (None,))[0]
        return (peer, (target.host, target.port)) if target is not None else (None, None)

    def _introduce(self, incoming):
        """A node asks to be introduced to another of its domain — a tunnel-node for a
        punched tunnel (Introduce), or any node for `meshnode punch` (PunchRequest): pass it
        on with the requester's Node record and RPC endpoint; the other's answer comes back
        as a ForwardedTunnelOpened (`_opened`). Nothing is kept here."""
        message, requester = incoming.message, incoming.node
        if message.back is not None:
            return self._refuse(incoming, "malformed_request")
        if message.endpoint.host != incoming.source[0]:
            # Its public address is where its request came from: an introduction never
            # makes the other node send its punch packets to a third party.
            return self._refuse(incoming, "endpoint_not_requester")
        tunnel = isinstance(message, Introduce)
        target_id = message.tunnel_node if tunnel else message.peer
        entry = self._partition.records.get(requester.domain, target_id, self._rpc.now_ms())
        if entry is None or (tunnel and not entry.info.record.roles & records.Role.TUNNEL):
            return self._refuse(incoming, "unknown_tunnel_node" if tunnel else "unknown_peer")
        peer, target = self._reach(entry)
        if target is None:
            return self._refuse(incoming,
                                "tunnel_node_unreachable" if tunnel else "peer_unreachable")
        back = (incoming.peer.signed, Endpoint(*incoming.source[:2]), incoming.message_id)
        self.introduced += 1
        if tunnel:
            passed = Introduction(message.tunnel_node, message.device_id, message.port,
                                  message.endpoint, back, message.birthday)
        else:
            passed = PunchIntroduction(message.peer, message.endpoint, message.nonce, back)
        self._rpc.send(peer, target, passed)
        return None

    def _opened(self, incoming):
        """A tunnel-node's outcome: send it on to the requester as its answer."""
        message = incoming.message
        if message.back is None:
            self.refusals["malformed_opened"] += 1
            return None
        node_id, endpoint, request_id = message.back
        peer = self._rpc.peers.get(node_id)
        if peer is None or peer.node.domain != incoming.node.domain:
            # Only a node of the requester's domain (its tunnel-node) answers for it.
            self.refusals["unknown_requester"] += 1
            return None
        self._rpc.respond(peer, (endpoint.host, endpoint.port), request_id,
                          ForwardedTunnelOpened(message.result, message.reason,
                                                message.endpoint, message.token))
        return None

    # -- pairing: tokens (gate.RelayToken) decide, the relay does what they say --------------

    def _expire(self):
        now = self._clock.seconds()
        for token, held in list(self._tokens.items()):
            held.expire(now)
            if not held.usable:
                del self._tokens[token]
                if held not in self._open:
                    self._ends.pop(held, None)

    def arrive(self, leg, token):
        """A leg sent its token: its RelayToken parks it, pairs it with the one waiting or
        refuses it."""
        self._expire()
        held = self._tokens.get(token)
        if held is None:
            return self.bad_token(leg)
        leg.pairing = held
        held.arrive(leg, self._clock.seconds())
        if not held.usable:
            del self._tokens[token]  # one use
        return None

    def left(self, leg):
        if leg.pairing is not None:
            leg.pairing.leave(leg)
            if self._open.pop(leg.pairing, None) is not None:
                self._ends.pop(leg.pairing, None)
        self.bytes_relayed += leg.bytes_forwarded

    def revoked(self, node_ids):
        """(Wired to the RPC's revocation observers.) Relayed tunnels of revoked nodes are
        closed, and their tokens no longer pair."""
        self._close_where(lambda held, ends: ends & node_ids, "revoked")

    def suspended(self, domain):
        """(Wired to the RPC's suspension observers.) Relayed tunnels of a suspended domain
        are closed, and their tokens no longer pair."""
        self._close_where(lambda held, ends: held.domain == domain, "domain_suspended")

    def _close_where(self, test, reason):
        for held, ends in list(self._ends.items()):
            if test(held, ends):
                for leg in self._open.pop(held, ()):
                    leg.transport.abortConnection()
                self._ends.pop(held, None)
                for token in [t for t, one in self._tokens.items() if one is held]:
                    del self._tokens[token]
                self.refusals[reason] += 1

    def paired(self, first, second, domain):
        self._open[first.pairing] = (first, second)
        for one in (first, second):
            one.handshake.go_ahead()
        self.open += 1
        self.open_per_domain[domain] += 1
        self.relayed += 1
        first.join(second)

    def bad_token(self, leg):
        self.refusals["bad_token"] += 1
        leg.handshake.refuse_token(gate.BAD_TOKEN)

    def expired(self, leg):
        leg.handshake.refuse_token(gate.TOKEN_EXPIRED)

    def unpaired(self, domain):
        self.open -= 1
        self.open_per_domain[domain] -= 1
        if not self.open_per_domain[domain]:
            del self.open_per_domain[domain]

    def status(self):
        return {"port": self.port, "open": self.open, "relayed": self.relayed,
                "introduced": self.introduced,
                "waiting": len(self._tokens), "bytes": self.bytes_relayed,
                "refused": dict(self.refusals)}


class _RelayGate(Leg):
    """A leg at the relay port (or the fallback port): its token, then — once the other leg
    came with it — GATE_OPEN and the splice. It feeds a gate.ListeningGate without TLS and
    performs its actions (gate.IGateActions); its token's RelayToken pairs it."""

    dataReceived = Leg.forward  # once the gate is through; until then the handshake's
    pairing = None  # the RelayToken of the token it came with, if the relay knew that token

    def __init__(self, relay):
        self.relay = relay
        self.handshake = gate.ListeningGate(self, tls=False)
        self.dataReceived = self.handshake.received

    def connectionMade(self):
        self.setTimeout(TOKEN_SECONDS)

    def timeoutConnection(self):
        self.handshake.timed_out()

    def left(self):
        self.handshake.lost()
        self.relay.left(self)

    # -- what the handshake does ---------------------------------------------------------------

    def gate_write(self, data):
        self.transport.write(data)

    def gate_token(self, token):
        self.relay.arrive(self, token)

    def gate_opened(self, received):
        del self.dataReceived  # straight to the other leg from now on

    def gate_abort(self, reason):
        self.transport.abortConnection()
