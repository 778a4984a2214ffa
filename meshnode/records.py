"""The six signed record types, their canonical encoding, signing and verification.

A signed record on the wire is: type u8 | version u8 | body | signer node id (32) | Ed25519
signature (64) over a per-type context string followed by everything before the signature.
"""

import enum
import hashlib
import ipaddress

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshnode.wire import DecodeError, Endpoint, Reader, Writer

RECORD_VERSION = 1
ID_SIZE = 32
KEY_SIZE = 32
SIGNATURE_SIZE = 64
NAME_LIMIT = 63
CLOCK_SKEW_MS = 60_000
BUNDLE_LIMIT = 256
NODE_INFO_LIFETIME_MS = 15 * 60 * 1000


class RecordType(enum.IntEnum):
    NODE = 1
    NODE_INFO = 2
    SUPER_NODE = 3
    OPERATOR_NODE = 4
    END_DEVICE = 5
    REVOCATION = 6
    DOMAIN_STATE = 7


class Role(enum.IntFlag):
    """The roles a node announces; every node is at least a user-node."""

    USER = 1
    TUNNEL = 2
    SUPER = 4
    OPERATOR = 8


class NatBehaviour(enum.IntEnum):
    UNKNOWN = 0
    PUBLIC = 1
    ENDPOINT_INDEPENDENT = 2  # mapping; filtering depends on the far endpoint
    SYMMETRIC = 3
    FULL_CONE = 4  # endpoint-independent mapping and filtering (RFC 5780, from STUN)


class RecordError(Exception):
    """A record that must not be stored or used; `reason` is a short counter-friendly tag."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def node_id_for(signing_key):
    """Node id = SHA-256 of the node's raw Ed25519 public key."""
    return hashlib.sha256(signing_key).digest()


NO_MAC = bytes(6)  # an EndDevice's MAC when it has none: it is reached at its pinned address


def device_id_for(mac, certificate_sha256=None, *, location_id=None, address=None):
    """An EndDevice's id, stable for as long as what it is made of stays the same.

    A device with a MAC: SHA-256(MAC ‖ TLS-certificate SHA-256, or 32 zero bytes); a pinned
    address beside the MAC does not change it. A device without one (`mac` is NO_MAC):
    SHA-256(location id ‖ the address's packed bytes, 4 for IPv4 or 16 for IPv6 ‖
    TLS-certificate SHA-256, or 32 zero bytes). Neither holds the domain: ids are scoped by
    domain wherever they are kept or named (records, the store, revocations).
    """
    certificate = certificate_sha256 or bytes(32)
    if mac != NO_MAC:
        return hashlib.sha256(mac + certificate).digest()
    if location_id is None or address is None:
        raise ValueError("a device without a MAC is known by its location and address")
    return hashlib.sha256(location_id + ipaddress.ip_address(address).packed
                          + certificate).digest()


def partition_of(domain):
    """The DHT partition key of a domain: its top 16 bits."""
    return domain >> 16


def now_ms(clock):
    """`clock`'s time in the unit of records' times: whole milliseconds since the epoch."""
    return int(clock.seconds() * 1000)


def _check_size(size):
    def check(instance, attribute, value):
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes")
    return check


def _check_uint(bits):
    def check(instance, attribute, value):
        if not isinstance(value, int) or not 0 <= value < (1 << bits):
            raise ValueError(f"{attribute.name} must be an unsigned {bits}-bit integer")
    return check


def _check_name(instance, attribute, value):
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > NAME_LIMIT:
        raise ValueError(f"{attribute.name} must be 1 to {NAME_LIMIT} bytes of text")


def _check_ids(limit):
    def check(instance, attribute, value):
        if len(value) > limit or any(not isinstance(v, bytes) or len(v) != ID_SIZE for v in value):
            raise ValueError(f"{attribute.name} must be at most {limit} ids of {ID_SIZE} bytes")
    return check


def _check_limit(limit):
    def check(instance, attribute, value):
        if len(value) > limit:
            raise ValueError(f"{attribute.name} holds more than {limit} items")
    return check


_DOMAIN = attrs.field(validator=_check_uint(32))
_ID = attrs.field(validator=_check_size(ID_SIZE))
_TIME = attrs.field(validator=_check_uint(64))


@attrs.frozen
class Node:
    """A node's identity, signed by an operator: who it is, its keys, its overlay name."""

    TYPE = RecordType.NODE
    SIGNED_BY_OPERATOR = True

    domain: int = _DOMAIN
    node_id: bytes = _ID
    signing_key: bytes = attrs.field(validator=_check_size(KEY_SIZE))
    agreement_key: bytes = attrs.field(validator=_check_size(KEY_SIZE))
    name: str = attrs.field(validator=_check_name)
    issued: int = _TIME
    expires: int = _TIME

    @property
    def created(self):
        return self.issued

    @property
    def subject(self):
        return self.node_id

    def write(self, w):
        w.u32(self.domain).fixed(self.node_id, ID_SIZE)
        w.fixed(self.signing_key, KEY_SIZE).fixed(self.agreement_key, KEY_SIZE)
        w.text(self.name, NAME_LIMIT).u64(self.issued).u64(self.expires)

    @classmethod
    def read(cls, r):
        return cls(r.u32(), r.fixed(ID_SIZE), r.fixed(KEY_SIZE), r.fixed(KEY_SIZE),
                   r.text(NAME_LIMIT), r.u64(), r.u64())

    def check(self, now):
        if node_id_for(self.signing_key) != self.node_id:
            raise RecordError("bad_record", "node id is not the hash of its signing key")
        if self.issued > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")
        if now >= self.expires:
            raise RecordError("expired")


@attrs.frozen
class NodeInfo:
    """Where a node is and what it does, signed by the node itself; lives 15 minutes."""

    TYPE = RecordType.NODE_INFO
    SIGNED_BY_OPERATOR = False
    ENDPOINT_LIMIT = 8
    LOCATION_LIMIT = 8

    domain: int = _DOMAIN
    node_id: bytes = _ID
    addresses: tuple = attrs.field(converter=tuple, validator=_check_limit(ENDPOINT_LIMIT))
    rpc_port: int = attrs.field(validator=_check_uint(16))
    observed: tuple = attrs.field(converter=tuple, validator=_check_limit(ENDPOINT_LIMIT))
    nat: NatBehaviour = attrs.field(converter=NatBehaviour)
    locations: tuple = attrs.field(converter=tuple, validator=_check_ids(LOCATION_LIMIT))
    roles: Role = attrs.field(converter=Role)
    created: int = _TIME

    @property
    def subject(self):
        return self.node_id

    def write(self, w):
        w.u32(self.domain).fixed(self.node_id, ID_SIZE)
        w.items(self.addresses, self.ENDPOINT_LIMIT, Writer.endpoint).u16(self.rpc_port)
        w.items(self.observed, self.ENDPOINT_LIMIT, Writer.endpoint).u8(self.nat)
        w.items(self.locations, self.LOCATION_LIMIT, lambda w, v: w.fixed(v, ID_SIZE))
        w.u8(self.roles).u64(self.created)

    @classmethod
    def read(cls, r):
        domain, node_id = r.u32(), r.fixed(ID_SIZE)
        addresses = r.items(cls.ENDPOINT_LIMIT, Reader.endpoint)
        rpc_port = r.u16()
        observed = r.items(cls.ENDPOINT_LIMIT, Reader.endpoint)
        nat = r.u8()
        locations = r.items(cls.LOCATION_LIMIT, lambda r: r.fixed(ID_SIZE))
        roles = r.u8()
        if roles & ~int(Role.USER | Role.TUNNEL | Role.SUPER | Role.OPERATOR):
            raise DecodeError(f"unknown role bits {roles:#x}")
        return cls(domain, node_id, addresses, rpc_port, observed, nat, locations, roles, r.u64())

    def check(self, now):
        if self.created > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")
        if now >= self.created + NODE_INFO_LIFETIME_MS:
            raise RecordError("expired")


@attrs.frozen
class SuperNode:
    """An operator's assignment of a DHT partition range to a super-node.

    `replicas` is K, the holders every range should have (fewer: the operator serves it
    too), signed here so that nobody handing the list on can change it. `endpoint` is the RPC
    endpoint the operator reached the super-node on before signing: nodes of every domain
    find their replicas from these records alone."""

    TYPE = RecordType.SUPER_NODE
    SIGNED_BY_OPERATOR = True

    domain: int = _DOMAIN
    node_id: bytes = _ID
    partition_from: int = attrs.field(validator=_check_uint(16))
    partition_to: int = attrs.field(validator=_check_uint(16))
    replicas: int = attrs.field()
    endpoint: Endpoint = attrs.field(validator=attrs.validators.instance_of(Endpoint))
    created: int = _TIME

    @partition_to.validator
    def _ordered(self, attribute, value):
        if value < self.partition_from:
            raise ValueError("partition_to is below partition_from")

    @replicas.validator
    def _positive(self, attribute, value):
        _check_uint(8)(self, attribute, value)
        if value == 0:
            raise ValueError("replicas must be at least 1")

    @property
    def subject(self):
        return self.node_id

    def write(self, w):
        w.u32(self.domain).fixed(self.node_id, ID_SIZE)
        w.u16(self.partition_from).u16(self.partition_to).u8(self.replicas)
        w.endpoint(self.endpoint).u64(self.created)

    @classmethod
    def read(cls, r):
        domain, node_id, low, high = r.u32(), r.fixed(ID_SIZE), r.u16(), r.u16()
        if high < low:
            raise DecodeError("partition range is reversed")
        return cls(domain, node_id, low, high, r.u8(), r.endpoint(), r.u64())

    def check(self, now):
        if self.created > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")


@attrs.frozen
class OperatorNode:
    """An operator's identity: self-signed at the root of trust, or signed by another operator.

    It carries both public keys so that it can be checked without a Node record.
    """

    TYPE = RecordType.OPERATOR_NODE
    SIGNED_BY_OPERATOR = True

    domain: int = _DOMAIN
    node_id: bytes = _ID
    signing_key: bytes = attrs.field(validator=_check_size(KEY_SIZE))
    agreement_key: bytes = attrs.field(validator=_check_size(KEY_SIZE))
    created: int = _TIME

    @property
    def subject(self):
        return self.node_id

    def write(self, w):
        w.u32(self.domain).fixed(self.node_id, ID_SIZE)
        w.fixed(self.signing_key, KEY_SIZE).fixed(self.agreement_key, KEY_SIZE).u64(self.created)

    @classmethod
    def read(cls, r):
        return cls(r.u32(), r.fixed(ID_SIZE), r.fixed(KEY_SIZE), r.fixed(KEY_SIZE), r.u64())

    def check(self, now):
        if node_id_for(self.signing_key) != self.node_id:
            raise RecordError("bad_record", "node id is not the hash of its signing key")
        if self.created > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")


def _check_mac(instance, attribute, value):
    if not isinstance(value, bytes) or len(value) != 6:
        raise ValueError("mac must be 6 bytes")


def canonical_address(value):
    """An IP address in its one canonical spelling (or None); scoped addresses are refused."""
    if value is None:
        return None
    if not isinstance(value, str) or "%" in value:
        raise ValueError(f"{value!r} is not an unscoped IP address")
    return str(ipaddress.ip_address(value))


def _check_ports(instance, attribute, value):
    if not value or len(value) > EndDevice.PORT_LIMIT:
        raise ValueError(f"ports must hold 1 to {EndDevice.PORT_LIMIT} ports")
    if any(not isinstance(p, int) or not 0 < p < 65536 for p in value):
        raise ValueError("ports must be TCP ports 1-65535")


@attrs.frozen
class EndDevice:
    """A device the operator registered: found by MAC, or at an operator-pinned address (its
    MAC then may be NO_MAC: none known)."""

    TYPE = RecordType.END_DEVICE
    SIGNED_BY_OPERATOR = True
    PORT_LIMIT = 64

    domain: int = _DOMAIN
    device_id: bytes = _ID
    name: str = attrs.field(validator=_check_name)
    mac: bytes = attrs.field(validator=_check_mac)
    address: str | None = attrs.field(converter=canonical_address)
    certificate_sha256: bytes | None = attrs.field(
        validator=attrs.validators.optional(_check_size(32)))
    location_id: bytes = _ID
    ports: tuple = attrs.field(converter=tuple, validator=_check_ports)
    created: int = _TIME

    @property
    def subject(self):
        return self.device_id

    def write(self, w):
        w.u32(self.domain).fixed(self.device_id, ID_SIZE).text(self.name, NAME_LIMIT)
        w.fixed(self.mac, 6)
        w.blob(ipaddress.ip_address(self.address).packed if self.address else b"", 16)
        w.u8(1 if self.certificate_sha256 else 0)
        if self.certificate_sha256:
            w.fixed(self.certificate_sha256, 32)
        w.fixed(self.location_id, ID_SIZE)
        w.items(self.ports, self.PORT_LIMIT, Writer.u16).u64(self.created)

    @classmethod
    def read(cls, r):
        domain, device_id, name, mac = r.u32(), r.fixed(ID_SIZE), r.text(NAME_LIMIT), r.fixed(6)
        packed = r.blob(16)
        if len(packed) not in (0, 4, 16):
            raise DecodeError(f"address of {len(packed)} bytes")
        address = str(ipaddress.ip_address(packed)) if packed else None
        has_certificate = r.u8()
        if has_certificate not in (0, 1):
            raise DecodeError("bad certificate flag")
        certificate = r.fixed(32) if has_certificate else None
        location_id = r.fixed(ID_SIZE)
        ports = r.items(cls.PORT_LIMIT, Reader.u16)
        return cls(domain, device_id, name, mac, address, certificate, location_id, ports, r.u64())

    def check(self, now):
        if self.mac == NO_MAC and self.address is None:
            raise RecordError("bad_record", "a device without a MAC needs a pinned address")
        if device_id_for(self.mac, self.certificate_sha256, location_id=self.location_id,
                         address=self.address) != self.device_id:
            raise RecordError("bad_record", "device id is not the hash of its MAC (or location "
                                            "and address) and certificate")
        if self.created > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")


@attrs.frozen
class Revocation:
    """Node and device ids an operator has revoked in a domain."""

    TYPE = RecordType.REVOCATION
    SIGNED_BY_OPERATOR = True
    ID_LIMIT = 1000  # both lists full still fit one u16-length bundle entry

    domain: int = _DOMAIN
    node_ids: tuple = attrs.field(converter=tuple, validator=_check_ids(ID_LIMIT))
    device_ids: tuple = attrs.field(converter=tuple, validator=_check_ids(ID_LIMIT))
    created: int = _TIME

    @property
    def subject(self):
        return None

    def write(self, w):
        w.u32(self.domain)
        w.items(self.node_ids, self.ID_LIMIT, lambda w, v: w.fixed(v, ID_SIZE))
        w.items(self.device_ids, self.ID_LIMIT, lambda w, v: w.fixed(v, ID_SIZE))
        w.u64(self.created)

    @classmethod
    def read(cls, r):
        return cls(r.u32(), r.items(cls.ID_LIMIT, lambda r: r.fixed(ID_SIZE)),
                   r.items(cls.ID_LIMIT, lambda r: r.fixed(ID_SIZE)), r.u64())

    def check(self, now):
        if self.created > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")


@attrs.frozen
class DomainState:
    """Whether a domain is suspended: while it is, every node of the domain is refused
    everywhere (`meshnode operator domain suspend`); the newest record of a domain wins, so
    a later one with `suspended` false resumes it."""

    TYPE = RecordType.DOMAIN_STATE
    SIGNED_BY_OPERATOR = True

    domain: int = _DOMAIN
    suspended: bool = attrs.field(converter=bool)
    created: int = _TIME

    @property
    def subject(self):
        return None

    def write(self, w):
        w.u32(self.domain).u8(1 if self.suspended else 0).u64(self.created)

    @classmethod
    def read(cls, r):
        domain, flag = r.u32(), r.u8()
        if flag > 1:
            raise DecodeError("a domain's suspended flag is 0 or 1")
        return cls(domain, flag, r.u64())

    def check(self, now):
        if self.created > now + CLOCK_SKEW_MS:
            raise RecordError("not_yet_valid")


RECORD_TYPES = {cls.TYPE: cls for cls in (Node, NodeInfo, SuperNode, OperatorNode, EndDevice,
                                          Revocation, DomainState)}


def _context(record_type):
    return b"meshnode/1 record " + RECORD_TYPES[record_type].__name__.encode("ascii") + b"\x00"


@attrs.frozen
class Signed:
    """A record with its signer and signature, and the exact bytes they cover."""

    record: object
    signer: bytes
    signature: bytes
    signed_bytes: bytes = attrs.field(repr=False)

    def encode(self):
        return self.signed_bytes + self.signature


def sign(record, signer_id, private_key):
    """Sign `record` with an Ed25519 private key whose node id is `signer_id`."""
    w = Writer().u8(record.TYPE).u8(RECORD_VERSION)
    record.write(w)
    w.fixed(signer_id, ID_SIZE)
    signed_bytes = w.bytes()
    signature = private_key.sign(_context(record.TYPE) + signed_bytes)
    return Signed(record, signer_id, signature, signed_bytes)


def read_signed(r):
    """Read one signed record from a Reader (does not verify the signature)."""
    start = r.offset
    record_type = r.u8()
    if record_type not in RECORD_TYPES:
        raise DecodeError(f"unknown record type {record_type}")
    version = r.u8()
    if version != RECORD_VERSION:
        raise DecodeError(f"unknown record version {version}")
    try:
        record = RECORD_TYPES[record_type].read(r)
    except DecodeError:
        raise
    except ValueError as e:
        # attrs validators and enum converters reject out-of-range field values
        raise DecodeError(str(e)) from None
    signer = r.fixed(ID_SIZE)
    signed_bytes = r._data[start:r.offset]
    signature = r.fixed(SIGNATURE_SIZE)
    return Signed(record, signer, signature, bytes(signed_bytes))


def decode_signed(data):
    """Decode exactly one signed record; trailing bytes are an error."""
    r = Reader(data)
    signed = read_signed(r)
    r.end()
    return signed


def encode_bundle(signed_records):
    """A list of signed records, as kept in files and carried in RPC answers."""
    return Writer().items(signed_records, BUNDLE_LIMIT,
                          lambda w, s: w.blob(s.encode(), 65535)).bytes()


def decode_bundle(data):
    r = Reader(data)
    records = r.items(BUNDLE_LIMIT, lambda r: decode_signed(r.blob(65535)))
    r.end()
    return records


_public_keys = {}


def _public_key(raw):
    key = _public_keys.get(raw)
    if key is None:
        if len(_public_keys) > 4096:
            _public_keys.clear()
        key = _public_keys[raw] = Ed25519PublicKey.from_public_bytes(raw)
    return key


def signature_holds(signing_key, signature, message):
    """Whether `signature` is the Ed25519 signature of `message` by `signing_key`."""
    try:
        _public_key(signing_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_signature(signed, signing_key):
    try:
        _public_key(signing_key).verify(signed.signature, _context(signed.record.TYPE)
                                        + signed.signed_bytes)
    except (InvalidSignature, ValueError):
        raise RecordError("bad_signature") from None


class Trust:
    """What a node believes: the operators' keys and what they revoked.

    `verify` applies the signer rule, the signature, the lifetime and revocation in one place;
    a record that fails any of them raises RecordError and must be neither stored nor used.
    """

    def __init__(self):
        self._operators = {}
        self.revoked = set()  # node and device ids; read on every datagram, so a plain set
        self.suspended = set()  # domain ids; read on every datagram too
        self._domain_states = {}  # domain id → `created` of the newest DomainState applied

    @property
    def operator_ids(self):
        return frozenset(self._operators)

    def is_operator(self, node_id):
        return node_id in self._operators

    def operator_key(self, node_id):
        """The signing key of a trusted operator, or None."""
        return self._operators.get(node_id)

    def is_revoked(self, some_id):
        return some_id in self.revoked

    def anchor(self, signed, now):
        """Trust a self-signed OperatorNode record that came from local, trusted state."""
        record = signed.record
        if not isinstance(record, OperatorNode) or signed.signer != record.node_id:
            raise RecordError("bad_anchor", "a trust anchor is a self-signed OperatorNode record")
        record.check(now)
        check_signature(signed, record.signing_key)
        self._operators[record.node_id] = record.signing_key

    def add_operator(self, signed, now):
        """Trust an OperatorNode record signed by an operator already trusted."""
        self.verify(signed, now)
        self._operators[signed.record.node_id] = signed.record.signing_key

    def add_revocation(self, signed, now):
        """Apply a Revocation record → the ids it revoked that were not revoked before."""
        self.verify(signed, now)
        named = set(signed.record.node_ids) | set(signed.record.device_ids)
        new = named - self.revoked
        self.revoked |= new
        return new

    def set_domain_state(self, signed, now):
        """Apply a DomainState record unless a newer one of its domain was applied → whether
        the domain's state changed (suspended or resumed)."""
        record = self.verify(signed, now)
        if not isinstance(record, DomainState):
            raise RecordError("bad_record", "not a DomainState record")
        if record.created <= self._domain_states.get(record.domain, -1):
            return False
        self._domain_states[record.domain] = record.created
        was = record.domain in self.suspended
        if record.suspended:
            self.suspended.add(record.domain)
        else:
            self.suspended.discard(record.domain)
        return was != record.suspended

    def learned_from(self, other):
        """Keep what `other` (the trust this one replaces, at enrollment or renewal) learned
        since: its revocations and domain states."""
        self.revoked |= other.revoked
        for domain, created in other._domain_states.items():
            if created > self._domain_states.get(domain, -1):
                self._domain_states[domain] = created
                if domain in other.suspended:
                    self.suspended.add(domain)
                else:
                    self.suspended.discard(domain)

    def verify(self, signed, now, subject_node=None):
        """Check `signed` and return its record.

        Self-signed records (NodeInfo) need `subject_node`, the subject's verified Node record.
        """
        record = signed.record
        if record.SIGNED_BY_OPERATOR:
            signing_key = self._operators.get(signed.signer)
            if signing_key is None:
                raise RecordError("unknown_signer", "not signed by a trusted operator")
        else:
            if signed.signer != record.subject:
                raise RecordError("wrong_signer", "a self-signed record signed by another node")
            if subject_node is None or subject_node.node_id != record.subject:
                raise RecordError("unknown_signer", "the subject's Node record is unknown")
            if record.domain != subject_node.domain:
                raise RecordError("wrong_domain", "not the domain of the subject's Node record")
            signing_key = subject_node.signing_key
        if signed.signer in self.revoked or (record.subject is not None
                                              and record.subject in self.revoked):
            raise RecordError("revoked")
        record.check(now)
        check_signature(signed, signing_key)
        return record
