"""Tests for the sealed datagram RPC (DESIGN.md §4): bootstrap, acceptance, replay, rate, calls.

Nodes run on tests.fakes' in-memory network, each with its own FakeReactor set to a realistic
epoch time; an operator made in memory signs every Node record.
"""

import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records
from meshnode.core.identity import Enrollment, Identity
from meshnode.records import Role
from meshnode.rpc import frame
from meshnode.rpc.frame import PLAIN, RESPONSE
from meshnode.rpc.messages import NODE_ANSWER_SIZE, Command, GetNode, NodeRecord, Ping, Pong
from meshnode.rpc.peers import ReplayWindow
from meshnode.rpc.ratelimit import RateLimiter
from meshnode.rpc.peers import PeerTable
from meshnode.rpc.service import (RESTART_SKEW_MS, TIMESTAMP_WINDOW_MS, CallTimeout,
                                  NotEnrolled, RPCService, Stopped,
                                  infrastructure_or_same_domain)
from tests.fakes import FakeNetwork, FakeReactor

EPOCH = 1_800_000_000
NOW_MS = EPOCH * 1000
DOMAIN = 0x00010001
OTHER_DOMAIN = 0x00020001
# Reasons a datagram that reached a node may be dropped for before any handler runs.
_HEADER_REASONS = {"malformed", "version", "receiver", "timestamp", "unknown_sender", "replay",
                   "decrypt", "malformed_payload", "not_plain", "amplification"}


# -- helpers ------------------------------------------------------------------------------

class _IdentityStandIn:
    """What RPCService needs of IdentityService: the keys and the enrollment."""

    def __init__(self, identity, enrollment):
        self.identity = identity
        self.enrollment = enrollment
        self.observers = []


class _Operator:
    """An operator made in memory: a self-signed OperatorNode record and a signing key."""

    def __init__(self, domain=DOMAIN):
        me = self.identity = Identity.generate()
        self.signed = me.sign(records.OperatorNode(domain, me.node_id, me.signing_public,
                                                   me.agreement_public, NOW_MS))

    def node_record(self, identity, domain=DOMAIN, name="node",
                    lifetime_ms=30 * 86_400_000):
        return self.identity.sign(records.Node(domain, identity.node_id, identity.signing_public,
                                               identity.agreement_public, name, NOW_MS,
                                               NOW_MS + lifetime_ms))

    def enrollment(self, identity, **kwargs):
        return Enrollment.from_bundle(identity, [self.node_record(identity, **kwargs),
                                                 self.signed], NOW_MS)


class _Node:
    """One started RPCService with its reactor, address and fake UDP port."""

    def __init__(self, rpc, reactor, identity, host):
        self.rpc = rpc
        self.reactor = reactor
        self.identity = identity
        self.host = host
        self.address = (host, rpc.port)
        self.udp = reactor.network.ports[self.address]

    def peer(self, other):
        return self.rpc.peers.get(other.rpc.node_id)


class _Mesh:
    """Nodes on one FakeNetwork at 10.0.0.x, all enrolled by one operator unless told not to."""

    def __init__(self, testcase):
        self._testcase = testcase
        self.network = FakeNetwork()
        self.operator = _Operator()
        self._hosts = 0

    def node(self, name="node", domain=DOMAIN, roles=Role.USER, enrolled=True,
             lifetime_ms=30 * 86_400_000, **kwargs):
        self._hosts += 1
        host = f"10.0.0.{self._hosts}"
        reactor = FakeReactor(self.network, host)
        reactor.advance(EPOCH)
        identity = Identity.generate()
        enrollment = (self.operator.enrollment(identity, domain=domain, name=name,
                                               lifetime_ms=lifetime_ms)
                      if enrolled else Enrollment())
        rpc = RPCService(identity=_IdentityStandIn(identity, enrollment), reactor=reactor,
                         interface=host, roles=roles, **kwargs)
        rpc.startService()
        self._testcase.addCleanup(lambda: rpc.running and rpc.stopService())
        return _Node(rpc, reactor, identity, host)


def _introduce(*nodes):
    """Every node learns every other node's Node record directly, as after a bootstrap."""
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.rpc.learn(other.rpc.own_node)


def _deliver(node, data, source):
    """Hand `data` to `node` as if it came from `source`; returns what the node sent back."""
    sent = []
    node.rpc.receive(data, source, lambda answer, address: sent.append((answer, address)))
    return sent


def _sealed(sender, receiver, command, payload, flags=0, timestamp=None, sender_domain=None,
            receiver_domain=None, receiver_id=None, message_id=None):
    """A datagram sealed with the sender's real key for `receiver`, any header field changed."""
    peer = sender.peer(receiver)
    head = frame.header(flags, command,
                        peer.node.domain if receiver_domain is None else receiver_domain,
                        peer.node.node_id if receiver_id is None else receiver_id,
                        sender.rpc.domain if sender_domain is None else sender_domain,
                        sender.rpc.node_id,
                        sender.rpc.now_ms() if timestamp is None else timestamp,
                        sender.rpc._ids.next() if message_id is None else message_id)
    return frame.seal(peer.seal_key, head, payload)


def _ping(sender, receiver, data=b""):
    """A valid sealed Ping request from `sender` to `receiver`."""
    return sender.rpc._seal(sender.peer(receiver), Command.PING, 0, Ping(data).encode())[1]


def _plain(sender_domain, sender_id, command, payload, flags=PLAIN, receiver_domain=0,
           receiver_id=frame.ZERO_ID, timestamp=NOW_MS, message_id=None, pad_to=0):
    """A plain datagram, to "whoever listens here" unless a receiver is given."""
    head = frame.header(flags, command, receiver_domain, receiver_id, sender_domain, sender_id,
                        timestamp, message_id or bytes(range(12)))
    return frame.plain(head, payload, pad_to)


def _fields(datagram):
    """The parsed header of a datagram as a Frame (for checking what a node sent)."""
    return frame.Frame(frame.parse(datagram), datagram)


def _record_pings(node):
    """Replace the node's Ping handler by one that records each Incoming and answers Pong."""
    seen = []

    def handler(incoming):
        seen.append(incoming)
        return Pong(incoming.message.data)

    node.rpc.register(Command.PING, handler, infrastructure_or_same_domain)
    return seen


# -- 1. bootstrap -------------------------------------------------------------------------

class BootstrapTests(SynchronousTestCase):
    """First contact by address, then a Ping to a node that does not know the caller yet."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.b = self.mesh.node("b")

    def test_fetch_node_then_ping_bootstraps_both_sides(self):
        """A fetches B's Node record, pings it; B asks A who it is, A answers and resends."""
        a, b = self.a, self.b
        heard = []
        b.rpc.learned.append(heard.append)
        fetched = []
        a.rpc.fetch_node(b.address).addCallback(fetched.append)
        self.mesh.network.flush()
        [peer] = fetched
        self.assertEqual(peer.node, b.rpc.own_node.record)
        self.assertIsNone(b.rpc.peers.get(a.rpc.node_id))

        rtts = []
        a.rpc.ping(peer, b.address, b"hello").addCallback(rtts.append)
        a.reactor.advance(0.05)
        self.mesh.network.flush()
        [rtt] = rtts
        self.assertIsInstance(rtt, float)
        self.assertAlmostEqual(rtt, 0.05, places=6)
        self.assertEqual(heard, [a.rpc.own_node])

        a_sent = [data for data, _ in a.udp.sent]
        b_sent = [data for data, _ in b.udp.sent]
        self.assertEqual([address for _, address in a.udp.sent], [b.address] * 4)
        self.assertEqual([address for _, address in b.udp.sent], [a.address] * 3)
        get_node, ping, node_answer, resent = a_sent
        b_node_answer, b_get_node, pong = b_sent

        # A's first contact is a GetNode to "whoever listens", padded to the largest answer.
        first = _fields(get_node)
        self.assertEqual((first.flags, first.command, first.receiver_id), (PLAIN, Command.GET_NODE,
                                                                           frame.ZERO_ID))
        self.assertEqual(len(get_node), NODE_ANSWER_SIZE)
        answer = _fields(b_node_answer)
        self.assertEqual((answer.flags, answer.command), (PLAIN | RESPONSE, Command.NODE))
        self.assertEqual(frame.plain_payload(answer.body)[:12], first.message_id)
        self.assertLessEqual(len(b_node_answer), len(get_node))

        # B cannot open the Ping: it asks back with a GetNode naming it, no larger than it.
        asked = _fields(b_get_node)
        self.assertEqual((asked.flags, asked.command), (PLAIN, Command.GET_NODE))
        self.assertEqual(GetNode.decode(frame.plain_payload(asked.body)).cause,
                         _fields(ping).message_id)
        self.assertLessEqual(len(b_get_node), len(ping))

        # A answers with its Node record (solicited: it goes only to the address A called)
        # and resends the very same Ping, which B now opens and answers.
        mine = _fields(node_answer)
        self.assertEqual((mine.flags, mine.command), (PLAIN | RESPONSE, Command.NODE))
        self.assertEqual(resent, ping)
        self.assertEqual((_fields(pong).flags, _fields(pong).command), (RESPONSE, Command.PONG))

        self.assertEqual(dict(b.rpc.accepted), {Command.GET_NODE: 1, Command.NODE: 1,
                                                Command.PING: 1})
        self.assertEqual(dict(a.rpc.accepted), {Command.NODE: 1, Command.GET_NODE: 1,
                                                Command.PONG: 1})
        self.assertEqual(dict(b.rpc.drops), {"unknown_sender": 1})
        self.assertEqual(dict(a.rpc.drops), {})

    def test_padded_get_node_covers_the_largest_node_answer(self):
        """A Node answer with a name of NAME_LIMIT bytes still fits in the padded GetNode."""
        big = self.mesh.node("é" * (records.NAME_LIMIT // 2) + "x")
        self.assertEqual(len(big.rpc.own_node.record.name.encode()), records.NAME_LIMIT)
        fetched = []
        self.a.rpc.fetch_node(big.address).addCallback(fetched.append)
        self.mesh.network.flush()
        self.assertEqual([p.node for p in fetched], [big.rpc.own_node.record])
        [(answer, _)] = big.udp.sent
        self.assertEqual(len(answer), len(self.a.udp.sent[0][0]))
        self.assertEqual(dict(big.rpc.drops), {})

    def test_unpadded_first_contact_get_node_is_not_answered(self):
        """A GetNode smaller than the Node answer it asks for is dropped: no amplification."""
        small = _plain(DOMAIN, self.a.rpc.node_id, Command.GET_NODE, GetNode().encode())
        self.assertEqual(_deliver(self.b, small, self.a.address), [])
        self.assertEqual(dict(self.b.rpc.drops), {"amplification": 1})
        self.assertEqual(dict(self.b.rpc.accepted), {})

    def test_get_node_naming_a_call_from_another_address_is_not_answered(self):
        """A GetNode citing a pending call is solicited only from the address that was called."""
        _introduce(self.a, self.b)
        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(), Pong)
        ping = _fields(self.a.udp.sent[-1][0])
        ask = _plain(DOMAIN, self.b.rpc.node_id, Command.GET_NODE,
                     GetNode(ping.message_id).encode(), receiver_domain=DOMAIN,
                     receiver_id=self.a.rpc.node_id)
        self.assertEqual(_deliver(self.a, ask, ("10.9.9.9", self.b.address[1])), [])
        self.assertEqual(dict(self.a.rpc.drops), {"amplification": 1})
        sent = _deliver(self.a, ask, self.b.address)
        self.assertEqual([_fields(data).command for data, _ in sent], [Command.NODE, Command.PING])
        self.assertEqual(sent[1][0], self.a.udp.sent[-1][0])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)


# -- 2. acceptance ------------------------------------------------------------------------

class AcceptanceTests(SynchronousTestCase):
    """Each rule of DESIGN.md §4: a datagram that fails it is dropped, counted, never handled."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.b = self.mesh.node("b")
        _introduce(self.a, self.b)
        self.pings = _record_pings(self.b)

    def assertDropped(self, reason, datagram, source=None, node=None):
        """Deliver `datagram`; it is counted once under `reason` and reaches no handler."""
        node = node or self.b
        drops, accepted, handled = (dict(node.rpc.drops), dict(node.rpc.accepted),
                                    len(self.pings))
        sent = _deliver(node, datagram, source or self.a.address)
        expected = dict(drops)
        expected[reason] = expected.get(reason, 0) + 1
        self.assertEqual(dict(node.rpc.drops), expected)
        self.assertEqual(dict(node.rpc.accepted), accepted)
        self.assertEqual(len(self.pings), handled)
        return sent

    def assertAccepted(self, datagram, source=None):
        """Deliver `datagram`: the Ping handler sees it and a sealed Pong goes back."""
        handled = len(self.pings)
        sent = _deliver(self.b, datagram, source or self.a.address)
        self.assertEqual(len(self.pings), handled + 1)
        self.assertEqual([(_fields(d).command, _fields(d).flags) for d, _ in sent],
                         [(Command.PONG, RESPONSE)])
        return sent

    def test_valid_sealed_ping_is_answered(self):
        """The control case: a call's Ping is handled and its Pong completes the call."""
        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(b"data"), Pong)
        sent = self.assertAccepted(self.a.udp.sent[-1][0])
        self.assertEqual(self.pings[0].node, self.a.rpc.own_node.record)
        self.assertEqual(self.pings[0].source, self.a.address)
        _deliver(self.a, sent[0][0], self.b.address)
        self.assertEqual(self.successResultOf(d), Pong(b"data"))
        self.assertEqual(dict(self.b.rpc.drops), {})
        self.assertEqual(dict(self.a.rpc.drops), {})

    def test_too_short_datagram_is_malformed(self):
        """Shorter than a header, or a sealed datagram shorter than header plus tag."""
        ping = _ping(self.a, self.b)
        for datagram in (b"", ping[:1], ping[:95], ping[:111]):
            self.assertDropped("malformed", datagram)

    def test_too_long_datagram_is_malformed(self):
        """A datagram over 1,200 bytes is dropped; one of exactly 1,200 is answered."""
        ask = _plain(DOMAIN, self.a.rpc.node_id, Command.GET_NODE, GetNode().encode(),
                     pad_to=frame.MAX_DATAGRAM + 1)
        self.assertDropped("malformed", ask)
        self.assertDropped("malformed", _ping(self.a, self.b, bytes(1000)) + bytes(100))
        ask = _plain(DOMAIN, self.a.rpc.node_id, Command.GET_NODE, GetNode().encode(),
                     pad_to=frame.MAX_DATAGRAM)
        self.assertEqual(len(_deliver(self.b, ask, self.a.address)), 1)

    def test_bad_magic_is_malformed(self):
        """A first byte other than 'M' is dropped."""
        ping = _ping(self.a, self.b)
        for magic in (0, ord("m"), 0xFF):
            self.assertDropped("malformed", bytes([magic]) + ping[1:])

    def test_unknown_flag_bits_are_malformed(self):
        """A flags byte with any bit besides RESPONSE and PLAIN is dropped."""
        ping = _ping(self.a, self.b)
        for flags in (4, 8, 0x80, 0xFF, RESPONSE | 4):
            self.assertDropped("malformed", ping[:2] + bytes([flags]) + ping[3:])

    def test_unknown_version_is_dropped(self):
        """A version other than 1 is counted under `version`."""
        ping = _ping(self.a, self.b)
        for version in (0, 2, 0xFF):
            self.assertDropped("version", ping[:1] + bytes([version]) + ping[2:])

    def test_wrong_receiver_is_dropped(self):
        """A sealed datagram for another node id, another domain or zeros is dropped."""
        for fields in ({"receiver_id": self.a.rpc.node_id}, {"receiver_domain": OTHER_DOMAIN},
                       {"receiver_id": frame.ZERO_ID, "receiver_domain": 0},
                       {"receiver_id": frame.ZERO_ID}):
            self.assertDropped("receiver", _sealed(self.a, self.b, Command.PING,
                                                   Ping().encode(), **fields))

    def test_zero_receiver_only_for_plain_get_node(self):
        """Zeros as receiver pass only for a plain GetNode request, and only with domain 0."""
        a = self.a.rpc
        node_push = _plain(DOMAIN, a.node_id, Command.NODE, NodeRecord(a.own_node).encode())
        self.assertDropped("receiver", node_push)
        other_domain = _plain(DOMAIN, a.node_id, Command.GET_NODE, GetNode().encode(),
                              receiver_domain=DOMAIN, pad_to=NODE_ANSWER_SIZE)
        self.assertDropped("receiver", other_domain)
        ask = _plain(DOMAIN, a.node_id, Command.GET_NODE, GetNode().encode(),
                     pad_to=NODE_ANSWER_SIZE)
        [(answer, address)] = _deliver(self.b, ask, self.a.address)
        self.assertEqual((_fields(answer).command, address), (Command.NODE, self.a.address))

    def test_plain_command_other_than_bootstrap_is_dropped(self):
        """Only GetNode requests and Node travel plain: a plain Ping or GetNode answer is not."""
        plain_ping = _plain(DOMAIN, self.a.rpc.node_id, Command.PING, Ping().encode(),
                            receiver_domain=DOMAIN, receiver_id=self.b.rpc.node_id)
        self.assertEqual(self.assertDropped("not_plain", plain_ping), [])
        get_node_answer = _plain(DOMAIN, self.a.rpc.node_id, Command.GET_NODE,
                                 GetNode().encode(), flags=PLAIN | RESPONSE,
                                 pad_to=NODE_ANSWER_SIZE)
        self.assertEqual(self.assertDropped("not_plain", get_node_answer), [])

    def test_timestamp_within_60_seconds_is_accepted(self):
        """Timestamps exactly 60 s before or after the receiver's clock are accepted (once
        it has run longer than that: before, RestartReplayTests)."""
        for node in (self.a, self.b):
            node.reactor.advance(120)
        for skew in (-TIMESTAMP_WINDOW_MS, TIMESTAMP_WINDOW_MS, 0):
            self.assertAccepted(_sealed(self.a, self.b, Command.PING, Ping().encode(),
                                        timestamp=NOW_MS + 120_000 + skew))

    def test_timestamp_beyond_60_seconds_is_dropped(self):
        """Timestamps 60.001 s off, or wildly off, are dropped."""
        for skew in (-TIMESTAMP_WINDOW_MS - 1, TIMESTAMP_WINDOW_MS + 1, -NOW_MS, 10 ** 12):
            self.assertDropped("timestamp", _sealed(self.a, self.b, Command.PING,
                                                    Ping().encode(), timestamp=NOW_MS + skew))

    def test_timestamp_window_follows_the_clock(self):
        """After the receiver's clock moves on 61 s, a datagram sealed before is stale."""
        ping = _ping(self.a, self.b)
        self.b.reactor.advance(61)
        self.assertDropped("timestamp", ping)

    def test_same_datagram_twice_is_a_replay(self):
        """The second delivery of one datagram is dropped as a replay."""
        ping = _ping(self.a, self.b)
        self.assertAccepted(ping)
        self.assertDropped("replay", ping)
        self.assertDropped("replay", ping, source=("10.9.9.9", 1234))

    def test_counter_older_than_window_is_a_replay(self):
        """A never-seen counter further back than the window is dropped; one inside passes."""
        old = _ping(self.a, self.b)
        inside = _ping(self.a, self.b)
        # The next counter is exactly SIZE past `old`'s: `old` just outside, `inside` just in.
        self.a.rpc._ids._counter += ReplayWindow.SIZE - 2
        newest = _ping(self.a, self.b)
        self.assertEqual(frame.counter_of(_fields(newest).message_id)
                         - frame.counter_of(_fields(old).message_id), ReplayWindow.SIZE)
        self.assertAccepted(newest)
        self.assertDropped("replay", old)
        self.assertAccepted(inside)

    def test_unknown_sender_is_asked_for_its_node(self):
        """A sealed datagram from a node never learned is dropped; a small GetNode goes back."""
        c = self.mesh.node("c")
        c.rpc.learn(self.b.rpc.own_node)
        ping = _ping(c, self.b)
        [(ask, address)] = self.assertDropped("unknown_sender", ping, source=c.address)
        self.assertEqual(address, c.address)
        self.assertLessEqual(len(ask), len(ping))
        asked = _fields(ask)
        self.assertEqual((asked.flags, asked.command, asked.receiver_domain, asked.receiver_id),
                         (PLAIN, Command.GET_NODE, DOMAIN, c.rpc.node_id))
        self.assertEqual(GetNode.decode(frame.plain_payload(asked.body)).cause,
                         _fields(ping).message_id)
        self.assertIsNone(self.b.rpc.peers.get(c.rpc.node_id))

    def test_any_single_byte_change_is_never_accepted(self):
        """Every byte of a sealed Ping, changed alone, gets the datagram dropped."""
        ping = _ping(self.a, self.b)
        for position in range(len(ping)):
            for mask in (0x01, 0x02, 0x80, 0xFF):
                changed = bytearray(ping)
                changed[position] ^= mask
                before = dict(self.b.rpc.drops)
                _deliver(self.b, bytes(changed), self.a.address)
                [reason] = [r for r in self.b.rpc.drops if self.b.rpc.drops[r] != before.get(r, 0)]
                self.assertEqual(self.b.rpc.drops[reason], before.get(reason, 0) + 1)
                if position >= frame.HEADER_SIZE:
                    self.assertEqual(reason, "decrypt", f"byte {position} ^ {mask:#x}")
                else:
                    self.assertIn(reason, _HEADER_REASONS, f"byte {position} ^ {mask:#x}")
        self.assertEqual(self.pings, [])
        self.assertEqual(dict(self.b.rpc.accepted), {})
        # Forgeries did not move the replay window: the real datagram still passes.
        self.assertAccepted(ping)

    def test_expired_sender_is_invalid(self):
        """A peer whose Node record has expired is dropped, though its datagram authenticates."""
        c = self.mesh.node("c", lifetime_ms=120_000)
        _introduce(c, self.b)
        for node in (c, self.b):
            node.reactor.advance(119)
        self.assertAccepted(_ping(c, self.b), source=c.address)
        for node in (c, self.b):
            node.reactor.advance(1)
        self.assertDropped("sender_invalid", _ping(c, self.b), source=c.address)

    def test_revoked_sender_is_invalid(self):
        """A peer the operator revoked after it was learned is dropped."""
        operator = self.mesh.operator.identity
        revocation = operator.sign(records.Revocation(DOMAIN, (self.a.rpc.node_id,), (), NOW_MS))
        self.b.rpc.trust.add_revocation(revocation, NOW_MS)
        self.assertDropped("sender_invalid", _ping(self.a, self.b))

    def test_sender_domain_not_its_records_is_invalid(self):
        """A sealed datagram whose sender domain differs from the sender's Node record."""
        self.assertDropped("sender_invalid", _sealed(self.a, self.b, Command.PING,
                                                     Ping().encode(), sender_domain=OTHER_DOMAIN))

    def test_command_without_handler_is_dropped(self):
        """A sealed request for a command nobody registered, or no command at all."""
        for command in (200, Command.ERROR, Command.PONG):
            self.assertDropped("unknown_command", _sealed(self.a, self.b, command,
                                                          Ping().encode()))

    def test_refused_registration_leaves_command_unhandled(self):
        """register() refusing a command without codec leaves no handler: requests are dropped."""
        called = []
        self.assertRaises(ValueError, self.b.rpc.register, Command.ERROR,
                          called.append)
        request = _sealed(self.a, self.b, Command.ERROR, b"")
        try:
            self.assertDropped("unknown_command", request)
        except Exception as e:
            if isinstance(e, self.failureException):
                raise
            self.fail(f"receive() raised {e!r} for a command whose registration was refused")
        self.assertEqual(called, [])

    def test_ping_from_another_domain_to_a_user_node_is_not_allowed(self):
        """A user-node refuses a Ping from another domain's node; a super-node answers it."""
        stranger = self.mesh.node("stranger", domain=OTHER_DOMAIN)
        _introduce(stranger, self.b)
        self.assertDropped("not_allowed", _ping(stranger, self.b), source=stranger.address)
        super_node = self.mesh.node("super", roles=Role.USER | Role.SUPER)
        _introduce(stranger, super_node)
        [(pong, _)] = _deliver(super_node, _ping(stranger, super_node), stranger.address)
        self.assertEqual(_fields(pong).command, Command.PONG)
        self.assertEqual(dict(super_node.rpc.drops), {})

    def test_burst_from_one_source_is_rate_limited(self):
        """Past the burst, a source is refused until its bucket refills; others are not."""
        b = self.mesh.node("limited", rate=1, burst=3)
        _introduce(self.a, b)
        self.b, self.pings = b, _record_pings(b)
        for _ in range(3):
            self.assertAccepted(_ping(self.a, b))
        self.assertDropped("rate_limited", _ping(self.a, b))
        self.assertAccepted(_ping(self.a, b), source=("10.9.9.9", 4000))
        b.reactor.advance(1)
        self.a.reactor.advance(1)
        self.assertAccepted(_ping(self.a, b))
        self.assertDropped("rate_limited", _ping(self.a, b))

    def test_undecodable_ping_is_a_malformed_payload(self):
        """A sealed Ping whose payload is not a Ping encoding is dropped."""
        for payload in (b"", b"\x00", b"\x00\x05ab", b"\x00\x01ab",
                        struct.pack(">H", 1001) + bytes(1001)):
            self.assertDropped("malformed_payload", _sealed(self.a, self.b, Command.PING, payload))

    def test_plain_padding_must_be_zeros(self):
        """A plain GetNode whose padding is not zeros is a malformed payload."""
        ask = bytearray(_plain(DOMAIN, self.a.rpc.node_id, Command.GET_NODE, GetNode().encode(),
                               pad_to=NODE_ANSWER_SIZE))
        ask[-1] = 1
        self.assertDropped("malformed_payload", bytes(ask))

    def test_raising_handler_is_counted_not_raised(self):
        """A handler that raises, or fails its Deferred, is counted and logged; nothing escapes."""
        def raising(incoming):
            raise RuntimeError("handler broke")

        self.b.rpc.register(Command.PING, raising, infrastructure_or_same_domain)
        self.assertEqual(_deliver(self.b, _ping(self.a, self.b), self.a.address), [])
        self.assertEqual(self.b.rpc.drops["handler_error"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

        self.b.rpc.register(Command.PING, lambda incoming: defer.fail(KeyError("later")),
                            infrastructure_or_same_domain)
        self.assertEqual(_deliver(self.b, _ping(self.a, self.b), self.a.address), [])
        self.assertEqual(self.b.rpc.drops["handler_error"], 2)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_response_to_no_pending_call_is_unexpected(self):
        """A response naming no pending call, the wrong command or the wrong peer is dropped."""
        b_rpc = self.b.rpc
        stray = b_rpc._seal(self.b.peer(self.a), Command.PONG, RESPONSE,
                            bytes(12) + Pong().encode())[1]
        self.assertDropped("unexpected_response", stray, source=self.b.address, node=self.a)

        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(b"x"), Pong)
        request_id = _fields(self.a.udp.sent[-1][0]).message_id
        wrong_command = b_rpc._seal(self.b.peer(self.a), Command.PING, RESPONSE,
                                    request_id + Ping(b"x").encode())[1]
        self.assertDropped("unexpected_response", wrong_command, source=self.b.address,
                           node=self.a)
        c = self.mesh.node("c")
        _introduce(c, self.a)
        wrong_peer = c.rpc._seal(c.peer(self.a), Command.PONG, RESPONSE,
                                 request_id + Pong(b"x").encode())[1]
        self.assertDropped("unexpected_response", wrong_peer, source=self.b.address, node=self.a)
        self.assertNoResult(d)
        right = b_rpc._seal(self.b.peer(self.a), Command.PONG, RESPONSE,
                            request_id + Pong(b"x").encode())[1]
        _deliver(self.a, right, self.b.address)
        self.assertEqual(self.successResultOf(d), Pong(b"x"))
        self.assertDropped("unexpected_response", b_rpc._seal(
            self.b.peer(self.a), Command.PONG, RESPONSE, request_id + Pong(b"x").encode())[1],
            source=self.b.address, node=self.a)


# -- 3. replay window ---------------------------------------------------------------------

class ReplayWindowTests(SynchronousTestCase):
    """ReplayWindow.fresh and commit, as IPsec's and WireGuard's sliding windows."""

    def test_in_order_counters_are_fresh_once(self):
        """Each new counter is fresh until committed, then never again."""
        window = ReplayWindow()
        for counter in range(0, 3 * ReplayWindow.SIZE):
            self.assertTrue(window.fresh(counter))
            window.commit(counter)
            self.assertFalse(window.fresh(counter))
        for counter in range(2 * ReplayWindow.SIZE, 3 * ReplayWindow.SIZE):
            self.assertFalse(window.fresh(counter))
        self.assertLessEqual(window.bits.bit_length(), 2 * ReplayWindow.SIZE + 1)

    def test_out_of_order_within_window_is_fresh(self):
        """A counter behind the top but inside the window is fresh once."""
        window = ReplayWindow()
        window.commit(10_000)
        for counter in (9_999, 10_000 - ReplayWindow.SIZE + 1, 9_000):
            self.assertTrue(window.fresh(counter))
            window.commit(counter)
            self.assertFalse(window.fresh(counter))
        self.assertTrue(window.fresh(9_998))
        self.assertTrue(window.fresh(10_001))

    def test_duplicate_is_not_fresh(self):
        """The top counter and a committed older one are both duplicates."""
        window = ReplayWindow()
        window.commit(5)
        window.commit(7)
        self.assertFalse(window.fresh(7))
        self.assertFalse(window.fresh(5))
        self.assertTrue(window.fresh(6))

    def test_counter_older_than_window_is_not_fresh(self):
        """A counter SIZE or more behind the top is refused though never seen."""
        window = ReplayWindow()
        window.commit(10_000)
        self.assertFalse(window.fresh(10_000 - ReplayWindow.SIZE))
        self.assertFalse(window.fresh(0))
        self.assertTrue(window.fresh(10_000 - ReplayWindow.SIZE + 1))

    def test_huge_jump_restarts_the_window(self):
        """After a jump of more than the window, only counters near the new top are fresh."""
        window = ReplayWindow()
        for counter in range(100):
            window.commit(counter)
        top = 10 ** 12
        window.commit(top)
        self.assertFalse(window.fresh(top))
        self.assertFalse(window.fresh(50))
        self.assertTrue(window.fresh(top - 1))
        self.assertTrue(window.fresh(top - ReplayWindow.SIZE + 1))
        self.assertFalse(window.fresh(top - ReplayWindow.SIZE))
        window.commit(top + ReplayWindow.SIZE)
        self.assertFalse(window.fresh(top))
        self.assertEqual(window.bits, 1)

    def test_counter_zero_is_fresh_at_first(self):
        """A new window accepts any counter, zero included."""
        self.assertTrue(ReplayWindow().fresh(0))


class RestartReplayTests(SynchronousTestCase):
    """A node restarted holds no replay windows: sealed datagrams captured between two RPC
    services before the receiver's restart are dropped when replayed after it."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.b = self.mesh.node("b")
        _introduce(self.a, self.b)
        self.advance(300)  # both have run a while

    def advance(self, seconds):
        for node in (self.a, self.b):
            node.reactor.advance(seconds)

    def ping(self, data):
        """A call of a's to b, delivered over the fake network → the Pong."""
        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(data), Pong)
        self.mesh.network.flush()
        return self.successResultOf(d)

    def capture(self, *data):
        """Pings a sent b and b answered → the sealed datagrams, as captured on the wire."""
        before = len(self.a.udp.sent)
        for each in data:
            self.assertEqual(self.ping(each), Pong(each))
        return [datagram for datagram, _ in self.a.udp.sent[before:]]

    def restart_b(self):
        """b stopped and a new RPCService of the same identity started on its port: fresh
        windows; it knows a again at once (as from its store of Node records)."""
        self.b.rpc.stopService()
        rpc = RPCService(identity=self.b.rpc._identity_service, reactor=self.b.reactor,
                         interface=self.b.host, port=self.b.address[1])
        rpc.startService()
        self.addCleanup(lambda: rpc.running and rpc.stopService())
        self.b = _Node(rpc, self.b.reactor, self.b.identity, self.b.host)
        self.b.rpc.learn(self.a.rpc.own_node)
        self.pings = _record_pings(self.b)

    def replay(self, datagrams):
        """Deliver the datagrams to b again, from a's address → what b sent back."""
        sent = []
        for datagram in datagrams:
            sent += _deliver(self.b, datagram, self.a.address)
        return sent

    def test_captured_before_a_restart_is_dropped_after_it(self):
        """Pings captured in the seconds before b restarts are dropped as replays after it,
        though b's fresh windows would take their counters; a's next ping is answered."""
        captured = self.capture(b"one", b"two", b"three")
        self.advance(RESTART_SKEW_MS / 1000 + 1)
        self.restart_b()
        self.advance(1)
        self.assertEqual(self.ping(b"after"), Pong(b"after"))  # b's window moves past them
        self.assertEqual(self.replay(captured), [])
        self.assertEqual(self.b.rpc.drops["replay"], 3)
        self.assertEqual([incoming.message.data for incoming in self.pings], [b"after"])
        self.assertEqual(self.ping(b"again"), Pong(b"again"))

    def test_replayed_first_after_a_restart(self):
        """Replayed before a's first datagram after the restart, they are dropped too, and b
        does not ask the replayer for a Node record either."""
        captured = self.capture(b"one", b"two")
        self.advance(RESTART_SKEW_MS / 1000 + 1)
        self.restart_b()
        self.b.rpc.peers.forget(self.a.rpc.node_id)
        self.assertEqual(self.replay(captured), [])
        self.assertEqual((self.b.rpc.drops["replay"], self.b.rpc.drops["unknown_sender"]),
                         (2, 0))
        self.assertEqual(self.pings, [])
        self.assertEqual(self.ping(b"fresh"), Pong(b"fresh"))  # bootstrapped with GetNode

    def test_without_a_restart_the_window_drops_them(self):
        """The control case: replayed to the b that saw them, its window drops them."""
        captured = self.capture(b"one", b"two")
        self.pings = _record_pings(self.b)
        self.assertEqual(self.replay(captured), [])
        self.assertEqual(self.b.rpc.drops["replay"], 2)
        self.assertEqual(self.pings, [])

    def test_lagging_clock_within_the_skew_is_served_at_once(self):
        """A sender whose clock is behind b's by less than RESTART_SKEW_MS is answered right
        after b restarts; one further behind is refused (as `replay`) until its clock passes
        b's start less the skew."""
        self.restart_b()
        self.a.reactor.advance(-(RESTART_SKEW_MS - 500) / 1000)
        self.assertEqual(self.ping(b"close"), Pong(b"close"))
        self.a.reactor.advance(-1)
        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(b"late"), Pong)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.b.rpc.drops["replay"], 1)
        d.cancel()
        self.failureResultOf(d)
        self.advance(1)
        self.assertEqual(self.ping(b"caught up"), Pong(b"caught up"))

    def test_clock_set_back_after_the_start(self):
        """A receiver whose own clock is set back past its start (a step at boot) takes the
        floor from its clock now, instead of refusing everyone until it catches up."""
        self.restart_b()
        self.advance(-3600)
        self.assertEqual(self.ping(b"an hour back"), Pong(b"an hour back"))
        self.assertEqual(self.b.rpc.drops["replay"], 0)


class EvictedWindowTests(SynchronousTestCase):
    """A peer evicted from a full PeerTable gets its replay window back when learned again."""

    def test_evicted_peer_keeps_its_window(self):
        """b with room for one peer: a's datagram, then c's (a evicted), then a learned
        again: a's datagram replayed is still a replay."""
        mesh = _Mesh(self)
        a, b, c = mesh.node("a"), mesh.node("b"), mesh.node("c")
        _introduce(a, b, c)
        b.rpc.peers = PeerTable(b.identity, limit=1)
        b.rpc.learn(a.rpc.own_node)
        pings = _record_pings(b)
        ping = _ping(a, b)
        _deliver(b, ping, a.address)
        b.rpc.learn(c.rpc.own_node)
        self.assertIsNone(b.peer(a))
        b.rpc.learn(a.rpc.own_node)
        self.assertEqual(_deliver(b, ping, a.address), [])
        self.assertEqual((len(pings), b.rpc.drops["replay"]), (1, 1))
        self.assertEqual(len(_deliver(b, _ping(a, b), a.address)), 1)


# -- 4. rate limiter ----------------------------------------------------------------------

class RateLimiterTests(SynchronousTestCase):
    """A token bucket per source, refilled by the clock, with a bounded number of sources."""

    def test_burst_then_refill(self):
        """`burst` datagrams pass at once, then `rate` per second, never more than `burst`."""
        clock = Clock()
        clock.advance(EPOCH)
        limiter = RateLimiter(clock, rate=2, burst=3)
        self.assertEqual([limiter.allow("10.0.0.1") for _ in range(4)], [True] * 3 + [False])
        clock.advance(0.25)
        self.assertFalse(limiter.allow("10.0.0.1"))
        clock.advance(0.25)
        self.assertEqual([limiter.allow("10.0.0.1") for _ in range(2)], [True, False])
        clock.advance(3600)
        self.assertEqual([limiter.allow("10.0.0.1") for _ in range(4)], [True] * 3 + [False])

    def test_sources_are_independent(self):
        """One source's exhausted bucket does not limit another."""
        limiter = RateLimiter(Clock(), rate=1, burst=1)
        self.assertEqual([limiter.allow("a"), limiter.allow("a")], [True, False])
        self.assertTrue(limiter.allow("b"))

    def test_number_of_sources_is_bounded(self):
        """Past `max_sources`, the source seen first is forgotten (and starts a full bucket)."""
        limiter = RateLimiter(Clock(), rate=1, burst=1, max_sources=2)
        self.assertEqual([limiter.allow("a"), limiter.allow("a")], [True, False])
        for source in ("b", "c"):
            self.assertTrue(limiter.allow(source))
        for source in range(1000):
            limiter.allow(source)
            self.assertLessEqual(len(limiter._buckets), 2)
        self.assertTrue(limiter.allow("a"))


# -- 5. calls -----------------------------------------------------------------------------

class CallTests(SynchronousTestCase):
    """rpc.call: timeouts, stopping, cancelling, and refusing when not enrolled."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.b = self.mesh.node("b")
        _introduce(self.a, self.b)

    def _call(self, **kwargs):
        return self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(), Pong, **kwargs)

    def test_unanswered_call_times_out(self):
        """No answer: CallTimeout after the service's call_timeout, not before."""
        d = self._call()
        self.a.reactor.advance(self.a.rpc.call_timeout - 0.01)
        self.assertNoResult(d)
        self.a.reactor.advance(0.21)
        self.failureResultOf(d, CallTimeout)

    def test_call_timeout_can_be_given_per_call(self):
        """A call's own timeout wins over the service's; each call times out on its own."""
        short, long = self._call(timeout=0.5), self._call(timeout=5.0)
        self.a.reactor.advance(0.45)
        self.assertNoResult(short)
        self.a.reactor.advance(0.25)
        self.failureResultOf(short, CallTimeout)
        self.a.reactor.advance(4.2)
        self.assertNoResult(long)
        self.a.reactor.advance(0.3)
        self.failureResultOf(long, CallTimeout)

    def test_answer_after_timeout_is_unexpected(self):
        """A Pong arriving after its call timed out is dropped, not delivered."""
        d = self._call()
        ping = self.a.udp.sent[-1][0]
        self.a.reactor.advance(self.a.rpc.call_timeout + 0.2)
        self.failureResultOf(d, CallTimeout)
        [(pong, _)] = _deliver(self.b, ping, self.a.address)
        _deliver(self.a, pong, self.b.address)
        self.assertEqual(dict(self.a.rpc.drops), {"unexpected_response": 1})

    def test_stop_fails_every_pending_call(self):
        """stopService fails each pending call with Stopped; later calls fail Stopped too."""
        calls = [self._call() for _ in range(3)] + [self.a.rpc.fetch_node(self.b.address)]
        self.a.rpc.stopService()
        for d in calls:
            self.failureResultOf(d, Stopped)
        self.failureResultOf(self._call(), Stopped)
        self.failureResultOf(self.a.rpc.fetch_node(self.b.address), Stopped)
        self.a.reactor.advance(10)

    def test_call_made_while_stopping_fails_stopped(self):
        """A call started by a failing call's errback during stopService fails Stopped too."""
        retries = []

        def retry(failure):
            retries.append(self._call())
            return failure

        d = self._call()
        d.addErrback(retry)
        self.a.rpc.stopService()
        self.failureResultOf(d, Stopped)
        self.addCleanup(lambda: [r.addErrback(lambda f: None) for r in retries])
        self.failureResultOf(retries[0], Stopped)
        self.assertEqual(self.a.reactor.getDelayedCalls(), [])

    def test_cancelled_call_is_forgotten(self):
        """Cancelling a call's Deferred removes it: its late answer is unexpected."""
        d = self._call()
        ping = self.a.udp.sent[-1][0]
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        [(pong, _)] = _deliver(self.b, ping, self.a.address)
        _deliver(self.a, pong, self.b.address)
        self.assertEqual(dict(self.a.rpc.drops), {"unexpected_response": 1})
        self.assertEqual(list(self.a.rpc._pending), [])
        self.a.reactor.advance(10)

    def test_call_when_not_enrolled_fails(self):
        """A node without a Node record cannot call: NotEnrolled, and nothing is sent."""
        lone = self.mesh.node("lone", enrolled=False)
        peer, _ = lone.rpc.peers.learn(self.b.rpc.own_node)
        self.failureResultOf(lone.rpc.call(peer, self.b.address, Ping(), Pong), NotEnrolled)
        self.failureResultOf(lone.rpc.ping(peer, self.b.address), NotEnrolled)
        self.assertEqual(lone.udp.sent, [])


# -- 6. unenrolled node -------------------------------------------------------------------

class UnenrolledTests(SynchronousTestCase):
    """A node without a Node record runs, but answers nothing and authenticates nobody."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.lone = self.mesh.node("lone", enrolled=False)

    def test_get_node_is_dropped_as_not_enrolled(self):
        """A first-contact GetNode gets no answer; the caller's fetch times out."""
        d = self.a.rpc.fetch_node(self.lone.address)
        self.mesh.network.flush()
        self.assertEqual(dict(self.lone.rpc.drops), {"not_enrolled": 1})
        self.assertEqual(self.lone.udp.sent, [])
        self.a.reactor.advance(self.a.rpc.call_timeout + 0.2)
        self.failureResultOf(d, CallTimeout)

    def test_sealed_datagram_is_dropped_without_asking(self):
        """Sealed traffic cannot be authenticated: dropped, and no GetNode goes back."""
        a = self.a.rpc
        head = frame.header(0, Command.PING, 0, self.lone.rpc.node_id, DOMAIN, a.node_id,
                            NOW_MS, a._ids.next())
        datagram = frame.seal(ChaCha20Poly1305(bytes(32)), head, Ping().encode())
        self.assertEqual(_deliver(self.lone, datagram, self.a.address), [])
        self.assertEqual(dict(self.lone.rpc.drops), {"unknown_sender": 1})
        self.assertEqual(dict(self.lone.rpc.accepted), {})

    def test_node_record_is_not_learned(self):
        """With no trusted operator, even a valid Node record is refused."""
        a = self.a.rpc
        push = _plain(DOMAIN, a.node_id, Command.NODE, NodeRecord(a.own_node).encode(),
                      receiver_id=self.lone.rpc.node_id)
        _deliver(self.lone, push, self.a.address)
        self.assertEqual(dict(self.lone.rpc.drops), {"sender_unknown_signer": 1})
        self.assertEqual(len(self.lone.rpc.peers), 0)


# -- 7. TCP transport ---------------------------------------------------------------------

class StreamTests(SynchronousTestCase):
    """The same frames, u16-length-prefixed, over one TCP connection."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.b = self.mesh.node("b")
        _introduce(self.a, self.b)
        [(port, factory, _, interface)] = self.b.reactor.tcpServers
        self.assertEqual((port, interface), (self.b.rpc.port, self.b.host))
        client = IPv4Address("TCP", self.a.host, 50000)
        self.protocol = factory.buildProtocol(client)
        self.transport = StringTransport(peerAddress=client)
        self.protocol.makeConnection(self.transport)

    def _frames(self):
        """The length-prefixed frames written back on the connection."""
        data, frames = self.transport.value(), []
        while data:
            [size] = struct.unpack(">H", data[:2])
            frames.append(data[2:2 + size])
            self.assertEqual(len(frames[-1]), size)
            data = data[2 + size:]
        return frames

    def test_ping_over_stream_gets_pong_on_the_same_connection(self):
        """A Ping split across reads is answered by a Pong written back length-prefixed."""
        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(b"tcp"), Pong)
        ping = self.a.udp.sent[-1][0]
        self.mesh.network.queue.clear()
        for byte in struct.pack(">H", len(ping)) + ping:
            self.protocol.dataReceived(bytes([byte]))
        [pong] = self._frames()
        self.assertEqual(self.b.udp.sent, [])
        self.assertEqual(self.b.rpc.accepted[Command.PING], 1)
        _deliver(self.a, pong, self.b.address)
        self.assertEqual(self.successResultOf(d), Pong(b"tcp"))
        self.assertFalse(self.transport.disconnecting)

    def test_frame_of_1200_bytes_is_carried(self):
        """A frame of exactly 1,200 bytes passes; a GetNode so padded is answered in the stream."""
        a = self.a.rpc
        ask = _plain(DOMAIN, a.node_id, Command.GET_NODE, GetNode().encode(),
                     pad_to=frame.MAX_DATAGRAM)
        self.protocol.dataReceived(struct.pack(">H", len(ask)) + ask)
        [answer] = self._frames()
        self.assertEqual(_fields(answer).command, Command.NODE)
        self.assertFalse(self.transport.disconnecting)

    def test_over_long_length_prefix_closes_the_connection(self):
        """A length prefix over 1,200 closes the connection; nothing reaches the RPC."""
        self.protocol.dataReceived(struct.pack(">H", frame.MAX_DATAGRAM + 1)
                                   + bytes(frame.MAX_DATAGRAM + 1))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(dict(self.b.rpc.drops), {})
        self.assertEqual(dict(self.b.rpc.accepted), {})
        self.assertEqual(self.transport.value(), b"")


# -- 8. Node push -------------------------------------------------------------------------

class NodePushTests(SynchronousTestCase):
    """A plain Node datagram teaches its sender to the receiver only when it checks out."""

    def setUp(self):
        self.mesh = _Mesh(self)
        self.b = self.mesh.node("b")
        self.heard = []
        self.b.rpc.learned.append(self.heard.append)

    def _push(self, signed, sender_id, sender_domain=DOMAIN):
        b = self.b.rpc
        datagram = _plain(sender_domain, sender_id, Command.NODE, NodeRecord(signed).encode(),
                          receiver_domain=b.domain, receiver_id=b.node_id)
        return _deliver(self.b, datagram, ("10.0.0.99", 4000))

    def test_valid_node_record_is_learned(self):
        """The control case: a record signed by the trusted operator for its sender."""
        stranger = Identity.generate()
        signed = self.mesh.operator.node_record(stranger)
        self.assertEqual(self._push(signed, stranger.node_id), [])
        self.assertEqual(self.b.rpc.peers.get(stranger.node_id).signed, signed)
        self.assertEqual(self.heard, [signed])
        self.assertEqual(dict(self.b.rpc.drops), {})

    def test_record_signed_by_untrusted_key_is_not_learned(self):
        """A Node record from an unknown operator, or forged in a known one's name, is dropped."""
        stranger = Identity.generate()
        rogue = _Operator()
        self._push(rogue.node_record(stranger), stranger.node_id)
        self.assertEqual(dict(self.b.rpc.drops), {"sender_unknown_signer": 1})
        forged = records.sign(records.Node(DOMAIN, stranger.node_id, stranger.signing_public,
                                           stranger.agreement_public, "forged", NOW_MS,
                                           NOW_MS + 60_000),
                              self.mesh.operator.identity.node_id, rogue.identity.signing_key)
        self._push(forged, stranger.node_id)
        self.assertEqual(self.b.rpc.drops["sender_bad_signature"], 1)
        self.assertIsNone(self.b.rpc.peers.get(stranger.node_id))
        self.assertEqual(self.heard, [])
        self.assertEqual(dict(self.b.rpc.accepted), {})

    def test_record_of_another_node_is_not_learned(self):
        """A valid Node record whose node id or domain is not the frame's sender is dropped."""
        owner, impostor = Identity.generate(), Identity.generate()
        signed = self.mesh.operator.node_record(owner)
        self._push(signed, impostor.node_id)
        self._push(signed, owner.node_id, sender_domain=OTHER_DOMAIN)
        self.assertEqual(dict(self.b.rpc.drops), {"sender_invalid": 2})
        self.assertIsNone(self.b.rpc.peers.get(owner.node_id))
        self.assertIsNone(self.b.rpc.peers.get(impostor.node_id))
        self.assertEqual(self.heard, [])

    def test_expired_record_is_not_learned(self):
        """A Node record past its expiry is dropped."""
        stranger = Identity.generate()
        signed = self.mesh.operator.node_record(stranger, lifetime_ms=60_000)
        self.b.reactor.advance(60)
        self._push(signed, stranger.node_id)
        self.assertEqual(dict(self.b.rpc.drops), {"sender_expired": 1})
        self.assertIsNone(self.b.rpc.peers.get(stranger.node_id))



# -- 9. where a peer's datagrams come from -----------------------------------------------------

class PeerAddressTests(SynchronousTestCase):
    """Peer.address: where the peer's last authenticated frame came from (a datagram's NAT
    mapping, or a stream it opened), where introductions and relayed requests to it are
    sent; forgeries do not move it."""

    NAT = ("198.51.100.30", 41000)
    MOVED = ("198.51.100.30", 41999)
    ELSEWHERE = ("203.0.113.66", 5000)

    def setUp(self):
        self.mesh = _Mesh(self)
        self.a = self.mesh.node("a")
        self.b = self.mesh.node("b")
        _introduce(self.a, self.b)
        self.pings = _record_pings(self.b)

    def arrive(self, datagram, source, node=None):
        """`datagram` reaches `node` (b) by UDP from `source`, as through a NAT."""
        node = node or self.b
        self.mesh.network.queue.append((source, node.address, datagram))
        self.mesh.network.flush()

    def address(self):
        return self.b.peer(self.a).address

    def test_no_address_before_any_datagram(self):
        """A peer learned from its Node record has no address of its own yet."""
        self.assertIsNone(self.address())

    def test_authenticated_datagram_sets_address(self):
        """A peer's valid datagram from its NAT mapping: that is its address; the answer
        goes there."""
        self.arrive(_ping(self.a, self.b), self.NAT)
        self.assertEqual(len(self.pings), 1)
        self.assertEqual(self.address(), self.NAT)
        self.assertEqual(self.b.udp.sent[-1][1], self.NAT)

    def test_follows_the_latest_datagram(self):
        """A new mapping (the NAT's, after a timeout) replaces the old one."""
        self.arrive(_ping(self.a, self.b), self.NAT)
        self.arrive(_ping(self.a, self.b), self.MOVED)
        self.assertEqual(self.address(), self.MOVED)

    def test_answer_sets_address(self):
        """An answer to our call, from a new mapping of the peer, sets its address too."""
        d = self.a.rpc.call(self.a.peer(self.b), self.b.address, Ping(b"x"), Pong)
        self.mesh.network.queue.clear()
        sent = _deliver(self.b, self.a.udp.sent[-1][0], self.a.address)
        self.arrive(sent[0][0], self.NAT, node=self.a)
        self.assertEqual(self.successResultOf(d), Pong(b"x"))
        self.assertEqual(self.a.peer(self.b).address, self.NAT)

    def test_undecryptable_datagram_leaves_address(self):
        """A datagram in the peer's name that does not authenticate (any byte of its
        sealed part changed) does not move its address."""
        self.arrive(_ping(self.a, self.b), self.NAT)
        forged = bytearray(_ping(self.a, self.b))
        forged[-1] ^= 0x01
        self.arrive(bytes(forged), self.ELSEWHERE)
        self.assertEqual(self.b.rpc.drops["decrypt"], 1)
        self.assertEqual(self.address(), self.NAT)

    def test_other_key_leaves_address(self):
        """A datagram sealed with another node's key in the peer's name does not move it."""
        self.arrive(_ping(self.a, self.b), self.NAT)
        c = self.mesh.node("c")
        _introduce(c, self.b)
        peer = c.peer(self.b)
        head = frame.header(0, Command.PING, DOMAIN, self.b.rpc.node_id, DOMAIN,
                            self.a.rpc.node_id, c.rpc.now_ms(), self.a.rpc._ids.next())
        self.arrive(frame.seal(peer.seal_key, head, Ping().encode()), self.ELSEWHERE)
        self.assertEqual(self.b.rpc.drops["decrypt"], 1)
        self.assertEqual(self.address(), self.NAT)

    def test_replayed_datagram_leaves_address(self):
        """The peer's own datagram replayed from elsewhere is dropped and does not move it."""
        ping = _ping(self.a, self.b)
        self.arrive(ping, self.NAT)
        self.arrive(ping, self.ELSEWHERE)
        self.assertEqual(self.b.rpc.drops["replay"], 1)
        self.assertEqual(len(self.pings), 1)
        self.assertEqual(self.address(), self.NAT)

    def stream(self):
        """A TCP connection a opened to b's RPC port → its transport."""
        factory = self.b.reactor.tcpServers[0][1]
        client = IPv4Address("TCP", self.a.host, 50000)
        protocol = factory.buildProtocol(client)
        transport = StringTransport(peerAddress=client)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_stream_then_datagram(self):
        """A request over a stream the peer opened: requests to it go back over that
        stream; its next datagram takes them back to UDP, to where that came from."""
        protocol, transport = self.stream()
        ping = _ping(self.a, self.b)
        protocol.dataReceived(struct.pack(">H", len(ping)) + ping)
        self.assertEqual(self.address(), (self.a.host, 50000))
        transport.clear()
        sent = len(self.b.udp.sent)
        self.b.rpc.send(self.b.peer(self.a), self.address(), Ping(b"back"))
        self.assertNotEqual(transport.value(), b"")
        self.assertEqual(len(self.b.udp.sent), sent)
        self.arrive(_ping(self.a, self.b), self.NAT)
        transport.clear()
        self.b.rpc.send(self.b.peer(self.a), self.address(), Ping(b"again"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.b.udp.sent[-1][1], self.NAT)
