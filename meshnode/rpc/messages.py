"""RPC command numbers and the payload codecs of the messages built so far.

A request's payload is its message; a response's payload is the 12-byte message id of the
request it answers followed by its message.
"""

import enum
import ipaddress
import struct

import attrs

from meshnode import records
from meshnode.wire import DecodeError, Endpoint, Reader, Writer


class Command(enum.IntEnum):
    """Every command of DESIGN.md §4; a command without a registered handler is dropped."""

    GET_NODE = 1
    NODE = 2
    PING = 3
    PONG = 4
    GET_OPERATOR_NODES = 5
    OPERATOR_NODES = 6
    GET_SUPER_NODES = 7
    SUPER_NODES = 8
    SUBMIT_SUPER_NODE = 9
    TRANSFER_PARTITION = 10
    GET_NODE_INFO = 11
    NODE_INFO = 12
    PUT_RECORD = 13
    STORED = 14
    GET_TUNNEL_NODES = 15
    TUNNEL_NODES = 16
    GET_END_DEVICES = 17
    END_DEVICES = 18
    TUNNEL_REQUEST = 19
    TUNNEL_OPENED = 20
    FORWARDED_TUNNEL_REQUEST = 21
    FORWARDED_TUNNEL_OPENED = 22
    WHO_AM_I = 23
    YOU_ARE = 24
    INTRODUCE = 25
    ERROR = 26
    SUPER_NODE_STATUS = 27
    PARTITION_DIGESTS = 28
    PARTITION_RECORDS = 29
    RELAYED_TUNNEL_REQUEST = 30
    DEVICES_SEEN = 31
    INTRODUCTION = 32
    PUNCH_REQUEST = 33
    PUNCH_INTRODUCTION = 34
    RECORDS_CHANGED = 35


PING_DATA_LIMIT = 1000
_LENGTH = struct.Struct(">H")


def _encode_echo(data):
    if len(data) > PING_DATA_LIMIT:
        raise ValueError(f"ping data over {PING_DATA_LIMIT} bytes")
    return _LENGTH.pack(len(data)) + data


def _decode_echo(payload):
    # Written out rather than through Reader: Ping/Pong is the RPC's hot path.
    if len(payload) < 2 or _LENGTH.unpack_from(payload)[0] != len(payload) - 2 or (
            len(payload) - 2 > PING_DATA_LIMIT):
        raise DecodeError("bad ping data")
    return payload[2:]


class _Echo:
    """Ping and Pong: plain slotted classes rather than attrs ones, as the RPC's hot path."""

    __slots__ = ("data",)

    def __init__(self, data=b""):
        self.data = data

    def __eq__(self, other):
        return type(self) is type(other) and self.data == other.data

    def __repr__(self):
        return f"{type(self).__name__}({self.data!r})"

    def encode(self):
        return _encode_echo(self.data)

    @classmethod
    def decode(cls, payload):
        return cls(_decode_echo(payload))


class Ping(_Echo):
    """Liveness and round-trip probe; the answer echoes `data`."""

    __slots__ = ()
    COMMAND = Command.PING


class Pong(_Echo):
    __slots__ = ()
    COMMAND = Command.PONG


@attrs.frozen
class GetNode:
    """Asks for an operator-signed Node record.

    Plain (bootstrap): the receiver's own record; `cause` is the message id of the sealed
    datagram that could not be opened because its sender was unknown, or zeros on first
    contact. Sealed, with `wanted` (a node id) or `name` (an overlay name): a directory lookup
    of that node in the asker's own domain.
    """

    COMMAND = Command.GET_NODE
    _BY_ID = 1
    _BY_NAME = 2

    cause: bytes = bytes(12)
    wanted: bytes | None = None
    name: str | None = None

    def encode(self):
        w = Writer().fixed(self.cause, 12)
        if self.wanted is not None:
            w.u8(self._BY_ID).fixed(self.wanted, 32)
        elif self.name is not None:
            w.u8(self._BY_NAME).text(self.name, records.NAME_LIMIT)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        cause = r.fixed(12)
        if r.offset == len(payload):
            return cls(cause)
        kind = r.u8()
        if kind == cls._BY_ID:
            message = cls(cause, wanted=r.fixed(32))
        elif kind == cls._BY_NAME:
            message = cls(cause, name=r.text(records.NAME_LIMIT))
        else:
            raise DecodeError(f"unknown GetNode lookup kind {kind}")
        r.end()
        return message


@attrs.frozen
class NodeRecord:
    """Carries an operator-signed Node record (plain: it authenticates itself), or None when a
    directory lookup found nothing."""

    COMMAND = Command.NODE
    signed: records.Signed | None

    def encode(self):
        return Writer().blob(self.signed.encode() if self.signed else b"", 1024).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        blob = r.blob(1024)
        r.end()
        return cls(records.decode_signed(blob) if blob else None)


# The most record bytes one answer can carry: a datagram less header, tag and request id.
PAGE_BYTES = 1200 - 96 - 16 - 12 - 4


class _PageRequest:
    """Asks for one page of a record list, starting at `offset`."""

    __slots__ = ("offset",)

    def __init__(self, offset=0):
        self.offset = offset

    def __eq__(self, other):
        return type(self) is type(other) and self.offset == other.offset

    def encode(self):
        return Writer().u16(self.offset).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(r.u16())
        r.end()
        return message


class _RecordPage:
    """One page of signed records and how many there are in all."""

    __slots__ = ("total", "signed")

    def __init__(self, total, signed):
        self.total = total
        self.signed = tuple(signed)

    def __eq__(self, other):
        return (type(self) is type(other) and self.total == other.total
                and self.signed == other.signed)

    @classmethod
    def fill(cls, blobs, offset):
        """As many records from `blobs[offset:]` as fit one datagram."""
        page, size = [], 0
        for blob in blobs[offset:]:
            if size + 2 + len(blob) > PAGE_BYTES:
                break
            page.append(records.decode_signed(blob))
            size += 2 + len(blob)
        return cls(len(blobs), page)

    def encode(self):
        w = Writer().u16(self.total)
        w.items(self.signed, 64, lambda w, s: w.blob(s.encode(), PAGE_BYTES))
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        total = r.u16()
        signed = r.items(64, lambda r: records.decode_signed(r.blob(PAGE_BYTES)))
        r.end()
        return cls(total, signed)


class GetOperatorNodes(_PageRequest):
    __slots__ = ()
    COMMAND = Command.GET_OPERATOR_NODES


class OperatorNodes(_RecordPage):
    __slots__ = ()
    COMMAND = Command.OPERATOR_NODES


class GetSuperNodes(_PageRequest):
    __slots__ = ()
    COMMAND = Command.GET_SUPER_NODES


class SuperNodes(_RecordPage):
    """A page of SuperNode records; K travels inside each, under the operator's signature."""

    __slots__ = ()
    COMMAND = Command.SUPER_NODES


class GetEndDevices(_PageRequest):
    """The requester's domain's end-devices (a page of them); a super-node names `domain`
    to fetch, from the operator, those of a domain in its ranges that it serves."""

    __slots__ = ("domain",)
    COMMAND = Command.GET_END_DEVICES

    def __init__(self, offset=0, domain=None):
        super().__init__(offset)
        self.domain = domain

    def __eq__(self, other):
        return super().__eq__(other) and self.domain == other.domain

    def encode(self):
        head = super().encode()
        return head if self.domain is None else head + struct.pack(">I", self.domain)

    @classmethod
    def decode(cls, payload):
        if len(payload) == 6:
            return cls(struct.unpack_from(">H", payload)[0],
                       struct.unpack_from(">I", payload, 2)[0])
        page = super().decode(payload)
        return cls(page.offset)


class EndDevices(_RecordPage):
    __slots__ = ()
    COMMAND = Command.END_DEVICES


@attrs.frozen
class PutRecord:
    """Asks a DHT replica to keep a signed record."""

    COMMAND = Command.PUT_RECORD
    signed: records.Signed

    def encode(self):
        return Writer().blob(self.signed.encode(), PAGE_BYTES).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(records.decode_signed(r.blob(PAGE_BYTES)))
        r.end()
        return message


@attrs.frozen
class Stored:
    """A replica's answer to PutRecord: 0 stored, 1 a newer one is held, 2 refused."""

    COMMAND = Command.STORED
    result: int
    reason: str = ""

    def encode(self):
        return Writer().u8(self.result).text(self.reason, 200).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(r.u8(), r.text(200))
        r.end()
        return message


@attrs.frozen
class GetNodeInfo:
    """Asks a DHT replica for the NodeInfo of a node of the requester's domain, by node id or
    by overlay name; an operator may name another `domain` (with a node id): it checks the
    tunnel-nodes that report devices to it."""

    COMMAND = Command.GET_NODE_INFO
    _BY_ID = 1
    _BY_NAME = 2
    _BY_DOMAIN_AND_ID = 3

    node_id: bytes | None = None
    name: str | None = None
    domain: int | None = None

    def __attrs_post_init__(self):
        if (self.node_id is None) == (self.name is None):
            raise ValueError("GetNodeInfo takes a node id or a name")
        if self.domain is not None and self.node_id is None:
            raise ValueError("GetNodeInfo of another domain takes a node id")

    def encode(self):
        if self.domain is not None:
            return Writer().u8(self._BY_DOMAIN_AND_ID).u32(self.domain).fixed(
                self.node_id, 32).bytes()
        if self.node_id is not None:
            return Writer().u8(self._BY_ID).fixed(self.node_id, 32).bytes()
        return Writer().u8(self._BY_NAME).text(self.name, records.NAME_LIMIT).bytes()

    @classmethod
    def decode(cls, payload):
        if len(payload) == 33 and payload[0] == cls._BY_ID:  # the common case, kept quick
            return cls(node_id=bytes(payload[1:]))
        r = Reader(payload)
        kind = r.u8()
        if kind == cls._BY_ID:
            message = cls(node_id=r.fixed(32))
        elif kind == cls._BY_NAME:
            message = cls(name=r.text(records.NAME_LIMIT))
        elif kind == cls._BY_DOMAIN_AND_ID:
            domain = r.u32()
            message = cls(node_id=r.fixed(32), domain=domain)
        else:
            raise DecodeError(f"unknown GetNodeInfo lookup kind {kind}")
        r.end()
        return message


def _write_entry(w, entry):
    node, info = entry
    w.blob(node.encode(), PAGE_BYTES).blob(info.encode(), PAGE_BYTES)


def _read_entry(r):
    return records.decode_signed(r.blob(PAGE_BYTES)), records.decode_signed(r.blob(PAGE_BYTES))


def entry_size(entry):
    """The bytes one (Node, NodeInfo) pair takes in an answer."""
    node, info = entry
    return 4 + len(node.signed_bytes) + len(node.signature) + len(info.signed_bytes) + len(
        info.signature)


@attrs.frozen
class NodeInfoRecord:
    """A replica's answer to GetNodeInfo: the node's operator-signed Node record and its
    self-signed NodeInfo (the asker needs no other lookup to check it), or neither."""

    COMMAND = Command.NODE_INFO
    node: records.Signed | None = None
    info: records.Signed | None = None

    def encode(self):
        if self.node is None or self.info is None:
            return b""
        w = Writer()
        _write_entry(w, (self.node, self.info))
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        if not payload:
            return cls()
        r = Reader(payload)
        node, info = _read_entry(r)
        r.end()
        return cls(node, info)


class Encoded:
    """An answer encoded once and sent many times (a DHT replica's hot reads)."""

    __slots__ = ("COMMAND", "payload")

    def __init__(self, message):
        self.COMMAND = message.COMMAND
        self.payload = message.encode()

    def encode(self):
        return self.payload


@attrs.frozen
class WhoAmI:
    """Asks the receiver which endpoint this datagram came from (reflexive discovery)."""

    COMMAND = Command.WHO_AM_I

    def encode(self):
        return b""

    @classmethod
    def decode(cls, payload):
        if payload:
            raise DecodeError("WhoAmI carries nothing")
        return cls()


@attrs.frozen
class YouAre:
    """The endpoint a WhoAmI came from, as the answering node saw it."""

    COMMAND = Command.YOU_ARE
    endpoint: Endpoint

    def encode(self):
        return Writer().endpoint(self.endpoint).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        endpoint = r.endpoint()
        r.end()
        return cls(endpoint)


def _check_range(low, high):
    if not 0 <= low <= high <= 0xFFFF:
        raise DecodeError(f"bad partition range {low:#x}-{high:#x}")


@attrs.frozen
class SubmitSuperNode:
    """A node offers to serve partition keys low..high as a super-node, reachable at
    `endpoint`; sent again every minute as the super-node's heartbeat."""

    COMMAND = Command.SUBMIT_SUPER_NODE
    low: int
    high: int
    endpoint: Endpoint

    def encode(self):
        return Writer().u16(self.low).u16(self.high).endpoint(self.endpoint).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        low, high, endpoint = r.u16(), r.u16(), r.endpoint()
        r.end()
        _check_range(low, high)
        return cls(low, high, endpoint)


class SubmitState(enum.IntEnum):
    ASSIGNED = 0   # the submitter's ranges are in the operator's SuperNode records
    CHECKING = 1   # the operator is reaching back to the endpoint; submit again shortly
    REFUSED = 2    # `reason` says why


@attrs.frozen
class SuperNodeStatus:
    """The operator's answer to SubmitSuperNode; the assignment itself is read with
    GetSuperNodes."""

    COMMAND = Command.SUPER_NODE_STATUS
    state: SubmitState = attrs.field(converter=SubmitState)
    reason: str = ""

    def encode(self):
        return Writer().u8(self.state).text(self.reason, 200).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        state, reason = r.u8(), r.text(200)
        r.end()
        try:
            return cls(state, reason)
        except ValueError as e:
            raise DecodeError(str(e)) from None


@attrs.frozen
class TransferPartition:
    """A replica asks another replica of keys low..high for one page: of per-domain digests
    (domain None), or of the (Node, NodeInfo) entries of one domain."""

    COMMAND = Command.TRANSFER_PARTITION
    low: int
    high: int
    domain: int | None = None
    offset: int = 0

    def encode(self):
        w = Writer().u16(self.low).u16(self.high).u32(self.offset)
        if self.domain is not None:
            w.u32(self.domain)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        low, high, offset = r.u16(), r.u16(), r.u32()
        domain = r.u32() if r.offset < len(payload) else None
        r.end()
        _check_range(low, high)
        return cls(low, high, domain, offset)


_DIGEST = struct.Struct(">IIH16s")
DIGESTS_PER_PAGE = (PAGE_BYTES - 8) // _DIGEST.size


@attrs.frozen
class PartitionDigests:
    """One page of (domain, record count, digest of the domain's entries) in a range."""

    COMMAND = Command.PARTITION_DIGESTS
    total: int
    digests: tuple = attrs.field(converter=tuple)

    def encode(self):
        # the u16 in each entry is reserved (zero)
        return struct.pack(">II", self.total, len(self.digests)) + b"".join(
            _DIGEST.pack(domain, count, 0, digest) for domain, count, digest in self.digests)

    @classmethod
    def decode(cls, payload):
        if len(payload) < 8:
            raise DecodeError("short digest page")
        total, n = struct.unpack_from(">II", payload)
        if n > DIGESTS_PER_PAGE or len(payload) != 8 + n * _DIGEST.size:
            raise DecodeError("bad digest page length")
        return cls(total, tuple((domain, count, digest) for domain, count, _, digest
                                in _DIGEST.iter_unpack(payload[8:])))


@attrs.frozen
class PartitionRecords:
    """One page of a domain's (Node, NodeInfo) entries, and how many the domain has."""

    COMMAND = Command.PARTITION_RECORDS
    total: int
    entries: tuple = attrs.field(converter=tuple)

    @classmethod
    def fill(cls, entries, offset):
        page, size = [], 0
        for entry in entries[offset:]:
            if size + entry_size(entry) > PAGE_BYTES - 6:
                break
            page.append(entry)
            size += entry_size(entry)
        return cls(len(entries), page)

    def encode(self):
        w = Writer().u32(self.total)
        w.items(self.entries, 16, _write_entry)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        total = r.u32()
        entries = r.items(16, _read_entry)
        r.end()
        return cls(total, entries)


# -- tunnels --------------------------------------------------------------------------------

@attrs.frozen
class GetTunnelNodes:
    """Asks a DHT replica for the tunnel-nodes of the requester's domain at a location."""

    COMMAND = Command.GET_TUNNEL_NODES
    location: bytes
    offset: int = 0

    def encode(self):
        return Writer().fixed(self.location, 32).u32(self.offset).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(r.fixed(32), r.u32())
        r.end()
        return message


class TunnelNodes(PartitionRecords):
    """One page of (Node, NodeInfo) entries of tunnel-nodes, and how many there are."""

    COMMAND = Command.TUNNEL_NODES


class TunnelResult(enum.IntEnum):
    OPENED = 0
    REFUSED = 1


# Refusals of who may have which device: the same whichever path the request took, so a
# requester neither tries the other paths to that tunnel-node nor takes them for a broken path.
AUTHORIZATION_REFUSALS = frozenset((
    "other_domain", "revoked", "unregistered_device", "wrong_location", "port_not_allowed",
    "device_not_found", "bad_requester", "limit_total", "limit_domain", "limit_node"))


_TOKEN_SIZE = 32


@attrs.frozen
class TunnelRequest:
    """Asks a tunnel-node for a tunnel to port `port` of end-device `device_id`."""

    COMMAND = Command.TUNNEL_REQUEST
    device_id: bytes
    port: int

    def encode(self):
        return Writer().fixed(self.device_id, 32).u16(self.port).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(r.fixed(32), r.u16())
        r.end()
        return message


def _write_opening(w, result, reason, endpoint, token):
    w.u8(result).text(reason, 200)
    if result == TunnelResult.OPENED:
        w.endpoint(endpoint).fixed(token, _TOKEN_SIZE)


def _read_opening(r):
    try:
        result = TunnelResult(r.u8())
    except ValueError as e:
        raise DecodeError(str(e)) from None
    reason = r.text(200)
    if result == TunnelResult.OPENED:
        return result, reason, r.endpoint(), r.fixed(_TOKEN_SIZE)
    return result, reason, None, None


@attrs.frozen
class TunnelOpened:
    """A tunnel-node's answer: where to connect and the one-time token to send first, or
    why not."""

    COMMAND = Command.TUNNEL_OPENED
    result: TunnelResult
    reason: str = ""
    endpoint: Endpoint | None = None
    token: bytes | None = None

    def encode(self):
        w = Writer()
        _write_opening(w, self.result, self.reason, self.endpoint, self.token)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(*_read_opening(r))
        r.end()
        return message


@attrs.frozen
class Forwarding:
    """What a super-node adds when it forwards a request to a tunnel-node, so the answer can
    be sent on without the super-node remembering anything: who asked (its Node record), from
    where, which request; and the relay the tunnel-node is to dial with the token."""

    requester: records.Signed
    requester_endpoint: Endpoint
    request_id: bytes
    relay: Endpoint
    token: bytes

    def write(self, w):
        w.blob(self.requester.encode(), 1024).endpoint(self.requester_endpoint)
        w.fixed(self.request_id, 12).endpoint(self.relay).fixed(self.token, _TOKEN_SIZE)

    @classmethod
    def read(cls, r):
        return cls(records.decode_signed(r.blob(1024)), r.endpoint(), r.fixed(12),
                   r.endpoint(), r.fixed(_TOKEN_SIZE))


@attrs.frozen
class ForwardedTunnelRequest:
    """A user-node asks a super-node for a relayed tunnel to a tunnel-node's device; the
    super-node passes it on with `forwarding` filled in."""

    COMMAND = Command.FORWARDED_TUNNEL_REQUEST
    tunnel_node: bytes
    device_id: bytes
    port: int
    forwarding: Forwarding | None = None

    def encode(self):
        w = Writer().fixed(self.tunnel_node, 32).fixed(self.device_id, 32).u16(self.port)
        if self.forwarding is not None:
            self.forwarding.write(w)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        tunnel_node, device_id, port = r.fixed(32), r.fixed(32), r.u16()
        forwarding = Forwarding.read(r) if r.offset < len(payload) else None
        r.end()
        return cls(tunnel_node, device_id, port, forwarding)


class RelayedTunnelRequest(ForwardedTunnelRequest):
    """A ForwardedTunnelRequest as the super-node passes it on to the tunnel-node, with
    `forwarding` filled in (its own command, so a node that is both a super-node and a
    tunnel-node tells the two apart)."""

    COMMAND = Command.RELAYED_TUNNEL_REQUEST


@attrs.frozen
class ForwardedTunnelOpened:
    """The tunnel-node's answer to a forwarded request: sent to the super-node as a request
    naming the requester (`back`: its node id, endpoint and request id), which the super-node
    sends on as the answer to the requester's ForwardedTunnelRequest (without `back`)."""

    COMMAND = Command.FORWARDED_TUNNEL_OPENED
    result: TunnelResult
    reason: str = ""
    endpoint: Endpoint | None = None
    token: bytes | None = None
    back: tuple | None = None  # (requester node id, requester Endpoint, request id)

    def encode(self):
        w = Writer()
        _write_opening(w, self.result, self.reason, self.endpoint, self.token)
        if self.back is not None:
            node_id, endpoint, request_id = self.back
            w.fixed(node_id, 32).endpoint(endpoint).fixed(request_id, 12)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        opening = _read_opening(r)
        back = (r.fixed(32), r.endpoint(), r.fixed(12)) if r.offset < len(payload) else None
        r.end()
        return cls(*opening, back)


def _write_back(w, back):
    requester, endpoint, request_id = back
    w.blob(requester.encode(), 1024).endpoint(endpoint).fixed(request_id, 12)


def _read_back(r, payload):
    if r.offset < len(payload):
        return records.decode_signed(r.blob(1024)), r.endpoint(), r.fixed(12)
    return None


@attrs.frozen
class Introduce:
    """A user-node asks a super-node to introduce it to a tunnel-node for a punched tunnel to
    a device: `endpoint` is where the user-node will connect from (its public address and
    punch port). The super-node passes it on as an Introduction naming the requester.
    `birthday`: the user-node is behind a symmetric NAT and opens many connections; the
    tunnel-node is to probe many ports of its address (birthday probing)."""

    COMMAND = Command.INTRODUCE
    tunnel_node: bytes
    device_id: bytes
    port: int
    endpoint: Endpoint
    back: tuple | None = None  # (requester's Signed Node, its RPC Endpoint, request id)
    birthday: bool = False

    def encode(self):
        w = Writer().fixed(self.tunnel_node, 32).fixed(self.device_id, 32).u16(self.port)
        w.endpoint(self.endpoint).u8(int(self.birthday))
        if self.back is not None:
            _write_back(w, self.back)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        tunnel_node, device_id, port, endpoint = r.fixed(32), r.fixed(32), r.u16(), r.endpoint()
        birthday = r.u8()
        if birthday > 1:
            raise DecodeError("the birthday flag is 0 or 1")
        back = _read_back(r, payload)
        r.end()
        return cls(tunnel_node, device_id, port, endpoint, back, bool(birthday))


class Introduction(Introduce):
    """An Introduce as the super-node passes it on to the tunnel-node, with `back` filled in;
    the tunnel-node answers with a ForwardedTunnelOpened through the super-node."""

    COMMAND = Command.INTRODUCTION


@attrs.frozen
class PunchRequest:
    """`meshnode punch`: a node asks a super-node to introduce it to `peer` of its domain
    for a punched UDP path: `endpoint` is its punch socket's public endpoint, `nonce` its
    half of the path's secret. Passed on as a PunchIntroduction naming the requester."""

    COMMAND = Command.PUNCH_REQUEST
    peer: bytes
    endpoint: Endpoint
    nonce: bytes
    back: tuple | None = None  # (requester's Signed Node, its RPC Endpoint, request id)

    def encode(self):
        w = Writer().fixed(self.peer, 32).endpoint(self.endpoint).fixed(self.nonce, 32)
        if self.back is not None:
            _write_back(w, self.back)
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        peer, endpoint, nonce = r.fixed(32), r.endpoint(), r.fixed(32)
        back = _read_back(r, payload)
        r.end()
        return cls(peer, endpoint, nonce, back)


class PunchIntroduction(PunchRequest):
    """A PunchRequest as the super-node passes it on to the peer, with `back` filled in; the
    peer answers with a ForwardedTunnelOpened (its endpoint, and its nonce as the token)."""

    COMMAND = Command.PUNCH_INTRODUCTION


DEVICES_SEEN_LIMIT = 40


@attrs.frozen
class DevicesSeen:
    """A tunnel-node tells the operator of devices it sees at a location that have no
    EndDevice record: (MAC, IPv4 address) pairs, for `meshnode operator device pending`."""

    COMMAND = Command.DEVICES_SEEN
    location: bytes
    devices: tuple = attrs.field(converter=tuple)

    def encode(self):
        w = Writer().fixed(self.location, 32)
        w.items(self.devices, DEVICES_SEEN_LIMIT,
                lambda w, d: w.fixed(d[0], 6).text(d[1], 45))
        return w.bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        location = r.fixed(32)
        devices = r.items(DEVICES_SEEN_LIMIT, lambda r: (r.fixed(6), _ipv4_text(r.text(45))))
        r.end()
        return cls(location, devices)


class Changed(enum.IntEnum):
    """What a RecordsChanged is news of."""

    END_DEVICES = 1  # the domain's EndDevice and Revocation records
    PLACEMENT = 2  # the super-node list: who holds the domain's partition


@attrs.frozen
class RecordsChanged:
    """News that records a node acts on changed, so it reads them again now:

    * END_DEVICES: the operator tells the super-nodes serving the domain, and each replica
      the domain's tunnel-nodes it holds; a receiver reads them again from whoever told it,
      unless it has read `serial` (the domain's change serial) already;
    * PLACEMENT: a replica handing a partition range over (the operator when super-nodes
      take it) tells the nodes it holds there to read the super-node list again.

    Answered with Stored."""

    COMMAND = Command.RECORDS_CHANGED
    domain: int
    serial: int
    what: Changed = attrs.field(default=Changed.END_DEVICES, converter=Changed)

    def encode(self):
        return struct.pack(">IQB", self.domain, self.serial, self.what)

    @classmethod
    def decode(cls, payload):
        if len(payload) != 13:
            raise DecodeError("a RecordsChanged is 13 bytes")
        domain, serial, what = struct.unpack(">IQB", payload)
        try:
            return cls(domain, serial, what)
        except ValueError:
            raise DecodeError(f"unknown kind of change {what}") from None


def _ipv4_text(text):
    """Only an IPv4 address, as `str(IPv4Address)` spells it, reaches the admin's table."""
    try:
        if str(ipaddress.IPv4Address(text)) == text:
            return text
    except ValueError:
        pass
    raise DecodeError("a seen device's address is not IPv4 text")


MESSAGES = {cls.COMMAND: cls for cls in (
    Ping, Pong, GetNode, NodeRecord, GetOperatorNodes, OperatorNodes, GetSuperNodes,
    SuperNodes, GetEndDevices, EndDevices, PutRecord, Stored, GetNodeInfo, NodeInfoRecord,
    WhoAmI, YouAre, SubmitSuperNode, SuperNodeStatus, TransferPartition, PartitionDigests,
    PartitionRecords, GetTunnelNodes, TunnelNodes, TunnelRequest, TunnelOpened,
    ForwardedTunnelRequest, RelayedTunnelRequest, ForwardedTunnelOpened, DevicesSeen, Introduce,
    Introduction, PunchRequest, PunchIntroduction, RecordsChanged)}

# A Node answer is at most: header, plain length, request id, blob length, largest Node record.
NODE_ANSWER_SIZE = 96 + 2 + 12 + 2 + (2 + 4 + 32 * 3 + 2 + records.NAME_LIMIT + 16 + 32 + 64)
