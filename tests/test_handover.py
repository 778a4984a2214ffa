"""Tests for `meshnode punch` (meshnode.nat.handover): the probe codec, the path's secret, the
punch socket on a Clock, PunchService's introductions and whole punches over tests.mesh, and
the POST /v1/punch resource.

Punch sockets bind on tests.fakes' in-memory network (no NAT in between: a node's public
endpoint is said to be its own address unless a test says otherwise); the super-node that
introduces is a mesh node, with a real RelayService when both sides punch.
"""

import hashlib
import hmac
import io
import json

from hypothesis import given, strategies as st
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from meshnode import records

from meshnode.nat import handover
from meshnode.core.dht import Entry
from meshnode.core.directory import DirectoryError, Replica, SuperNodeList
from meshnode.nat.handover import (FINAL_PROBES, KEEPALIVE_SECONDS, MAGIC, RETRY_SECONDS,
                                   TAG_SIZE, PunchResource, PunchService, _PunchSocket, probe,
                                   read_probe, shared_secret)
from meshnode.nat.rules import PUNCH_SECONDS, SPRAY_PER_TICK, TICK_SECONDS, PunchFailed
from meshnode.core.identity import Identity
from meshnode.records import NatBehaviour, Role
from meshnode.roles.super.relay import RelayService
from meshnode.rpc.messages import (Command, ForwardedTunnelOpened, PunchIntroduction,
                                   TunnelResult)
from meshnode.rpc.service import any_domain
from meshnode.nat.stun import BindingResponse
from meshnode.wire import Endpoint
from tests.fakes import FakeNetwork
from tests.mesh import NOW_MS, Mesh
from tests.test_relay import _Partition

SECRET = bytes(range(32))
OWN_ID = bytes([0xAA]) * 32
PEER_ID = bytes([0xBB]) * 32
TARGET = ("198.51.100.9", 50001)  # where the peer said its punch socket is
REFLEXIVE = ("198.51.100.9", 50777)  # where its probes really come from (its NAT's choice)
STUN_SERVER = ("192.0.2.30", 3478)
PUBLIC_HOST = "198.51.100.7"  # where the replicas see the accepting node (its NAT)
REQUEST_ID = bytes(range(12))
NONCE = bytes([0x11]) * 32


def node_of(identity, name="n"):
    """An (unsigned) Node record of `identity`, as a peer knows it."""
    return records.Node(0x10000, identity.node_id, identity.signing_public,
                        identity.agreement_public, name, NOW_MS, NOW_MS + 86_400_000)


class ProbeTests(SynchronousTestCase):
    """probe/read_probe: MAGIC, the sender's `seen` flag, and a tag of the secret and id."""

    def test_round_trip(self):
        """A probe reads back as its `seen` flag, 0 or 1."""
        for seen in (0, 1):
            self.assertEqual(read_probe(SECRET, OWN_ID, probe(SECRET, OWN_ID, seen)), seen)

    def test_shape(self):
        """A probe is MAGIC, the flag and a TAG_SIZE-byte tag."""
        data = probe(SECRET, OWN_ID, 1)
        self.assertEqual(len(data), len(MAGIC) + 1 + TAG_SIZE)
        self.assertTrue(data.startswith(MAGIC + b"\x01"))

    def test_other_sender_refused(self):
        """A probe tagged for another sender id is not that sender's."""
        self.assertIsNone(read_probe(SECRET, PEER_ID, probe(SECRET, OWN_ID, 0)))

    def test_other_secret_refused(self):
        """A probe made with another secret is refused."""
        self.assertIsNone(read_probe(SECRET, OWN_ID, probe(bytes(32), OWN_ID, 0)))

    def test_truncated_or_extended_refused(self):
        """A probe one byte short or long is refused."""
        data = probe(SECRET, OWN_ID, 0)
        self.assertIsNone(read_probe(SECRET, OWN_ID, data[:-1]))
        self.assertIsNone(read_probe(SECRET, OWN_ID, data + b"\x00"))
        self.assertIsNone(read_probe(SECRET, OWN_ID, b""))

    def test_bad_magic_refused(self):
        """Another magic is refused."""
        data = probe(SECRET, OWN_ID, 0)
        self.assertIsNone(read_probe(SECRET, OWN_ID, b"MNPUNCH2" + data[len(MAGIC):]))

    def test_flag_two_refused(self):
        """A flag other than 0 or 1 is refused, even with a tag that matches it."""
        head = MAGIC + b"\x02"
        forged = head + probe(SECRET, OWN_ID, 0)[len(head):]
        self.assertIsNone(read_probe(SECRET, OWN_ID, forged))
        tagged = head + hmac.new(SECRET, head + OWN_ID, hashlib.sha256).digest()[:TAG_SIZE]
        self.assertIsNone(read_probe(SECRET, OWN_ID, tagged))

    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_never_raise(self, data):
        """Any datagram reads as no probe, without raising."""
        self.assertIsNone(read_probe(SECRET, OWN_ID, data))

    @given(st.integers(0, 1), st.integers(0, len(MAGIC) + TAG_SIZE), st.integers(1, 255))
    def test_any_byte_changed_refused(self, seen, index, change):
        """A valid probe with any one byte changed is refused."""
        data = bytearray(probe(SECRET, OWN_ID, seen))
        data[index] ^= change
        self.assertIsNone(read_probe(SECRET, OWN_ID, bytes(data)))


class SharedSecretTests(SynchronousTestCase):
    """shared_secret: both nodes compute it from their own key and the other's record."""

    def setUp(self):
        self.initiator, self.acceptor = Identity.generate(), Identity.generate()
        self.initiator_nonce, self.acceptor_nonce = bytes([1]) * 32, bytes([2]) * 32

    def secret(self, identity, peer, initiator_nonce=None, acceptor_nonce=None):
        return shared_secret(identity, node_of(peer), initiator_nonce or self.initiator_nonce,
                             acceptor_nonce or self.acceptor_nonce)

    def test_symmetric(self):
        """The initiator and the acceptor arrive at the same 32-byte secret."""
        mine = self.secret(self.initiator, self.acceptor)
        self.assertEqual(len(mine), 32)
        self.assertEqual(mine, self.secret(self.acceptor, self.initiator))

    def test_nonces_matter(self):
        """Another nonce on either side, or the two swapped, gives another secret."""
        base = self.secret(self.initiator, self.acceptor)
        self.assertNotEqual(base, self.secret(self.initiator, self.acceptor, bytes([3]) * 32))
        self.assertNotEqual(base, self.secret(self.initiator, self.acceptor, None,
                                              bytes([3]) * 32))
        self.assertNotEqual(base, self.secret(self.initiator, self.acceptor,
                                              self.acceptor_nonce, self.initiator_nonce))

    def test_keys_matter(self):
        """A third node, knowing both nonces, computes another secret."""
        base = self.secret(self.initiator, self.acceptor)
        self.assertNotEqual(base, self.secret(Identity.generate(), self.acceptor))


class PunchSocketTests(SynchronousTestCase):
    """_PunchSocket on a Clock: probes, peer-reflexive answers, completion, budget."""

    def setUp(self):
        self.clock = Clock()
        self.socket = _PunchSocket(self.clock)
        self.transport = FakeNetwork().bind("192.168.1.10", 0, self.socket)  # records `sent`

    def run_socket(self, **kwargs):
        return self.socket.run(SECRET, OWN_ID, PEER_ID, TARGET, **kwargs)

    def mine(self, seen, address):
        return (probe(SECRET, OWN_ID, seen), address)

    def from_peer(self, seen, address=REFLEXIVE):
        self.socket.datagramReceived(probe(SECRET, PEER_ID, seen), address)

    def test_probes_every_interval(self):
        """Probes saying "not seen" go to the target at once and every TICK_SECONDS."""
        self.run_socket()
        self.assertEqual(self.transport.sent, [self.mine(0, TARGET)])
        self.clock.advance(TICK_SECONDS)
        self.clock.advance(TICK_SECONDS)
        self.assertEqual(self.transport.sent, [self.mine(0, TARGET)] * 3)

    def test_sprays_the_shared_rate(self):
        """Spraying, SPRAY_PER_TICK probes go to the next ports of the target's host each
        TICK_SECONDS; once the peer is heard, only the peer gets probes."""
        ports = list(range(2000, 2000 + 3 * SPRAY_PER_TICK))
        self.run_socket(spray=ports)
        self.assertEqual(self.transport.sent,
                         [self.mine(0, (TARGET[0], port)) for port in ports[:SPRAY_PER_TICK]])
        self.clock.advance(TICK_SECONDS)
        self.assertEqual(self.transport.sent[SPRAY_PER_TICK:],
                         [self.mine(0, (TARGET[0], port))
                          for port in ports[SPRAY_PER_TICK:2 * SPRAY_PER_TICK]])
        self.from_peer(0)
        before = len(self.transport.sent)
        self.clock.advance(TICK_SECONDS)
        self.assertEqual(self.transport.sent[before:], [self.mine(1, REFLEXIVE)])
        self.assertEqual(self.socket.sprayed, 2 * SPRAY_PER_TICK)

    def test_answers_where_probes_come_from(self):
        """Once a probe of the peer arrives, probes say "seen" and go where it came from."""
        d = self.run_socket()
        self.from_peer(0)
        self.clock.advance(TICK_SECONDS)
        self.assertEqual(self.transport.sent[-1], self.mine(1, REFLEXIVE))
        self.assertNotIn(self.mine(1, TARGET), self.transport.sent)
        self.assertNoResult(d)

    def test_not_seen_never_completes(self):
        """Probes saying "not seen" never complete the punch, however many."""
        d = self.run_socket()
        for _ in range(5):
            self.from_peer(0)
            self.clock.advance(TICK_SECONDS)
        self.assertNoResult(d)

    def test_completes_when_seen_after_ours(self):
        """A probe saying "seen", after we said "seen" too, completes the punch with the
        peer's endpoint; FINAL_PROBES more go out, then nothing."""
        d = self.run_socket()
        self.from_peer(0)
        self.clock.advance(TICK_SECONDS)
        self.assertIn(self.mine(1, REFLEXIVE), self.transport.sent)
        before = len(self.transport.sent)
        self.from_peer(1)
        self.assertEqual(self.successResultOf(d), REFLEXIVE)
        self.assertEqual(self.transport.sent[before:], [self.mine(1, REFLEXIVE)] * FINAL_PROBES)
        self.clock.advance(PUNCH_SECONDS)
        self.assertEqual(len(self.transport.sent), before + FINAL_PROBES)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_said_seen_before_completing(self):
        """However the peer's "seen" arrives, we have sent a "seen" probe of ours to it
        before the punch completes."""
        d = self.run_socket()
        self.from_peer(1)
        self.clock.advance(TICK_SECONDS)
        self.from_peer(1)
        self.assertEqual(self.successResultOf(d), REFLEXIVE)
        first_seen = self.transport.sent.index(self.mine(1, REFLEXIVE))
        self.assertLess(first_seen, len(self.transport.sent) - FINAL_PROBES)

    def test_budget(self):
        """No probe within the budget: PunchFailed naming where we sent, and probing stops."""
        d = self.run_socket(budget=2.0)
        self.clock.advance(1.0)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertIn(f"{TARGET[0]}:{TARGET[1]}", str(self.failureResultOf(d, PunchFailed).value))
        sent = len(self.transport.sent)
        self.clock.advance(1.0)
        self.assertEqual(len(self.transport.sent), sent)

    def test_default_budget(self):
        """The budget is PUNCH_SECONDS unless told."""
        d = self.run_socket()
        self.clock.advance(PUNCH_SECONDS - TICK_SECONDS)
        self.assertNoResult(d)
        self.clock.advance(TICK_SECONDS)
        self.failureResultOf(d, PunchFailed)

    def test_non_probes_ignored_and_counted(self):
        """Junk, probes with another secret and our own probes echoed back are counted
        not_a_probe and change nothing."""
        d = self.run_socket()
        self.socket.datagramReceived(b"hello", REFLEXIVE)
        self.socket.datagramReceived(probe(bytes(32), PEER_ID, 1), REFLEXIVE)
        self.socket.datagramReceived(probe(SECRET, OWN_ID, 1), REFLEXIVE)
        self.assertEqual(self.socket.drops["not_a_probe"], 3)
        self.clock.advance(TICK_SECONDS)
        self.assertEqual(self.transport.sent[-1], self.mine(0, TARGET))
        self.assertNoResult(d)

    def test_stun_answers_go_to_the_stun_client(self):
        """A STUN answer on the punch socket answers its binding request (before and while
        punching) and is not counted as a bad probe."""
        d = self.socket.stun.binding(STUN_SERVER)
        request, destination = self.transport.sent[-1]
        self.assertEqual(destination, STUN_SERVER)
        mapped = Endpoint("203.0.113.50", 61000)
        self.socket.datagramReceived(BindingResponse(request[8:20], mapped).encode(),
                                     STUN_SERVER)
        self.assertEqual(self.successResultOf(d).mapped, mapped)
        self.run_socket()
        self.socket.datagramReceived(BindingResponse(bytes(12), mapped).encode(), STUN_SERVER)
        self.assertEqual(self.socket.drops["stun_unmatched"], 1)
        self.assertEqual(self.socket.drops["not_a_probe"], 0)


class _Announcer:
    """What PunchService needs of the announcer: where the replicas saw us."""

    def __init__(self, host):
        self.seen = [Endpoint(host, 40001)]

    def nat(self, seen):
        return NatBehaviour.UNKNOWN


class PunchTestCase(SynchronousTestCase):
    """A mesh with `bob` (who punches), `alice` and `dave` of his domain, `carol` of another,
    and `super1`, placed as the super-node of bob's and alice's directories."""

    def setUp(self):
        self.patch(handover, "outbound_address", lambda towards: "192.168.1.5")
        self.mesh = mesh = Mesh(self)
        self.super = mesh.user("super1", "infra")
        self.super.rpc.roles |= Role.SUPER  # it answers every domain's pings
        self.bob = mesh.user("bob")
        self.alice = mesh.user("alice")
        self.dave = mesh.user("dave")
        self.carol = mesh.user("carol", "globex")
        self.answers = []
        self.super.rpc.register(Command.FORWARDED_TUNNEL_OPENED,
                                lambda incoming: self.answers.append(incoming.message),
                                any_domain)
        self.replicas = [Replica(self.super.node_id, self.super.address)]
        self.service = self.punch_service(self.bob, PUBLIC_HOST)

    def punch_service(self, node, public_host=None):
        """A started PunchService on `node`, its directory placing `super1` and finding the
        other mesh nodes' NodeInfo at once."""
        directory = self.mesh.directory_of(node)
        directory.super_node_list = SuperNodeList([self.mesh.me.sign(records.SuperNode(
            self.super.rpc.domain, self.super.node_id, 0, 0xFFFF, 3,
            Endpoint(*self.super.address), node.rpc.now_ms()))])
        self.patch(directory, "lookup_node_info", self.lookup)
        self.patch(directory, "replicas", lambda domain=None: defer.succeed(self.replicas))
        for other in self.mesh.nodes:
            node.rpc.learn(other.rpc.own_node)
        service = PunchService(self.mesh.core_of(
            node, directory=directory, reachability=_Announcer(public_host or node.host)))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def lookup(self, spec):
        node = next(n for n in self.mesh.nodes if spec in (n.node_id, n.node_id.hex(),
                                                             n.identity_service.enrollment
                                                             .node.record.name))
        return defer.succeed((self.info(node), []))

    def info(self, node):
        return records.NodeInfo(node.rpc.domain, node.node_id,
                                [Endpoint(node.host, node.rpc.port)], node.rpc.port, (),
                                NatBehaviour.UNKNOWN, (), Role.USER, node.rpc.now_ms())

    def accept(self, peer, wait=60.0):
        """bob waits for `peer` (`meshnode punch --accept`) → the pending Deferred."""
        d = self.service.punch(peer.node_id.hex(), accept=True, wait=wait)
        self.addCleanup(self.abandon, d)
        return d

    def abandon(self, d):
        """Give up a punch still pending (as the control API's caller going away does)."""
        if not d.called:
            d.cancel()
        d.addErrback(lambda failure: None)

    def introduce(self, requester, peer=None, back=True, sender=None, endpoint=None):
        """`sender` (super1) passes bob a PunchIntroduction of `requester`."""
        sender = sender or self.super
        message = PunchIntroduction(
            peer or self.bob.node_id, endpoint or Endpoint(*TARGET), NONCE,
            (requester.rpc.own_node, Endpoint(*requester.address), REQUEST_ID)
            if back else None)
        sender.rpc.send(sender.rpc.learn(self.bob.rpc.own_node), self.bob.address, message)
        self.mesh.network.flush()

    def back(self, requester):
        return (requester.node_id, Endpoint(*requester.address), REQUEST_ID)


class _Recorder(DatagramProtocol):
    def __init__(self):
        self.received = []

    def datagramReceived(self, data, address):
        self.received.append((data, address))


class IntroductionTests(PunchTestCase):
    """PunchService._introduction: a super-node passes a peer's PunchRequest on."""

    def test_opened_when_waiting(self):
        """While bob waits for alice, her introduction is answered OPENED to the super-node
        with bob's punch socket's public endpoint and a fresh nonce, naming her (`back`);
        his punch socket starts probing the endpoint she gave."""
        self.accept(self.alice)
        target = self.mesh.network.bind(*TARGET, _Recorder())
        self.introduce(self.alice)
        (answer,) = self.answers
        self.assertEqual((answer.result, answer.reason, answer.back),
                         (TunnelResult.OPENED, "", self.back(self.alice)))
        self.assertEqual(answer.endpoint.host, PUBLIC_HOST)
        self.assertEqual(len(answer.token), 32)
        self.mesh.network.flush()
        (data, source), = target.protocol.received
        self.assertEqual(source, (self.bob.host, answer.endpoint.port))
        secret = shared_secret(self.alice.identity, self.bob.rpc.own_node.record, NONCE,
                               answer.token)
        self.assertEqual(read_probe(secret, self.bob.node_id, data), 0)

    def test_not_waiting_refused(self):
        """An introduction nobody waits for is answered REFUSED not_accepting."""
        self.introduce(self.alice)
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, "not_accepting", back=self.back(self.alice))])

    def test_waiting_for_another_refused(self):
        """While bob waits for alice, dave's introduction is refused and bob keeps waiting,
        sending nothing to dave's endpoint."""
        d = self.accept(self.alice)
        target = self.mesh.network.bind(*TARGET, _Recorder())
        self.introduce(self.dave)
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, "not_accepting", back=self.back(self.dave))])
        self.mesh.network.flush()
        self.assertEqual(target.protocol.received, [])
        self.assertNoResult(d)
        self.assertEqual(self.service.status()["accepting"], [self.alice.node_id.hex()])

    def test_requester_of_another_domain_refused(self):
        """A requester of another domain is refused even when awaited."""
        self.accept(self.carol)
        self.introduce(self.carol)
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, "not_accepting", back=self.back(self.carol))])

    def test_without_back_dropped(self):
        """An introduction without `back` is dropped, counted malformed_forwarding."""
        self.accept(self.alice)
        self.introduce(self.alice, back=False)
        self.assertEqual(self.answers, [])
        self.assertEqual(self.bob.rpc.drops["malformed_forwarding"], 1)

    def test_for_another_node_dropped(self):
        """An introduction naming another peer than bob is dropped and counted."""
        self.accept(self.alice)
        self.introduce(self.alice, peer=self.dave.node_id)
        self.assertEqual(self.answers, [])
        self.assertEqual(self.bob.rpc.drops["malformed_forwarding"], 1)

    def test_only_from_placed_super_nodes(self):
        """An introduction from a node not placed as a super-node is not allowed."""
        self.accept(self.alice)
        self.introduce(self.alice, sender=self.dave)
        self.assertEqual(self.bob.rpc.drops["not_allowed"], 1)
        self.assertEqual(self.answers, [])


class AcceptTests(PunchTestCase):
    """punch(accept=True): wait for the peer's introduction, then punch."""

    def test_accepted_path(self):
        """After alice's introduction and her probes, bob's punch gives the command his
        local endpoint, his public one, where alice's probes came from and the secret she
        computes too; his punch socket is closed."""
        d = self.accept(self.alice)
        said = self.mesh.network.bind(*TARGET, _Recorder())
        reflexive = self.mesh.network.bind(*REFLEXIVE, _Recorder())
        self.introduce(self.alice)
        (answer,) = self.answers
        secret = shared_secret(self.alice.identity, self.bob.rpc.own_node.record, NONCE,
                               answer.token)
        self.mesh.network.flush()
        bob_socket = said.protocol.received[0][1]
        reflexive.write(probe(secret, self.alice.node_id, 0), bob_socket)
        self.mesh.network.flush()
        self.bob.reactor.advance(TICK_SECONDS)
        self.mesh.network.flush()
        self.assertIn((probe(secret, self.bob.node_id, 1), bob_socket),
                      reflexive.protocol.received)
        reflexive.write(probe(secret, self.alice.node_id, 1), bob_socket)
        self.mesh.network.flush()
        result = self.successResultOf(d)
        port = bob_socket[1]
        self.assertEqual(
            {key: result[key] for key in ("local", "public", "peer", "secret")},
            {"local": f"192.168.1.5:{port}", "public": f"{PUBLIC_HOST}:{port}",
             "peer": f"{REFLEXIVE[0]}:{REFLEXIVE[1]}", "secret": secret.hex()})
        self.assertNotIn(bob_socket, self.mesh.network.ports)
        self.assertEqual(self.service.status()["accepting"], [])
        self.assertEqual(sum(self.service.status()["punched"].values()), 1)

    def test_nobody_asks(self):
        """Nobody asking within `wait`: PunchFailed saying so; the socket is closed and bob
        no longer waits."""
        d = self.accept(self.alice, wait=30.0)
        ports = set(self.mesh.network.ports)
        self.bob.reactor.advance(30.0)
        self.assertIn("did not ask within 30 s", str(self.failureResultOf(d, PunchFailed).value))
        self.assertLess(set(self.mesh.network.ports), ports)
        self.assertEqual(self.service.status()["accepting"], [])

    def test_keeps_mapping_alive_while_waiting(self):
        """While waiting, bob pings his super-nodes every KEEPALIVE_SECONDS, so their
        introduction reaches him through his NAT."""
        self.accept(self.alice)
        self.mesh.network.flush()
        self.assertEqual(self.super.rpc.accepted[Command.PING], 1)
        self.bob.reactor.advance(KEEPALIVE_SECONDS)
        self.mesh.network.flush()
        self.assertEqual(self.super.rpc.accepted[Command.PING], 2)

    def test_super_nodes_unknown_while_waiting(self):
        """With no super-node known for the keep-alive, an introduction still completes the
        wait: bob's punch socket probes alice."""
        self.replicas = None
        self.patch(self.service._directory, "replicas",
                   lambda domain=None: defer.fail(DirectoryError("the operator did not answer")))
        d = self.accept(self.alice)
        # The bug leaves bob waiting for alice for good: forget it, so the service can stop.
        self.addCleanup(self.service._accepting.clear)
        self.introduce(self.alice)
        self.assertEqual(self.answers[0].result, TunnelResult.OPENED)
        self.assertNoResult(d)


    def test_stopping_while_waiting(self):
        """Stopping the service while bob waits cancels the wait and closes the socket."""
        d = self.service.punch(self.alice.node_id.hex(), accept=True)
        self.addCleanup(d.addErrback, lambda failure: None)
        ports = set(self.mesh.network.ports)
        self.service.stopService()
        self.failureResultOf(d, defer.CancelledError)
        self.assertLess(set(self.mesh.network.ports), ports)


    def test_waiting_twice_refused(self):
        """A second wait for the same peer is refused while the first one waits."""
        self.accept(self.alice)
        d = self.service.punch(self.alice.node_id.hex(), accept=True)
        self.assertIn("already waiting", str(self.failureResultOf(d, PunchFailed).value))

    def test_public_address_unknown(self):
        """Before any replica answered WhoAmI (and with no STUN server) bob cannot punch."""
        self.service._reachability.seen = []
        ports = set(self.mesh.network.ports)
        d = self.service.punch(self.alice.node_id.hex(), accept=True)
        self.assertIn("public address is not known",
                      str(self.failureResultOf(d, PunchFailed).value))
        self.assertEqual(set(self.mesh.network.ports), ports)

    def test_not_another_node(self):
        """Bob cannot punch to himself."""
        d = self.service.punch(self.bob.node_id.hex(), accept=True)
        self.assertIn("not another node", str(self.failureResultOf(d, PunchFailed).value))


class BothSidesTests(PunchTestCase):
    """bob accepts, alice initiates through super1's real relay: both get the same path."""

    def setUp(self):
        super().setUp()
        self.super.rpc.learn(self.bob.rpc.own_node)  # bob met it before (his keep-alives)
        self.partition = _Partition()
        signed = self.bob.identity.sign(self.info(self.bob))
        self.partition.records.put(Entry(self.bob.rpc.own_node, signed), self.bob.rpc.now_ms())
        relay = RelayService(rpc=self.super.rpc, partition=self.partition,
                             clock=self.super.reactor, listen_address=self.super.host, port=7402)
        relay.startService()
        self.addCleanup(lambda: relay.running and relay.stopService())
        self.alice_service = self.punch_service(self.alice)

    def run_until(self, *ds):
        for _ in range(200):
            if all(d.called for d in ds):
                return
            self.mesh.network.flush()
            self.mesh.advance(TICK_SECONDS)

    def test_punched_both_ways(self):
        """The two commands get each other's punch endpoints and the same secret."""
        self.service._reachability.seen = [Endpoint(self.bob.host, 40001)]
        accepted = self.accept(self.alice)
        initiated = self.alice_service.punch("bob")
        self.run_until(accepted, initiated)
        bob, alice = self.successResultOf(accepted), self.successResultOf(initiated)
        self.assertEqual(bob["secret"], alice["secret"])
        self.assertEqual(bob["peer"], alice["public"])
        self.assertEqual(alice["peer"], bob["public"])
        self.assertEqual(bob["peer"].split(":")[0], self.alice.host)
        self.assertEqual(alice["peer"].split(":")[0], self.bob.host)

    def test_initiator_asks_again_while_not_accepting(self):
        """alice asking before bob waits is refused not_accepting, and she asks again
        every RETRY_SECONDS until he does."""
        initiated = self.alice_service.punch("bob", wait=10.0)
        self.mesh.network.flush()
        self.assertNoResult(initiated)
        self.mesh.advance(RETRY_SECONDS)
        self.mesh.network.flush()
        self.service._reachability.seen = [Endpoint(self.bob.host, 40001)]
        accepted = self.accept(self.alice)
        self.mesh.advance(RETRY_SECONDS)
        self.run_until(accepted, initiated)
        self.assertEqual(self.successResultOf(accepted)["secret"],
                         self.successResultOf(initiated)["secret"])

    def test_initiator_gives_up(self):
        """Nobody accepting within `wait`: PunchFailed naming the refusal."""
        initiated = self.alice_service.punch("bob", wait=2.0)
        for _ in range(4):
            self.mesh.network.flush()
            self.mesh.advance(RETRY_SECONDS)
        self.mesh.network.flush()
        self.assertIn("not_accepting", str(self.failureResultOf(initiated, PunchFailed).value))


class _Punch:
    """What PunchResource needs of PunchService: punch() answered as the test says."""

    def __init__(self):
        self.calls = []
        self.result = defer.succeed({"local": "192.168.1.5:4000"})

    def punch(self, peer, accept, wait):
        self.calls.append((peer, accept, wait))
        return self.result


class PunchServiceOffersTests(PunchTestCase):
    """What PunchService offers build_node to wire: its control resource and status."""

    def test_served_by_the_service(self):
        """PunchService offers the resource for /v1/punch, and a status of its own."""
        resources = self.service.resources()
        self.assertEqual(list(resources), [b"punch"])
        self.assertIsInstance(resources[b"punch"], PunchResource)
        self.assertEqual(self.service.status(), {"accepting": [], "punched": {}})


class PunchResourceTests(SynchronousTestCase):
    """POST /v1/punch: JSON in, the path or a JSON error out."""

    def setUp(self):
        self.punch = _Punch()
        self.resource = PunchResource(self.punch)

    def post(self, body, method=b"POST"):
        """→ (status, the JSON answer)."""
        request = DummyRequest([])
        request.method = method
        request.content = io.BytesIO(body if isinstance(body, bytes) else
                                     json.dumps(body).encode())
        rendered = self.resource.render(request)
        if rendered is not NOT_DONE_YET:
            request.write(rendered)
        return request.responseCode, json.loads(b"".join(request.written))

    def test_path_returned(self):
        """A good request is passed on, and the path comes back as JSON."""
        self.assertEqual(self.post({"peer": "alice", "accept": True, "wait": 30}),
                         (200, {"local": "192.168.1.5:4000"}))
        self.assertEqual(self.punch.calls, [("alice", True, 30.0)])

    def test_defaults(self):
        """Without accept and wait: initiate, waiting 60 s; 600 s is allowed."""
        self.post({"peer": "alice"})
        self.post({"peer": "alice", "wait": 600})
        self.assertEqual(self.punch.calls, [("alice", False, 60.0), ("alice", False, 600.0)])

    def assertBad(self, body):
        status, answer = self.post(body)
        self.assertEqual(status, 400, answer)
        self.assertIn("bad punch request", answer["error"])
        self.assertEqual(self.punch.calls, [])

    def test_bad_json(self):
        """A body that is not JSON, or not an object, is a 400 JSON error."""
        self.assertBad(b"{")
        self.assertBad(b"[1]")
        self.assertBad(b"null")

    def test_missing_or_bad_peer(self):
        """A missing peer, or one that is not a string, is a 400 JSON error."""
        self.assertBad({})
        self.assertBad({"peer": 5})

    def test_wait_out_of_range(self):
        """A wait of 0 or less, over 600 s, not a number or NaN is a 400 JSON error."""
        for wait in (0, -1, 600.5, "soon", None):
            self.assertBad({"peer": "alice", "wait": wait})
        self.assertBad(b'{"peer": "alice", "wait": NaN}')

    def test_punch_failed_is_409(self):
        """A punch that fails is a 409 JSON error with its reason."""
        self.punch.result = defer.fail(PunchFailed("no probe from the peer"))
        self.assertEqual(self.post({"peer": "alice"}), (409, {"error": "no probe from the peer"}))

    def test_get_not_allowed(self):
        """GET is a 405 JSON error."""
        self.assertEqual(self.post({"peer": "alice"}, method=b"GET"),
                         (405, {"error": "method not allowed"}))
