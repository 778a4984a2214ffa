"""Canonical binary encoding shared by records and RPC messages.

Fixed-width big-endian integers, length-prefixed byte strings and lists with hard upper
bounds; a reader that rejects truncation, overlong lists and trailing bytes with one typed error.
"""

import socket
import struct

import attrs


class DecodeError(ValueError):
    """Bytes that are not a canonical encoding of what was expected."""


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Writer:
    """Appends canonical fields to a byte buffer."""

    def __init__(self):
        self._parts = []

    def u8(self, value):
        self._parts.append(_U8.pack(value))
        return self

    def u16(self, value):
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value):
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value):
        self._parts.append(_U64.pack(value))
        return self

    def fixed(self, value, size):
        if len(value) != size:
            raise ValueError(f"expected {size} bytes, got {len(value)}")
        self._parts.append(bytes(value))
        return self

    def blob(self, value, limit):
        """A u16 length then the bytes; `limit` is the largest length allowed."""
        if len(value) > limit:
            raise ValueError(f"{len(value)} bytes is over the limit of {limit}")
        self._parts.append(_U16.pack(len(value)))
        self._parts.append(bytes(value))
        return self

    def text(self, value, limit):
        return self.blob(value.encode("utf-8"), limit)

    def items(self, values, limit, write_one):
        """A u16 count then each item written by `write_one(writer, item)`."""
        if len(values) > limit:
            raise ValueError(f"{len(values)} items is over the limit of {limit}")
        self._parts.append(_U16.pack(len(values)))
        for value in values:
            write_one(self, value)
        return self

    def endpoint(self, value):
        value.write(self)
        return self

    def bytes(self):
        return b"".join(self._parts)


class Reader:
    """Reads canonical fields, raising DecodeError on anything out of shape."""

    def __init__(self, data, offset=0):
        self._data = data
        self._offset = offset

    def _take(self, size):
        end = self._offset + size
        if end > len(self._data):
            raise DecodeError("truncated")
        chunk = self._data[self._offset:end]
        self._offset = end
        return chunk

    def u8(self):
        return self._take(1)[0]

    def u16(self):
        return _U16.unpack(self._take(2))[0]

    def u32(self):
        return _U32.unpack(self._take(4))[0]

    def u64(self):
        return _U64.unpack(self._take(8))[0]

    def fixed(self, size):
        return bytes(self._take(size))

    def blob(self, limit):
        size = self.u16()
        if size > limit:
            raise DecodeError(f"length {size} over the limit of {limit}")
        return bytes(self._take(size))

    def text(self, limit):
        raw = self.blob(limit)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("text is not UTF-8") from None

    def items(self, limit, read_one):
        count = self.u16()
        if count > limit:
            raise DecodeError(f"{count} items over the limit of {limit}")
        return [read_one(self) for _ in range(count)]

    def endpoint(self):
        return Endpoint.read(self)

    def rest(self):
        chunk = bytes(self._data[self._offset:])
        self._offset = len(self._data)
        return chunk

    @property
    def offset(self):
        return self._offset

    def end(self):
        """Assert that every byte was read: canonical encodings have no trailing bytes."""
        if self._offset != len(self._data):
            raise DecodeError(f"{len(self._data) - self._offset} trailing bytes")


_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _packed(host):
    """(4 or 6, the address's bytes) of an IP address in text; ValueError if it is none."""
    for version, family in _FAMILIES.items():
        try:
            return version, socket.inet_pton(family, host)
        except (OSError, TypeError, ValueError):
            continue
    raise ValueError(f"{host!r} is not an IP address")


def _canonical_host(value):
    # inet_pton/inet_ntop rather than ipaddress: one spelling per address, several times faster
    if not isinstance(value, str) or "%" in value:
        raise ValueError(f"{value!r} is not an unscoped IP address")
    version, packed = _packed(value)
    return socket.inet_ntop(_FAMILIES[version], packed)


def _check_port(instance, attribute, value):
    if not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{value!r} is not a port number")


@attrs.frozen
class Endpoint:
    """An IP address (canonical spelling) and port: family (4 or 6), address bytes, port."""

    host: str = attrs.field(converter=_canonical_host)
    port: int = attrs.field(validator=_check_port)

    def write(self, writer):
        version, packed = _packed(self.host)
        writer.u8(version).fixed(packed, len(packed)).u16(self.port)

    @classmethod
    def read(cls, reader):
        version = reader.u8()
        if version not in _FAMILIES:
            raise DecodeError(f"unknown address family {version}")
        host = socket.inet_ntop(_FAMILIES[version], reader.fixed(4 if version == 4 else 16))
        return cls(host, reader.u16())

    def __str__(self):
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"
