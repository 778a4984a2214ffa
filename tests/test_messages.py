"""RPC message codecs: every message round-trips, and malformed payloads are refused."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records
from meshnode.identity import Identity
from meshnode.rpc import messages
from meshnode.rpc.messages import (PAGE_BYTES, EndDevices, GetEndDevices, GetNode,
                                   GetOperatorNodes, GetSuperNodes, NodeRecord, OperatorNodes,
                                   Ping, Pong, SuperNodes)
from meshnode.wire import DecodeError

NOW = 1_800_000_000_000
OPERATOR = Identity.generate()


def _operator_record(identity):
    return OPERATOR.sign(records.OperatorNode(1, identity.node_id, identity.signing_public,
                                              identity.agreement_public, NOW))


def _node_record(name):
    me = Identity.generate()
    return OPERATOR.sign(records.Node(7, me.node_id, me.signing_public, me.agreement_public,
                                      name, NOW, NOW + 1000))


_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                 max_size=20).filter(lambda n: len(n.encode()) <= records.NAME_LIMIT)


class MessageRoundTripTests(SynchronousTestCase):
    def round_trip(self, message):
        self.assertEqual(type(message).decode(message.encode()), message)

    @given(st.binary(max_size=messages.PING_DATA_LIMIT))
    def test_ping_and_pong_round_trip(self, data):
        """Ping and Pong carry any data up to the limit."""
        self.round_trip(Ping(data))
        self.round_trip(Pong(data))

    @given(st.binary(min_size=12, max_size=12), st.none() | st.binary(min_size=32, max_size=32))
    def test_get_node_round_trips(self, cause, wanted):
        """GetNode with or without a wanted node id."""
        self.round_trip(GetNode(cause, wanted))

    @given(st.binary(min_size=12, max_size=12), _NAMES)
    def test_get_node_by_name_round_trips(self, cause, name):
        """GetNode asking for an overlay name."""
        self.round_trip(GetNode(cause, name=name))

    @given(_NAMES)
    def test_node_record_round_trips(self, name):
        """NodeRecord carries a signed Node record, or nothing."""
        self.round_trip(NodeRecord(_node_record(name)))
        self.round_trip(NodeRecord(None))

    @given(st.integers(0, 65535))
    def test_page_requests_round_trip(self, offset):
        """The paged requests carry their offset."""
        for kind in (GetOperatorNodes, GetSuperNodes, GetEndDevices):
            self.round_trip(kind(offset))

    @given(st.integers(0, 4), st.integers(0, 65535))
    def test_record_pages_round_trip(self, count, total):
        """A page of signed records round-trips and fits one datagram."""
        signed = [_operator_record(Identity.generate()) for _ in range(count)]
        page = OperatorNodes.fill([s.encode() for s in signed], 0)
        self.assertEqual(len(page.signed), count)
        self.round_trip(page)
        self.round_trip(SuperNodes(total, signed))
        self.round_trip(EndDevices(total, []))
        self.assertLessEqual(len(page.encode()), PAGE_BYTES + 2)


class MalformedPayloadTests(SynchronousTestCase):
    def test_truncated_and_extended_payloads_refused(self):
        """Every proper prefix and any extra byte of a payload is refused."""
        for message in (Ping(b"abc"), GetNode(bytes(12), bytes(32)),
                        NodeRecord(_node_record("n")), GetEndDevices(3),
                        OperatorNodes(1, [_operator_record(Identity.generate())])):
            data = message.encode()
            for length in range(len(data)):
                if type(message) is GetNode and length == 12:
                    continue  # a GetNode without `wanted` is 12 bytes
                self.assertRaises(DecodeError, type(message).decode, data[:length])
            self.assertRaises(DecodeError, type(message).decode, data + b"\x00")

    def test_ping_data_over_the_limit_refused(self):
        """Ping data longer than its limit is neither sent nor accepted."""
        self.assertRaises(ValueError, Ping(bytes(messages.PING_DATA_LIMIT + 1)).encode)
        data = (messages.PING_DATA_LIMIT + 1).to_bytes(2, "big") + bytes(
            messages.PING_DATA_LIMIT + 1)
        self.assertRaises(DecodeError, Ping.decode, data)
