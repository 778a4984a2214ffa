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
    """Asks the receiver for its own operator-signed Node record (plain, bootstrap).

    `cause` is the message id of the sealed datagram that could not be opened because its
    sender was unknown, or zeros on first contact.
    """

    COMMAND = Command.GET_NODE
    cause: bytes = bytes(12)

    def encode(self):
        return Writer().fixed(self.cause, 12).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(r.fixed(12))
        r.end()
        return message


@attrs.frozen
class NodeRecord:
    """Carries an operator-signed Node record (plain: it authenticates itself)."""

    COMMAND = Command.NODE
    signed: records.Signed

    def encode(self):
        return Writer().blob(self.signed.encode(), 1024).bytes()

    @classmethod
    def decode(cls, payload):
        r = Reader(payload)
        message = cls(records.decode_signed(r.blob(1024)))
        r.end()
        return message


MESSAGES = {cls.COMMAND: cls for cls in (Ping, Pong, GetNode, NodeRecord)}

# A Node answer is at most: header, plain length, request id, blob length, largest Node record.
NODE_ANSWER_SIZE = 96 + 2 + 12 + 2 + (2 + 4 + 32 * 3 + 2 + records.NAME_LIMIT + 16 + 32 + 64)
