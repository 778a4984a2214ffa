"""The datagram frame: the 96-byte header, sealing with ChaCha20-Poly1305, plain bodies.

Knows nothing of sockets or peers: it turns bytes into a Frame and back (DESIGN.md §4).
"""

import os
import struct

from cryptography.exceptions import InvalidTag

MAGIC = 0x4D  # 'M'
VERSION = 1
HEADER = struct.Struct(">BBBBI32sI32sQ12s")
HEADER_SIZE = HEADER.size  # 96
TAG_SIZE = 16
MAX_DATAGRAM = 1200
MESSAGE_ID_SIZE = 12
ZERO_ID = bytes(32)
_PLAIN_LENGTH = struct.Struct(">H")
COUNTER = struct.Struct(">Q")  # the first 8 bytes of a message id


# Header flags. Plain ints, not an enum: they are tested for every datagram.
RESPONSE = 1
PLAIN = 2
_KNOWN_FLAGS = RESPONSE | PLAIN


class FrameError(ValueError):
    """A datagram that is not a frame; `reason` names the drop counter."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Frame:
    """One parsed datagram for the cold paths (bootstrap); `body` is as received."""

    __slots__ = ("flags", "command", "receiver_domain", "receiver_id", "sender_domain",
                 "sender_id", "timestamp", "message_id", "header", "body")

    def __init__(self, fields, data):
        (_, _, self.flags, self.command, self.receiver_domain, self.receiver_id,
         self.sender_domain, self.sender_id, self.timestamp, self.message_id) = fields
        self.header = data[:HEADER_SIZE]
        self.body = data[HEADER_SIZE:]


def parse(data):
    """The header fields of a datagram as a tuple (HEADER's order), or raise FrameError.

    A tuple rather than an object: this runs for every datagram.
    """
    size = len(data)
    if size < HEADER_SIZE or size > MAX_DATAGRAM:
        raise FrameError("malformed")
    fields = HEADER.unpack_from(data)
    if fields[0] != MAGIC:
        raise FrameError("malformed")
    if fields[1] != VERSION:
        raise FrameError("version")
    flags = fields[2]
    if flags & ~_KNOWN_FLAGS or (not flags & PLAIN and size < HEADER_SIZE + TAG_SIZE):
        raise FrameError("malformed")
    return fields


def counter_of(message_id):
    """The sender's counter: the first 8 bytes of a message id."""
    return COUNTER.unpack_from(message_id)[0]


class MessageIds:
    """Message ids: an 8-byte counter that only grows, then 4 random bytes.

    The counter starts from the clock in microseconds so it keeps growing across restarts; it
    is the AEAD nonce, so it must never repeat under one key.
    """

    def __init__(self, clock):
        self._counter = int(clock.seconds() * 1_000_000)
        # Random per process: two processes sharing one identity never share a nonce.
        self._random = os.urandom(4)

    def next(self):
        self._counter += 1
        return COUNTER.pack(self._counter) + self._random


def header(flags, command, receiver_domain, receiver_id, sender_domain, sender_id, timestamp,
           message_id):
    return HEADER.pack(MAGIC, VERSION, flags, command, receiver_domain, receiver_id,
                       sender_domain, sender_id, timestamp, message_id)


def seal(aead, head, payload):
    """Encrypt and authenticate `payload` under one peer key; the header is the AAD."""
    return head + aead.encrypt(head[84:96], payload, head)


def open_sealed(aead, message_id, data):
    """The payload of a sealed datagram, or None when it does not authenticate."""
    try:
        return aead.decrypt(message_id, data[HEADER_SIZE:], data[:HEADER_SIZE])
    except InvalidTag:
        return None


def plain(head, payload, pad_to=0):
    """A plain body: u16 payload length, payload, zero padding up to `pad_to` datagram bytes."""
    datagram = head + _PLAIN_LENGTH.pack(len(payload)) + payload
    if len(datagram) < pad_to:
        datagram += bytes(pad_to - len(datagram))
    return datagram


def plain_payload(body):
    """The payload of a plain body; the padding after it must be zeros."""
    if len(body) < 2:
        raise FrameError("malformed")
    size = _PLAIN_LENGTH.unpack_from(body)[0]
    if 2 + size > len(body) or body[2 + size:].count(0) != len(body) - 2 - size:
        raise FrameError("malformed")
    return body[2:2 + size]
