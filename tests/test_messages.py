"""RPC message codecs: every message round-trips, and malformed payloads are refused."""

import struct

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records
from meshnode.core.identity import Identity
from meshnode.records import NatBehaviour, Role
from meshnode.rpc import messages
from meshnode.rpc.messages import (DIGESTS_PER_PAGE, MESSAGES, PAGE_BYTES, EndDevices,
                                   GetEndDevices, GetNode, GetNodeInfo, GetOperatorNodes,
                                   GetSuperNodes, NodeInfoRecord, NodeRecord, OperatorNodes,
                                   PartitionDigests, PartitionRecords, Ping, Pong, PutRecord,
                                   Stored, SubmitState, SubmitSuperNode, SuperNodes,
                                   SuperNodeStatus, TransferPartition, WhoAmI, YouAre)
from meshnode.wire import DecodeError, Endpoint

NOW = 1_800_000_000_000
OPERATOR = Identity.generate()


def _operator_record(identity):
    return OPERATOR.sign(records.OperatorNode(1, identity.node_id, identity.signing_public,
                                              identity.agreement_public, NOW))


def _node_record(name, me=None):
    me = me or Identity.generate()
    return OPERATOR.sign(records.Node(7, me.node_id, me.signing_public, me.agreement_public,
                                      name, NOW, NOW + 1000))


def _entry(name="n", addresses=1):
    """A (Node record, NodeInfo) pair as a replica hands it out."""
    me = Identity.generate()
    info = me.sign(records.NodeInfo(
        7, me.node_id, [Endpoint("2001:db8::1", 4000 + i) for i in range(addresses)], 4000,
        (), NatBehaviour.UNKNOWN, (), Role.USER, NOW))
    return _node_record(name, me), info


_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                 max_size=20).filter(lambda n: len(n.encode()) <= records.NAME_LIMIT)
_ENDPOINTS = st.builds(Endpoint, st.ip_addresses().map(str), st.integers(0, 65535))
_KEYS = st.integers(0, 0xFFFF)
_RANGES = st.tuples(_KEYS, _KEYS).map(sorted)
_DIGESTS = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                     st.binary(min_size=16, max_size=16))
_ENTRIES = [_entry(f"node{i}", i % 3) for i in range(4)]


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

    def test_super_nodes_carry_k_only_inside_the_signed_records(self):
        """A SuperNodes page is its total and the signed records, nothing more (the layout of
        every record page): K is read from each record's signed bytes, and a page with a
        byte put in front (the old unsigned K) is refused."""
        me = Identity.generate()
        signed = [OPERATOR.sign(records.SuperNode(1, me.node_id, 0, 0xFFFF, 5,
                                                  Endpoint("192.0.2.7", 4000), NOW))]
        data = SuperNodes.fill([s.encode() for s in signed], 0).encode()
        self.assertEqual(data, OperatorNodes(1, signed).encode())
        self.assertEqual(SuperNodes.decode(data).signed[0].record.replicas, 5)
        self.assertRaises(DecodeError, SuperNodes.decode, b"\x05" + data)

    @given(st.binary(min_size=32, max_size=32))
    def test_get_node_info_by_id_round_trips(self, node_id):
        """GetNodeInfo asking for a node id."""
        self.round_trip(GetNodeInfo(node_id=node_id))

    @given(_NAMES)
    def test_get_node_info_by_name_round_trips(self, name):
        """GetNodeInfo asking for an overlay name."""
        self.round_trip(GetNodeInfo(name=name))

    def test_get_node_info_takes_one_key(self):
        """GetNodeInfo takes exactly one of a node id and a name; a domain only with an id."""
        self.assertRaises(ValueError, GetNodeInfo)
        self.assertRaises(ValueError, GetNodeInfo, bytes(32), "alice")
        self.assertRaises(ValueError, GetNodeInfo, name="alice", domain=7)
        self.round_trip(GetNodeInfo(node_id=bytes(range(32)), domain=0xFFFFFFFF))

    def test_node_info_record_round_trips(self):
        """NodeInfoRecord carries a Node record and a NodeInfo, or neither (as no bytes)."""
        for node, info in _ENTRIES:
            self.round_trip(NodeInfoRecord(node, info))
        self.round_trip(NodeInfoRecord())
        self.assertEqual(NodeInfoRecord().encode(), b"")

    @given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
           st.sampled_from(list(messages.Changed)))
    def test_records_changed_round_trips(self, domain, serial, what):
        """RecordsChanged carries a domain, a serial and what changed, in exactly 13
        bytes; an unknown kind of change does not decode."""
        self.round_trip(messages.RecordsChanged(domain, serial, what))
        encoded = messages.RecordsChanged(domain, serial, what).encode()
        for bad in (encoded[:-1], encoded + b"\0", encoded[:-1] + b"\x09"):
            self.assertRaises(DecodeError, messages.RecordsChanged.decode, bad)

    def test_who_am_i_round_trips(self):
        """WhoAmI carries nothing."""
        self.assertEqual(WhoAmI().encode(), b"")
        self.round_trip(WhoAmI())

    @given(_ENDPOINTS)
    def test_you_are_round_trips(self, endpoint):
        """YouAre carries an IPv4 or IPv6 endpoint."""
        self.round_trip(YouAre(endpoint))

    @given(_RANGES, _ENDPOINTS)
    def test_submit_super_node_round_trips(self, key_range, endpoint):
        """SubmitSuperNode carries an inclusive range and an endpoint."""
        self.round_trip(SubmitSuperNode(*key_range, endpoint))

    @given(st.sampled_from(SubmitState), st.text(max_size=50))
    def test_super_node_status_round_trips(self, state, reason):
        """SuperNodeStatus carries a state and a reason."""
        self.round_trip(SuperNodeStatus(state, reason))
        self.assertIsInstance(SuperNodeStatus.decode(SuperNodeStatus(state).encode()).state,
                              SubmitState)

    @given(_RANGES, st.none() | st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    def test_transfer_partition_round_trips(self, key_range, domain, offset):
        """TransferPartition asks for digests (no domain) or a domain's entries, from an
        offset; domain 0 is a domain, not "no domain"."""
        self.round_trip(TransferPartition(*key_range, domain, offset))
        self.round_trip(TransferPartition(*key_range, 0, offset))

    @given(st.integers(0, 2**32 - 1), st.lists(_DIGESTS, max_size=DIGESTS_PER_PAGE))
    def test_partition_digests_round_trip(self, total, digests):
        """A page of digests round-trips; a full page fits one answer."""
        page = PartitionDigests(total, digests)
        self.round_trip(page)
        self.assertLessEqual(len(page.encode()), PAGE_BYTES)

    @given(st.integers(0, 2**32 - 1), st.lists(st.sampled_from(_ENTRIES), max_size=2))
    def test_partition_records_round_trip(self, total, entries):
        """A page of (Node, NodeInfo) entries round-trips."""
        self.round_trip(PartitionRecords(total, entries))

    def test_partition_records_fill(self):
        """fill() takes as many entries as fit one answer, from `offset`, and says how many
        there are; past the end it is an empty page."""
        entries = _ENTRIES * 3
        offset, pages = 0, []
        while offset < len(entries):
            page = PartitionRecords.fill(entries, offset)
            self.assertEqual(page.total, len(entries))
            self.assertTrue(page.entries)
            self.assertLessEqual(len(page.encode()), PAGE_BYTES)
            self.assertEqual(PartitionRecords.decode(page.encode()), page)
            pages.append(page.entries)
            offset += len(page.entries)
        self.assertGreater(len(pages), 2)
        self.assertEqual([entry for page in pages for entry in page], entries)
        for past in (len(entries), len(entries) + 1):
            self.assertEqual(PartitionRecords.fill(entries, past),
                             PartitionRecords(len(entries), ()))

    def test_every_message_has_a_codec(self):
        """Every command that has a message class maps to it in MESSAGES."""
        for command, kind in MESSAGES.items():
            self.assertEqual(kind.COMMAND, command)
        for kind in (GetNodeInfo, NodeInfoRecord, WhoAmI, YouAre, SubmitSuperNode,
                     SuperNodeStatus, TransferPartition, PartitionDigests, PartitionRecords):
            self.assertIs(MESSAGES[kind.COMMAND], kind)


def _samples():
    """One encoded instance of each message whose every proper prefix is refused."""
    node, info = _ENTRIES[0]
    return [
        Ping(b"abc"), GetNode(bytes(12), bytes(32)), NodeRecord(_node_record("n")),
        GetEndDevices(3), OperatorNodes(1, [_operator_record(Identity.generate())]),
        SuperNodes(1, [_operator_record(Identity.generate())]),
        PutRecord(info), Stored(2, "the domain's quota is full"),
        GetNodeInfo(node_id=bytes(range(32))), GetNodeInfo(name="alice"),
        GetNodeInfo(node_id=bytes(range(32)), domain=0x0A1B2C3D),
        NodeInfoRecord(node, info), YouAre(Endpoint("192.0.2.7", 4000)),
        YouAre(Endpoint("2001:db8::7", 4000)),
        SubmitSuperNode(0x10, 0x7FFF, Endpoint("192.0.2.7", 4000)),
        SuperNodeStatus(SubmitState.CHECKING, "reaching back"), TransferPartition(1, 2, None, 3),
        PartitionDigests(3, [(7, 2, bytes(range(16))), (8, 1, bytes(16))]),
        PartitionRecords(5, _ENTRIES[:2]),
    ]


class MalformedPayloadTests(SynchronousTestCase):
    def test_truncated_and_extended_payloads_refused(self):
        """Every proper prefix and any extra byte of a payload is refused."""
        for message in _samples():
            data = message.encode()
            for length in range(len(data)):
                if type(message) is GetNode and length == 12:
                    continue  # a GetNode without `wanted` is 12 bytes
                if type(message) is NodeInfoRecord and length == 0:
                    continue  # no bytes: the record was not found
                with self.subTest(message=type(message).__name__, length=length):
                    self.assertRaises(DecodeError, type(message).decode, data[:length])
            self.assertRaises(DecodeError, type(message).decode, data + b"\x00")

    def test_transfer_partition_with_a_domain(self):
        """TransferPartition with a domain: only its 8-byte prefix (no domain) decodes, and
        an extra byte or an extra u32 is refused."""
        data = TransferPartition(1, 2, 0x12345678, 3).encode()
        for length in range(len(data)):
            if length == 8:
                self.assertEqual(TransferPartition.decode(data[:8]),
                                 TransferPartition(1, 2, None, 3))
                continue
            self.assertRaises(DecodeError, TransferPartition.decode, data[:length])
        for extra in (b"\x00", bytes(4)):
            self.assertRaises(DecodeError, TransferPartition.decode, data + extra)

    def test_reversed_range_refused(self):
        """A range whose low key is above its high key is refused."""
        endpoint = Endpoint("192.0.2.7", 4000)
        self.assertRaises(DecodeError, SubmitSuperNode.decode,
                          SubmitSuperNode(0x8000, 0x7FFF, endpoint).encode())
        for domain in (None, 5):
            self.assertRaises(DecodeError, TransferPartition.decode,
                              TransferPartition(0x10, 0x0F, domain).encode())
        self.assertEqual(TransferPartition.decode(TransferPartition(9, 9).encode()),
                         TransferPartition(9, 9))

    def test_bad_lookup_kind_refused(self):
        """GetNodeInfo with a lookup kind other than 1 (id), 2 (name) or 3 (domain and id)
        is refused."""
        by_id = GetNodeInfo(node_id=bytes(32)).encode()
        by_name = GetNodeInfo(name="alice").encode()
        for kind in (0, 4, 255):
            self.assertRaises(DecodeError, GetNodeInfo.decode, bytes([kind]) + by_id[1:])
            self.assertRaises(DecodeError, GetNodeInfo.decode, bytes([kind]) + by_name[1:])
        # the kind is what decides how the rest is read
        self.assertRaises(DecodeError, GetNodeInfo.decode, b"\x02" + by_id[1:])
        self.assertRaises(DecodeError, GetNodeInfo.decode, b"")

    def test_bad_names_refused(self):
        """A GetNodeInfo name over the limit, or not UTF-8, is refused."""
        long_name = "n" * (records.NAME_LIMIT + 1)
        self.assertRaises(ValueError, GetNodeInfo(name=long_name).encode)
        raw = long_name.encode()
        self.assertRaises(DecodeError, GetNodeInfo.decode,
                          b"\x02" + struct.pack(">H", len(raw)) + raw)
        self.assertRaises(DecodeError, GetNodeInfo.decode, b"\x02\x00\x02\xff\xfe")

    def test_node_info_record_blobs_checked(self):
        """A NodeInfoRecord whose records do not decode, or carries one of two, is refused."""
        node, info = _ENTRIES[0]
        blob = node.encode()
        half = struct.pack(">H", len(blob)) + blob
        self.assertRaises(DecodeError, NodeInfoRecord.decode, half)
        self.assertRaises(DecodeError, NodeInfoRecord.decode, half + b"\x00\x00")
        bad_type = bytearray(NodeInfoRecord(node, info).encode())
        bad_type[2] = 99  # the Node record's type byte
        self.assertRaises(DecodeError, NodeInfoRecord.decode, bytes(bad_type))

    def test_who_am_i_carries_nothing(self):
        """A WhoAmI with any payload is refused."""
        for payload in (b"\x00", b"x" * 10):
            self.assertRaises(DecodeError, WhoAmI.decode, payload)

    def test_you_are_unknown_family_refused(self):
        """A YouAre endpoint of an address family other than 4 or 6 is refused."""
        data = bytearray(YouAre(Endpoint("192.0.2.7", 4000)).encode())
        for family in (0, 5, 255):
            data[0] = family
            self.assertRaises(DecodeError, YouAre.decode, bytes(data))

    def test_unknown_submit_state_refused(self):
        """A SuperNodeStatus state other than assigned, checking or refused is refused."""
        data = bytearray(SuperNodeStatus(SubmitState.REFUSED, "no").encode())
        for state in (3, 255):
            data[0] = state
            self.assertRaises(DecodeError, SuperNodeStatus.decode, bytes(data))
        self.assertRaises(ValueError, SuperNodeStatus(SubmitState.REFUSED, "x" * 201).encode)

    def test_digest_page_wrong_length_refused(self):
        """A digest page whose length is not 8 + 26 × its count, or whose count is over a
        page, is refused."""
        page = PartitionDigests(3, [(7, 2, bytes(16)), (8, 1, bytes(16))]).encode()
        self.assertRaises(DecodeError, PartitionDigests.decode, page[:-26])
        self.assertRaises(DecodeError, PartitionDigests.decode, page + bytes(26))
        self.assertRaises(DecodeError, PartitionDigests.decode, page[:8] + page[8 + 26:])
        self.assertEqual(PartitionDigests.decode(struct.pack(">II", 5, 0)),
                         PartitionDigests(5, ()))
        count = DIGESTS_PER_PAGE + 1
        over = struct.pack(">II", count, count) + bytes(26 * count)
        self.assertRaises(DecodeError, PartitionDigests.decode, over)

    def test_partition_records_limits(self):
        """A records page with more than 16 entries, or with a record that does not decode,
        is refused."""
        node, info = _ENTRIES[0]
        entry = b"".join(struct.pack(">H", len(s.encode())) + s.encode() for s in (node, info))
        self.assertRaises(DecodeError, PartitionRecords.decode,
                          struct.pack(">IH", 17, 17) + entry * 17)
        broken = bytearray(PartitionRecords(1, [(node, info)]).encode())
        broken[8] = 99  # the Node record's type byte
        self.assertRaises(DecodeError, PartitionRecords.decode, bytes(broken))

    def test_ping_data_over_the_limit_refused(self):
        """Ping data longer than its limit is neither sent nor accepted."""
        self.assertRaises(ValueError, Ping(bytes(messages.PING_DATA_LIMIT + 1)).encode)
        data = (messages.PING_DATA_LIMIT + 1).to_bytes(2, "big") + bytes(
            messages.PING_DATA_LIMIT + 1)
        self.assertRaises(DecodeError, Ping.decode, data)


_SIGNED_NODES = [_node_record(f"user{i}") for i in range(3)]
_IDS = st.binary(min_size=32, max_size=32)
_BACKS = st.none() | st.tuples(st.sampled_from(_SIGNED_NODES), _ENDPOINTS,
                               st.binary(min_size=12, max_size=12))
_INTRODUCTIONS = st.builds(lambda kind, *fields: kind(*fields),
                           st.sampled_from([messages.Introduce, messages.Introduction]), _IDS,
                           _IDS, st.integers(0, 65535), _ENDPOINTS, _BACKS)


class IntroduceCodecTests(SynchronousTestCase):
    """Introduce (user-node → super-node) and Introduction (super-node → tunnel-node)."""

    endpoint = Endpoint("203.0.113.7", 50123)
    back = (_SIGNED_NODES[0], Endpoint("198.51.100.4", 7400), bytes(range(12)))

    def test_round_trip_without_back(self):
        """An Introduce as the user-node sends it (no `back`) round-trips."""
        message = messages.Introduce(bytes([1]) * 32, bytes([2]) * 32, 631, self.endpoint)
        self.assertIsNone(message.back)
        self.assertEqual(messages.Introduce.decode(message.encode()), message)

    def test_round_trip_with_back(self):
        """An Introduction carries the requester's Signed Node, endpoint and request id."""
        message = messages.Introduction(bytes([1]) * 32, bytes([2]) * 32, 631, self.endpoint,
                                        self.back)
        decoded = messages.Introduction.decode(message.encode())
        self.assertEqual(decoded, message)
        self.assertIsInstance(decoded, messages.Introduction)
        self.assertEqual(decoded.back[0].record, _SIGNED_NODES[0].record)

    def test_commands_and_codecs(self):
        """Each has its own command, and MESSAGES decodes each as itself."""
        self.assertNotEqual(messages.Introduce.COMMAND, messages.Introduction.COMMAND)
        self.assertIs(MESSAGES[messages.Introduce.COMMAND], messages.Introduce)
        self.assertIs(MESSAGES[messages.Introduction.COMMAND], messages.Introduction)
        fields = (bytes(32), bytes(32), 1, self.endpoint)
        self.assertNotEqual(messages.Introduce(*fields), messages.Introduction(*fields))

    @given(_INTRODUCTIONS)
    def test_any_introduction_round_trips(self, message):
        """Any ids, port, IPv4 or IPv6 endpoint, with or without `back`, round-trip."""
        self.assertEqual(type(message).decode(message.encode()), message)

    @given(_INTRODUCTIONS, st.data())
    def test_single_byte_change_never_decodes_to_the_same(self, message, data):
        """A payload with any one byte changed is refused with DecodeError, or decodes to
        another message that encodes to exactly those bytes (one encoding per message)."""
        encoded = message.encode()
        position = data.draw(st.integers(0, len(encoded) - 1))
        mask = data.draw(st.integers(1, 255))
        changed = bytearray(encoded)
        changed[position] ^= mask
        try:
            decoded = type(message).decode(bytes(changed))
        except DecodeError:
            return
        self.assertNotEqual(decoded, message)
        self.assertEqual(decoded.encode(), bytes(changed))

    def test_truncated_and_extended_refused(self):
        """Every proper prefix and any extra byte is refused, but for the prefix that ends
        where `back` begins: an Introduce without it."""
        plain = messages.Introduce(bytes(32), bytes(32), 631, self.endpoint)
        full = messages.Introduction(bytes(32), bytes(32), 631, self.endpoint, self.back)
        base = len(plain.encode())
        for message in (plain, full):
            data = message.encode()
            for length in range(len(data)):
                if length == base:
                    self.assertEqual(type(message).decode(data[:length]).back, None)
                    continue
                with self.subTest(message=type(message).__name__, length=length):
                    self.assertRaises(DecodeError, type(message).decode, data[:length])
            self.assertRaises(DecodeError, type(message).decode, data + b"\x00")

    def test_structural_bytes_refused(self):
        """An unknown endpoint family, or a `back` whose record is not a signed record, is
        refused."""
        data = bytearray(messages.Introduction(bytes(32), bytes(32), 631, self.endpoint,
                                               self.back).encode())
        family = 32 + 32 + 2
        for bad in (0, 5, 255):
            changed = bytearray(data)
            changed[family] = bad
            self.assertRaises(DecodeError, messages.Introduction.decode, bytes(changed))
        record_type = family + 7 + 2  # after the endpoint and the blob's length
        changed = bytearray(data)
        changed[record_type] = 99
        self.assertRaises(DecodeError, messages.Introduction.decode, bytes(changed))
