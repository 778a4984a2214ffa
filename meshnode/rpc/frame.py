"""The datagram frame: the 96-byte header, sealing with ChaCha20-Poly1305, plain bodies.

Knows nothing of sockets or peers: it turns bytes into a Frame and back (DESIGN.md §4).
"""

import enum
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
_COUNTER = struct.Struct(">Q")


class Flag(enum.IntFlag):
    RESPONSE = 1
    PLAIN = 2


_KNOWN_FLAGS = int(Flag.RESPONSE | Flag.PLAIN)


class FrameError(ValueError):
    """A datagram that is not a frame; `reason` names the drop counter."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Frame:
    """One parsed datagram. `body` is still sealed unless the PLAIN flag is set."""

    __slots__ = ("flags", "command", "receiver_domain", "receiver_id", "sender_domain",
                 "sender_id", "timestamp", "message_id", "header", "body")

    def __init__(self, flags, command, receiver_domain, receiver_id, sender_domain, sender_id,
                 timestamp, message_id, header, body):
        self.flags = flags
        self.command = command
        self.receiver_domain = receiver_domain
        self.receiver_id = receiver_id
        self.sender_domain = sender_domain
        self.sender_id = sender_id
        self.timestamp = timestamp
        self.message_id = message_id
        self.header = header
        self.body = body

    @property
    def counter(self):
        return _COUNTER.unpack_from(self.message_id)[0]

    @property
    def is_plain(self):
        return bool(self.flags & Flag.PLAIN)

    @property
    def is_response(self):
        return bool(self.flags & Flag.RESPONSE)


def parse(data):
    """Split a datagram into header fields and body, or raise FrameError."""
    if len(data) < HEADER_SIZE or len(data) > MAX_DATAGRAM:
        raise FrameError("malformed")
    (magic, version, flags, command, receiver_domain, receiver_id, sender_domain, sender_id,
     timestamp, message_id) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("malformed")
    if version != VERSION:
        raise FrameError("version")
    if flags & ~_KNOWN_FLAGS:
        raise FrameError("malformed")
    if not flags & Flag.PLAIN and len(data) < HEADER_SIZE + TAG_SIZE:
        raise FrameError("malformed")
    return Frame(flags, command, receiver_domain, receiver_id, sender_domain, sender_id,
                 timestamp, message_id, data[:HEADER_SIZE], data[HEADER_SIZE:])


class MessageIds:
    """Message ids: an 8-byte counter that only grows, then 4 random bytes.

    The counter starts from the clock in microseconds so it keeps growing across restarts; it
    is the AEAD nonce, so it must never repeat under one key.
    """

    def __init__(self, clock):
        self._counter = int(clock.seconds() * 1_000_000)

    def next(self):
        self._counter += 1
        return _COUNTER.pack(self._counter) + os.urandom(4)


def header(flags, command, receiver_domain, receiver_id, sender_domain, sender_id, timestamp,
           message_id):
    return HEADER.pack(MAGIC, VERSION, flags, command, receiver_domain, receiver_id,
                       sender_domain, sender_id, timestamp, message_id)


def seal(aead, head, payload):
    """Encrypt and authenticate `payload` under one peer key; the header is the AAD."""
    return head + aead.encrypt(head[84:96], payload, head)


def open_sealed(aead, frame):
    """The payload of a sealed frame, or None when it does not authenticate."""
    try:
        return aead.decrypt(frame.message_id, frame.body, frame.header)
    except InvalidTag:
        return None


def plain(head, payload, pad_to=0):
    """A plain body: u16 payload length, payload, zero padding up to `pad_to` datagram bytes."""
    datagram = head + _PLAIN_LENGTH.pack(len(payload)) + payload
    if len(datagram) < pad_to:
        datagram += bytes(pad_to - len(datagram))
    return datagram


def plain_payload(frame):
    """The payload of a plain frame; the padding after it must be zeros."""
    body = frame.body
    if len(body) < 2:
        raise FrameError("malformed")
    size = _PLAIN_LENGTH.unpack_from(body)[0]
    if 2 + size > len(body) or body[2 + size:].count(0) != len(body) - 2 - size:
        raise FrameError("malformed")
    return body[2:2 + size]
