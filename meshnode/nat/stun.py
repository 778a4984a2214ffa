"""A STUN client (RFC 5389 Binding, RFC 5780 NAT behaviour discovery) that runs on a socket
it does not own: the RPC socket, so that the mapping it learns is the RPC port's.
"""

import collections
import os
import socket
import struct
import zlib

import attrs
from twisted.internet import defer

from meshnode.nat.rules import Behaviour
from meshnode.wire import DecodeError, Endpoint

MAGIC_COOKIE = 0x2112A442
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_HEADER = struct.Struct(">HHI12s")
_ATTRIBUTE = struct.Struct(">HH")
_ADDRESS = struct.Struct(">xBH")
_FINGERPRINT_XOR = 0x5354554E

_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101
_BINDING_ERROR = 0x0111

_MAPPED_ADDRESS = 0x0001
_CHANGE_REQUEST = 0x0003
_SOURCE_ADDRESS = 0x0004  # RFC 3489's RESPONSE-ORIGIN
_CHANGED_ADDRESS = 0x0005  # RFC 3489's OTHER-ADDRESS
_MESSAGE_INTEGRITY = 0x0008
_ERROR_CODE = 0x0009
_XOR_MAPPED_ADDRESS = 0x0020
_FINGERPRINT = 0x8028
_RESPONSE_ORIGIN = 0x802B
_OTHER_ADDRESS = 0x802C

# Comprehension-required attributes (below 0x8000) of RFC 3489, 5389 and 5780 that a Binding
# message may carry; any other one makes the message unusable (RFC 5389 §7.3).
_KNOWN_REQUIRED = frozenset({
    0x0001, 0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x0007, 0x0008, 0x0009, 0x000A, 0x000B,
    0x0014, 0x0015, 0x0020, 0x0026, 0x0027})

_CHANGE_IP = 0x04
_CHANGE_PORT = 0x02
_FAMILIES = {1: (socket.AF_INET, 4), 2: (socket.AF_INET6, 16)}
REASON_LIMIT = 763  # bytes of an ERROR-CODE reason phrase (RFC 5389 §15.6)


class StunDecodeError(DecodeError):
    """Bytes that are not a usable STUN Binding message; `reason` names the drop counter."""

    def __init__(self, detail, reason="stun_malformed"):
        super().__init__(detail)
        self.reason = reason


class StunError(Exception):
    """A Binding transaction that brought no mapped address."""


class StunTimeout(StunError):
    """No answer came before the transaction's deadline."""


class StunRefused(StunError):
    """The server answered with a Binding Error Response."""

    def __init__(self, code, reason, source):
        super().__init__(f"STUN server {source} refused: {code} {reason}")
        self.code = code
        self.reason = reason
        self.source = source


class StunStopped(StunError):
    """The client was stopped before an answer came."""


def _check_transaction_id(instance, attribute, value):
    if not isinstance(value, bytes) or len(value) != 12:
        raise ValueError("a transaction id is 12 bytes")


def _check_error_code(instance, attribute, value):
    if not 300 <= value <= 699:
        raise ValueError(f"{value} is not a STUN error code")


# -- codec ------------------------------------------------------------------------------------


def is_stun(data):
    """Whether a datagram is shaped like a STUN message: the first two bits zero, the magic
    cookie, and a length that is the rest of the datagram (RFC 5389 §6). RPC frames start
    with 'M' (0x4D), whose first two bits are not zero."""
    return (len(data) >= 20 and data[0] < 0x40 and data[4:8] == _COOKIE
            and (len(data) - 20) % 4 == 0 and int.from_bytes(data[2:4], "big") == len(data) - 20)


def _attribute(kind, value):
    return _ATTRIBUTE.pack(kind, len(value)) + value + bytes(-len(value) % 4)


def _message(kind, transaction_id, attributes):
    body = b"".join(attributes)
    return _HEADER.pack(kind, len(body), MAGIC_COOKIE, transaction_id) + body


def _address(endpoint, transaction_id=None):
    """An address attribute's value; XOR-ed (RFC 5389 §15.2) when given the transaction id."""
    if ":" in endpoint.host:
        family, packed = 2, socket.inet_pton(socket.AF_INET6, endpoint.host)
    else:
        family, packed = 1, socket.inet_pton(socket.AF_INET, endpoint.host)
    port = endpoint.port
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        packed = bytes(a ^ b for a, b in zip(packed, _COOKIE + transaction_id))
    return _ADDRESS.pack(family, port) + packed


def _read_address(value, transaction_id=None):
    if len(value) < 4:
        raise StunDecodeError("short address attribute")
    family, port = _ADDRESS.unpack_from(value)
    if family not in _FAMILIES:
        raise StunDecodeError(f"unknown address family {family}")
    af, size = _FAMILIES[family]
    packed = value[4:]
    if len(packed) != size:
        raise StunDecodeError(f"address attribute of {len(value)} bytes")
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        packed = bytes(a ^ b for a, b in zip(packed, _COOKIE + transaction_id))
    return Endpoint(socket.inet_ntop(af, packed), port)


@attrs.frozen
class BindingRequest:
    """Asks for the address the server sees; CHANGE-REQUEST (RFC 5780 §7.2) asks for the answer
    from the server's other IP and/or port."""

    transaction_id: bytes = attrs.field(validator=_check_transaction_id)
    change_ip: bool = False
    change_port: bool = False

    def encode(self):
        attributes = []
        if self.change_ip or self.change_port:
            flags = ((_CHANGE_IP if self.change_ip else 0)
                     | (_CHANGE_PORT if self.change_port else 0))
            attributes.append(_attribute(_CHANGE_REQUEST, flags.to_bytes(4, "big")))
        return _message(_BINDING_REQUEST, self.transaction_id, attributes)


@attrs.frozen
class BindingResponse:
    """A Binding Success Response: `mapped` is the requester's address as the server saw it,
    `other_address` the server's alternate address (RFC 5780), `response_origin` the address it
    answered from. `source` is where the datagram came from: set by the client, not on the wire."""

    transaction_id: bytes = attrs.field(validator=_check_transaction_id)
    mapped: Endpoint
    other_address: Endpoint | None = None
    response_origin: Endpoint | None = None
    source: Endpoint | None = None

    def encode(self):
        attributes = [_attribute(_XOR_MAPPED_ADDRESS, _address(self.mapped, self.transaction_id))]
        if self.other_address is not None:
            attributes.append(_attribute(_OTHER_ADDRESS, _address(self.other_address)))
        if self.response_origin is not None:
            attributes.append(_attribute(_RESPONSE_ORIGIN, _address(self.response_origin)))
        return _message(_BINDING_SUCCESS, self.transaction_id, attributes)


@attrs.frozen
class BindingErrorResponse:
    """A Binding Error Response: an ERROR-CODE (300 to 699) and its reason phrase."""

    transaction_id: bytes = attrs.field(validator=_check_transaction_id)
    code: int = attrs.field(validator=_check_error_code)
    reason: str = ""

    def encode(self):
        phrase = self.reason.encode("utf-8")
        if len(phrase) > REASON_LIMIT:
            raise ValueError(f"reason phrase over {REASON_LIMIT} bytes")
        value = bytes(2) + bytes([self.code // 100, self.code % 100]) + phrase
        return _message(_BINDING_ERROR, self.transaction_id, [_attribute(_ERROR_CODE, value)])


def _attributes(data):
    """The first value of each attribute type; checks FINGERPRINT, rejects unknown
    comprehension-required attributes, ignores what follows MESSAGE-INTEGRITY (§15.4)."""
    found = {}
    offset = 20
    integrity_seen = False
    while offset < len(data):
        kind, length = _ATTRIBUTE.unpack_from(data, offset)
        start = offset + 4
        end = start + length
        if end > len(data):
            raise StunDecodeError("attribute overruns the message")
        if kind == _FINGERPRINT:
            if end + (-length % 4) != len(data):
                raise StunDecodeError("FINGERPRINT is not the last attribute")
            expected = (zlib.crc32(data[:offset]) ^ _FINGERPRINT_XOR).to_bytes(4, "big")
            if data[start:end] != expected:
                raise StunDecodeError("FINGERPRINT does not match")
        elif not integrity_seen:
            if kind < 0x8000 and kind not in _KNOWN_REQUIRED:
                raise StunDecodeError(f"unknown comprehension-required attribute {kind:#06x}",
                                      "stun_unsupported")
            found.setdefault(kind, data[start:end])
            integrity_seen = kind == _MESSAGE_INTEGRITY
        offset = end + (-length % 4)
    return found


def decode(data):
    """The BindingRequest, BindingResponse or BindingErrorResponse in a datagram, or raise
    StunDecodeError (and nothing else)."""
    data = bytes(data)
    if not is_stun(data):
        raise StunDecodeError("not a STUN message")
    kind, _, _, transaction_id = _HEADER.unpack_from(data)
    if kind not in (_BINDING_REQUEST, _BINDING_SUCCESS, _BINDING_ERROR):
        raise StunDecodeError(f"message type {kind:#06x} is not a Binding request or response",
                              "stun_unsupported")
    found = _attributes(data)
    if kind == _BINDING_REQUEST:
        flags = found.get(_CHANGE_REQUEST, bytes(4))
        if len(flags) != 4:
            raise StunDecodeError("CHANGE-REQUEST is not 4 bytes")
        return BindingRequest(transaction_id, bool(flags[3] & _CHANGE_IP),
                              bool(flags[3] & _CHANGE_PORT))
    if kind == _BINDING_ERROR:
        return _error_response(transaction_id, found.get(_ERROR_CODE))
    if _XOR_MAPPED_ADDRESS in found:
        mapped = _read_address(found[_XOR_MAPPED_ADDRESS], transaction_id)
    elif _MAPPED_ADDRESS in found:
        mapped = _read_address(found[_MAPPED_ADDRESS])
    else:
        raise StunDecodeError("no mapped address")
    other = _optional_address(found, _OTHER_ADDRESS, _CHANGED_ADDRESS)
    origin = _optional_address(found, _RESPONSE_ORIGIN, _SOURCE_ADDRESS)
    return BindingResponse(transaction_id, mapped, other, origin)


def _optional_address(found, kind, legacy_kind):
    value = found.get(kind, found.get(legacy_kind))
    return None if value is None else _read_address(value)


def _error_response(transaction_id, value):
    if value is None or len(value) < 4:
        raise StunDecodeError("error response without an ERROR-CODE")
    error_class, number = value[2] & 0x07, value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunDecodeError(f"error code {error_class}/{number} out of range")
    try:
        reason = value[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise StunDecodeError("reason phrase is not UTF-8") from None
    return BindingErrorResponse(transaction_id, error_class * 100 + number, reason)


def _endpoint(address):
    """An Endpoint from an Endpoint or a (host, port, ...) tuple; IPv6 scope ids dropped."""
    if isinstance(address, Endpoint):
        return address
    return Endpoint(address[0].partition("%")[0], address[1])


# -- client -----------------------------------------------------------------------------------


class _Transaction:
    __slots__ = ("server", "request", "deferred", "deadline", "sends", "timer")

    def __init__(self, server, request, deadline):
        self.server = server
        self.request = request
        self.deadline = deadline
        self.deferred = None
        self.sends = 0
        self.timer = None


class StunClient:
    """Binding transactions over a datagram socket owned by someone else.

    The owner sends with `send(data, (host, port))` and hands every datagram it receives to
    `receive`, which consumes the STUN ones. Requests are retransmitted (RFC 5389 §7.2.1) after
    `rto` seconds, the interval doubling up to `max_rto`, at most `max_sends` times; a
    transaction fails with StunTimeout `timeout` seconds after its first send.
    """

    def __init__(self, send, clock, drops=None, *, rto=0.5, max_rto=1.0, max_sends=4,
                 timeout=3.0):
        self._send = send
        self._clock = clock
        self.drops = collections.Counter() if drops is None else drops
        self.rto = rto
        self.max_rto = max_rto
        self.max_sends = max_sends
        self.timeout = timeout
        self._pending = {}
        self._stopped = False

    def binding(self, server, change_ip=False, change_port=False, timeout=None):
        """A Deferred firing with the BindingResponse of `server` (an IP literal and port),
        from whatever address it comes; failing with StunTimeout, StunRefused or StunStopped."""
        if self._stopped:
            return defer.fail(StunStopped("the STUN client is stopped"))
        server = _endpoint(server)
        timeout = self.timeout if timeout is None else timeout
        transaction_id = os.urandom(12)
        while transaction_id in self._pending:
            transaction_id = os.urandom(12)
        transaction = _Transaction(server,
                                   BindingRequest(transaction_id, change_ip, change_port).encode(),
                                   self._clock.seconds() + timeout)
        d = transaction.deferred = defer.Deferred(lambda _: self._forget(transaction_id))
        self._pending[transaction_id] = transaction

        def timed_out(result, _):
            result.trap(defer.CancelledError)
            raise StunTimeout(f"no STUN answer from {server} in {timeout} s "
                              f"({transaction.sends} sends)")

        d.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        self._transmit(transaction_id)
        return d

    def _transmit(self, transaction_id):
        transaction = self._pending.get(transaction_id)
        if transaction is None:
            return
        transaction.timer = None
        transaction.sends += 1
        try:
            self._send(transaction.request, (transaction.server.host, transaction.server.port))
        except OSError:
            self.drops["stun_send_error"] += 1  # lost, as UDP loses; the retransmission may pass
        if transaction.sends >= self.max_sends:
            return
        delay = min(self.rto * 2 ** (transaction.sends - 1), self.max_rto)
        if self._clock.seconds() + delay < transaction.deadline:
            transaction.timer = self._clock.callLater(delay, self._transmit, transaction_id)

    def _forget(self, transaction_id):
        transaction = self._pending.pop(transaction_id, None)
        if transaction is not None and transaction.timer is not None:
            transaction.timer.cancel()
            transaction.timer = None
        return transaction

    def receive(self, data, source):
        """Consume a datagram from `source` if it is STUN: False when it is not (it belongs to
        the owner), True when it answered a transaction or was dropped and counted."""
        if not is_stun(data):
            return False
        try:
            message = decode(data)
        except StunDecodeError as e:
            self.drops[e.reason] += 1
            return True
        if isinstance(message, BindingRequest):
            self.drops["stun_not_response"] += 1
            return True
        try:
            source = _endpoint(source)
        except ValueError:
            self.drops["stun_bad_source"] += 1
            return True
        transaction = self._forget(message.transaction_id)
        if transaction is None:
            self.drops["stun_unmatched"] += 1  # late, duplicated or never asked for
            return True
        if isinstance(message, BindingErrorResponse):
            transaction.deferred.errback(StunRefused(message.code, message.reason, source))
        else:
            transaction.deferred.callback(attrs.evolve(message, source=source))
        return True

    def stop(self):
        """Fail every pending transaction with StunStopped, and every later one."""
        self._stopped = True
        pending, self._pending = self._pending, {}
        for transaction in pending.values():
            if transaction.timer is not None:
                transaction.timer.cancel()
            transaction.deferred.errback(StunStopped("the STUN client stopped"))


# -- NAT behaviour discovery ------------------------------------------------------------------


@attrs.frozen
class NatReport:
    """What discover() learned: the mapped endpoint (test I's), the server's alternate
    address, and the mapping and filtering behaviours."""

    mapped: Endpoint
    other_address: Endpoint | None
    mapping: Behaviour
    filtering: Behaviour


@defer.inlineCallbacks
def discover(client, server, local=()):
    """RFC 5780 §4.3 mapping and §4.4 filtering discovery against `server` through `client`.

    `local` are the socket's own endpoints, if known: a mapped endpoint among them means no
    NAT. Without an OTHER-ADDRESS (an RFC 5389-only server) the behaviours are unknown. The
    filtering tests run first: the mapping tests open the NAT to the server's other address.
    Fails as test I (a plain Binding) fails; a later test unanswered is part of the result.
    """
    server = _endpoint(server)
    first = yield client.binding(server)
    mapped, other = first.mapped, first.other_address
    mapping = None
    if mapped in {_endpoint(address) for address in local}:
        mapping = Behaviour.NO_NAT
    if other is None or other.host == server.host or other.port == server.port:
        return NatReport(mapped, other, mapping or Behaviour.UNKNOWN, Behaviour.UNKNOWN)
    try:
        filtering = yield _filtering(client, server)
    except StunRefused:
        filtering = Behaviour.UNKNOWN  # a server that does not do CHANGE-REQUEST
    if mapping is None:
        try:
            mapping = yield _mapping(client, server, other, mapped)
        except StunRefused:
            mapping = Behaviour.UNKNOWN
    return NatReport(mapped, other, mapping, filtering)


@defer.inlineCallbacks
def _answer(client, server, **change):
    """The BindingResponse, or None when none came in time."""
    try:
        response = yield client.binding(server, **change)
    except StunTimeout:
        return None
    return response


@defer.inlineCallbacks
def _filtering(client, server):
    # Tests II and III at once: neither request opens the NAT towards another source, so both
    # together tell what one after the other would, and a filter that wants the port (no
    # answer to either) costs one timeout, not two.
    changed, port_changed = yield defer.gatherResults(
        [_answer(client, server, change_ip=True, change_port=True),
         _answer(client, server, change_port=True)], consumeErrors=True).addErrback(
        lambda failure: failure.value.subFailure)
    # An answer from the source asked for passed the filter; one from the primary address
    # means the server ignored CHANGE-REQUEST, and says nothing.
    if changed is not None:
        if changed.source.host == server.host:
            return Behaviour.UNKNOWN
        return Behaviour.ENDPOINT_INDEPENDENT
    answer = port_changed
    if answer is None:
        return Behaviour.ADDRESS_AND_PORT_DEPENDENT
    if answer.source.host != server.host or answer.source.port == server.port:
        return Behaviour.UNKNOWN
    return Behaviour.ADDRESS_DEPENDENT


@defer.inlineCallbacks
def _mapping(client, server, other, mapped):
    second = yield _answer(client, Endpoint(other.host, server.port))
    if second is None:
        return Behaviour.UNKNOWN
    if second.mapped == mapped:
        return Behaviour.ENDPOINT_INDEPENDENT
    third = yield _answer(client, other)
    if third is None:
        return Behaviour.UNKNOWN
    if third.mapped == second.mapped:
        return Behaviour.ADDRESS_DEPENDENT
    return Behaviour.ADDRESS_AND_PORT_DEPENDENT
