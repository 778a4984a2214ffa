"""RPC command numbers and the payload codecs of the messages built so far.

A request's payload is its message; a response's payload is the 12-byte message id of the
request it answers followed by its message.
"""

import enum
import struct

import attrs

from meshnode import records
from meshnode.wire import DecodeError, Reader, Writer


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
    __slots__ = ()
    COMMAND = Command.SUPER_NODES


class GetEndDevices(_PageRequest):
    """The requester's domain's end-devices (a page of them)."""

    __slots__ = ()
    COMMAND = Command.GET_END_DEVICES


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
    """Asks for the NodeInfo of a node of the requester's domain."""

    COMMAND = Command.GET_NODE_INFO
    node_id: bytes

    def encode(self):
        return self.node_id

    @classmethod
    def decode(cls, payload):
        if len(payload) != 32:
            raise DecodeError("bad GetNodeInfo length")
        return cls(payload)


@attrs.frozen
class NodeInfoRecord:
    """Carries a signed NodeInfo record, or None when the replica holds none."""

    COMMAND = Command.NODE_INFO
    signed: records.Signed | None

    def encode(self):
        return Writer().blob(self.signed.encode() if self.signed else b"", PAGE_BYTES).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        blob = r.blob(PAGE_BYTES)
        r.end()
        return cls(records.decode_signed(blob) if blob else None)


MESSAGES = {cls.COMMAND: cls for cls in (
    Ping, Pong, GetNode, NodeRecord, GetOperatorNodes, OperatorNodes, GetSuperNodes,
    SuperNodes, GetEndDevices, EndDevices, PutRecord, Stored, GetNodeInfo, NodeInfoRecord)}

# A Node answer is at most: header, plain length, request id, blob length, largest Node record.
NODE_ANSWER_SIZE = 96 + 2 + 12 + 2 + (2 + 4 + 32 * 3 + 2 + records.NAME_LIMIT + 16 + 32 + 64)
