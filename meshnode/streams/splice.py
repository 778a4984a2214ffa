"""Two connections joined into one stream, with flow control both ways (DESIGN.md §6.6).

Each side's transport is registered as the producer of the other's writes, so a slow reader
pauses the fast writer instead of buffering without bound (Twisted's producer/consumer). What
arrives before the two are joined is held, and the side is paused once that passes
EARLY_BUFFER bytes. A pair idle for `idle_timeout` seconds is closed; closing one side closes
the other once what it holds is written. Half-close is carried through: a side that ends its
stream (TCP FIN) ends the other's, which can still answer — over TCP as a FIN of its own, and
inside TLS (which Twisted cannot half-close) as a zero-length frame of FramedLeg.
"""

import struct

from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols import policies
from zope.interface import implementer

EARLY_BUFFER = 65536
DEFAULT_IDLE_SECONDS = 600.0
FRAME_HEADER = struct.Struct(">I")
FRAME_LIMIT = 1 << 20


@implementer(IHalfCloseableProtocol)
class Leg(protocol.Protocol, policies.TimeoutMixin):
    """One side of a spliced pair. Subclasses call `forward(data)` with what they receive
    for the other side (after their own framing, if any) and may override `left()`."""

    other = None
    idle_timeout = DEFAULT_IDLE_SECONDS
    _early = None
    _closed = False
    _ended_in = False  # the peer ended its stream to us
    _ended_out = False  # we ended our stream to the peer
    bytes_forwarded = 0

    def join(self, other):
        """Splice this leg with `other` (both connected)."""
        self.other, other.other = other, self
        for leg in (self, other):
            leg.transport.registerProducer(leg.other.transport, True)
            leg.setTimeout(leg.idle_timeout)
            early, leg._early = leg._early, None
            if early:
                leg.other.send(b"".join(early))
                leg.transport.resumeProducing()
            if leg._closed:
                leg.other.transport.loseConnection()
            elif leg._ended_in:
                leg.other.end()

    def forward(self, data):
        self.bytes_forwarded += len(data)
        if self.other is None:
            if self._early is None:
                self._early = []
            self._early.append(data)
            if sum(map(len, self._early)) > EARLY_BUFFER:
                self.transport.pauseProducing()
            return
        self.resetTimeout()
        self.other.resetTimeout()
        self.other.send(data)

    def send(self, data):
        """Write what the other side forwarded."""
        self.transport.write(data)

    def end(self):
        """The other side's stream ended: end ours to the peer."""
        self._ended_out = True
        self.send_end()
        if self._ended_in:
            self.transport.loseConnection()

    def send_end(self):
        # Nothing more comes from the other side: its transport stops being our producer
        # (a paused producer would keep Twisted from ever sending the FIN) and reads on.
        self.transport.unregisterProducer()
        if self.other is not None:
            self.other.transport.resumeProducing()
        self.transport.loseWriteConnection()

    def ended(self):
        """Our peer ended its stream to us: pass the end on."""
        self._ended_in = True
        if self.other is not None:
            self.other.end()
        if self._ended_out:
            self.transport.loseConnection()

    def readConnectionLost(self):
        self.ended()

    def writeConnectionLost(self):
        pass

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self._closed = True
        self.setTimeout(None)
        if self.other is not None and not self.other._closed:
            # (A TLS transport already gone has no producer to unregister: it would raise.)
            self.other.transport.unregisterProducer()
            self.other.transport.loseConnection()
        self.left()

    def left(self):
        """Called once this side's connection is gone."""


class FramedLeg(Leg):
    """A leg over TLS: the stream is carried in length-prefixed frames, and a zero-length
    frame ends it (half-close). Subclasses call `deframe(data)` with the TLS plaintext."""

    _pending = ()  # the start of a frame not complete yet, in chunks
    _pending_size = 0
    _needed = 0  # bytes that frame needs in all

    def send(self, data):
        if data:
            self.transport.writeSequence([FRAME_HEADER.pack(len(data)), data])

    def send_end(self):
        self.transport.write(FRAME_HEADER.pack(0))

    def deframe(self, data):
        """Forward the frames in `data`; a frame cut across reads is joined once, when
        complete (each byte is copied once on the way)."""
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._needed:
                return
            data = b"".join(self._pending)
            self._pending, self._pending_size = (), 0
        offset, end = 0, len(data)
        while True:
            if end - offset < FRAME_HEADER.size:
                needed = FRAME_HEADER.size
                break
            size = FRAME_HEADER.unpack_from(data, offset)[0]
            if size > FRAME_LIMIT:
                self.transport.abortConnection()
                return
            if end - offset - FRAME_HEADER.size < size:
                needed = FRAME_HEADER.size + size
                break
            start = offset + FRAME_HEADER.size
            offset = start + size
            if size:
                self.forward(data[start:offset])
            elif not self._ended_in:
                self.ended()
        if offset < end:
            self._pending = [data[offset:]]
            self._pending_size = end - offset
            self._needed = needed
