"""The STUN client: codec vectors and properties, transactions on a fake clock, and NAT
behaviour discovery against a fake RFC 5780 server behind emulated NATs."""

import collections
import struct

from hypothesis import given, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshnode.nat import stun
from meshnode.nat.rules import Behaviour
from meshnode.nat.stun import (BindingErrorResponse, BindingRequest, BindingResponse,
                           NatReport, StunClient, StunDecodeError, StunRefused, StunStopped,
                           StunTimeout, discover, is_stun)
from meshnode.wire import DecodeError, Endpoint

# RFC 5769 §2.2 and §2.3, verbatim: SOFTWARE "test vector", XOR-MAPPED-ADDRESS
# 192.0.2.1:32853 / [2001:db8:1234:5678:11:2233:4455:6677]:32853, MESSAGE-INTEGRITY, FINGERPRINT.
RFC5769_TRANSACTION = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_IPV4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96")
RFC5769_IPV6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c")

TID = bytes(range(1, 13))
SERVER = Endpoint("198.51.100.1", 3478)
ALTERNATE = Endpoint("198.51.100.2", 3479)
LOCAL = Endpoint("192.168.1.10", 7400)
PUBLIC_IP = "203.0.113.7"


def _message(kind, transaction_id, *attributes):
    """A STUN message built by hand, independently of the codec."""
    body = b"".join(struct.pack(">HH", t, len(v)) + v + bytes(-len(v) % 4)
                    for t, v in attributes)
    return struct.pack(">HHI", kind, len(body), 0x2112A442) + transaction_id + body


def _plain_address(host_bytes, port):
    return struct.pack(">BBH", 0, 1 if len(host_bytes) == 4 else 2, port) + host_bytes


_TRANSACTION_IDS = st.binary(min_size=12, max_size=12)
_ENDPOINTS = st.builds(Endpoint, st.ip_addresses().map(str), st.integers(0, 65535))
_OPTIONAL_ENDPOINTS = st.none() | _ENDPOINTS
_MESSAGES = st.one_of(
    st.builds(BindingRequest, _TRANSACTION_IDS, st.booleans(), st.booleans()),
    st.builds(BindingResponse, _TRANSACTION_IDS, _ENDPOINTS, _OPTIONAL_ENDPOINTS,
              _OPTIONAL_ENDPOINTS),
    st.builds(BindingErrorResponse, _TRANSACTION_IDS, st.integers(300, 699),
              st.text(max_size=40)))


class CodecTests(SynchronousTestCase):
    def test_rfc5769_ipv4_response(self):
        """RFC 5769's IPv4 sample response decodes to 192.0.2.1:32853, fingerprint checked."""
        self.assertEqual(stun.decode(RFC5769_IPV4),
                         BindingResponse(RFC5769_TRANSACTION, Endpoint("192.0.2.1", 32853)))

    def test_rfc5769_ipv6_response(self):
        """RFC 5769's IPv6 sample response decodes, the address XOR-ed with the transaction id."""
        self.assertEqual(stun.decode(RFC5769_IPV6).mapped,
                         Endpoint("2001:db8:1234:5678:11:2233:4455:6677", 32853))

    def test_xor_mapped_address_encoding_matches_rfc5769(self):
        """Encoding 192.0.2.1:32853 gives the vector's XOR-MAPPED-ADDRESS bytes."""
        encoded = BindingResponse(RFC5769_TRANSACTION, Endpoint("192.0.2.1", 32853)).encode()
        self.assertEqual(encoded[20:], bytes.fromhex("002000080001a147e112a643"))
        self.assertEqual(encoded[:20], bytes.fromhex("0101000c2112a442") + RFC5769_TRANSACTION)

    def test_wrong_fingerprint_rejected(self):
        """A message whose FINGERPRINT does not match its bytes is refused."""
        for index in (25, len(RFC5769_IPV4) - 1):
            damaged = bytearray(RFC5769_IPV4)
            damaged[index] ^= 0x01
            self.assertRaises(StunDecodeError, stun.decode, bytes(damaged))

    def test_binding_request_bytes(self):
        """A Binding Request is a bare header; CHANGE-REQUEST carries the IP and port flags."""
        self.assertEqual(BindingRequest(TID).encode(), bytes.fromhex("000100002112a442") + TID)
        self.assertEqual(BindingRequest(TID, change_ip=True, change_port=True).encode(),
                         bytes.fromhex("000100082112a442") + TID
                         + bytes.fromhex("0003000400000006"))
        self.assertEqual(BindingRequest(TID, change_port=True).encode()[-1], 0x02)

    def test_rfc3489_attributes(self):
        """RFC 3489's MAPPED-, CHANGED- and SOURCE-ADDRESS stand in for the newer attributes."""
        data = _message(0x0101, TID, (0x0001, _plain_address(bytes([203, 0, 113, 7]), 50000)),
                        (0x0005, _plain_address(bytes([198, 51, 100, 2]), 3479)),
                        (0x0004, _plain_address(bytes([198, 51, 100, 1]), 3478)))
        self.assertEqual(stun.decode(data), BindingResponse(
            TID, Endpoint("203.0.113.7", 50000), ALTERNATE, SERVER))

    def test_xor_mapped_address_preferred(self):
        """With both, XOR-MAPPED-ADDRESS is the mapped address, whatever the order."""
        xor = (0x0020, BindingResponse(TID, Endpoint("203.0.113.7", 50000)).encode()[24:])
        plain = (0x0001, _plain_address(bytes([10, 0, 0, 1]), 1))
        for attributes in ((plain, xor), (xor, plain)):
            self.assertEqual(stun.decode(_message(0x0101, TID, *attributes)).mapped,
                             Endpoint("203.0.113.7", 50000))

    def test_other_address_and_response_origin(self):
        """OTHER-ADDRESS and RESPONSE-ORIGIN decode, IPv6 ones too."""
        other, origin = Endpoint("2001:db8::2", 3479), Endpoint("2001:db8::1", 3478)
        response = BindingResponse(TID, Endpoint("2001:db8::77", 4), other, origin)
        self.assertEqual(stun.decode(response.encode()), response)

    def test_unknown_optional_attribute_skipped(self):
        """Attributes from 0x8000 up that we do not know (SOFTWARE, anything) are skipped."""
        xor = (0x0020, bytes.fromhex("0001a147e112a643"))
        data = _message(0x0101, RFC5769_TRANSACTION, (0x8022, b"coturn"), (0xC0FF, b"\x01"), xor)
        self.assertEqual(stun.decode(data).mapped, Endpoint("192.0.2.1", 32853))

    def test_unknown_required_attribute_rejected(self):
        """An unknown attribute below 0x8000 makes the message unusable (RFC 5389 §7.3.3)."""
        xor = (0x0020, bytes.fromhex("0001a147e112a643"))
        with self.assertRaises(StunDecodeError) as raised:
            stun.decode(_message(0x0101, RFC5769_TRANSACTION, (0x7FFF, b""), xor))
        self.assertEqual(raised.exception.reason, "stun_unsupported")

    def test_error_response(self):
        """A Binding Error Response decodes to its code and reason phrase."""
        data = _message(0x0111, TID, (0x0009, bytes([0, 0, 4, 20]) + b"Unknown Attribute"),
                        (0x000A, struct.pack(">H", 3)))
        self.assertEqual(stun.decode(data), BindingErrorResponse(TID, 420, "Unknown Attribute"))

    def test_malformed_messages_rejected(self):
        """Each way a message can be out of shape raises StunDecodeError."""
        xor = bytes.fromhex("0001a147e112a643")
        cases = {
            "short": bytes.fromhex("000100002112a442"),
            "first bits": bytes([0x40]) + BindingRequest(TID).encode()[1:],
            "cookie": BindingRequest(TID).encode()[:4] + bytes(4) + TID,
            "length": BindingRequest(TID).encode() + bytes(4),
            "odd length": _message(0x0001, TID)[:3] + b"\x01" + _message(0x0001, TID)[4:] + b"x",
            "overrun": _message(0x0101, TID, (0x0020, xor))[:-4],
            "family": _message(0x0101, TID, (0x0020, bytes([0, 3]) + xor[2:])),
            "address size": _message(0x0101, TID, (0x0020, xor + bytes(4))),
            "short address": _message(0x0101, TID, (0x0020, b"\x00\x01")),
            "no mapped address": _message(0x0101, TID, (0x8022, b"x")),
            "no error code": _message(0x0111, TID),
            "error class": _message(0x0111, TID, (0x0009, bytes([0, 0, 7, 0]))),
            "error number": _message(0x0111, TID, (0x0009, bytes([0, 0, 4, 100]))),
            "reason": _message(0x0111, TID, (0x0009, bytes([0, 0, 4, 0]) + b"\xff")),
            "change request": _message(0x0001, TID, (0x0003, b"\x00\x06")),
            "fingerprint not last": _message(0x0101, TID, (0x8028, bytes(4)), (0x0020, xor)),
            "indication": _message(0x0011, TID),
            "other method": _message(0x0003, TID),
        }
        for name, data in cases.items():
            with self.subTest(name):
                self.assertRaises(StunDecodeError, stun.decode, data)

    def test_is_stun(self):
        """STUN messages are recognised; RPC frames ('M' first) and truncated ones are not."""
        self.assertTrue(is_stun(RFC5769_IPV4))
        self.assertTrue(is_stun(BindingRequest(TID).encode()))
        self.assertFalse(is_stun(b"M" + RFC5769_IPV4[1:]))
        self.assertFalse(is_stun(RFC5769_IPV4[:-4]))
        self.assertFalse(is_stun(b""))

    def test_decode_error_is_the_wire_one(self):
        """StunDecodeError is a wire.DecodeError, so one except clause catches every codec."""
        self.assertTrue(issubclass(StunDecodeError, DecodeError))


class CodecPropertyTests(SynchronousTestCase):
    @given(_MESSAGES)
    def test_round_trip(self, message):
        """Every request, success and error response decodes to what was encoded."""
        encoded = message.encode()
        self.assertTrue(is_stun(encoded))
        self.assertEqual(stun.decode(encoded), message)

    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, data):
        """Arbitrary bytes decode or raise StunDecodeError, nothing else."""
        try:
            stun.decode(data)
        except StunDecodeError:
            pass

    @given(_MESSAGES, st.data())
    def test_mutations(self, message, data):
        """A byte changed, dropped or added decodes or raises StunDecodeError, nothing else."""
        encoded = bytearray(message.encode())
        index = data.draw(st.integers(0, len(encoded) - 1))
        action = data.draw(st.sampled_from(["change", "drop", "insert"]))
        if action == "change":
            encoded[index] ^= data.draw(st.integers(1, 255))
        elif action == "drop":
            del encoded[index]
        else:
            encoded.insert(index, data.draw(st.integers(0, 255)))
        try:
            stun.decode(bytes(encoded))
        except StunDecodeError:
            return
        self.assertTrue(is_stun(bytes(encoded)))

    @given(st.sampled_from([0x0001, 0x0101, 0x0111]), st.lists(st.tuples(
        st.sampled_from([0x0001, 0x0003, 0x0004, 0x0005, 0x0008, 0x0009, 0x0020, 0x8022,
                         0x8028, 0x802B, 0x802C, 0x7000, 0x9000]),
        st.binary(max_size=24)), max_size=5))
    def test_arbitrary_attributes(self, kind, attributes):
        """Well-framed messages of arbitrary attributes decode or raise StunDecodeError."""
        try:
            stun.decode(_message(kind, TID, *attributes))
        except StunDecodeError:
            pass


class _Wire:
    """Records what a client sends, with the fake clock's time."""

    def __init__(self, clock):
        self.clock = clock
        self.sent = []

    def send(self, data, address):
        self.sent.append((self.clock.seconds(), data, address))

    def request(self, index=-1):
        return stun.decode(self.sent[index][1])


class StunClientTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.wire = _Wire(self.clock)
        self.client = StunClient(self.wire.send, self.clock)

    def answer(self, mapped=Endpoint(PUBLIC_IP, 50000), source=SERVER, index=-1):
        request = self.wire.request(index)
        return self.client.receive(BindingResponse(request.transaction_id, mapped).encode(),
                                   (source.host, source.port))

    def test_retransmits_then_times_out(self):
        """Unanswered, the request goes out at 0, 0.5, 1.5 and 2.5 s; it fails at 3 s."""
        d = self.client.binding(SERVER)
        self.clock.pump([0.5] * 5 + [0.49])
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.failureResultOf(d, StunTimeout)
        self.assertEqual([at for at, _, _ in self.wire.sent], [0, 0.5, 1.5, 2.5])
        self.assertEqual({data for _, data, _ in self.wire.sent}, {self.wire.sent[0][1]})
        self.assertEqual({address for _, _, address in self.wire.sent}, {(SERVER.host, 3478)})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_schedule_is_configurable(self):
        """rto, max_sends and the per-call timeout bound the sends."""
        client = StunClient(self.wire.send, self.clock, rto=0.25, max_rto=10, max_sends=3)
        d = client.binding(SERVER, timeout=5.0)
        self.clock.pump([0.25] * 19)
        self.assertNoResult(d)
        self.clock.advance(0.25)
        self.failureResultOf(d, StunTimeout)
        self.assertEqual([at for at, _, _ in self.wire.sent], [0, 0.25, 0.75])

    def test_no_retransmission_past_the_deadline(self):
        """A short timeout cuts the schedule: no send after the deadline."""
        d = self.client.binding(SERVER, timeout=1.0)
        self.clock.pump([0.5] * 3)
        self.failureResultOf(d, StunTimeout)
        self.assertEqual([at for at, _, _ in self.wire.sent], [0, 0.5])

    def test_answer_fires_with_mapped_and_source(self):
        """An answer gives the mapped endpoint and where it came from; retransmission stops."""
        d = self.client.binding((SERVER.host, SERVER.port))
        self.clock.advance(0.5)
        self.assertTrue(self.answer(source=ALTERNATE))
        response = self.successResultOf(d)
        self.assertEqual((response.mapped, response.source),
                         (Endpoint(PUBLIC_IP, 50000), ALTERNATE))
        self.clock.advance(10)
        self.assertEqual(len(self.wire.sent), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_change_request_sent(self):
        """binding() passes the CHANGE-REQUEST flags on."""
        self.client.binding(SERVER, change_ip=True)
        self.client.binding(SERVER, change_port=True)
        self.assertEqual([(r.change_ip, r.change_port) for r in map(self.wire.request, (0, 1))],
                         [(True, False), (False, True)])

    def test_matched_by_transaction_id(self):
        """Concurrent transactions each get their own answer, in any order."""
        first, second = self.client.binding(SERVER), self.client.binding(ALTERNATE)
        self.answer(Endpoint(PUBLIC_IP, 2), index=1)
        self.assertNoResult(first)
        self.answer(Endpoint(PUBLIC_IP, 1), index=0)
        self.assertEqual([self.successResultOf(d).mapped.port for d in (first, second)], [1, 2])
        self.assertNotEqual(self.wire.request(0).transaction_id,
                            self.wire.request(1).transaction_id)

    def test_unmatched_answer_dropped(self):
        """An answer to no pending transaction (or a late duplicate) is consumed and counted."""
        d = self.client.binding(SERVER)
        stray = BindingResponse(bytes(12), Endpoint(PUBLIC_IP, 1)).encode()
        self.assertTrue(self.client.receive(stray, (SERVER.host, SERVER.port)))
        self.assertNoResult(d)
        self.answer()
        self.answer()
        self.successResultOf(d)
        self.assertEqual(self.client.drops, {"stun_unmatched": 2})

    def test_malformed_dropped(self):
        """A STUN-shaped datagram that does not decode is consumed and counted."""
        d = self.client.binding(SERVER)
        broken = _message(0x0101, self.wire.request().transaction_id, (0x0020, b"\x00\x09"))
        unsupported = _message(0x0101, self.wire.request().transaction_id, (0x7FFF, b""))
        request = BindingRequest(bytes(12)).encode()
        for data in (broken, unsupported, request):
            self.assertTrue(self.client.receive(data, (SERVER.host, SERVER.port)))
        self.assertNoResult(d)
        self.assertEqual(self.client.drops, {"stun_malformed": 1, "stun_unsupported": 1,
                                             "stun_not_response": 1})

    def test_other_datagrams_left_to_the_owner(self):
        """A datagram that is not STUN (an RPC frame) is not consumed and not counted."""
        self.client.binding(SERVER)
        self.assertFalse(self.client.receive(b"M" + bytes(95), (SERVER.host, SERVER.port)))
        self.assertFalse(self.client.receive(b"", (SERVER.host, SERVER.port)))
        self.assertEqual(self.client.drops, {})

    def test_drops_counter_shared(self):
        """Given a counter (the RPC service's), the client counts into it."""
        drops = collections.Counter(malformed=3)
        client = StunClient(self.wire.send, self.clock, drops)
        client.receive(BindingResponse(TID, SERVER).encode(), (SERVER.host, SERVER.port))
        self.assertEqual(drops, {"malformed": 3, "stun_unmatched": 1})

    def test_error_response_fails_the_transaction(self):
        """A Binding Error Response fails the call with StunRefused and its code."""
        d = self.client.binding(SERVER, change_ip=True)
        error = BindingErrorResponse(self.wire.request().transaction_id, 420, "Unknown Attribute")
        self.client.receive(error.encode(), (SERVER.host, SERVER.port))
        failure = self.failureResultOf(d, StunRefused)
        self.assertEqual((failure.value.code, failure.value.source), (420, SERVER))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_fails_pending_and_later_calls(self):
        """stop() fails every pending transaction, ends retransmission and refuses new calls."""
        pending = [self.client.binding(SERVER), self.client.binding(ALTERNATE)]
        self.client.stop()
        for d in pending:
            self.failureResultOf(d, StunStopped)
        self.failureResultOf(self.client.binding(SERVER), StunStopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.wire.sent), 2)

    def test_cancel_ends_retransmission(self):
        """Cancelling a call forgets its transaction: no more sends, a late answer is unmatched."""
        d = self.client.binding(SERVER)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.advance(10)
        self.assertEqual(len(self.wire.sent), 1)
        self.answer()
        self.assertEqual(self.client.drops, {"stun_unmatched": 1})

    def test_send_error_counted(self):
        """A send the socket refuses is counted and retransmitted like a lost one."""
        attempts = []

        def refuse(data, address):
            attempts.append(data)
            raise OSError("network unreachable")

        client = StunClient(refuse, self.clock)
        d = client.binding(SERVER)
        self.clock.pump([0.5] * 7)
        self.failureResultOf(d, StunTimeout)
        self.assertEqual((len(attempts), client.drops["stun_send_error"]), (4, 4))


def _other(address):
    """The RFC 5780 server's address on its other IP and other port."""
    return ALTERNATE if address.host == SERVER.host else SERVER


class _StunServer:
    """An RFC 5780 server on two IPs and two ports. `other_address` False plays an RFC
    5389-only server; `on_change` says what it does with CHANGE-REQUEST: honour, ignore
    (answer from where it was asked) or refuse (420)."""

    def __init__(self, other_address=True, on_change="honour"):
        self.other_address = other_address
        self.on_change = on_change
        ips, ports = (SERVER.host, ALTERNATE.host), (SERVER.port, ALTERNATE.port)
        self.addresses = {Endpoint(ip, port) for ip in ips for port in ports}
        if not other_address:
            self.addresses = {SERVER}

    def answer(self, data, source, destination):
        """The (datagram, from-address) answers to `data` sent from `source` to `destination`."""
        if destination not in self.addresses:
            return []
        request = stun.decode(data)
        origin = destination
        if request.change_ip or request.change_port:
            if self.on_change == "refuse":
                return [(BindingErrorResponse(request.transaction_id, 420).encode(), origin)]
            if self.on_change == "honour":
                other = _other(destination)
                origin = Endpoint(other.host if request.change_ip else destination.host,
                                  other.port if request.change_port else destination.port)
        other = _other(destination) if self.other_address else None
        return [(BindingResponse(request.transaction_id, source, other, origin).encode(), origin)]


class _Nat:
    """One NAT (RFC 4787) in front of LOCAL; mapping None is no NAT (filtering may still apply,
    as a firewall's)."""

    def __init__(self, mapping, filtering):
        self.mapping = mapping
        self.filtering = filtering
        self.ports = {}
        self.contacted = collections.defaultdict(set)

    def outbound(self, destination):
        """The public endpoint a datagram from LOCAL to `destination` leaves with."""
        if self.mapping is None:
            public = LOCAL
        else:
            key = {Behaviour.ENDPOINT_INDEPENDENT: None,
                   Behaviour.ADDRESS_DEPENDENT: destination.host,
                   Behaviour.ADDRESS_AND_PORT_DEPENDENT: destination}[self.mapping]
            public = Endpoint(PUBLIC_IP, self.ports.setdefault(key, 50000 + len(self.ports)))
        self.contacted[public].add(destination)
        return public

    def admits(self, public, source):
        contacted = self.contacted[public]
        if self.filtering == Behaviour.ENDPOINT_INDEPENDENT:
            return bool(contacted)
        if self.filtering == Behaviour.ADDRESS_DEPENDENT:
            return any(c.host == source.host for c in contacted)
        return source in contacted


class _Lab:
    """A client behind a NAT, a STUN server, and a queue of datagrams between them."""

    def __init__(self, mapping, filtering, **server):
        self.clock = Clock()
        self.nat = _Nat(mapping, filtering)
        self.server = _StunServer(**server)
        self.queue = collections.deque()
        self.client = StunClient(lambda data, address: self.queue.append((data, address)),
                                 self.clock)

    def run(self, d, seconds=30):
        """Deliver datagrams and let time pass until `d` fires."""
        for _ in range(int(seconds * 10)):
            while self.queue:
                data, address = self.queue.popleft()
                destination = Endpoint(*address)
                public = self.nat.outbound(destination)
                for reply, origin in self.server.answer(data, public, destination):
                    if self.nat.admits(public, origin):
                        self.client.receive(reply, (origin.host, origin.port))
            if d.called:
                break
            self.clock.advance(0.1)
        return d


EIM = EIF = Behaviour.ENDPOINT_INDEPENDENT
ADM = ADF = Behaviour.ADDRESS_DEPENDENT
APDM = APDF = Behaviour.ADDRESS_AND_PORT_DEPENDENT


class DiscoverTests(SynchronousTestCase):
    def discover(self, mapping, filtering, local=(), **server):
        lab = _Lab(mapping, filtering, **server)
        return self.successResultOf(lab.run(discover(lab.client, SERVER, local)))

    def test_nat_behaviours(self):
        """Every mapping and filtering behaviour, in each combination, is told apart."""
        for mapping in (EIM, ADM, APDM):
            for filtering in (EIF, ADF, APDF):
                with self.subTest(mapping=mapping, filtering=filtering):
                    self.assertEqual(self.discover(mapping, filtering), NatReport(
                        Endpoint(PUBLIC_IP, 50000), ALTERNATE, mapping, filtering))

    def test_report_strings(self):
        """The behaviours compare equal to their RFC 4787 names."""
        report = self.discover(APDM, ADF)
        self.assertEqual((report.mapping, report.filtering),
                         ("address-and-port-dependent", "address-dependent"))

    def test_no_nat(self):
        """A mapped endpoint among the local ones is no NAT; a firewall's filtering still shows."""
        self.assertEqual(self.discover(None, EIF, [LOCAL]),
                         NatReport(LOCAL, ALTERNATE, Behaviour.NO_NAT, EIF))
        self.assertEqual(self.discover(None, APDF, [(LOCAL.host, LOCAL.port)]).filtering, APDF)

    def test_local_addresses_unknown(self):
        """Without the local endpoints, an unNATed host shows endpoint-independent mapping."""
        self.assertEqual(self.discover(None, EIF).mapping, EIM)

    def test_server_without_other_address(self):
        """An RFC 5389-only server gives the mapped endpoint, and unknown behaviours."""
        self.assertEqual(self.discover(APDM, APDF, other_address=False),
                         NatReport(Endpoint(PUBLIC_IP, 50000), None, Behaviour.UNKNOWN,
                                   Behaviour.UNKNOWN))
        self.assertEqual(self.discover(None, EIF, [LOCAL], other_address=False).mapping,
                         Behaviour.NO_NAT)

    def test_server_ignoring_change_request(self):
        """A server answering CHANGE-REQUEST from its primary address gives unknown filtering."""
        report = self.discover(ADM, APDF, on_change="ignore")
        self.assertEqual((report.mapping, report.filtering), (ADM, Behaviour.UNKNOWN))

    def test_server_refusing_change_request(self):
        """A server refusing CHANGE-REQUEST gives unknown filtering, and still the mapping."""
        report = self.discover(APDM, EIF, on_change="refuse")
        self.assertEqual((report.mapping, report.filtering), (APDM, Behaviour.UNKNOWN))

    def test_port_dependent_filtering_costs_one_timeout(self):
        """Behind a filter that wants the port neither filtering test is answered: they are
        asked at once, so discovery waits out one transaction's timeout, not two."""
        lab = _Lab(EIM, APDF)
        report = self.successResultOf(lab.run(discover(lab.client, SERVER)))
        self.assertEqual((report.mapping, report.filtering), (EIM, APDF))
        self.assertLess(lab.clock.seconds(), 2 * lab.client.timeout)

    def test_no_answer_fails(self):
        """With no answer to the first request, discover fails with StunTimeout."""
        lab = _Lab(EIM, EIF)
        lab.server.addresses = set()
        self.failureResultOf(lab.run(discover(lab.client, SERVER)), StunTimeout)

    def test_stop_fails_discovery(self):
        """Stopping the client mid-discovery fails it with StunStopped, not a guessed report."""
        lab = _Lab(EIM, APDF)
        d = lab.run(discover(lab.client, SERVER), seconds=1)
        self.assertNoResult(d)
        lab.client.stop()
        self.failureResultOf(d, StunStopped)
