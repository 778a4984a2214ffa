"""Two connections joined into one stream, with flow control both ways (DESIGN.md §6.6).

Each side's transport is registered as the producer of the other's writes, so a slow reader
pauses the fast writer instead of buffering without bound (Twisted's producer/consumer). What
arrives before the two are joined is held, and the side is paused once that passes
EARLY_BUFFER bytes. A pair idle for `idle_timeout` seconds is closed; closing one side closes
the other once what it holds is written.
"""

from twisted.internet import protocol
from twisted.protocols import policies

EARLY_BUFFER = 65536
DEFAULT_IDLE_SECONDS = 600.0


class Leg(protocol.Protocol, policies.TimeoutMixin):
    """One side of a spliced pair. Subclasses call `forward(data)` with what they receive
    for the other side (after their own framing, if any) and may override `left()`."""

    other = None
    idle_timeout = DEFAULT_IDLE_SECONDS
    _early = None
    _closed = False
    bytes_forwarded = 0

    def join(self, other):
        """Splice this leg with `other` (both connected)."""
        self.other, other.other = other, self
        for leg in (self, other):
            leg.transport.registerProducer(leg.other.transport, True)
            leg.setTimeout(leg.idle_timeout)
            early, leg._early = leg._early, None
            if early:
                leg.other.transport.write(b"".join(early))
                leg.transport.resumeProducing()
            if leg._closed:
                leg.other.transport.loseConnection()

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
        self.other.transport.write(data)

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self._closed = True
        self.setTimeout(None)
        if self.other is not None:
            self.other.transport.unregisterProducer()
            self.other.transport.loseConnection()
        self.left()

    def left(self):
        """Called once this side's connection is gone."""
