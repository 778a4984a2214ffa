"""Tests for the super-node's relay (meshnode.roles.relay): ForwardedTunnelRequest passed on to
the tunnel-node, its answer passed back, and the pairing of the two legs by one-time token.

The relay runs on a tests.mesh node with a partition index holding the tunnel-node's NodeInfo;
the tunnel-node and the requester are mesh nodes; relay legs run over StringTransports.
"""

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.streams import tunnel_tls
from meshnode.core.dht import Entry, PartitionStore
from meshnode.records import NatBehaviour, Role
from meshnode.roles.super.relay import TOKEN_SECONDS, RelayService
from meshnode.rpc.messages import (Command, ForwardedTunnelOpened, ForwardedTunnelRequest,
                                   Forwarding, Introduce, Introduction, TunnelResult,
                                   WhoAmI, YouAre)
from meshnode.rpc.service import any_domain
from meshnode.wire import Endpoint
from tests.mesh import Mesh

RELAY_PORT = 7402
DEVICE = bytes([0xD0]) * 32
DEVICE_PORT = 631


class _Partition:
    """What RelayService needs of a PartitionService: its index."""

    def __init__(self):
        self.records = PartitionStore()


class RelayTestCase(SynchronousTestCase):
    """A relay on node `super1`, a tunnel-node whose NodeInfo it holds, and a requester."""

    total = 4096
    per_domain = 256

    def setUp(self):
        self.mesh = mesh = Mesh(self)
        self.super = mesh.user("super1", "infra")
        self.tunnel = mesh.user("tunnel1")
        self.user = mesh.user("user1")
        self.partition = _Partition()
        self.hold(self.tunnel)
        self.super.rpc.learn(self.tunnel.rpc.own_node)  # it keeps its mapping to us alive
        self.tunnel.rpc.learn(self.super.rpc.own_node)
        self.forwarded = []
        self.tunnel.rpc.register(Command.RELAYED_TUNNEL_REQUEST, self.forwarded.append,
                                 any_domain)
        self.relay = RelayService(rpc=self.super.rpc, partition=self.partition,
                                  clock=self.super.reactor, listen_address=self.super.host,
                                  port=RELAY_PORT, per_domain=self.per_domain, total=self.total)
        self.relay.startService()
        self.addCleanup(lambda: self.relay.running and self.relay.stopService())

    def hold(self, node, roles=Role.USER | Role.TUNNEL, observed=()):
        """The partition holds `node`'s NodeInfo (signed by it) with `roles`."""
        info = node.identity.sign(records.NodeInfo(
            node.rpc.domain, node.node_id, [Endpoint(node.host, node.rpc.port)],
            node.rpc.port, observed, NatBehaviour.UNKNOWN, (), roles, node.rpc.now_ms()))
        self.partition.records.put(Entry(node.rpc.own_node, info), node.rpc.now_ms())

    def ask(self, tunnel_node=None, forwarding=None, node=None):
        """`node` (the user) sends a ForwardedTunnelRequest to the relay → (Deferred of the
        answer, the request's message id)."""
        node = node or self.user
        peer = node.rpc.learn(self.super.rpc.own_node)
        message = ForwardedTunnelRequest(tunnel_node or self.tunnel.node_id, DEVICE,
                                         DEVICE_PORT, forwarding)
        before = set(node.rpc._pending)
        d = node.rpc.call(peer, self.super.address, message, ForwardedTunnelOpened)
        # Calls left unanswered fail (time out, or stop with the RPC): not a test's concern.
        self.addCleanup(d.addErrback, lambda failure: None)
        (request_id,) = set(node.rpc._pending) - before
        self.mesh.network.flush()
        return d, request_id

    def refused(self, reason, **kwargs):
        """The request is answered at once REFUSED with `reason`, counted, and nothing is
        forwarded."""
        d, _ = self.ask(**kwargs)
        self.assertEqual(self.successResultOf(d),
                         ForwardedTunnelOpened(TunnelResult.REFUSED, reason))
        self.assertEqual(self.relay.refusals[reason], 1)
        self.assertEqual(self.forwarded, [])

    def answer(self, incoming, result=TunnelResult.OPENED, reason=""):
        """The tunnel-node answers a forwarded request through the relay."""
        forwarding = incoming.message.forwarding
        back = (forwarding.requester.record.node_id, forwarding.requester_endpoint,
                forwarding.request_id)
        if result == TunnelResult.OPENED:
            message = ForwardedTunnelOpened(result, reason, forwarding.relay, forwarding.token,
                                            back)
        else:
            message = ForwardedTunnelOpened(result, reason, back=back)
        peer = self.tunnel.rpc.peers.get(self.super.node_id)
        self.tunnel.rpc.send(peer, self.super.address, message)
        self.mesh.network.flush()

    def token(self):
        """A token the relay made for a request of the user (answered OPENED)."""
        d, _ = self.ask()
        incoming = self.forwarded[-1]
        self.answer(incoming)
        self.successResultOf(d)
        return incoming.message.forwarding.token

    def leg(self):
        """A new connection to the relay port → (protocol, transport)."""
        port, factory = self.super.reactor.tcpServers[-1][:2]
        self.assertEqual(port, RELAY_PORT)
        leg = factory.buildProtocol(None)
        leg.callLater = self.super.reactor.callLater
        transport = StringTransport()
        leg.makeConnection(transport)
        return leg, transport


class ForwardTests(RelayTestCase):
    """ForwardedTunnelRequest → RelayedTunnelRequest to the tunnel-node, and its answer back."""

    def test_forwards_with_forwarding(self):
        """The tunnel-node gets the request with the requester's Node record, endpoint and
        request id, the relay endpoint and a fresh token; the requester is not answered."""
        d, request_id = self.ask()
        self.assertNoResult(d)
        (incoming,) = self.forwarded
        message = incoming.message
        self.assertEqual(message.COMMAND, Command.RELAYED_TUNNEL_REQUEST)
        self.assertEqual((message.tunnel_node, message.device_id, message.port),
                         (self.tunnel.node_id, DEVICE, DEVICE_PORT))
        self.assertEqual(incoming.node.node_id, self.super.node_id)
        self.assertEqual(message.forwarding, Forwarding(
            self.user.rpc.own_node, Endpoint(self.user.host, self.user.rpc.port), request_id,
            Endpoint(self.super.host, RELAY_PORT), message.forwarding.token))
        self.assertEqual(len(message.forwarding.token), tunnel_tls.TOKEN_SIZE)
        self.assertEqual(self.relay.status()["waiting"], 1)

    def test_sent_to_observed_endpoint(self):
        """The relay sends to the tunnel-node's observed endpoint when its NodeInfo has one
        (its NAT mapping), not its own addresses."""
        self.mesh.advance(1)
        self.hold(self.tunnel, observed=[Endpoint("198.51.100.1", 40000)])
        self.ask()
        self.assertEqual(self.super.udp.sent[-1][1], ("198.51.100.1", 40000))

    def test_tokens_differ(self):
        """Every request gets its own token."""
        self.ask()
        self.ask()
        first, second = (i.message.forwarding.token for i in self.forwarded)
        self.assertNotEqual(first, second)

    def test_opened_passed_back(self):
        """The tunnel-node's ForwardedTunnelOpened answers the requester's original request
        (without `back`)."""
        d, _ = self.ask()
        incoming = self.forwarded[0]
        self.answer(incoming)
        forwarding = incoming.message.forwarding
        self.assertEqual(self.successResultOf(d), ForwardedTunnelOpened(
            TunnelResult.OPENED, "", Endpoint(self.super.host, RELAY_PORT), forwarding.token))

    def test_refusal_passed_back(self):
        """A tunnel-node's refusal reaches the requester with its reason."""
        d, _ = self.ask()
        self.answer(self.forwarded[0], TunnelResult.REFUSED, "port_not_allowed")
        self.assertEqual(self.successResultOf(d), ForwardedTunnelOpened(
            TunnelResult.REFUSED, "port_not_allowed"))

    def test_answer_without_back_dropped(self):
        """A ForwardedTunnelOpened without `back` is counted malformed_opened and dropped."""
        d, _ = self.ask()
        peer = self.tunnel.rpc.peers.get(self.super.node_id)
        self.tunnel.rpc.send(peer, self.super.address,
                             ForwardedTunnelOpened(TunnelResult.REFUSED, "x"))
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.relay.refusals["malformed_opened"], 1)

    def test_answer_for_unknown_requester_dropped(self):
        """An answer naming a requester the relay does not know is counted and dropped."""
        peer = self.tunnel.rpc.peers.get(self.super.node_id)
        self.tunnel.rpc.send(peer, self.super.address, ForwardedTunnelOpened(
            TunnelResult.REFUSED, "x", back=(bytes(32), Endpoint("192.0.2.1", 1), bytes(12))))
        self.mesh.network.flush()
        self.assertEqual(self.relay.refusals["unknown_requester"], 1)


class RefusalTests(RelayTestCase):
    """Requests the relay refuses at once, each answered and counted."""

    def test_unknown_tunnel_node(self):
        """A tunnel-node whose NodeInfo the partition does not hold → unknown_tunnel_node."""
        self.refused("unknown_tunnel_node", tunnel_node=bytes(32))

    def test_not_a_tunnel_node(self):
        """A node whose NodeInfo does not announce the tunnel role → unknown_tunnel_node."""
        self.hold(self.user, roles=Role.USER)
        self.refused("unknown_tunnel_node", tunnel_node=self.user.node_id)

    def test_tunnel_node_of_another_domain(self):
        """A requester of another domain cannot reach this domain's tunnel-node."""
        stranger = self.mesh.user("carol", "globex")
        self.refused("unknown_tunnel_node", node=stranger)

    def test_expired_node_info(self):
        """A NodeInfo past its lifetime no longer counts."""
        self.mesh.advance(records.NODE_INFO_LIFETIME_MS // 1000)
        self.refused("unknown_tunnel_node")

    def test_forwarding_from_requester_refused(self):
        """A request that already carries a forwarding → malformed_request."""
        forwarding = Forwarding(self.user.rpc.own_node, Endpoint("192.0.2.1", 1), bytes(12),
                                Endpoint("192.0.2.2", 2), bytes(32))
        self.refused("malformed_request", forwarding=forwarding)

    def test_tunnel_node_unreachable(self):
        """A tunnel-node the relay never heard from (no peer) → tunnel_node_unreachable."""
        other = self.mesh.user("tunnel2")
        self.hold(other)
        self.refused("tunnel_node_unreachable", tunnel_node=other.node_id)

    def test_relay_address_unknown(self):
        """A relay that knows no address of its own to hand out → relay_address_unknown."""
        self.relay._listen_address = ""
        self.relay._advertised = lambda: None
        self.refused("relay_address_unknown")

    def test_advertised_address(self):
        """The advertised host (the super-node's public endpoint) is the relay endpoint."""
        self.relay._advertised = lambda: "203.0.113.5"
        self.ask()
        self.assertEqual(self.forwarded[0].message.forwarding.relay,
                         Endpoint("203.0.113.5", RELAY_PORT))

    def test_limit_files(self):
        """Near the open-file limit → limit_files."""
        self.relay._files_left = lambda: 1
        self.refused("limit_files")


class TotalLimitTests(RelayTestCase):
    total = 2

    def test_tokens_count_to_total(self):
        """Outstanding tokens count toward the total: past it, refused at once."""
        self.ask()
        self.ask()
        self.forwarded.clear()
        self.refused("limit_total")

    def test_expired_tokens_free_places(self):
        """Tokens past TOKEN_SECONDS free their places."""
        self.ask()
        self.ask()
        self.mesh.advance(TOKEN_SECONDS)
        self.forwarded.clear()
        d, _ = self.ask()
        self.assertNoResult(d)
        self.assertEqual(len(self.forwarded), 1)

    def test_open_tunnels_count_to_total(self):
        """Open tunnels count toward the total."""
        for _ in range(2):
            token = self.token()
            self.relay.arrive(self.leg()[0], token)
            self.relay.arrive(self.leg()[0], token)
        self.assertEqual(self.relay.open, 2)
        self.forwarded.clear()
        self.refused("limit_total")


class DomainLimitTests(RelayTestCase):
    per_domain = 1

    def test_open_tunnels_count(self):
        """Past per_domain open tunnels of the requester's domain → limit_domain."""
        token = self.token()
        self.relay.arrive(self.leg()[0], token)
        self.relay.arrive(self.leg()[0], token)
        self.forwarded.clear()
        self.refused("limit_domain")

    def test_other_domains_unaffected(self):
        """One domain at its limit does not refuse another's requests."""
        token = self.token()
        self.relay.arrive(self.leg()[0], token)
        self.relay.arrive(self.leg()[0], token)
        stranger = self.mesh.user("carol", "globex")
        tunnel = self.mesh.user("tunnel9", "globex")
        self.hold(tunnel)
        self.super.rpc.learn(tunnel.rpc.own_node)
        self.forwarded.clear()
        d, _ = self.ask(tunnel_node=tunnel.node_id, node=stranger)
        self.assertNoResult(d)
        self.assertEqual(self.relay.refusals, {})

    def test_outstanding_tokens_count(self):
        """Tokens handed out together cannot open more than per_domain tunnels."""
        self.ask()
        self.forwarded.clear()
        self.refused("limit_domain")


class PairingTests(RelayTestCase):
    """arrive(): the first leg waits, the second is paired with it."""

    def setUp(self):
        super().setUp()
        self.tok = self.token()

    def test_first_leg_parked(self):
        """The first leg is told nothing and kept open."""
        leg, transport = self.leg()
        leg.dataReceived(self.tok)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.relay.open, 0)

    def test_second_leg_paired(self):
        """The second leg with the token: both get GATE_OPEN and are spliced both ways."""
        first, first_transport = self.leg()
        second, second_transport = self.leg()
        first.dataReceived(self.tok[:5])
        first.dataReceived(self.tok[5:])
        second.dataReceived(self.tok)
        self.assertEqual(first_transport.value(), tunnel_tls.GATE_OPEN)
        self.assertEqual(second_transport.value(), tunnel_tls.GATE_OPEN)
        self.assertIs(first.other, second)
        self.assertIs(first_transport.producer, second_transport)
        self.assertIs(second_transport.producer, first_transport)
        first.dataReceived(b"client hello")
        second.dataReceived(b"server hello")
        self.assertEqual(second_transport.value(), tunnel_tls.GATE_OPEN + b"client hello")
        self.assertEqual(first_transport.value(), tunnel_tls.GATE_OPEN + b"server hello")
        self.assertEqual((self.relay.open, dict(self.relay.open_per_domain), self.relay.relayed,
                          self.relay.status()["waiting"]),
                         (1, {self.user.rpc.domain: 1}, 1, 0))

    def test_spliced_reads_skip_the_handshake(self):
        """Once paired, a leg's reads go straight to the splice (Leg.forward), not through
        its handshake, while before they went to the handshake."""
        first, _ = self.leg()
        second, _ = self.leg()
        self.assertEqual(first.dataReceived, first.handshake.received)
        first.dataReceived(self.tok)
        second.dataReceived(self.tok)
        self.assertEqual((first.dataReceived, second.dataReceived),
                         (first.forward, second.forward))

    def test_token_works_once(self):
        """A third leg with the token of a paired pair is aborted, bad_token."""
        for _ in range(2):
            self.leg()[0].dataReceived(self.tok)
        third, transport = self.leg()
        third.dataReceived(self.tok)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.relay.refusals["bad_token"], 1)
        self.assertEqual(self.relay.relayed, 1)

    def test_token_expires(self):
        """After TOKEN_SECONDS the token is bad: the waiting leg is dropped, a late second
        leg aborted."""
        first, first_transport = self.leg()
        first.dataReceived(self.tok)
        self.super.reactor.advance(TOKEN_SECONDS)
        second, second_transport = self.leg()
        second.dataReceived(self.tok)
        self.assertTrue(first_transport.disconnecting)
        self.assertTrue(second_transport.disconnecting)
        self.assertEqual(self.relay.refusals["bad_token"], 1)
        self.assertEqual(self.relay.open, 0)

    def test_unknown_token(self):
        """A token the relay never made is aborted and counted."""
        leg, transport = self.leg()
        leg.dataReceived(bytes(tunnel_tls.TOKEN_SIZE))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.relay.refusals["bad_token"], 1)

    def test_bytes_after_token_aborted(self):
        """Bytes after the token before GATE_OPEN → aborted without using the token."""
        leg, transport = self.leg()
        leg.dataReceived(self.tok + b"\x16")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.relay.status()["waiting"], 1)

    def test_bytes_while_waiting_aborted(self):
        """A waiting leg that sends anything before its GATE_OPEN breaks the gate: aborted,
        and nothing of it reaches the leg it would have been paired with."""
        first, first_transport = self.leg()
        first.dataReceived(self.tok)
        first.dataReceived(b"\x16")
        self.assertTrue(first_transport.disconnecting)
        first.connectionLost(None)
        second, second_transport = self.leg()
        third, third_transport = self.leg()
        second.dataReceived(self.tok)
        third.dataReceived(self.tok)
        self.assertEqual(third_transport.value(), tunnel_tls.GATE_OPEN)
        self.assertEqual(self.relay.open, 1)

    def test_waiting_leg_gives_up(self):
        """A waiting leg that closes frees its place: the token still pairs two others."""
        first, _ = self.leg()
        first.dataReceived(self.tok)
        first.connectionLost(None)
        second, second_transport = self.leg()
        third, third_transport = self.leg()
        second.dataReceived(self.tok)
        third.dataReceived(self.tok)
        self.assertIs(second.other, third)
        self.assertEqual(second_transport.value(), tunnel_tls.GATE_OPEN)
        self.assertEqual(self.relay.open, 1)

    def test_waiting_leg_timeout(self):
        """A leg that sends no token within TOKEN_SECONDS is closed."""
        leg, transport = self.leg()
        self.super.reactor.advance(TOKEN_SECONDS)
        self.assertTrue(transport.disconnecting)

    def test_left_bookkeeping(self):
        """Closing one side closes the other; `open` goes down once; bytes are summed."""
        first, first_transport = self.leg()
        second, second_transport = self.leg()
        first.dataReceived(self.tok)
        second.dataReceived(self.tok)
        first.dataReceived(b"abc")
        second.dataReceived(b"defgh")
        first.connectionLost(None)
        self.assertTrue(second_transport.disconnecting)
        self.assertEqual((self.relay.open, dict(self.relay.open_per_domain)), (0, {}))
        second.connectionLost(None)
        self.assertEqual((self.relay.open, dict(self.relay.open_per_domain)), (0, {}))
        self.assertEqual(self.relay.status()["bytes"], 8)

    def test_revoked_end_closes_its_relayed_tunnel(self):
        """A revocation naming either end of a relayed tunnel closes both legs; one naming
        neither leaves it; a token not yet paired stops working."""
        first, first_transport = self.leg()
        second, second_transport = self.leg()
        first.dataReceived(self.tok)
        second.dataReceived(self.tok)
        self.relay.revoked({bytes(32)})
        self.assertFalse(first_transport.disconnecting or second_transport.disconnecting)
        self.relay.revoked({self.tunnel.node_id})
        self.assertTrue(first_transport.disconnecting and second_transport.disconnecting)
        waiting = self.token()
        self.relay.revoked({self.user.node_id})
        leg, transport = self.leg()
        leg.dataReceived(waiting)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.relay.refusals["revoked"], 2)

    def test_stop(self):
        """stopService unregisters the relay's commands: requests go unanswered."""
        self.relay.stopService()
        self.forwarded.clear()
        d, _ = self.ask()
        self.assertNoResult(d)
        self.assertEqual(self.forwarded, [])
        self.assertEqual(self.super.rpc.drops["unknown_command"], 1)


class IntroduceTests(RelayTestCase):
    """Introduce from a user-node → Introduction to the tunnel-node, where its datagrams come
    from; its ForwardedTunnelOpened goes back to the user-node as the answer."""

    PUBLIC = ("198.51.100.30", 41000)  # the tunnel-node's NAT mapping

    def setUp(self):
        super().setUp()
        self.introductions = []
        self.tunnel.rpc.register(Command.INTRODUCTION, self.introductions.append, any_domain)
        # where the user-node will connect from: its own address, as the super-node sees it
        self.PUNCH = Endpoint(self.user.address[0], 50001)

    def behind_nat(self, node, public):
        """`node`'s datagrams leave from `public`, and what is sent there reaches it."""
        network, udp = self.mesh.network, node.udp

        def write(data, destination):
            udp.sent.append((data, destination))
            network.queue.append((public, destination, data))

        udp.protocol._sendto = write  # what the RPC's datagram protocol sends with
        network.ports[public] = udp

    def keep_alive(self):
        """The tunnel-node asks the super-node WhoAmI, as its announcer does → the endpoint
        the super-node saw it at."""
        d = self.tunnel.rpc.call(self.tunnel.rpc.peers.get(self.super.node_id),
                                 self.super.address, WhoAmI(), YouAre)
        self.mesh.network.flush()
        return self.successResultOf(d).endpoint

    def introduce(self, tunnel_node=None, back=None, node=None, endpoint=None):
        """`node` (the user) sends an Introduce to the super-node → (Deferred of the answer,
        the request's message id)."""
        node = node or self.user
        peer = node.rpc.learn(self.super.rpc.own_node)
        before = set(node.rpc._pending)
        d = node.rpc.call(peer, self.super.address,
                          Introduce(tunnel_node or self.tunnel.node_id, DEVICE, DEVICE_PORT,
                                    endpoint or Endpoint(node.address[0], 50001), back),
                          ForwardedTunnelOpened)
        self.addCleanup(d.addErrback, lambda failure: None)
        (request_id,) = set(node.rpc._pending) - before
        self.mesh.network.flush()
        return d, request_id

    def assertRefused(self, reason, **kwargs):
        """The Introduce is answered REFUSED with `reason` at once, counted, not passed on."""
        d, _ = self.introduce(**kwargs)
        self.check_refused(d, reason)

    def check_refused(self, d, reason):
        self.assertEqual(self.successResultOf(d),
                         ForwardedTunnelOpened(TunnelResult.REFUSED, reason))
        self.assertEqual(self.relay.refusals[reason], 1)
        self.assertEqual(self.introductions, [])
        self.assertEqual(self.relay.status()["introduced"], 0)

    def test_passed_on_to_where_datagrams_come_from(self):
        """Behind a NAT, the tunnel-node gets the Introduction at the address its datagrams
        came from (not its NodeInfo's), with the requester's Node record, endpoint and
        request id; the requester waits for the tunnel-node's answer."""
        self.behind_nat(self.tunnel, self.PUBLIC)
        self.assertEqual(self.keep_alive(), Endpoint(*self.PUBLIC))
        d, request_id = self.introduce()
        self.assertEqual(self.super.udp.sent[-1][1], self.PUBLIC)
        (incoming,) = self.introductions
        self.assertEqual(incoming.node.node_id, self.super.node_id)
        self.assertEqual(incoming.message, Introduction(
            self.tunnel.node_id, DEVICE, DEVICE_PORT, self.PUNCH,
            (self.user.rpc.own_node, Endpoint(self.user.host, self.user.rpc.port),
             request_id)))
        self.assertNoResult(d)
        self.assertEqual((self.relay.introduced, self.relay.status()["introduced"]), (1, 1))
        self.assertEqual(self.relay.refusals, {})
        self.assertEqual(self.relay.status()["waiting"], 0)  # nothing kept for it

    def test_follows_the_latest_source(self):
        """When the tunnel-node's mapping changes, the next Introduction goes to the new one."""
        self.behind_nat(self.tunnel, self.PUBLIC)
        self.keep_alive()
        moved = ("198.51.100.30", 41999)
        self.behind_nat(self.tunnel, moved)
        self.keep_alive()
        self.introduce()
        self.assertEqual(self.super.udp.sent[-1][1], moved)
        self.assertEqual(len(self.introductions), 1)

    def test_node_info_endpoint_before_any_datagram(self):
        """Before any datagram of the tunnel-node arrived, the endpoint its NodeInfo reports
        is used."""
        self.mesh.advance(1)
        self.hold(self.tunnel, observed=[Endpoint("198.51.100.1", 40000)])
        self.introduce()
        self.assertEqual(self.super.udp.sent[-1][1], ("198.51.100.1", 40000))
        self.assertEqual(self.relay.introduced, 1)

    def test_answer_passed_back(self):
        """The tunnel-node's ForwardedTunnelOpened (naming the requester) answers the
        requester's Introduce, without `back`."""
        d, request_id = self.introduce()
        (incoming,) = self.introductions
        requester, endpoint, request = incoming.message.back
        answer_endpoint = Endpoint("198.51.100.30", 7401)
        token = bytes([9]) * tunnel_tls.TOKEN_SIZE
        peer = self.tunnel.rpc.peers.get(self.super.node_id)
        self.tunnel.rpc.send(peer, self.super.address, ForwardedTunnelOpened(
            TunnelResult.OPENED, "", answer_endpoint, token,
            (requester.record.node_id, endpoint, request)))
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d), ForwardedTunnelOpened(
            TunnelResult.OPENED, "", answer_endpoint, token))

    def test_endpoint_of_another_host_refused(self):
        """An Introduce naming an endpoint on another host than the requester's is refused:
        the tunnel-node's punch packets never go to a third party."""
        self.assertRefused("endpoint_not_requester", endpoint=Endpoint("203.0.113.99", 80))

    def test_unknown_tunnel_node(self):
        """A tunnel-node the partition does not hold → unknown_tunnel_node."""
        self.assertRefused("unknown_tunnel_node", tunnel_node=bytes(32))

    def test_not_a_tunnel_node(self):
        """A node whose NodeInfo does not announce the tunnel role → unknown_tunnel_node."""
        self.hold(self.user, roles=Role.USER)
        self.assertRefused("unknown_tunnel_node", tunnel_node=self.user.node_id)

    def test_tunnel_node_of_another_domain(self):
        """A requester of another domain is not introduced to this domain's tunnel-node."""
        self.assertRefused("unknown_tunnel_node", node=self.mesh.user("carol", "globex"))

    def test_back_from_requester_refused(self):
        """An Introduce that already carries `back` → malformed_request."""
        back = (self.user.rpc.own_node, Endpoint("192.0.2.1", 1), bytes(12))
        self.assertRefused("malformed_request", back=back)

    def test_tunnel_node_unreachable(self):
        """A tunnel-node the super-node never heard from → tunnel_node_unreachable."""
        other = self.mesh.user("tunnel2")
        self.hold(other)
        self.assertRefused("tunnel_node_unreachable", tunnel_node=other.node_id)

    def test_stop(self):
        """Stopped, the relay no longer handles Introduce."""
        self.relay.stopService()
        d, _ = self.introduce()
        self.assertNoResult(d)
        self.assertEqual(self.introductions, [])
        self.assertEqual(self.super.rpc.drops["unknown_command"], 1)
