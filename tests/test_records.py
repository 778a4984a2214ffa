"""Tests for meshnode.records: the six signed record types, their canonical encoding and Trust."""

import hashlib

import attrs
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshnode.core.identity import Identity
from meshnode.records import (
    CLOCK_SKEW_MS, ID_SIZE, NAME_LIMIT, NO_MAC, NODE_INFO_LIFETIME_MS, RECORD_VERSION,
    EndDevice, NatBehaviour, Node, NodeInfo, OperatorNode, RecordError, RecordType, Revocation,
    Role, SuperNode, Trust, decode_bundle, decode_signed, device_id_for, encode_bundle, sign)
from meshnode.wire import DecodeError, Endpoint, Writer

NOW = 1_800_000_000_000
DAY_MS = 86_400_000
DOMAIN = 0x0A0B0C0D

OPERATOR = Identity.generate()
SECOND_OPERATOR = Identity.generate()
NODES = tuple(Identity.generate() for _ in range(3))


# Strategies for any valid record (what the attrs validators accept, canonically spelled).

_u16 = st.integers(0, 0xFFFF)
_u32 = st.integers(0, 0xFFFF_FFFF)
_u64 = st.integers(0, 2 ** 64 - 1)
_ids = st.binary(min_size=ID_SIZE, max_size=ID_SIZE)
_hosts = st.ip_addresses().map(str)
_endpoints = st.builds(Endpoint, _hosts, _u16)
_macs = st.binary(min_size=6, max_size=6)


def _fit_name(text):
    """Cut text to at most NAME_LIMIT bytes of UTF-8 without splitting a character."""
    return text.encode("utf-8")[:NAME_LIMIT].decode("utf-8", "ignore")


_names = st.one_of(st.text(min_size=1, max_size=NAME_LIMIT).map(_fit_name),
                   st.text("aé€😀", min_size=1, max_size=NAME_LIMIT).map(_fit_name))


def _times(valid_at):
    """Any u64 time, or with `valid_at` a creation time Trust accepts at that moment."""
    if valid_at is None:
        return _u64
    return st.integers(valid_at - 30 * DAY_MS, valid_at + CLOCK_SKEW_MS)


@st.composite
def nodes(draw, valid_at=None):
    if valid_at is None:
        node_id, signing_key, agreement_key = draw(_ids), draw(_ids), draw(_ids)
        issued, expires = draw(_u64), draw(_u64)
    else:
        subject = draw(st.sampled_from(NODES))
        node_id, signing_key = subject.node_id, subject.signing_public
        agreement_key = subject.agreement_public
        issued = draw(_times(valid_at))
        expires = draw(st.integers(valid_at + 1, valid_at + 30 * DAY_MS))
    return Node(draw(_u32), node_id, signing_key, agreement_key, draw(_names), issued, expires)


@st.composite
def node_infos(draw, valid_at=None):
    if valid_at is None:
        node_id, created = draw(_ids), draw(_u64)
    else:
        node_id = draw(st.sampled_from(NODES)).node_id
        created = draw(st.integers(valid_at - NODE_INFO_LIFETIME_MS + 1,
                                   valid_at + CLOCK_SKEW_MS))
    endpoints = st.lists(_endpoints, max_size=NodeInfo.ENDPOINT_LIMIT)
    return NodeInfo(draw(_u32), node_id, draw(endpoints), draw(_u16), draw(endpoints),
                    draw(st.sampled_from(NatBehaviour)),
                    draw(st.lists(_ids, max_size=NodeInfo.LOCATION_LIMIT)),
                    Role(draw(st.integers(0, 15))), created)


@st.composite
def super_nodes(draw, valid_at=None):
    low, high = sorted((draw(_u16), draw(_u16)))
    return SuperNode(draw(_u32), draw(_ids), low, high, draw(st.integers(1, 255)),
                     draw(_endpoints), draw(_times(valid_at)))


@st.composite
def operator_nodes(draw, valid_at=None):
    if valid_at is None:
        node_id, signing_key, agreement_key = draw(_ids), draw(_ids), draw(_ids)
    else:
        subject = draw(st.sampled_from((SECOND_OPERATOR,) + NODES))
        node_id, signing_key = subject.node_id, subject.signing_public
        agreement_key = subject.agreement_public
    return OperatorNode(draw(_u32), node_id, signing_key, agreement_key, draw(_times(valid_at)))


@st.composite
def end_devices(draw, valid_at=None):
    mac = draw(_macs | st.just(NO_MAC))
    certificate = draw(st.none() | _ids)
    address = draw(_hosts if mac == NO_MAC else st.none() | _hosts)
    location_id = draw(_ids)
    device_id = draw(_ids) if valid_at is None else device_id_for(
        mac, certificate, location_id=location_id, address=address)
    ports = st.lists(st.integers(1, 65535), min_size=1, max_size=EndDevice.PORT_LIMIT)
    return EndDevice(draw(_u32), device_id, draw(_names), mac, address, certificate,
                     location_id, draw(ports), draw(_times(valid_at)))


@st.composite
def revocations(draw, valid_at=None, max_ids=Revocation.ID_LIMIT):
    ids = st.lists(_ids, max_size=max_ids)
    return Revocation(draw(_u32), draw(ids), draw(ids), draw(_times(valid_at)))


def _small_records():
    """Any record of any type, with Revocation lists kept short so encodings stay small."""
    return st.one_of(nodes(), node_infos(), super_nodes(), operator_nodes(), end_devices(),
                     revocations(max_ids=8))


def _trust():
    """A Trust anchored with OPERATOR's self-signed OperatorNode record."""
    trust = Trust()
    trust.anchor(OPERATOR.sign(OperatorNode(DOMAIN, OPERATOR.node_id, OPERATOR.signing_public,
                                            OPERATOR.agreement_public, NOW - DAY_MS)), NOW)
    return trust


def _node_record(subject, issued=NOW - DAY_MS, expires=NOW + DAY_MS, domain=DOMAIN):
    return Node(domain, subject.node_id, subject.signing_public, subject.agreement_public,
                "node", issued, expires)


def _node_info(subject, created=NOW):
    return NodeInfo(DOMAIN, subject.node_id, [Endpoint("192.0.2.1", 4433)], 4433, [],
                    NatBehaviour.PUBLIC, [], Role.USER, created)


def _end_device(created=NOW, mac=b"\x02\x00\x00\x00\x00\x01", device_id=None):
    if device_id is None:
        device_id = device_id_for(mac)
    return EndDevice(DOMAIN, device_id, "camera", mac, None, None, bytes(32), [443], created)


def _subject_node_for(record):
    """The Node record Trust.verify needs for a self-signed NodeInfo, else None."""
    if isinstance(record, NodeInfo):
        subject = next(n for n in NODES if n.node_id == record.node_id)
        return _node_record(subject, domain=record.domain)
    return None


def _signer_for(record):
    if isinstance(record, NodeInfo):
        return next(n for n in NODES if n.node_id == record.node_id)
    return OPERATOR


class RoundTripTests(SynchronousTestCase):
    """sign() → Signed.encode() → decode_signed() gives back the same record and bytes."""

    def _round_trip(self, record):
        signed = OPERATOR.sign(record)
        data = signed.encode()
        decoded = decode_signed(data)
        self.assertEqual(decoded.record, record)
        self.assertEqual(decoded, signed)
        self.assertEqual(decoded.encode(), data)

    @given(nodes())
    def test_node_round_trips(self, record):
        """Any valid Node record decodes to an equal record."""
        self._round_trip(record)

    @given(node_infos())
    def test_node_info_round_trips(self, record):
        """Any valid NodeInfo record, with IPv4 and IPv6 endpoints, decodes to an equal record."""
        self._round_trip(record)

    @given(super_nodes())
    def test_super_node_round_trips(self, record):
        """Any valid SuperNode record decodes to an equal record."""
        self._round_trip(record)

    @given(operator_nodes())
    def test_operator_node_round_trips(self, record):
        """Any valid OperatorNode record decodes to an equal record."""
        self._round_trip(record)

    @given(end_devices())
    def test_end_device_round_trips(self, record):
        """Any valid EndDevice record, with or without address and certificate, decodes equal."""
        self._round_trip(record)

    @given(revocations())
    def test_revocation_round_trips(self, record):
        """Any valid Revocation record decodes to an equal record."""
        self._round_trip(record)

    def test_records_at_their_limits_round_trip(self):
        """Records with every list and name at its largest allowed size decode equal."""
        ids = [bytes([i % 256, i // 256]) * 16 for i in range(Revocation.ID_LIMIT)]
        endpoints = [Endpoint(f"2001:db8::{i + 1:x}", 65535)
                     for i in range(NodeInfo.ENDPOINT_LIMIT)]
        for record in [
                Node(0xFFFF_FFFF, ids[0], ids[1], ids[2], "€" * 21, 2 ** 64 - 1, 2 ** 64 - 1),
                NodeInfo(DOMAIN, ids[0], endpoints, 65535, endpoints, NatBehaviour.SYMMETRIC,
                         ids[:NodeInfo.LOCATION_LIMIT], Role(15), NOW),
                SuperNode(DOMAIN, ids[0], 0, 65535, 255, Endpoint("2001:db8::1", 65535), NOW),
                EndDevice(DOMAIN, ids[0], "x" * NAME_LIMIT, b"\xff" * 6,
                          "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", bytes(32), ids[1],
                          range(1, EndDevice.PORT_LIMIT + 1), NOW),
                Revocation(DOMAIN, ids, ids, NOW)]:
            self._round_trip(record)

    def test_end_device_address_spelling_round_trips(self):
        """An EndDevice address is kept in its canonical spelling; scoped ones are refused."""
        device = EndDevice(DOMAIN, bytes(32), "printer", bytes(6), "::0:1", None, bytes(32),
                           [631], NOW)
        self.assertEqual(device.address, "::1")
        self._round_trip(device)
        self.assertRaises(ValueError, EndDevice, DOMAIN, bytes(32), "printer", bytes(6),
                          "fe80::1%eth0", None, bytes(32), [631], NOW)

    def test_endpoint_spelling_is_canonical(self):
        """An Endpoint keeps its host canonical and refuses bad ports and non-IP hosts."""
        self.assertEqual(Endpoint("2001:db8::0", 1).host, "2001:db8::")
        self.assertRaises(ValueError, Endpoint, "1.2.3.4", 70000)
        self.assertRaises(ValueError, Endpoint, "printer.local", 80)


class TamperingTests(SynchronousTestCase):
    """Any single changed byte of an encoded signed record gets it rejected."""

    def _assert_every_byte_matters(self, record, mask):
        trust = _trust()
        subject_node = _subject_node_for(record)
        data = _signer_for(record).sign(record).encode()
        # The untouched record is accepted, so the rejections below are due to the change.
        self.assertEqual(trust.verify(decode_signed(data), NOW, subject_node=subject_node), record)
        for position in range(len(data)):
            for xor in sorted({mask, 0x01, 0xFF}):
                tampered = bytearray(data)
                tampered[position] ^= xor
                try:
                    trust.verify(decode_signed(bytes(tampered)), NOW, subject_node=subject_node)
                except (DecodeError, RecordError):
                    continue
                self.fail(f"{type(record).__name__}: byte {position} of {len(data)} xor "
                          f"{xor:#04x} was accepted")

    _masks = st.integers(1, 255)

    @settings(max_examples=10)
    @given(nodes(valid_at=NOW), _masks)
    def test_node_byte_changes_rejected(self, record, mask):
        """Changing any byte of an operator-signed Node record gets it rejected."""
        self._assert_every_byte_matters(record, mask)

    @settings(max_examples=10)
    @given(node_infos(valid_at=NOW), _masks)
    def test_node_info_byte_changes_rejected(self, record, mask):
        """Changing any byte of a self-signed NodeInfo record gets it rejected."""
        self._assert_every_byte_matters(record, mask)

    @settings(max_examples=10)
    @given(super_nodes(valid_at=NOW), _masks)
    def test_super_node_byte_changes_rejected(self, record, mask):
        """Changing any byte of a SuperNode record gets it rejected."""
        self._assert_every_byte_matters(record, mask)

    @settings(max_examples=10)
    @given(operator_nodes(valid_at=NOW), _masks)
    def test_operator_node_byte_changes_rejected(self, record, mask):
        """Changing any byte of an OperatorNode record gets it rejected."""
        self._assert_every_byte_matters(record, mask)

    @settings(max_examples=10)
    @given(end_devices(valid_at=NOW), _masks)
    def test_end_device_byte_changes_rejected(self, record, mask):
        """Changing any byte of an EndDevice record gets it rejected."""
        self._assert_every_byte_matters(record, mask)

    @settings(max_examples=10)
    @given(revocations(valid_at=NOW, max_ids=4), _masks)
    def test_revocation_byte_changes_rejected(self, record, mask):
        """Changing any byte of a Revocation record gets it rejected."""
        self._assert_every_byte_matters(record, mask)


# Hand-written encodings, field by field, so that one field can be out of shape.

_ID_A = hashlib.sha256(b"a").digest()
_NO_SIGNER = bytes(ID_SIZE)
_NO_SIGNATURE = bytes(64)


def _frame(write_body, record_type, version=RECORD_VERSION):
    """A signed record around a hand-written body; decoding does not check the signature."""
    w = Writer().u8(record_type).u8(version)
    write_body(w)
    return w.fixed(_NO_SIGNER, ID_SIZE).fixed(_NO_SIGNATURE, 64).bytes()


def _raw_blob(w, data):
    w.u16(len(data)).fixed(data, len(data))


def _node_bytes(name=b"node", version=RECORD_VERSION, record_type=RecordType.NODE):
    def write(w):
        w.u32(DOMAIN).fixed(_ID_A, ID_SIZE).fixed(_ID_A, ID_SIZE).fixed(_ID_A, ID_SIZE)
        _raw_blob(w, name)
        w.u64(NOW).u64(NOW + DAY_MS)
    return _frame(write, record_type, version)


def _node_info_bytes(addresses=1, family=4, observed=0, locations=0, nat=1, roles=1):
    def endpoint(w, i):
        w.u8(family).fixed(bytes(15) + bytes([i]) if family == 6 else bytes([10, 0, 0, i]),
                           16 if family == 6 else 4).u16(1000 + i)

    def write(w):
        w.u32(DOMAIN).fixed(_ID_A, ID_SIZE).u16(addresses)
        for i in range(addresses):
            endpoint(w, i)
        w.u16(4433).u16(observed)
        for i in range(observed):
            endpoint(w, i)
        w.u8(nat).u16(locations)
        for i in range(locations):
            w.fixed(_ID_A, ID_SIZE)
        w.u8(roles).u64(NOW)
    return _frame(write, RecordType.NODE_INFO)


def _super_node_bytes(low, high, replicas=3):
    def write(w):
        w.u32(DOMAIN).fixed(_ID_A, ID_SIZE).u16(low).u16(high).u8(replicas)
        w.endpoint(Endpoint("192.0.2.7", 7400)).u64(NOW)
    return _frame(write, RecordType.SUPER_NODE)


def _end_device_bytes(name=b"camera", address=b"", certificate_flag=0, ports=(443,)):
    def write(w):
        w.u32(DOMAIN).fixed(_ID_A, ID_SIZE)
        _raw_blob(w, name)
        w.fixed(bytes(6), 6)
        _raw_blob(w, address)
        w.u8(certificate_flag)
        if certificate_flag:
            w.fixed(_ID_A, 32)
        w.fixed(_ID_A, ID_SIZE).u16(len(ports))
        for port in ports:
            w.u16(port)
        w.u64(NOW)
    return _frame(write, RecordType.END_DEVICE)


def _revocation_bytes(node_ids, device_ids):
    def write(w):
        w.u32(DOMAIN)
        for count in (node_ids, device_ids):
            w.u16(count)
            for i in range(count):
                w.fixed(i.to_bytes(ID_SIZE, "big"), ID_SIZE)
        w.u64(NOW)
    return _frame(write, RecordType.REVOCATION)


class DecodeRejectionTests(SynchronousTestCase):
    """decode_signed raises DecodeError for anything but one canonical signed record."""

    @given(_small_records(), st.binary(min_size=1, max_size=16))
    def test_trailing_bytes_rejected(self, record, extra):
        """A signed record followed by any extra bytes is rejected."""
        data = OPERATOR.sign(record).encode()
        self.assertRaises(DecodeError, decode_signed, data + extra)

    @settings(max_examples=30)
    @given(_small_records())
    def test_truncation_rejected_at_every_length(self, record):
        """Every proper prefix of a signed record, the empty one included, is rejected."""
        data = OPERATOR.sign(record).encode()
        for length in range(len(data)):
            self.assertRaises(DecodeError, decode_signed, data[:length])

    def test_hand_written_encodings_decode(self):
        """The hand-written encodings used below decode when every field is in shape."""
        self.assertEqual(decode_signed(_node_bytes()).record,
                         Node(DOMAIN, _ID_A, _ID_A, _ID_A, "node", NOW, NOW + DAY_MS))
        info = decode_signed(_node_info_bytes(addresses=2, family=6, observed=1,
                                              locations=1)).record
        self.assertEqual(info.addresses, (Endpoint("::", 1000), Endpoint("::1", 1001)))
        self.assertEqual(info.observed, (Endpoint("::", 1000),))
        self.assertEqual(info.locations, (_ID_A,))
        self.assertEqual(decode_signed(_super_node_bytes(7, 7)).record,
                         SuperNode(DOMAIN, _ID_A, 7, 7, 3, Endpoint("192.0.2.7", 7400), NOW))
        self.assertEqual(decode_signed(_end_device_bytes()).record,
                         EndDevice(DOMAIN, _ID_A, "camera", bytes(6), None, None, _ID_A, [443],
                                   NOW))
        self.assertEqual(len(decode_signed(_revocation_bytes(2, 3)).record.device_ids), 3)

    def test_node_info_address_count_over_limit_rejected(self):
        """NodeInfo with 9 addresses, observed endpoints or locations is rejected; 8 decode."""
        self.assertEqual(len(decode_signed(_node_info_bytes(addresses=8)).record.addresses), 8)
        self.assertEqual(len(decode_signed(_node_info_bytes(observed=8)).record.observed), 8)
        self.assertEqual(len(decode_signed(_node_info_bytes(locations=8)).record.locations), 8)
        self.assertRaises(DecodeError, decode_signed, _node_info_bytes(addresses=9))
        self.assertRaises(DecodeError, decode_signed, _node_info_bytes(observed=9))
        self.assertRaises(DecodeError, decode_signed, _node_info_bytes(locations=9))

    def test_revocation_id_count_over_limit_rejected(self):
        """A Revocation listing 1001 node or device ids is rejected; 1000 decode."""
        record = decode_signed(_revocation_bytes(1000, 1000)).record
        self.assertEqual((len(record.node_ids), len(record.device_ids)), (1000, 1000))
        self.assertRaises(DecodeError, decode_signed, _revocation_bytes(1001, 0))
        self.assertRaises(DecodeError, decode_signed, _revocation_bytes(0, 1001))

    def test_end_device_port_list_out_of_range_rejected(self):
        """An EndDevice with 65 ports, no ports or port 0 is rejected; 64 ports decode."""
        self.assertEqual(len(decode_signed(_end_device_bytes(ports=range(1, 65))).record.ports),
                         64)
        self.assertRaises(DecodeError, decode_signed, _end_device_bytes(ports=range(1, 66)))
        self.assertRaises(DecodeError, decode_signed, _end_device_bytes(ports=()))
        self.assertRaises(DecodeError, decode_signed, _end_device_bytes(ports=(0,)))

    def test_blob_over_limit_rejected(self):
        """A 64-byte name or a 17-byte device address is rejected; 63 and 16 bytes decode."""
        self.assertEqual(decode_signed(_node_bytes(name=b"n" * 63)).record.name, "n" * 63)
        self.assertRaises(DecodeError, decode_signed, _node_bytes(name=b"n" * 64))
        self.assertRaises(DecodeError, decode_signed, _end_device_bytes(name=b"n" * 64))
        self.assertEqual(decode_signed(_end_device_bytes(address=bytes(15) + b"\x01")).record
                         .address, "::1")
        self.assertRaises(DecodeError, decode_signed, _end_device_bytes(address=bytes(17)))

    def test_bad_device_address_length_rejected(self):
        """A device address that is neither empty, 4 nor 16 bytes long is rejected."""
        self.assertEqual(decode_signed(_end_device_bytes(address=b"\xc0\x00\x02\x01")).record
                         .address, "192.0.2.1")
        for size in (1, 3, 5, 15):
            self.assertRaises(DecodeError, decode_signed, _end_device_bytes(address=bytes(size)))

    def test_unknown_version_rejected(self):
        """A record version other than 1 is rejected."""
        for version in (0, 2, 255):
            self.assertRaises(DecodeError, decode_signed, _node_bytes(version=version))

    def test_unknown_record_type_rejected(self):
        """Record types 0 and 7 and up are rejected."""
        for record_type in (0, 7, 255):
            self.assertRaises(DecodeError, decode_signed, _node_bytes(record_type=record_type))

    def test_bad_address_family_rejected(self):
        """An Endpoint whose family is neither 4 nor 6 is rejected."""
        for family in (0, 5, 255):
            self.assertRaises(DecodeError, decode_signed, _node_info_bytes(family=family))

    def test_reversed_partition_range_rejected(self):
        """A SuperNode whose partition_to is below partition_from is rejected."""
        self.assertRaises(DecodeError, decode_signed, _super_node_bytes(8, 7))
        self.assertRaises(DecodeError, decode_signed, _super_node_bytes(65535, 0))

    def test_super_node_without_replicas_rejected(self):
        """A SuperNode that signs K = 0 is rejected; K is read from the signed bytes."""
        self.assertRaises(DecodeError, decode_signed, _super_node_bytes(0, 7, replicas=0))
        self.assertEqual(decode_signed(_super_node_bytes(0, 7, replicas=255)).record.replicas,
                         255)
        self.assertRaises(ValueError, SuperNode, DOMAIN, _ID_A, 0, 7, 0,
                          Endpoint("192.0.2.7", 7400), NOW)
        self.assertRaises(ValueError, SuperNode, DOMAIN, _ID_A, 0, 7, 256,
                          Endpoint("192.0.2.7", 7400), NOW)

    def test_invalid_utf8_name_rejected(self):
        """Node and EndDevice names that are not UTF-8, or empty, are rejected."""
        for name in (b"\xff", b"caf\xc3", b"\xed\xa0\x80", b""):
            self.assertRaises(DecodeError, decode_signed, _node_bytes(name=name))
            self.assertRaises(DecodeError, decode_signed, _end_device_bytes(name=name))

    def test_unknown_enum_values_rejected(self):
        """Unknown NAT behaviours, role bits and certificate flags are rejected."""
        self.assertRaises(DecodeError, decode_signed, _node_info_bytes(nat=5))
        self.assertRaises(DecodeError, decode_signed, _node_info_bytes(roles=16))
        self.assertRaises(DecodeError, decode_signed, _end_device_bytes(certificate_flag=2))


class TrustVerifyTests(SynchronousTestCase):
    """Trust.verify applies the signer rule, lifetime, revocation and signature."""

    def setUp(self):
        self.trust = _trust()
        self.node = _node_record(NODES[0])

    def assertRejected(self, reason, signed, now=NOW, subject_node=None):
        e = self.assertRaises(RecordError, self.trust.verify, signed, now,
                              subject_node=subject_node)
        self.assertEqual(e.reason, reason)

    def _records_created_at(self, created):
        """One record of each type created (or issued) at `created`, with its signer."""
        return [
            (OPERATOR, _node_record(NODES[0], issued=created, expires=created + DAY_MS)),
            (NODES[0], _node_info(NODES[0], created)),
            (OPERATOR, SuperNode(DOMAIN, NODES[0].node_id, 0, 10, 3,
                                 Endpoint("192.0.2.7", 7400), created)),
            (OPERATOR, OperatorNode(DOMAIN, SECOND_OPERATOR.node_id,
                                    SECOND_OPERATOR.signing_public,
                                    SECOND_OPERATOR.agreement_public, created)),
            (OPERATOR, _end_device(created)),
            (OPERATOR, Revocation(DOMAIN, [NODES[2].node_id], [], created))]

    def test_valid_records_returned(self):
        """A valid record of each of the six types is returned by verify."""
        for signer, record in self._records_created_at(NOW - 1000):
            self.assertEqual(self.trust.verify(signer.sign(record), NOW,
                                               subject_node=self.node), record)

    def test_non_operator_signer_rejected(self):
        """An operator-type record signed by a key that is not an operator's is rejected."""
        for _, record in self._records_created_at(NOW):
            if record.SIGNED_BY_OPERATOR:
                self.assertRejected("unknown_signer", NODES[1].sign(record))

    def test_operator_id_with_another_key_rejected(self):
        """A record naming the operator as signer but signed with another key is rejected."""
        self.assertRejected("bad_signature",
                            sign(self.node, OPERATOR.node_id, NODES[1].signing_key))

    def test_node_info_signed_by_another_node_rejected(self):
        """A NodeInfo signed by a node other than its subject is rejected."""
        signed = NODES[1].sign(_node_info(NODES[0]))
        self.assertRejected("wrong_signer", signed, subject_node=self.node)
        self.assertRejected("wrong_signer", signed, subject_node=_node_record(NODES[1]))

    def test_node_info_of_another_domain_rejected(self):
        """A NodeInfo naming a domain other than its node's is refused ("wrong_domain")."""
        subject = NODES[0]
        signed = subject.sign(_node_info(subject))
        with self.assertRaises(RecordError) as caught:
            _trust().verify(signed, NOW, subject_node=_node_record(subject, domain=DOMAIN + 1))
        self.assertEqual(caught.exception.reason, "wrong_domain")

    def test_node_info_needs_its_subject_node(self):
        """A NodeInfo is rejected without its subject's Node record, or with another's."""
        signed = NODES[0].sign(_node_info(NODES[0]))
        self.assertRejected("unknown_signer", signed)
        self.assertRejected("unknown_signer", signed, subject_node=_node_record(NODES[1]))

    def test_node_info_with_another_key_rejected(self):
        """A NodeInfo naming its subject as signer but signed with another key is rejected."""
        signed = sign(_node_info(NODES[0]), NODES[0].node_id, NODES[1].signing_key)
        self.assertRejected("bad_signature", signed, subject_node=self.node)

    def test_expired_node_rejected(self):
        """A Node is rejected from the millisecond it expires on, accepted the one before."""
        signed = OPERATOR.sign(_node_record(NODES[0], expires=NOW))
        self.assertEqual(self.trust.verify(signed, NOW - 1), signed.record)
        self.assertRejected("expired", signed, now=NOW)
        self.assertRejected("expired", signed, now=NOW + DAY_MS)

    def test_old_node_info_rejected(self):
        """A NodeInfo is rejected once it is 15 minutes old, accepted just before."""
        signed = NODES[0].sign(_node_info(NODES[0], NOW - NODE_INFO_LIFETIME_MS))
        self.assertEqual(NODE_INFO_LIFETIME_MS, 15 * 60 * 1000)
        self.assertRejected("expired", signed, subject_node=self.node)
        self.assertEqual(self.trust.verify(signed, NOW - 1, subject_node=self.node),
                         signed.record)

    def test_records_from_the_future_rejected(self):
        """A record of any type issued more than 60 s ahead is rejected; 60 s ahead is not."""
        for signer, record in self._records_created_at(NOW + CLOCK_SKEW_MS + 1):
            self.assertRejected("not_yet_valid", signer.sign(record), subject_node=self.node)
        for signer, record in self._records_created_at(NOW + CLOCK_SKEW_MS):
            self.assertEqual(self.trust.verify(signer.sign(record), NOW,
                                               subject_node=self.node), record)

    def test_ids_not_derived_from_keys_rejected(self):
        """Node, OperatorNode and EndDevice records whose ids are not their hashes are rejected."""
        other_id = NODES[1].node_id
        self.assertRejected("bad_record", OPERATOR.sign(attrs.evolve(self.node, node_id=other_id)))
        self.assertRejected("bad_record", OPERATOR.sign(OperatorNode(
            DOMAIN, other_id, SECOND_OPERATOR.signing_public, SECOND_OPERATOR.agreement_public,
            NOW)))
        self.assertRejected("bad_record", OPERATOR.sign(_end_device(device_id=other_id)))

    def test_address_only_device(self):
        """A device without a MAC is valid with a pinned address, its id the hash of its
        location, packed address and certificate; moved or without an address it is not."""
        location = hashlib.sha256(b"lan").digest()
        device_id = hashlib.sha256(location + bytes([127, 0, 0, 1]) + bytes(32)).digest()
        self.assertEqual(device_id_for(NO_MAC, location_id=location, address="127.0.0.1"),
                         device_id)
        device = EndDevice(DOMAIN, device_id, "cups", NO_MAC, "127.0.0.1", None, location,
                           [631], NOW)
        self.assertEqual(self.trust.verify(OPERATOR.sign(device), NOW), device)
        self.assertRejected("bad_record", OPERATOR.sign(attrs.evolve(device, address="::1")))
        self.assertRejected("bad_record", OPERATOR.sign(attrs.evolve(device,
                                                                     location_id=bytes(32))))
        self.assertRejected("bad_record", OPERATOR.sign(attrs.evolve(device, address=None)))
        self.assertRaises(ValueError, device_id_for, NO_MAC)

    def test_device_id_with_a_mac_ignores_the_address(self):
        """A device with a MAC keeps the id of its MAC and certificate, pinned address or not."""
        mac = b"\x02\x00\x00\x00\x00\x01"
        self.assertEqual(device_id_for(mac, location_id=bytes(32), address="10.0.0.1"),
                         hashlib.sha256(mac + bytes(32)).digest())

    def test_revoked_ids_rejected(self):
        """After an operator revokes a node and a device, their records are rejected."""
        device = _end_device()
        self.trust.add_revocation(OPERATOR.sign(Revocation(
            DOMAIN, [NODES[0].node_id], [device.device_id], NOW)), NOW)
        self.assertTrue(self.trust.is_revoked(NODES[0].node_id))
        self.assertRejected("revoked", OPERATOR.sign(self.node))
        self.assertRejected("revoked", NODES[0].sign(_node_info(NODES[0])),
                            subject_node=self.node)
        self.assertRejected("revoked", OPERATOR.sign(
            SuperNode(DOMAIN, NODES[0].node_id, 0, 1, 3, Endpoint("192.0.2.7", 7400), NOW)))
        self.assertRejected("revoked", OPERATOR.sign(device))
        other = _node_record(NODES[1])
        self.assertEqual(self.trust.verify(OPERATOR.sign(other), NOW), other)

    def test_revoked_operator_records_rejected(self):
        """Records signed by an operator that was later revoked are rejected."""
        self.trust.add_operator(OPERATOR.sign(OperatorNode(
            DOMAIN, SECOND_OPERATOR.node_id, SECOND_OPERATOR.signing_public,
            SECOND_OPERATOR.agreement_public, NOW)), NOW)
        signed = SECOND_OPERATOR.sign(self.node)
        self.assertEqual(self.trust.verify(signed, NOW), self.node)
        self.trust.add_revocation(OPERATOR.sign(Revocation(
            DOMAIN, [SECOND_OPERATOR.node_id], [], NOW)), NOW)
        self.assertRejected("revoked", signed)

    def test_revocation_by_non_operator_refused(self):
        """A Revocation signed by a non-operator is refused and revokes nothing."""
        e = self.assertRaises(RecordError, self.trust.add_revocation, NODES[1].sign(
            Revocation(DOMAIN, [NODES[0].node_id], [], NOW)), NOW)
        self.assertEqual(e.reason, "unknown_signer")
        self.assertFalse(self.trust.is_revoked(NODES[0].node_id))
        self.assertEqual(self.trust.verify(OPERATOR.sign(self.node), NOW), self.node)


class TrustAnchorTests(SynchronousTestCase):
    """Trust.anchor and Trust.add_operator decide which keys sign operator records."""

    def _operator_node(self, subject, created=NOW):
        return OperatorNode(DOMAIN, subject.node_id, subject.signing_public,
                            subject.agreement_public, created)

    def test_self_signed_operator_anchors(self):
        """A self-signed OperatorNode record makes its key trusted."""
        trust = Trust()
        self.assertFalse(trust.is_operator(OPERATOR.node_id))
        trust.anchor(OPERATOR.sign(self._operator_node(OPERATOR)), NOW)
        self.assertEqual(trust.operator_ids, frozenset([OPERATOR.node_id]))
        node = _node_record(NODES[0])
        self.assertEqual(trust.verify(OPERATOR.sign(node), NOW), node)

    def test_anchor_refuses_records_not_self_signed(self):
        """anchor refuses an OperatorNode signed by another operator, and non-operator records."""
        trust = Trust()
        for signed in (OPERATOR.sign(self._operator_node(SECOND_OPERATOR)),
                       OPERATOR.sign(_node_record(OPERATOR))):
            e = self.assertRaises(RecordError, trust.anchor, signed, NOW)
            self.assertEqual(e.reason, "bad_anchor")
        self.assertEqual(trust.operator_ids, frozenset())

    def test_anchor_refuses_bad_signature(self):
        """anchor refuses a self-signed OperatorNode whose signature is not by its key."""
        trust = Trust()
        signed = sign(self._operator_node(OPERATOR), OPERATOR.node_id, NODES[0].signing_key)
        e = self.assertRaises(RecordError, trust.anchor, signed, NOW)
        self.assertEqual(e.reason, "bad_signature")
        self.assertFalse(trust.is_operator(OPERATOR.node_id))

    def test_add_operator_signed_by_trusted_operator(self):
        """An OperatorNode signed by a trusted operator adds a key whose records then verify."""
        trust = _trust()
        node = _node_record(NODES[0])
        e = self.assertRaises(RecordError, trust.verify, SECOND_OPERATOR.sign(node), NOW)
        self.assertEqual(e.reason, "unknown_signer")
        trust.add_operator(OPERATOR.sign(self._operator_node(SECOND_OPERATOR)), NOW)
        self.assertTrue(trust.is_operator(SECOND_OPERATOR.node_id))
        self.assertEqual(trust.verify(SECOND_OPERATOR.sign(node), NOW), node)

    def test_add_operator_refuses_untrusted_signer(self):
        """add_operator refuses an OperatorNode not signed by a trusted operator."""
        trust = _trust()
        e = self.assertRaises(RecordError, trust.add_operator,
                              SECOND_OPERATOR.sign(self._operator_node(SECOND_OPERATOR)), NOW)
        self.assertEqual(e.reason, "unknown_signer")
        self.assertFalse(trust.is_operator(SECOND_OPERATOR.node_id))


class BundleTests(SynchronousTestCase):
    """encode_bundle/decode_bundle carry a list of signed records."""

    @given(st.lists(_small_records().map(OPERATOR.sign), max_size=10))
    def test_bundle_round_trips(self, signed_records):
        """Any list of signed records decodes to an equal list, signatures included."""
        self.assertEqual(decode_bundle(encode_bundle(signed_records)), signed_records)

    @given(st.lists(_small_records().map(OPERATOR.sign), max_size=4),
           st.binary(min_size=1, max_size=16))
    def test_trailing_bytes_rejected(self, signed_records, extra):
        """A bundle followed by any extra bytes is rejected."""
        data = encode_bundle(signed_records)
        self.assertRaises(DecodeError, decode_bundle, data + extra)

    @settings(max_examples=20)
    @given(st.lists(_small_records().map(OPERATOR.sign), min_size=1, max_size=3))
    def test_truncated_bundle_rejected(self, signed_records):
        """Every proper prefix of a bundle is rejected."""
        data = encode_bundle(signed_records)
        for length in range(len(data)):
            self.assertRaises(DecodeError, decode_bundle, data[:length])

    def test_record_with_trailing_bytes_inside_bundle_rejected(self):
        """A bundle entry holding a record plus extra bytes is rejected."""
        data = OPERATOR.sign(_node_record(NODES[0])).encode()
        self.assertEqual(len(decode_bundle(Writer().u16(1).blob(data, 8192).bytes())), 1)
        self.assertRaises(DecodeError, decode_bundle,
                          Writer().u16(1).blob(data + b"\x00", 8192).bytes())

    def test_largest_revocation_fits_in_a_bundle(self):
        """A Revocation at its id limits can be written to and read from a bundle."""
        ids = [i.to_bytes(ID_SIZE, "big") for i in range(Revocation.ID_LIMIT)]
        signed = OPERATOR.sign(Revocation(DOMAIN, ids, ids, NOW))
        self.assertEqual(decode_bundle(encode_bundle([signed])), [signed])

